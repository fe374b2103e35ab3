"""src/tracker.py, src/tracking.py and src/serving.py: the tracking process and its pipe,
batching, run endings, the sweep parent, the served model. The CLI tests
(test_train_cli.py) cover the same paths end to end."""

from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from src import tracker, tracking
from src.config import PROJECT_ROOT, Settings, validate
from src.serving import DigitClassifier
from src.train import load_splits, train_tracked
from src.training import Callback, Evaluation

METRICS = ["train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr", "weights/norm"]


def evaluation(step: int, steps_per_epoch: int = 10) -> Evaluation:
    values = {name: 1.0 / step for name in METRICS}
    return Evaluation(step=step, epoch=step / steps_per_epoch, metrics=values)


class InThreadProcess(tracker.TrackingProcess):
    """The tracking process's loop (``tracking.serve``) on a thread of this process, behind
    the same kind of pipe as the real one, so that a test can watch or break MLflow calls."""

    def __init__(self) -> None:
        self.connection, child = multiprocessing.Pipe()
        thread = threading.Thread(target=tracking.serve, args=(child,), daemon=True)
        thread.start()
        self.process = SimpleNamespace(  # what TrackingProcess asks of its Popen
            poll=lambda: None if thread.is_alive() else 0,
            wait=lambda timeout=None: thread.join(timeout),
        )


def job_settings(tiny_data: Path, *overrides: str) -> Settings:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data.dir={tiny_data}", *overrides])
    return validate(cfg)


