"""Shared fixtures of the config, tracking and CLI tests: tiny data, a ready MLflow store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_SIZES = {"train": 400, "val": 100, "test": 100}


def write_tiny_mnist(folder: Path, seed: int = 0) -> Path:
    """Write a small processed ``mnist.npz`` (the pipeline's contract: six uint8 arrays).

    Each digit is a fixed random 28x28 template plus noise, so that the classes are easy to
    separate and a few epochs of training classify them well.
    """
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 784)).astype(np.float64)
    arrays = {}
    for split, n in TINY_SIZES.items():
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        noise = rng.normal(0.0, 40.0, size=(n, 784))
        images = np.clip(0.6 * templates[labels] + noise + 50.0, 0, 255)
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "mnist.npz", **arrays)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny processed MNIST (400/100/100 images)."""
    return write_tiny_mnist(tmp_path_factory.mktemp("processed"))


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite MLflow store, migrated once per session (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def copy_store(template: Path, folder: Path) -> str:
    """A fresh store for one test, copied from the template; returns its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def tracking_uri(mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh store in tmp_path, also the store of in-process code (``MLFLOW_TRACKING_URI``
    and MLflow's global URI, which an earlier in-process run may have set elsewhere)."""
    import mlflow

    uri = copy_store(mlflow_template, tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def train_command(args: list[str], workdir: Path) -> list[str]:
    """``python -m src.train`` with Hydra's run and sweep directories inside ``workdir``."""
    return [
        sys.executable,
        "-m",
        "src.train",
        *args,
        f"hydra.run.dir={workdir / 'run'}",
        f"hydra.sweep.dir={workdir / 'sweep'}",
    ]


def train_env(tracking_uri: str) -> dict[str, str]:
    """The environment of a training subprocess: the store, the project importable."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_train(
    args: list[str], tracking_uri: str, workdir: Path, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m src.train args`` in a subprocess whose cwd is ``workdir`` (so nothing
    can land in the repository), and return what it did."""
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        train_command(args, workdir),
        cwd=workdir,
        env=train_env(tracking_uri),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def all_artifacts(client: Any, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact path of a run, folders walked (``plots/weights.png``, ...)."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found |= all_artifacts(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (now)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TrackingServer:
    """A real team tracking server (src.tracking_server: ``mlflow server`` on PostgreSQL) in
    ``folder`` (its own folder is ``folder/<port>``), on 127.0.0.1:``port``.

    ``uri`` is its tracking URI; ``stop()`` stops both daemons (a server that dies mid-run);
    ``start()`` starts them again on the same folder and port, runs and artifacts kept (it does
    nothing if the server is up); ``info`` is the ServerInfo of the last start (pids, logs,
    ``artifacts``, ``backend_store_uri``)."""

    def __init__(self, folder: Path, port: int, host: str = "127.0.0.1") -> None:
        self.folder, self.port, self.host = folder, port, host
        self.info: Any = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Any:
        from src import tracking_server

        self.info = tracking_server.start(self.folder, self.host, self.port)
        return self.info

    def stop(self) -> bool:
        from src import tracking_server

        return tracking_server.stop(self.folder, self.port)

    def is_running(self) -> bool:
        from src import tracking_server

        return tracking_server.is_running(self.folder, self.port)


@pytest.fixture(scope="session")
def tracking_server() -> Any:
    """One real tracking server for the whole session (a TrackingServer), in a temporary
    folder on a free port; stopped, and its folder removed, at the session's end. A test that
    stops it should start it again (``tracking_server.start()``) before it ends."""
    import tempfile

    # Under /tmp, not pytest's tmp_path: PostgreSQL's user must reach its folder (pytest's
    # are root's alone), and its socket's path must be short.
    folder = Path(tempfile.mkdtemp(prefix="mlflow-server-", dir="/tmp"))
    folder.chmod(0o755)
    server = TrackingServer(folder, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
