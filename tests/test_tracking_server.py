"""The team's tracking server (src/tracking_server.py, ``make server``): real PostgreSQL and
mlflow server processes, on 127.0.0.1 and free ports, in temporary folders; most tests share
the session's server (the ``tracking_server`` fixture of conftest.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from src import tracking_server as ts
from tests.conftest import PROJECT_ROOT, TrackingServer, free_port


def health(uri: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{uri}/health", timeout=10) as answer:
        return answer.read().decode()


def ended(pid: int) -> bool:
    """Whether process ``pid`` is gone (a zombie, which this machine's init may not reap,
    has ended too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in "ZX"


def group_left(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (a daemon's session: its children)."""
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                left.append(int(entry.name))
    return left


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "src.tracking_server", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder PostgreSQL's user can reach (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="mlflow-server-test-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_server_keeps_runs_in_postgres_and_proxies_artifacts(
    tracking_server: TrackingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    info = tracking_server.start()
    assert health(tracking_server.uri) == "OK"

    client = MlflowClient(tracking_server.uri)
    experiment_id = client.create_experiment(f"server-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric("loss", 1.0 / (step + 1), now, step) for step in range(1000)],
        params=[Param("lr", "0.1"), Param("model", "logistic")],
    )
    (tmp_path / "note.txt").write_text("kept by the server\n")
    client.log_artifact(run_id, str(tmp_path / "note.txt"), "notes")
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "model": "logistic"}
    assert run.data.metrics == {"loss": pytest.approx(1.0 / 1000)}
    assert len(client.get_metric_history(run_id, "loss")) == 1000
    # Artifacts are proxied: the client knows only the server, the files are in its folder.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    back = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "back"))
    assert Path(back).read_text() == "kept by the server\n"
    assert [p.read_text() for p in info.artifacts.rglob("note.txt")] == ["kept by the server\n"]

    # ... and the runs in PostgreSQL's database.
    import psycopg

    with psycopg.connect(host=str(info.folder / "run"), dbname="mlflow", user="postgres") as db:
        (count,) = db.execute(
            "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)
        ).fetchone()
    assert count == 1000


def test_starting_twice_starts_no_second_server(tracking_server: TrackingServer) -> None:
    first = tracking_server.start()
    again = ts.start(tracking_server.folder, "127.0.0.1", tracking_server.port)
    assert not again.started
    assert (again.mlflow_pid, again.postgres_pid) == (first.mlflow_pid, first.postgres_pid)

    done = cli(
        "start", "--port", str(tracking_server.port), "--folder", str(tracking_server.folder)
    )
    assert done.returncode == 0, done.stderr
    assert "already running" in done.stdout
    assert f"export MLFLOW_TRACKING_URI={tracking_server.uri}" in done.stdout
    status = ts.status(tracking_server.folder, tracking_server.port)
    assert status is not None
    assert (status.mlflow_pid, status.postgres_pid) == (first.mlflow_pid, first.postgres_pid)


def test_stop_ends_both_daemons_and_a_restart_keeps_the_runs(
    tracking_server: TrackingServer,
) -> None:
    info = tracking_server.start()
    name = f"kept-{uuid.uuid4().hex[:8]}"
    experiment_id = MlflowClient(tracking_server.uri).create_experiment(name)

    assert tracking_server.stop()
    assert ended(info.mlflow_pid) and ended(info.postgres_pid)
    assert group_left(info.mlflow_pid) == [] and group_left(info.postgres_pid) == []
    assert port_free(tracking_server.port)
    assert not tracking_server.is_running()
    assert not (info.folder / "mlflow.pid").exists()
    assert not tracking_server.stop()  # nothing left to stop

    again = tracking_server.start()
    assert again.started and again.mlflow_pid != info.mlflow_pid
    experiment = MlflowClient(tracking_server.uri).get_experiment_by_name(name)
    assert experiment is not None and experiment.experiment_id == experiment_id


def test_a_port_in_use_is_one_error_line_and_starts_nothing(scratch: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = cli("start", "--port", str(port), "--folder", str(scratch))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: port {port} on 127.0.0.1 is already in use")
    assert len(done.stderr.splitlines()) == 1
    assert list(scratch.iterdir()) == []


def test_make_server_then_server_stop(scratch: Path) -> None:
    port = free_port()
    # `-o .venv/.installed`: the venv running these tests is the installed project; pip is not
    # to run again because pyproject.toml is newer.
    make = ["make", "-s", "-o", ".venv/.installed", f"SERVER_PORT={port}", f"SERVER_DIR={scratch}"]

    def run(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*make, target], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
        )

    try:
        started = run("server")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in started.stdout
        assert health(f"http://127.0.0.1:{port}") == "OK"  # up when make returns
        info = ts.status(scratch, port)
        assert info is not None and info.folder == scratch / str(port)
        assert (info.folder / "pgdata" / "PG_VERSION").is_file()

        twice = run("server")
        assert twice.returncode == 0 and "already running" in twice.stdout
        assert ts.status(scratch, port) == info

        stopped = run("server-stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert ended(info.mlflow_pid) and ended(info.postgres_pid)
        assert group_left(info.mlflow_pid) == [] and group_left(info.postgres_pid) == []
        assert port_free(port)
    finally:
        ts.stop(scratch, port)
