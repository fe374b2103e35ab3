"""Start and stop the team's MLflow tracking server on PostgreSQL (make server, server-stop).

One server per port, each in its own folder ``<folder>/<port>/`` (``.server/5000/`` by
default, git-ignored), created on first use:

    pgdata/        the PostgreSQL cluster (initdb on first use; database ``mlflow``)
    run/           PostgreSQL's unix socket, its only way in: it listens on no TCP port
    artifacts/     the runs' artifacts, proxied by the server (``mlflow-artifacts:/...``),
                   so clients need no storage credentials
    postgres.log, mlflow.log       the two daemons' logs
    postgres.pid, mlflow.pid       their process ids, which ``stop`` signals
    server.json    where the server listens (its tracking URI)

PostgreSQL needs no port of its own (``listen_addresses = ''``, a socket in ``run/``), so
two servers on different ports never collide. As root, PostgreSQL runs as the ``postgres``
user (it refuses to run as root), which then owns ``pgdata/`` and ``run/``; local
connections are trusted, and ``run/`` (mode 0700) lets nobody else reach the socket.
``mlflow server`` runs with one uvicorn worker (with more, every reused connection stalls
~40 ms) and without job execution (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: ~1.4 GB
less memory, 15 s faster start-up). Both daemons run in sessions of their own, so they
outlive the command that started them. Nothing here imports MLflow: the server is a
subprocess. The CLI, which the Makefile calls::

    python -m src.tracking_server start|stop|status [--host H] [--port P] [--folder F]

For a human: ``psql -h .server/5000/run -U postgres mlflow`` opens the database.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = PROJECT_ROOT / ".server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
START_TIMEOUT = 120.0  # seconds for each daemon to come up (a first start migrates the DB)
STOP_TIMEOUT = 30.0  # seconds for each daemon to shut down before it is killed
DATABASE = "mlflow"
PG_USER = "postgres"  # the OS user that runs PostgreSQL when we are root; the DB superuser
PG_PORT = 5432  # names the socket file (run/.s.PGSQL.5432) only: there is no TCP port
MAX_SOCKET_PATH = 107  # bytes in a unix socket's path (sun_path), Linux
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "localhost"}  # reached through 127.0.0.1
LOG_TAIL_LINES = 15

# The daemons this process started, kept so that they are reaped (not left zombies) when they
# end, and so that a test process can tell their end at once.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServerError(Exception):
    """A failure a user can hit: the CLI prints it as one line ``error: ...`` (and, when a
    daemon died, the last lines of its log after it)."""

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.details = list(details)


@dataclass(frozen=True)
class ServerInfo:
    """A running server: where clients go, where it keeps things, its two process ids."""

    uri: str  # the tracking URI: http://127.0.0.1:5000
    host: str
    port: int
    folder: Path  # this server's own folder, <folder>/<port>
    mlflow_pid: int
    postgres_pid: int
    backend_store_uri: str
    started: bool  # False when it was running already

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"


# ---------------------------------------------------------------- the public functions


def instance_dir(folder: Path | str, port: int) -> Path:
    """The folder of the server on ``port``: ``<folder>/<port>``."""
    return Path(folder).resolve() / str(port)


def tracking_uri(host: str, port: int) -> str:
    """The URI clients use for a server listening on ``host``: a wildcard host is reached
    through 127.0.0.1."""
    return f"http://{_url_host(_probe_host(host))}:{port}"


def backend_store_uri(folder: Path | str, port: int) -> str:
    """The SQLAlchemy URI of the server's database: psycopg 3 over the cluster's socket."""
    socket_dir = quote(str(instance_dir(folder, port) / "run"), safe="/")
    return f"postgresql+psycopg://{PG_USER}@/{DATABASE}?host={socket_dir}&port={PG_PORT}"


def status(folder: Path | str = DEFAULT_FOLDER, port: int = DEFAULT_PORT) -> ServerInfo | None:
    """The server on ``port`` if both of its daemons are alive, else None."""
    inst = instance_dir(folder, port)
    mlflow_pid, postgres_pid = _mlflow_pid(inst), _postgres_pid(inst)
    if mlflow_pid is None or postgres_pid is None:
        return None
    return _info(inst, port, mlflow_pid, postgres_pid, started=False)


def is_running(folder: Path | str = DEFAULT_FOLDER, port: int = DEFAULT_PORT) -> bool:
    """Whether the server on ``port`` (both its mlflow server and its PostgreSQL) is up."""
    return status(folder, port) is not None


def start(
    folder: Path | str = DEFAULT_FOLDER,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    timeout: float = START_TIMEOUT,
) -> ServerInfo:
    """Start the server on ``host:port`` (PostgreSQL first, created on first use), and return
    once it answers on /health. If it is running already, return it (``started=False``);
    if only one of its daemons is left, that one is stopped and both start afresh. Raises
    ServerError (with nothing left running) when it cannot start."""
    inst = instance_dir(folder, port)
    fresh = not inst.exists()
    _make_dirs(inst)
    try:
        with _locked(inst):
            running = status(folder, port)
            if running is not None:
                return running
            _stop_locked(inst)  # the half of a server that lost its other half, if any
            _check_port_free(host, port)
            bindir = find_pg_bindir(log=inst / "apt-get.log")
            account = _pg_account()
            try:
                postgres_pid = _start_postgres(bindir, inst, account, timeout)
                _ensure_database(bindir, inst)
                mlflow_pid = _start_mlflow(inst, host, port, timeout)
            except BaseException:
                _stop_locked(inst)
                raise
            (inst / "server.json").write_text(
                json.dumps({"host": host, "port": port, "uri": tracking_uri(host, port)}) + "\n"
            )
            return _info(inst, port, mlflow_pid, postgres_pid, started=True)
    except ServerError:
        if fresh and {p.name for p in inst.iterdir()} <= {".lock"}:
            shutil.rmtree(inst, ignore_errors=True)  # a start that did nothing leaves nothing
        raise


def stop(
    folder: Path | str = DEFAULT_FOLDER, port: int = DEFAULT_PORT, timeout: float = STOP_TIMEOUT
) -> bool:
    """Stop the server on ``port``: the mlflow server (SIGTERM, its process group), then
    PostgreSQL (SIGINT, a fast shutdown); each is killed if it outlasts ``timeout``. Returns
    whether anything was running."""
    inst = instance_dir(folder, port)
    if not inst.is_dir():
        return False
    with _locked(inst):
        return _stop_locked(inst, timeout)


def find_pg_bindir(install: bool = True, log: Path | None = None) -> Path:
    """The folder of PostgreSQL's server programs: ``pg_config --bindir``, else the newest
    /usr/lib/postgresql/*/bin, else the one of ``postgres`` on PATH. If there is none,
    Debian's ``postgresql`` package is installed when we are root and ``install`` is true
    (apt-get's output to ``log``)."""
    for bindir in _pg_bindir_candidates():
        if all((bindir / name).is_file() for name in ("postgres", "initdb", "pg_isready")):
            return bindir
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_postgresql(log or Path("/tmp/tracking-server-apt-get.log"))
        return find_pg_bindir(install=False)
    raise ServerError(
        "PostgreSQL's server programs (postgres, initdb) are not installed: install PostgreSQL "
        "(Debian/Ubuntu: apt-get install postgresql), or run `make server` as root to have "
        "it installed"
    )


# ---------------------------------------------------------------- PostgreSQL


def _pg_bindir_candidates() -> Iterator[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                yield Path(out)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    yield from sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    on_path = shutil.which("postgres")
    if on_path:
        yield Path(on_path).resolve().parent


def _install_postgresql(log: Path) -> None:
    """apt-get install postgresql, starting no service: Debian's package creates a cluster
    of its own and would start it; we use neither (a policy-rc.d, while apt-get runs, says
    no to every service start, unless the machine has one already)."""
    print("PostgreSQL is not installed: installing Debian's postgresql package ...", flush=True)
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if ours:
            policy.write_text("#!/bin/sh\n# src.tracking_server: start no service\nexit 101\n")
            policy.chmod(0o755)
        with log.open("wb") as out:
            for command in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
                done = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    check=False,
                )
                if done.returncode != 0:
                    raise ServerError(
                        f"could not install PostgreSQL: `{' '.join(command)}` exited with "
                        f"code {done.returncode} (see {log}); install PostgreSQL by hand",
                        _tail(log),
                    )
    except OSError as error:
        raise ServerError(f"could not install PostgreSQL: {error}") from error
    finally:
        if ours:
            policy.unlink(missing_ok=True)


def _pg_account() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: ``postgres`` when we are root, else our own (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        raise ServerError(
            f"running as root, but there is no '{PG_USER}' user to run PostgreSQL as (it "
            "refuses to run as root): install Debian's postgresql package, or create the user"
        ) from None


def _as(account: pwd.struct_passwd | None) -> dict:
    """Popen's arguments to run a program as ``account`` (nothing for ourselves)."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _pg_env(account: pwd.struct_passwd | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if account is not None:
        env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    return env


def _owned_dir(path: Path, account: pwd.struct_passwd | None) -> None:
    """A folder of PostgreSQL's own, mode 0700, owned by the account it runs as."""
    path.mkdir(mode=0o700, exist_ok=True)
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(0o700)


def _init_cluster(bindir: Path, inst: Path, account: pwd.struct_passwd | None) -> None:
    """Create the cluster in pgdata/ unless it is there (initdb, as PostgreSQL's user)."""
    pgdata, run = inst / "pgdata", inst / "run"
    socket_path = run / f".s.PGSQL.{PG_PORT}"
    if len(str(socket_path).encode()) > MAX_SOCKET_PATH:
        raise ServerError(
            f"the folder's path is too long for PostgreSQL's unix socket ({socket_path}): "
            "choose a shorter --folder (SERVER_DIR)"
        )
    _owned_dir(run, account)
    if (pgdata / "PG_VERSION").is_file():
        return
    if pgdata.exists():  # the remains of an initdb that failed
        shutil.rmtree(pgdata)
    _owned_dir(pgdata, account)
    reachable = subprocess.run(
        ["test", "-w", str(pgdata), "-a", "-w", str(run)], cwd="/", check=False, **_as(account)
    )
    if reachable.returncode != 0:
        who = account.pw_name if account else "this user"
        raise ServerError(
            f"{who} cannot reach {pgdata}: make {inst} and the folders above it traversable "
            "(chmod o+x), or choose another --folder (SERVER_DIR)"
        )
    log = inst / "initdb.log"
    with log.open("wb") as out:
        done = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                PG_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=inst,
            env=_pg_env(account),
            check=False,
            **_as(account),
        )
    if done.returncode != 0:
        raise ServerError(
            f"initdb failed (exit code {done.returncode}) in {pgdata}; the end of {log}:",
            _tail(log),
        )


def _start_postgres(
    bindir: Path, inst: Path, account: pwd.struct_passwd | None, timeout: float
) -> int:
    """Start PostgreSQL on the cluster (made on first use); return its pid once it accepts
    connections on its socket."""
    _init_cluster(bindir, inst, account)
    pgdata, run, log = inst / "pgdata", inst / "run", inst / "postgres.log"
    command = [
        str(bindir / "postgres"),
        "-D",
        str(pgdata),
        "-p",
        str(PG_PORT),
        "-c",
        "listen_addresses=",
        "-c",
        f"unix_socket_directories={run}",
    ]
    process = _spawn(command, log, cwd=inst, env=_pg_env(account), **_as(account))
    (inst / "postgres.pid").write_text(f"{process.pid}\n")
    ready = [str(bindir / "pg_isready"), "-q", "-h", str(run), "-p", str(PG_PORT), "-U", PG_USER]
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerError(
                f"PostgreSQL exited with code {process.returncode} on start-up; the end of {log}:",
                _tail(log, since=process.log_offset),  # type: ignore[attr-defined]
            )
        done = subprocess.run(ready, env=_pg_env(None), check=False, timeout=30)
        if done.returncode == 0:
            return process.pid
        if time.monotonic() > deadline:
            raise ServerError(f"PostgreSQL did not start within {timeout:.0f} s; see {log}")
        time.sleep(0.1)


def _ensure_database(bindir: Path, inst: Path) -> None:
    """Create the database ``mlflow`` unless it exists."""
    connect = ["-h", str(inst / "run"), "-p", str(PG_PORT), "-U", PG_USER]
    query = f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
    found = subprocess.run(
        [str(bindir / "psql"), "-X", *connect, "-d", "postgres", "-Atqc", query],
        capture_output=True,
        text=True,
        env=_pg_env(None),
        check=False,
        timeout=60,
    )
    if found.returncode == 0 and found.stdout.strip() == "1":
        return
    made = subprocess.run(
        [str(bindir / "createdb"), *connect, DATABASE],
        capture_output=True,
        text=True,
        env=_pg_env(None),
        check=False,
        timeout=60,
    )
    if made.returncode != 0:
        reason = (made.stderr or found.stderr).strip().splitlines() or ["no output"]
        raise ServerError(f"could not create the database '{DATABASE}': {reason[-1]}")


# ---------------------------------------------------------------- mlflow server


def _start_mlflow(inst: Path, host: str, port: int, timeout: float) -> int:
    """Start ``mlflow server`` on the database; return its pid once /health answers."""
    log = inst / "mlflow.log"
    artifacts = inst / "artifacts"
    artifacts.mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri(inst.parent, port),
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # a client's setting (maybe this very server)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    process = _spawn(command, log, cwd=inst, env=env)
    (inst / "mlflow.pid").write_text(f"{process.pid}\n")
    url = f"{tracking_uri(host, port)}/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy: local
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerError(
                f"mlflow server exited with code {process.returncode} on start-up; "
                f"the end of {log}:",
                _tail(log, since=process.log_offset),  # type: ignore[attr-defined]
            )
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            with opener.open(url, timeout=5) as answer:
                if answer.status == 200:
                    return process.pid
        if time.monotonic() > deadline:
            raise ServerError(
                f"mlflow server did not answer on {url} within {timeout:.0f} s; the end of {log}:",
                _tail(log, since=process.log_offset),  # type: ignore[attr-defined]
            )
        time.sleep(0.2)


def _check_port_free(host: str, port: int) -> None:
    """Fail unless ``host:port`` can be listened on (as uvicorn will: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"port {port} on {host} is already in use by another program: stop it, "
                    "or choose another port (make server SERVER_PORT=...)"
                ) from None
            raise ServerError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ---------------------------------------------------------------- processes


def _spawn(command: list[str], log: Path, **kwargs) -> subprocess.Popen[bytes]:
    """Start a daemon in a session of its own (so it outlives ``make``), its output appended
    to ``log``; ``log_offset`` on the result is where its output begins there."""
    with log.open("ab") as out:
        out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        out.flush()
        offset = out.tell()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
    process.log_offset = offset  # type: ignore[attr-defined]
    _CHILDREN[process.pid] = process
    return process


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has ended)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    state = _stat(pid)
    return state is not None and state[0] not in "ZX"


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and process group, from /proc (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2])


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _mlflow_pid(inst: Path) -> int | None:
    """The pid of the mlflow server in ``inst``, if it is alive (and is that server)."""
    pid = _read_pid(inst / "mlflow.pid")
    if pid is None or not _alive(pid):
        return None
    return pid if str(inst / "artifacts") in _cmdline(pid) else None


def _postgres_pid(inst: Path) -> int | None:
    """The pid of the PostgreSQL of ``inst``, if it is alive: from postgres.pid, else from
    the cluster's own postmaster.pid."""
    pgdata = inst / "pgdata"
    for pid_file in (inst / "postgres.pid", pgdata / "postmaster.pid"):
        pid = _read_pid(pid_file)
        if pid is not None and _alive(pid) and str(pgdata) in _cmdline(pid):
            return pid
    return None


def _group(pgid: int, word: str) -> list[int]:
    """The live processes of process group ``pgid`` whose command line holds ``word``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _stat(int(entry.name))
            if (
                state
                and state[1] == pgid
                and state[0] not in "ZX"
                and word in _cmdline(int(entry.name))
            ):
                found.append(int(entry.name))
    return found


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _end(pids: list[int], signum: int, timeout: float) -> None:
    """Signal ``pids``, wait for them to end, kill what is left."""
    _signal(pids, signum)
    if not _wait_gone(pids, timeout):
        _signal(pids, signal.SIGKILL)
        _wait_gone(pids, 10)


def _stop_locked(inst: Path, timeout: float = STOP_TIMEOUT) -> bool:
    stopped = False
    # mlflow server: its own process and the uvicorn it started (it forwards SIGTERM to it);
    # any process of its group left over (its parent killed) goes too.
    mlflow_pid = _mlflow_pid(inst)
    recorded = _read_pid(inst / "mlflow.pid")
    group = _group(recorded, "mlflow") if recorded else []
    pids = sorted({*([mlflow_pid] if mlflow_pid else []), *group})
    if pids:
        _end(pids, signal.SIGTERM, timeout)
        stopped = True
    # PostgreSQL: SIGINT is its fast shutdown (clients disconnected, a clean checkpoint);
    # SIGQUIT its immediate one.
    postgres_pid = _postgres_pid(inst)
    if postgres_pid:
        _signal([postgres_pid], signal.SIGINT)
        if not _wait_gone([postgres_pid], timeout):
            _end([postgres_pid], signal.SIGQUIT, 10)
        stopped = True
    for name in ("mlflow.pid", "postgres.pid"):
        (inst / name).unlink(missing_ok=True)
    return stopped


@contextlib.contextmanager
def _locked(inst: Path) -> Iterator[None]:
    """One start or stop of a server at a time (``make server`` run twice at once)."""
    with (inst / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------- helpers


def _make_dirs(path: Path) -> None:
    """Make ``path`` and its missing parents, each readable and traversable by all (so that
    PostgreSQL's user reaches its folders inside)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)


def _tail(log: Path, since: int = 0, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with log.open("rb") as file:
            file.seek(since)
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _info(inst: Path, port: int, mlflow_pid: int, postgres_pid: int, started: bool) -> ServerInfo:
    try:
        host = json.loads((inst / "server.json").read_text())["host"]
    except (OSError, ValueError, KeyError, TypeError):
        host = DEFAULT_HOST
    return ServerInfo(
        uri=tracking_uri(host, port),
        host=host,
        port=port,
        folder=inst,
        mlflow_pid=mlflow_pid,
        postgres_pid=postgres_pid,
        backend_store_uri=backend_store_uri(inst.parent, port),
        started=started,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.tracking_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    env = os.environ
    parser.add_argument(
        "--host",
        default=env.get("SERVER_HOST") or DEFAULT_HOST,
        help="where the server listens (default: 127.0.0.1; SERVER_HOST)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env.get("SERVER_PORT") or DEFAULT_PORT),
        help="its port (default: 5000; SERVER_PORT)",
    )
    parser.add_argument(
        "--folder",
        type=Path,
        default=Path(env.get("SERVER_DIR") or DEFAULT_FOLDER),
        help="where the servers keep everything, one folder per port "
        "(default: .server; SERVER_DIR)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT,
        help="seconds to wait for each daemon to start",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            info = start(args.folder, args.host, args.port, args.timeout)
            if info.started:
                print(
                    f"MLflow tracking server started on {info.uri} (pids: mlflow "
                    f"{info.mlflow_pid}, postgres {info.postgres_pid}; logs in {info.folder})"
                )
            else:
                note = (
                    ""
                    if info.host == args.host
                    else (f"; it listens on {info.host}, not {args.host}: stop it to change that")
                )
                print(
                    f"MLflow tracking server already running on {info.uri} (pids: mlflow "
                    f"{info.mlflow_pid}, postgres {info.postgres_pid}){note}"
                )
            print(f"export MLFLOW_TRACKING_URI={info.uri}")
        elif args.command == "stop":
            if stop(args.folder, args.port):
                print(f"stopped the MLflow tracking server on port {args.port} and its PostgreSQL")
            else:
                print(f"no MLflow tracking server is running on port {args.port}")
        else:
            info = status(args.folder, args.port)
            if info is None:
                print(f"no MLflow tracking server is running on port {args.port}")
                return 1
            print(
                f"MLflow tracking server running on {info.uri} (pids: mlflow "
                f"{info.mlflow_pid}, postgres {info.postgres_pid}; logs in {info.folder})"
            )
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        for line in error.details:
            print(f"  | {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