def test_metrics_reach_the_store_in_full_batches_of_a_thousand(
    tiny_data: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    log_batch = MlflowClient.log_batch

    def recording(self: MlflowClient, run_id: str, metrics: Any = (), **kwargs: Any) -> None:
        if metrics:
            calls.append(len(metrics))
        log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", recording)
    job = tracker.JobRun(job_settings(tiny_data), "batched", {}, process=InThreadProcess())
    for step in range(1, 401):
        job.on_evaluation(evaluation(step))
    job.end(tracker.FINISHED)
    assert calls == [1000, 1000, 400]  # 2400 metrics: two full calls and the rest at the end
    history = MlflowClient(tracking_uri).get_metric_history(job.run_id, "val/loss")
    assert sorted(m.step for m in history) == list(range(1, 401))
    assert MlflowClient(tracking_uri).get_run(job.run_id).info.status == "FINISHED"


def test_a_store_error_stops_the_training_and_fails_the_run(
    tiny_data: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_batch = MlflowClient.log_batch

    def read_only(self: MlflowClient, run_id: str, metrics: Any = (), **kwargs: Any) -> None:
        if metrics:
            raise RuntimeError("the store is read-only")
        log_batch(self, run_id, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", read_only)
    job = tracker.JobRun(job_settings(tiny_data), "refused", {}, process=InThreadProcess())
    with pytest.raises(tracker.TrackingError, match="read-only"):
        for step in range(1, 10_000):  # the error arrives within a few evaluations
            job.on_evaluation(evaluation(step))
            time.sleep(0.001)
    job.end(tracker.FAILED, "the store is read-only")
    run = MlflowClient(tracking_uri).get_run(job.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "the store is read-only"


def test_a_run_that_cannot_be_created_fails_the_job_at_its_first_evaluation(
    tiny_data: Path, tmp_path: Path
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    settings = job_settings(tiny_data, f"mlflow.tracking_uri=sqlite:///{tmp_path}/a_file/m.db")
    job = tracker.JobRun(settings, "nowhere", {}, process=InThreadProcess())
    with pytest.raises(tracker.TrackingError):
        job.run_id  # noqa: B018 - waits for the tracking process's answer
    with pytest.raises(tracker.TrackingError):
        job.on_evaluation(evaluation(1))
    job.end(tracker.FAILED, "no store")  # nothing to end: returns


def test_when_the_tracking_process_dies_the_run_still_ends(
    tiny_data: Path, tracking_uri: str
) -> None:
    process = tracker.TrackingProcess()
    try:
        job = tracker.JobRun(job_settings(tiny_data), "orphan", {}, process=process)
        run_id = job.run_id
        job.on_evaluation(evaluation(1))
        process.process.kill()
        process.process.wait()
        stopped = r"tracking process stopped \(exit code -9\)"
        with pytest.raises(tracker.TrackingError, match=stopped):
            for step in range(2, 100):
                job.on_evaluation(evaluation(step))
        job.end(tracker.FAILED, "the tracking process stopped")
    finally:
        process.close()
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "the tracking process stopped"


def test_when_the_training_process_dies_its_run_ends_killed(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    script = f"""
import os, signal
from tests.test_tracking import evaluation, job_settings
from src import tracker
from pathlib import Path
import time
job = tracker.JobRun(job_settings(Path({str(tiny_data)!r})), "killed", {{}})
job.on_evaluation(evaluation(1))
time.sleep(tracker.FLUSH_SECONDS + 0.1)
job.on_evaluation(evaluation(2))  # both are sent now: the first is FLUSH_SECONDS old
job.on_evaluation(evaluation(3))  # waits in this process, and dies with it
print(job.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    run_id = done.stdout.split()[-1]
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 60
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "training process ended" in run.data.tags["error"]
    assert len(client.get_metric_history(run_id, "val/loss")) == 2


def test_ctrl_c_never_cuts_a_message_in_two() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with tracker.whole_messages():
            signal.raise_signal(signal.SIGINT)  # as if Ctrl-C came mid-message
            done.append("the rest of the message")
    assert done == ["the rest of the message"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_curves_are_drawn_against_the_epoch() -> None:
    curves = tracker.curves_from_history([evaluation(s, steps_per_epoch=4) for s in (2, 4, 6)])
    epochs, values = curves["val/loss"]
    np.testing.assert_allclose(epochs, [0.5, 1.0, 1.5])
    np.testing.assert_allclose(values, [1 / 2, 1 / 4, 1 / 6])
    assert set(curves) == set(METRICS)
    assert tracker.curves_from_history([]) == {}


def test_the_parent_reference_travels_through_the_sweep_directory(tmp_path: Path) -> None:
    assert tracking.read_parent(tmp_path) is None
    parent = tracking.ParentRef(run_id="abc", experiment_id="7")
    tracking.write_parent(tmp_path / "sweep", parent)
    assert tracking.read_parent(tmp_path / "sweep") == parent


def test_artifacts_of_a_sqlite_store_live_beside_it(tmp_path: Path) -> None:
    where = tracking.artifact_location(f"sqlite:///{tmp_path / 'mlflow.db'}", "logistic 2v3")
    assert where == (tmp_path / "mlartifacts" / "logistic_2v3").as_uri()
    assert tracking.artifact_location("http://127.0.0.1:5000", "x") is None


def test_ending_a_run_records_the_reason_once(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    exp = tracking.experiment_id(client, "e")
    assert tracking.experiment_id(client, "e") == exp
    run_id = client.create_run(exp).info.run_id
    tracking.end_run(tracking_uri, run_id, tracking.FAILED, error="it broke")
    tracking.end_run(tracking_uri, run_id, tracking.FINISHED)  # already ended: left alone
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "it broke"


def test_a_job_that_failed_before_its_run_is_recorded_under_the_parent(
    tracking_uri: str,
) -> None:
    parent = tracking.start_parent(tracking_uri, "sweeps", "a sweep", {"overrides": "x"})
    run_id = tracking.failed_run(tracking_uri, "sweeps", "job", {}, "bad data", parent)
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "bad data"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id


def _child(client: MlflowClient, parent: tracking.ParentRef, lam: float, folder: Path) -> str:
    run = client.create_run(
        parent.experiment_id,
        run_name=f"logistic-2v3 lambda={lam}",
        tags={"mlflow.parentRunId": parent.run_id, "steps_per_epoch": "10"},
    )
    run_id = run.info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric("val/accuracy", 0.5 + s / 100, 0, s) for s in (5, 10, 15)]
        + [Metric("final/val_accuracy", 0.6, 0, 10), Metric("best/step", 10, 0, 10)],
    )
    params = {"lambda": str(lam), "lr": "0.5", "seed": "0", "model.name": "logistic"}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    weights = folder / f"{lam}" / "weights"
    weights.mkdir(parents=True)
    np.savez(weights / "weights.npz", weights=np.full(784, lam, np.float32), bias=0.0,
             labels=np.array([3, 2]))
    client.log_artifacts(run_id, str(weights.parent))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_finishing_a_sweep_draws_the_comparison_and_closes_the_parent(
    tracking_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    parent = tracking.start_parent(tracking_uri, "sweeps", "a sweep", {})
    for lam in (0.01, 0.1):
        _child(client, parent, lam, tmp_path)
    tracking.failed_run(tracking_uri, "sweeps", "diverged job", {}, "diverged", parent)

    summary = tracking.finish_parent(tracking_uri, parent)
    assert (summary.n_jobs, summary.n_failed, summary.first_error) == (3, 1, "diverged")
    run = client.get_run(parent.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("1 of 3 jobs")
    names = {a.path for d in ("plots", "tables") for a in client.list_artifacts(parent.run_id, d)}
    assert names == {
        "plots/sweep_comparison.png",
        "plots/weight_norm_vs_lambda.png",
        "plots/weights_by_lambda.png",
        "tables/sweep_summary.csv",
    }
    table = client.download_artifacts(parent.run_id, "tables/sweep_summary.csv", str(tmp_path))
    rows = list(csv.DictReader(Path(table).open()))
    assert sorted(r["status"] for r in rows) == ["FAILED", "FINISHED", "FINISHED"]
    assert {r["lambda"] for r in rows} == {"0.01", "0.1", ""}


def test_an_interrupted_sweep_parent_ends_killed(tracking_uri: str) -> None:
    parent = tracking.start_parent(tracking_uri, "sweeps", "a sweep", {})
    tracking.finish_parent(tracking_uri, parent, interrupted=True)
    assert MlflowClient(tracking_uri).get_run(parent.run_id).info.status == "KILLED"


@pytest.mark.parametrize("shape", [(784,), (784, 10)])
def test_the_served_model_predicts_digits_from_raw_pixels(tmp_path: Path, shape: tuple) -> None:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=shape).astype(np.float32)
    labels = np.array([3, 2]) if len(shape) == 1 else np.arange(10)
    bias = np.float32(0.0) if len(shape) == 1 else np.zeros(10, np.float32)
    np.savez(tmp_path / "w.npz", weights=weights, bias=bias, labels=labels)
    served = DigitClassifier()
    served.load_context(SimpleNamespace(artifacts={"weights": str(tmp_path / "w.npz")}))
    pixels = rng.integers(0, 256, size=(5, 784))
    predicted = served.predict(None, pixels)
    logits = (pixels / 255.0) @ weights
    expected = labels[(logits > 0).astype(int)] if len(shape) == 1 else logits.argmax(1)
    np.testing.assert_array_equal(predicted, expected)
    assert served.predict(None, pixels[0]).shape == (1,)
    with pytest.raises(ValueError, match="784"):
        served.predict(None, np.zeros((2, 100)))


class StopAt(Callback):
    """Raises ``error`` at the given evaluation, as Ctrl-C or a failure would."""

    def __init__(self, error: BaseException, at: int = 2) -> None:
        self.error, self.at, self.seen = error, at, 0

    def on_evaluation(self, evaluation: Evaluation) -> None:
        self.seen += 1
        if self.seen == self.at:
            raise self.error


@pytest.mark.parametrize(
    ("error", "status"), [(KeyboardInterrupt(), "KILLED"), (ValueError("boom"), "FAILED")]
)
def test_a_run_stopped_in_training_never_stays_running(
    tiny_data: Path, tracking_uri: str, error: BaseException, status: str
) -> None:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data.dir={tiny_data}", "epochs=2"])
    settings = validate(cfg)
    with pytest.raises(type(error)):
        train_tracked(
            settings, load_splits(settings), "stopped", {}, "a: 1\n", None, [StopAt(error)]
        )
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("logistic-2v3").experiment_id])
    assert run.info.status == status
    assert run.data.tags["error"] == ("interrupted" if status == "KILLED" else "boom")
    # the metrics of the evaluations up to the stop (the logger sees each one first) are kept
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2
