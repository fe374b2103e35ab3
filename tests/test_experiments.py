"""The report's experiments (conf/experiment/*.yaml): each composes, and each runs end to end.

The smoke runs are real `python -m src.train` subprocesses on a tiny MNIST written in
tmp_path, each into its own temporary SQLite MLflow store, with the epochs cut to 1. They
are started together (one process per experiment) and checked through ``MlflowClient``:
the runs, their parent/child structure where the experiment sweeps, and every figure under
its stable artifact name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from PIL import Image

from src.config import PROJECT_ROOT, validate
from tests.conftest import all_artifacts

CONF = PROJECT_ROOT / "conf"
EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))

RUN_PLOTS = {
    "plots/loss_curves.png",
    "plots/accuracy_curves.png",
    "plots/weights.png",
    "plots/confusion_matrix.png",
}
SOFTMAX_PLOTS = {"plots/class_means_and_weights.png"}
RUN_TABLES = {"tables/most_confused_pairs.json"}
PARENT_ARTIFACTS = {
    "plots/sweep_comparison.png",
    "plots/weight_norm_vs_lambda.png",
    "plots/weights_by_lambda.png",
    "tables/sweep_summary.csv",
}


@dataclass(frozen=True)
class Expected:
    """What an experiment sets: the model, the key settings, the swept lambdas (or None)."""

    model: str
    settings: dict
    swept_lambdas: tuple[float, ...] | None


EXPECTED = {
    "task2_1": Expected(
        "logistic",
        {
            "epochs": 40,
            "evals_per_epoch": 20,
            "schedule.name": "exponential",
            "early_stopping.enabled": True,
            "early_stopping.patience": 4,
            "limit_train": None,
        },
        None,
    ),
    "task2_2": Expected(
        "logistic",
        {"epochs": 20, "evals_per_epoch": 20, "limit_train": 1000, "early_stopping.enabled": False},
        (0.01, 0.001, 0.0001),
    ),
    "task3": Expected(
        "softmax", {"lambda": 0.0, "limit_train": None, "early_stopping.enabled": False}, None
    ),
    "task3_overfit": Expected(
        "softmax", {"limit_train": 10000, "early_stopping.enabled": False}, (0.0, 0.01)
    ),
}


def _select(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _compose(overrides: list[str], hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


# --------------------------------------------------------------------------- composition


def test_every_experiment_file_is_known_and_global():
    assert EXPERIMENTS == sorted(EXPECTED)
    for name in EXPERIMENTS:
        first_line = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()[0]
        assert first_line == "# @package _global_", name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_composes_with_its_settings_and_sweep(name):
    expected = EXPECTED[name]
    cfg = _compose([f"experiment={name}"], hydra_config=True)
    assert cfg.model.name == expected.model
    for key, value in expected.settings.items():
        assert _select(cfg, key) == value, key
    assert cfg.mlflow.experiment_name == f"report-{name}"
    params = cfg.hydra.sweeper.params
    if expected.swept_lambdas is None:
        assert not params, "a single-run experiment sets no sweep"
        assert cfg.hydra.mode is None  # one run, unless `-m` says otherwise
    else:
        # a sweep runs as one without `-m`: the file sets Hydra's mode
        assert cfg.hydra.mode == RunMode.MULTIRUN
        assert set(params) == {"lambda"}, "the sweep changes lambda only"
        swept = tuple(float(v) for v in str(params["lambda"]).split(","))
        assert swept == expected.swept_lambdas


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_job_of_an_experiment_passes_validation(name):
    lambdas = EXPECTED[name].swept_lambdas or (None,)
    for lam in lambdas:
        overrides = [f"experiment={name}"] + ([] if lam is None else [f"lambda={lam}"])
        settings = validate(_compose(overrides))
        assert settings.model == EXPECTED[name].model
        if lam is not None:
            assert settings.train.l2 == lam


def test_the_command_line_still_overrides_an_experiment():
    cfg = _compose(["experiment=task2_2", "epochs=3", "lr=0.1"])
    assert (cfg.epochs, cfg.lr, cfg.limit_train) == (3, 0.1, 1000)


# --------------------------------------------------------------------------- smoke runs


def _write_tiny_mnist(directory: Path) -> None:
    """A processed-data file with the contract's six arrays, every digit present."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 120), ("val", 60), ("test", 60)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 784), dtype=np.uint8)
        # A bright block whose place depends on the digit: something learnable.
        for digit in range(10):
            rows = labels == digit
            images[rows, 78 * digit : 78 * digit + 60] = 220
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels
    directory.mkdir(parents=True)
    np.savez(directory / "mnist.npz", **arrays)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Start one training subprocess per experiment (together), wait, return their stores."""
    root = tmp_path_factory.mktemp("experiments")
    data_dir = root / "processed"
    _write_tiny_mnist(data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    started = {}
    for name in EXPECTED:
        store = f"sqlite:///{root / f'{name}.db'}"
        # no `-m` for the sweeps: the experiment file makes them one (hydra.mode: MULTIRUN)
        command = [sys.executable, "-m", "src.train"]
        command += [
            f"experiment={name}",
            "epochs=1",
            "evals_per_epoch=2",
            f"data.dir={data_dir}",
            f"mlflow.tracking_uri={store}",
            f"hydra.run.dir={root / name / 'run'}",
            f"hydra.sweep.dir={root / name / 'multirun'}",
        ]
        log = open(root / f"{name}.log", "w")  # closed once the process has ended
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        started[name] = (process, log, store)
    results = {}
    try:
        for name, (process, log, store) in started.items():
            code = process.wait(timeout=240)
            log.close()
            output = (root / f"{name}.log").read_text()
            results[name] = (code, output, store)
    finally:
        for process, log, _ in started.values():
            if process.poll() is None:  # a hung run must not outlive the tests
                process.kill()
                process.wait()
            log.close()
    return results


def _runs(name: str, store: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(f"report-{name}")
    assert experiment is not None, f"no MLflow experiment report-{name}"
    return client, client.search_runs([experiment.experiment_id])


def _check_png(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> None:
    local = client.download_artifacts(run_id, path, str(tmp_path))
    with Image.open(local) as image:
        image.verify()
        assert image.format == "PNG"


def _check_child(client: MlflowClient, run, model: str, tmp_path: Path) -> None:
    assert run.info.status == "FINISHED"
    artifacts = all_artifacts(client, run.info.run_id)
    expected = RUN_PLOTS | RUN_TABLES | (SOFTMAX_PLOTS if model == "softmax" else set())
    assert expected <= artifacts, sorted(expected - artifacts)
    assert not (SOFTMAX_PLOTS & artifacts) or model == "softmax"
    assert run.data.params["epochs"] == "1"
    for path in sorted(expected):
        if path.endswith(".png"):
            _check_png(client, run.info.run_id, path, tmp_path)


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if not EXPECTED[n].swept_lambdas])
def test_single_run_experiment_logs_one_run_with_its_figures(smoke_runs, name, tmp_path):
    code, output, store = smoke_runs[name]
    assert code == 0, output[-3000:]
    client, runs = _runs(name, store)
    assert len(runs) == 1
    (run,) = runs
    assert "mlflow.parentRunId" not in run.data.tags
    _check_child(client, run, EXPECTED[name].model, tmp_path)
    assert run.data.params["evals_per_epoch"] == "2"
    if name == "task2_1":
        assert run.data.params["early_stopping.patience"] == "4"
        assert run.data.params["schedule.name"] == "exponential"


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if EXPECTED[n].swept_lambdas])
def test_sweep_experiment_logs_a_parent_with_one_child_per_lambda(smoke_runs, name, tmp_path):
    code, output, store = smoke_runs[name]
    assert code == 0, output[-3000:]
    client, runs = _runs(name, store)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1, "one parent run per sweep"
    (parent,) = parents
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId")]
    assert len(children) == len(runs) - 1
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    lambdas = sorted(float(run.data.params["lambda"]) for run in children)
    assert lambdas == sorted(EXPECTED[name].swept_lambdas)
    # named by what the sweep varies
    assert {run.info.run_name for run in children} == {
        f"lambda={run.data.params['lambda']}" for run in children
    }
    for child in children:
        _check_child(client, child, EXPECTED[name].model, tmp_path)
    assert parent.info.status == "FINISHED"
    parent_artifacts = all_artifacts(client, parent.info.run_id)
    assert PARENT_ARTIFACTS <= parent_artifacts, sorted(PARENT_ARTIFACTS - parent_artifacts)
    for path in sorted(PARENT_ARTIFACTS):
        if path.endswith(".png"):
            _check_png(client, parent.info.run_id, path, tmp_path)
    summary = client.download_artifacts(
        parent.info.run_id, "tables/sweep_summary.csv", str(tmp_path)
    )
    rows = Path(summary).read_text().strip().splitlines()
    assert len(rows) == 1 + len(children), "a header and one row per job"
