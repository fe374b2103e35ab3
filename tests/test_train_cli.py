"""`python -m src.train` end to end, in real subprocesses, on tiny data, into a temporary store.

What a user sees: one run per job with its params, tags, metrics, artifacts and a servable
model; a multirun nested under one parent with the comparison; a diverging job FAILED while
the others finish; a refused config stopped with one line and nothing in the store; Ctrl-C
leaves no run RUNNING.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import all_artifacts, copy_store, run_train, train_command, train_env

PER_STEP = [
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "test/loss",
    "test/accuracy",
    "lr",
    "weights/norm",
]
# once per run, named without a '/': MLflow's UI draws them after the curves' sections
FINAL = [
    f"final_{split}_{kind}" for split in ("train", "val", "test") for kind in ("accuracy", "loss")
] + ["best_step"]
RUN_ARTIFACTS = {
    "plots/loss_curves.png",
    "plots/accuracy_curves.png",
    "plots/weights.png",
    "plots/confusion_matrix.png",
    "tables/most_confused_pairs.json",
    "config/config.yaml",
    "weights/weights.npz",
}
PARENT_ARTIFACTS = {
    "plots/sweep_comparison.png",
    "plots/weight_norm_vs_lambda.png",
    "plots/weights_by_lambda.png",
    "tables/sweep_summary.csv",
}
# a short training on the tiny data (80 images of 2 or 3: 4 steps of 20 per epoch)
SHORT = ["epochs=3", "evals_per_epoch=2", "batch_size=20", "early_stopping.enabled=false"]


def all_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def tiny_test_set(tiny_data: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(tiny_data / "mnist.npz", allow_pickle=False) as saved:
        return saved["test_images"], saved["test_labels"].astype(np.int64)


def test_single_run_logs_params_metrics_artifacts_and_a_servable_model(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    done = run_train([f"data.dir={tiny_data}", *SHORT], tracking_uri, tmp_path / "work")
    assert done.returncode == 0, done.stderr

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("logistic-2v3")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "logistic-2v3 lambda=0.0 lr=1.0 epochs=3 evals_per_epoch=2 " \
        "batch_size=20 early_stopping.enabled=false"

    params = run.data.params
    assert params["lambda"] == "0.0" and params["lr"] == "1.0"
    assert params["model.name"] == "logistic" and params["model.digits"] == "[2, 3]"
    assert params["epochs"] == "3" and params["schedule.decay"] == "0.1"
    assert "data.dir" not in params and "mlflow.tracking_uri" not in params
    assert not any(str(tiny_data) in value or "sqlite" in value for value in params.values())

    tags = run.data.tags
    assert tags["data_hash"] == hashlib.sha256((tiny_data / "mnist.npz").read_bytes()).hexdigest()
    assert tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40
    assert "epochs=3" in tags["overrides"] and "error" not in tags
    # no local path and no store address in any tag either
    assert not any(str(tiny_data) in value or "sqlite" in value for value in tags.values())
    assert tags["mlflow.source.name"] == "src/train.py"  # no absolute local path

    # 4 steps per epoch, evaluated twice per epoch (steps 2 and 4), for 3 epochs
    steps = None
    for name in PER_STEP:
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert len(history) == 6, name
        these = [m.step for m in history]
        assert these == sorted(set(these)) and these == [2, 4, 6, 8, 10, 12], name
        steps = steps or these
        assert these == steps, name
    for name in FINAL:
        assert name in run.data.metrics, name
    assert run.data.metrics["best_step"] in steps
    assert run.data.metrics["final_test_accuracy"] > 0.9
    assert not [key for key in run.data.metrics if key not in PER_STEP and "/" in key]

    # the closing line opens the run in MLflow's model-training view
    closing = [line for line in done.stdout.splitlines() if "val accuracy" in line]
    assert len(closing) == 1 and closing[0].endswith(
        f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
        "?workflowType=machine_learning"
    ), done.stdout
    # MLflow's INFO lines about checking the input example stay off the console
    assert "input example" not in (done.stdout + done.stderr).lower()

    assert all_artifacts(client, run.info.run_id) == RUN_ARTIFACTS

    import mlflow

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.signature is not None
    assert model.metadata.saved_input_example_info is not None
    images, digits = tiny_test_set(tiny_data)
    keep = np.isin(digits, [2, 3])
    predicted = np.asarray(model.predict(images[keep].astype(np.float64)))
    assert set(np.unique(predicted)) <= {2, 3}
    assert np.mean(predicted == digits[keep]) > 0.9
    # the logged model carries the metrics of the evaluation whose weights it holds
    (logged,) = mlflow.search_logged_models([experiment.experiment_id], output_format="list")
    assert logged.source_run_id == run.info.run_id and logged.name == "model"
    linked = {m.key: m.step for m in logged.metrics or []}
    best = int(run.data.metrics["best_step"])
    assert linked["val/loss"] == best and linked["final_test_accuracy"] == best


def test_multirun_nests_three_jobs_under_one_parent(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    args = ["-m", "model=softmax", "lambda=0,0.01,0.1", f"data.dir={tiny_data}", *SHORT]
    done = run_train(args, tracking_uri, tmp_path / "work")
    assert done.returncode == 0, done.stderr

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("softmax")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(float(c.data.params["lambda"]) for c in children) == [0.0, 0.01, 0.1]
    # a child is named by what the sweep varies; what they share is in the parent's name
    assert {c.info.run_name for c in children} == {"lambda=0", "lambda=0.01", "lambda=0.1"}
    assert parent.info.run_name == "softmax sweep lambda=0,0.01,0.1"

    # the parent can be sorted and compared: the best child's metrics, the swept values
    best = min(children, key=lambda c: c.data.metrics["final_val_loss"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert best.data.tags["best_of_sweep"] == parent.info.run_id
    assert parent.data.params["lambda"] == "0,0.01,0.1"
    for key in ("val_accuracy", "test_accuracy", "val_loss", "train_accuracy"):
        assert parent.data.metrics[f"best_{key}"] == best.data.metrics[f"final_{key}"], key
    assert parent.data.metrics["best_lambda"] == float(best.data.params["lambda"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # the sweep ends with a table of its jobs, the best one and the parent's address
    tail = done.stderr.strip().splitlines()
    header = next(i for i, line in enumerate(tail) if line.startswith("job "))
    assert tail[header].split() == ["job", "lambda", "lr", "val", "acc", "test", "acc", "status"]
    rows = [line.split() for line in tail[header + 1 : header + 4]]
    assert [row[1] for row in rows] == ["0", "0.01", "0.1"]
    assert all(row[-1] == "FINISHED" for row in rows)
    assert f"best job: {best.info.run_name} (lowest validation loss)" in tail
    address = f"#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
    assert f"parent run: http://127.0.0.1:5000/{address}?workflowType=machine_learning" in tail
    # and a link to its jobs side by side: a view MLflow's UI opens from the experiment's tag
    (jobs_line,) = [line for line in tail if line.startswith("its jobs side by side: ")]
    key = jobs_line.rpartition("viewStateShareKey=")[2]
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
    assert view["searchFilter"] == f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    assert view["orderByKey"] == "metrics.`final_val_loss`" and view["orderByAsc"] is True
    assert {"params.`lambda`", "metrics.`final_val_accuracy`"} <= set(view["selectedColumns"])

    assert PARENT_ARTIFACTS <= all_artifacts(client, parent.info.run_id)
    table = client.download_artifacts(parent.info.run_id, "tables/sweep_summary.csv", tmp_path)
    rows = Path(table).read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    for child in children:
        assert all_artifacts(client, child.info.run_id) == RUN_ARTIFACTS | {
            "plots/class_means_and_weights.png"
        }

    import mlflow

    (unregularised,) = [c for c in children if c.data.params["lambda"] == "0"]
    model = mlflow.pyfunc.load_model(f"runs:/{unregularised.info.run_id}/model")
    images, digits = tiny_test_set(tiny_data)
    predicted = np.asarray(model.predict(images.astype(np.float64)))
    assert set(np.unique(predicted)) <= set(range(10))
    assert np.mean(predicted == digits) > 0.8


def test_a_parallel_launcher_nests_jobs_from_other_processes_under_one_parent(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "lambda=0,0.01,1e9",
            f"data.dir={tiny_data}", *SHORT]
    done = run_train(args, tracking_uri, tmp_path / "work")
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr  # jobs in 2 worker processes
    assert done.returncode == 1, done.stderr
    assert "1 of 3 jobs failed" in done.stderr.strip().splitlines()[-1]
    client = MlflowClient(tracking_uri)
    runs = all_runs(client)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    statuses = {c.data.params["lambda"]: c.info.status for c in children}
    assert statuses == {"0": "FINISHED", "0.01": "FINISHED", "1000000000.0": "FAILED"}
    assert parent.info.status == "FAILED"
    for child in children:
        if child.info.status == "FINISHED":
            assert all_artifacts(client, child.info.run_id) == RUN_ARTIFACTS


def test_a_diverging_job_fails_alone_and_the_parent_is_closed(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    # the tiny data are separable, so only the L2 term can blow up: |1 - 2 lr lambda| > 1
    args = ["-m", "lr=0.1,1e6", "lambda=1", f"data.dir={tiny_data}", *SHORT]
    done = run_train(args, tracking_uri, tmp_path / "work")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 jobs failed") and "diverged" in last

    client = MlflowClient(tracking_uri)
    runs = all_runs(client)
    children = {r.data.params["lr"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert children["0.1"].info.status == "FINISHED"
    assert children["1000000.0"].info.status == "FAILED"
    assert "diverged" in children["1000000.0"].data.tags["error"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["error"].startswith("1 of 2 jobs failed")
    assert "plots/sweep_comparison.png" in all_artifacts(client, parent.info.run_id)


REFUSED = {
    # case: (arguments, what the one line must name)
    "negative lambda": (["lambda=-1"], "lambda=-1"),
    "zero lr": (["lr=0"], "lr=0"),
    "zero batch size": (["batch_size=0"], "batch_size=0"),
    "zero epochs": (["epochs=0"], "epochs=0"),
    "unknown model": (["model=perceptron"], "model=perceptron"),
    "unknown model name": (["model.name=perceptron"], "model.name=perceptron"),
    "equal digits": (["model.digits=[2,2]"], "model.digits=[2, 2]"),
    "digit out of range": (["model.digits=[2,10]"], "model.digits=[2, 10]"),
    "zero training limit": (["limit_train=0"], "limit_train=0"),
    "unknown key": (["foo=1"], "unknown key 'foo'"),
    "unknown key added": (["+foo=1"], "unknown key 'foo'"),
    "unknown nested key": (["schedule.bogus=1"], "unknown key 'schedule.bogus'"),
    "a typo": (["lamda=0.1"], "unknown key 'lamda'; did you mean 'lambda'?"),
    "a typo added": (["+lamda=0.1"], "unknown key 'lamda'; did you mean 'lambda'?"),
    "a nested typo": (["schedule.decy=1"], "did you mean 'schedule.decay'?"),
    "not a number": (["lr=fast"], "lr=fast"),
    "sweep with a refused job": (["-m", "lambda=0.1,-1"], "lambda=-1"),
    "sweep with an unknown model": (["-m", "model=logistic,perceptron"], "model=perceptron"),
    "sweep with an unknown key": (["-m", "foo=1,2"], "unknown key 'foo'"),
    "missing data": (["data.dir=MISSING"], "dvc repro"),
    "sweep on missing data": (["-m", "lambda=0,0.1", "data.dir=MISSING"], "dvc repro"),
}


@pytest.fixture(scope="module")
def refused_runs(
    tiny_data: Path, mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[subprocess.CompletedProcess[str], str]]:
    """Every refused config, run at once (they are independent) in its own store."""
    started = {}
    for case, (args, _) in REFUSED.items():
        work = tmp_path_factory.mktemp("refused")
        uri = copy_store(mlflow_template, work / "store")
        missing = work / "no-data"
        full = [a.replace("MISSING", str(missing)) for a in args]
        if not any(a.startswith("data.dir=") for a in full):
            full.append(f"data.dir={tiny_data}")
        process = subprocess.Popen(
            train_command(full, work),
            cwd=work,
            env=train_env(uri),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[case] = (process, uri, full)
    results = {}
    for case, (process, uri, full) in started.items():
        stdout, stderr = process.communicate(timeout=240)
        results[case] = (subprocess.CompletedProcess(full, process.returncode, stdout, stderr), uri)
    return results


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_config_stops_with_one_line_and_no_run(
    case: str, refused_runs: dict[str, tuple[subprocess.CompletedProcess[str], str]]
) -> None:
    done, uri = refused_runs[case]
    expected = REFUSED[case][1]
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert all_runs(MlflowClient(uri)) == []


def test_a_store_that_cannot_be_opened_fails_the_job_with_one_line(
    tiny_data: Path, tmp_path: Path
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"
    done = run_train([f"data.dir={tiny_data}", "epochs=2"], uri, tmp_path / "work")
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the MLflow store {uri} cannot be reached"), done.stderr
    assert "File exists" in last, done.stderr
    assert "Traceback" not in done.stderr


def test_help_and_cfg_job(tracking_uri: str, tmp_path: Path) -> None:
    shown = run_train(["--cfg", "job"], tracking_uri, tmp_path / "cfg")
    assert shown.returncode == 0, shown.stderr
    assert "lambda: 0.0" in shown.stdout and "name: logistic" in shown.stdout
    helped = run_train(["--help"], tracking_uri, tmp_path / "help")
    assert helped.returncode == 0, helped.stderr
    assert "model: logistic, softmax" in helped.stdout


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, or `kill`
def test_ctrl_c_ends_the_runs_killed(
    tiny_data: Path, tracking_uri: str, tmp_path: Path, stop: signal.Signals
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = ["-m", "lambda=0,0.1", f"data.dir={tiny_data}", "epochs=100000", "batch_size=20"]
    args.append("early_stopping.enabled=false")  # the first job must still run at Ctrl-C
    process = subprocess.Popen(
        train_command(args, work),
        cwd=work,
        env=train_env(tracking_uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = MlflowClient(tracking_uri)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = all_runs(client)
            if any("mlflow.parentRunId" in r.data.tags and r.data.params for r in runs):
                break  # the job's run has its params: it is about to train
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.5)
        time.sleep(1.0)  # well inside the training loop
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    runs = all_runs(client)
    assert len(runs) == 2  # the parent and the first job; the second never started
    statuses = {r.info.run_name: (r.info.status, r.data.tags.get("error")) for r in runs}
    assert {status for status, _ in statuses.values()} == {"KILLED"}, statuses


def test_the_dvc_train_stage_writes_what_dvc_yaml_declares(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    import sys

    import yaml

    from tests.conftest import PROJECT_ROOT

    reports = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, "-m", "src.stage", f"data.dir={tiny_data}", *SHORT,
         "--reports", str(reports)],
        cwd=tmp_path,
        env=train_env(tracking_uri),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    # one small file per task: `dvc metrics show` prints a row of three columns for each
    files = sorted(p.name for p in (reports / "metrics").iterdir())
    assert files == ["logistic-2v3.json", "softmax.json"]
    for name in files:
        metrics = json.loads((reports / "metrics" / name).read_text())
        assert list(metrics) == ["test_accuracy", "val_accuracy", "best_step"]
        assert isinstance(metrics["best_step"], int)
        assert all(v == float(f"{v:.4g}") for v in metrics.values())  # 4 significant digits
    rows = (reports / "plots" / "logistic-2v3.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,train_loss,train_accuracy,val_loss,val_accuracy," \
        "test_loss,test_accuracy"
    assert len(rows) == 1 + 6  # 3 epochs, 2 evaluations each
    # 4 significant digits: the last digits of a float32 loss differ between CPUs
    for row in rows[1:]:
        for value in row.split(",")[2:]:
            assert float(value) == float(f"{float(value):.4g}"), value
    (closing,) = [line for line in done.stdout.splitlines() if line.startswith("logistic-2v3")]
    assert "?workflowType=machine_learning" in closing

    runs = all_runs(MlflowClient(tracking_uri))
    assert sorted(r.data.tags["task"] for r in runs) == ["logistic-2v3", "softmax"]
    assert {r.info.status for r in runs} == {"FINISHED"}

    stage = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    train = stage["stages"]["train"]
    assert train["cmd"] == "python -m src.stage"
    assert train["metrics"] == [{"reports/metrics": {"cache": False}}]
    # the curves are an output, not a plot of the stage: DVC would draw each of their
    # columns against the row number beside the four plots below
    assert "plots" not in train
    assert {"reports/plots": {"cache": False}} in train["outs"]
    plots = [spec for plot in stage["plots"] for spec in plot.values()]
    assert len(plots) == 4
    plotted = {path for spec in plots for path in spec["y"]}
    assert plotted == {"reports/plots/logistic-2v3.csv", "reports/plots/softmax.csv"}
    for spec in plots:
        assert spec["x"] == "epoch" and spec["x_label"] == "epoch"
        assert spec["y_label"].startswith(("accuracy", "cross-entropy")) and spec["title"]
        (columns,) = spec["y"].values()
        assert set(columns) <= set(rows[0].split(","))
    assert {"data/processed", "conf", "src"} <= set(train["deps"])


def test_a_sweep_on_unreadable_data_records_every_job_failed(
    tracking_uri: str, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "mnist.npz").write_bytes(b"not a zip archive")
    done = run_train(["-m", "lambda=0,0.1", f"data.dir={corrupt}"], tracking_uri, tmp_path / "w")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 jobs failed")
    runs = all_runs(MlflowClient(tracking_uri))
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all("dvc repro" in c.data.tags["error"] for c in children)


def test_the_dvc_stage_turns_a_typo_into_one_line(tiny_data: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "src.stage", f"data.dir={tiny_data}", "lamda=0.1",
         "--reports", str(tmp_path / "reports")],
        cwd=tmp_path, env=train_env(f"sqlite:///{tmp_path / 'm.db'}"),
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown key 'lamda'; did you mean 'lambda'?"
    ], done.stderr
