"""src/tracking.py, src/job.py and src/sweep.py against a real SQLite store: batched metrics,
runs that end however the job ends, files kept when the store fails, sweep parents."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from src import artifacts, job, sweep, tracking
from src.config import PROJECT_ROOT, Settings, validate
from src.training import Callback, Evaluation

METRICS = ["train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr", "weights/norm"]


def evaluation(step: int, steps_per_epoch: int = 10) -> Evaluation:
    values = {name: 1.0 / step for name in METRICS}
    return Evaluation(step=step, epoch=step / steps_per_epoch, metrics=values)


def job_settings(tiny_data: Path, *overrides: str) -> Settings:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data.dir={tiny_data}", *overrides])
    return validate(cfg)


def record_log_batch(monkeypatch: pytest.MonkeyPatch, fail_metrics: bool = False) -> list[int]:
    """Count the metrics of every log_batch call; make them fail if asked."""
    calls: list[int] = []
    log_batch = MlflowClient.log_batch

    def recording(self: MlflowClient, run_id: str, metrics: Any = (), **kwargs: Any) -> None:
        if metrics:
            calls.append(len(metrics))
            if fail_metrics:
                raise RuntimeError("the store is read-only")
        log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", recording)
    return calls


def test_metrics_reach_the_store_in_full_batches_of_a_thousand(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_log_batch(monkeypatch)
    client = tracking.open_store(tracking_uri)
    run_id = tracking.start_job_run(client, "e", "batched", {}, {"lambda": "0"})
    buffer = tracking.MetricBuffer(client, run_id)
    for step in range(1, 401):
        buffer.on_evaluation(evaluation(step))
    assert calls == [1000, 1000]  # 2400 metrics: two full calls so far, the rest waits
    buffer.flush()
    tracking.end_run(client, run_id, tracking.FINISHED)
    assert calls == [1000, 1000, 400]
    history = client.get_metric_history(run_id, "val/loss")
    assert sorted(m.step for m in history) == list(range(1, 401))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lambda": "0"}
    assert len(buffer.rows) == 2400


def test_metrics_that_wait_too_long_are_sent_at_the_next_evaluation(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_log_batch(monkeypatch)
    client = tracking.open_store(tracking_uri)
    run_id = tracking.start_job_run(client, "e", "live", {}, {})
    buffer = tracking.MetricBuffer(client, run_id)
    buffer.on_evaluation(evaluation(1))
    assert calls == []
    buffer.sent_at -= tracking.FLUSH_SECONDS + 1  # as if the first had waited that long
    buffer.on_evaluation(evaluation(2))
    assert calls == [2 * len(METRICS)]
    tracking.end_run(client, run_id, tracking.FINISHED)


def test_a_store_that_fails_mid_run_stops_the_training_and_keeps_its_files(
    tiny_data: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = job_settings(tiny_data, "epochs=300", "early_stopping.enabled=false")
    record_log_batch(monkeypatch, fail_metrics=True)
    folder = tmp_path / "job"
    with pytest.raises(tracking.TrackingError) as raised:
        job.run_tracked(settings, job.load_splits(settings), "lost", {}, "a: 1\n", folder)
    line = str(raised.value)
    assert "read-only" in line and str(folder) in line and "python -m src.upload" in line
    assert "\n" not in line
    # the training stopped at the evaluation that found the store broken, not after 300
    rows = artifacts.read_metrics(folder)
    assert {key for key, *_ in rows} >= {"val/loss", "final_val_accuracy"}
    assert max(step for key, _, _, step in rows if key == "val/loss") < 300
    kept = folder / artifacts.ARTIFACTS_DIR
    for name in ("weights/weights.npz", "plots/loss_curves.png", "config/config.yaml"):
        assert (kept / name).is_file(), name
    record = artifacts.read_run_record(folder)
    assert record["run_name"] == "lost" and record["params"]["lambda"] == "0.0"
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("logistic-2v3").experiment_id])
    assert run.info.status == "FAILED" and "read-only" in run.data.tags["error"]


def test_a_store_that_cannot_be_opened_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/a_file/m.db"
    with pytest.raises(tracking.TrackingError) as raised:
        tracking.open_store(uri)
    assert uri in str(raised.value) and "\n" not in str(raised.value)


def test_a_password_in_the_store_address_stays_out_of_messages() -> None:
    assert tracking.safe_uri("http://me:secret@host:5000/x") == "http://host:5000/x"
    assert tracking.safe_uri("sqlite:///a/b.db") == "sqlite:///a/b.db"


def test_http_retries_are_short_unless_the_user_set_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    tracking.use_short_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


FIRST_USE = """
import sys
from src import tracking
client = tracking.open_store(sys.argv[1])
run_id = tracking.start_job_run(client, "together", "job " + sys.argv[2], {}, {"n": sys.argv[2]})
tracking.end_run(client, run_id, tracking.FINISHED)
"""


def test_processes_that_open_a_fresh_sqlite_store_together_all_record_their_runs(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    for round_number in range(3):
        uri = f"sqlite:///{tmp_path / f'round{round_number}' / 'mlflow.db'}"
        processes = [
            subprocess.Popen([sys.executable, "-c", FIRST_USE, uri, str(n)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for n in range(6)
        ]
        outputs = [p.communicate(timeout=300) for p in processes]
        assert [p.returncode for p in processes] == [0] * 6, [err for _, err in outputs]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
        assert sorted(r.data.params["n"] for r in runs) == [str(n) for n in range(6)]
        assert {r.info.status for r in runs} == {"FINISHED"}


def test_curves_are_drawn_against_the_epoch() -> None:
    history = [evaluation(s, steps_per_epoch=4) for s in (2, 4, 6)]
    curves = artifacts.curves_from_history(history)
    epochs, values = curves["val/loss"]
    np.testing.assert_allclose(epochs, [0.5, 1.0, 1.5])
    np.testing.assert_allclose(values, [1 / 2, 1 / 4, 1 / 6])
    assert set(curves) == set(METRICS)
    assert artifacts.curves_from_history([]) == {}


def test_a_job_finds_its_parent_in_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sweep.PARENT_RUN_ENV, raising=False)
    assert sweep.job_parent() is None
    monkeypatch.setenv(sweep.PARENT_RUN_ENV, "abc")
    monkeypatch.setenv(sweep.PARENT_EXPERIMENT_ENV, "7")
    assert sweep.job_parent() == sweep.ParentRef(run_id="abc", experiment_id="7")


def test_artifacts_of_a_sqlite_store_live_beside_it(tmp_path: Path) -> None:
    where = tracking.artifact_location(f"sqlite:///{tmp_path / 'mlflow.db'}", "logistic 2v3")
    assert where == (tmp_path / "mlartifacts" / "logistic_2v3").as_uri()
    assert tracking.artifact_location("http://127.0.0.1:5000", "x") is None


def test_experiments_open_in_the_model_training_view(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    exp = tracking.experiment_id(client, "e")
    assert tracking.experiment_id(client, "e") == exp
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    address = tracking.ui_address("http://127.0.0.1:5001", exp, "r1")
    assert address == (
        f"http://127.0.0.1:5001/#/experiments/{exp}/runs/r1?workflowType=machine_learning"
    )
    assert tracking.ui_address(tracking_uri, exp) == (
        f"{tracking.MLFLOW_UI}/#/experiments/{exp}/runs?workflowType=machine_learning"
    )
    run_id = client.create_run(exp).info.run_id
    assert tracking.run_address(tracking_uri, run_id) == tracking.ui_address(
        tracking_uri, exp, run_id
    )


def test_a_shared_view_opens_the_runs_table_with_its_columns(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    exp = tracking.experiment_id(client, "e")
    columns = [tracking.column("params", "lambda"), tracking.column("metrics", "final_val_loss")]
    tracking.share_runs_view(client, exp, "k1", columns, columns[1], search="tags.x = '1'")
    view = json.loads(client.get_experiment(exp).tags["mlflow.sharedViewState.k1"])
    assert view == {
        "searchFilter": "tags.x = '1'",
        "orderByKey": "metrics.`final_val_loss`",
        "orderByAsc": True,
        "selectedColumns": ["params.`lambda`", "metrics.`final_val_loss`"],
    }
    assert tracking.ui_address(tracking_uri, exp, view="k1").endswith(
        f"/#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey=k1"
    )


def test_a_job_reads_the_keys_its_sweep_varies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sweep.SWEEP_KEYS_ENV, raising=False)
    assert sweep.job_swept_keys() == []
    monkeypatch.setenv(sweep.SWEEP_KEYS_ENV, "lambda,lr")
    assert sweep.job_swept_keys() == ["lambda", "lr"]


def test_the_sweep_hands_its_keys_to_the_jobs_as_one_override() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    config = OmegaConf.create({"hydra": {"overrides": {"hydra": []}}})
    sweep.hand_off(config, sweep.ParentRef("p1", "7"), swept=["lambda", "+lr"])
    (handed,) = [o for o in config.hydra.overrides.hydra if sweep.SWEEP_KEYS_ENV in o]
    # quoted: a comma would make the job's override a sweep of its own
    (parsed,) = OverridesParser.create().parse_overrides([handed])
    assert not parsed.is_sweep_override() and parsed.value() == "lambda,lr"


def test_the_early_stop_line_says_when_and_which_weights_were_kept() -> None:
    from src.training import TrainResult

    history = [evaluation(step) for step in (5, 10, 15, 20, 25)]

    def result(stopped_early: bool, reason: str | None = None) -> TrainResult:
        return TrainResult(model=None, history=history, best_step=10,
                           stopped_early=stopped_early, final={}, stop_reason=reason)

    assert job.stop_line(result(True), patience=3) == (
        "early stopping at epoch 2.50, after 3 rising validation losses in a row; kept the "
        "weights of step 10 (epoch 1.00), the lowest validation loss"
    )
    assert job.stop_line(result(False), patience=3) is None  # it ran all its epochs
    stopped = job.stop_line(result(False, "the store failed"), patience=3)
    assert stopped == "training stopped at epoch 2.50: the store failed"
    empty = TrainResult(model=None, history=[], best_step=0, stopped_early=False, final={})
    assert job.stop_line(empty, patience=3) is None


def test_ending_a_run_records_the_reason_once(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(tracking.experiment_id(client, "e")).info.run_id
    tracking.end_run(client, run_id, tracking.FAILED, error="it broke")
    tracking.end_run(client, run_id, tracking.FINISHED)  # already ended: left alone
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "it broke"


def test_a_job_that_failed_before_its_run_is_recorded_under_the_parent(
    tracking_uri: str,
) -> None:
    client = MlflowClient(tracking_uri)
    parent = tracking.start_parent(client, "sweeps", "a sweep", {"overrides": "x"})
    run_id = tracking.record_failed_job(client, "sweeps", "job", {}, "bad data", parent)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "bad data"
    assert run.data.tags["mlflow.parentRunId"] == parent[0]


def _child(client: MlflowClient, parent: sweep.ParentRef, lam: float, folder: Path,
           end: bool = True) -> str:
    run = client.create_run(
        parent.experiment_id,
        run_name=f"logistic-2v3 lambda={lam}",
        tags={"mlflow.parentRunId": parent.run_id, "steps_per_epoch": "10"},
    )
    run_id = run.info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric("val/accuracy", 0.5 + s / 100, 0, s) for s in (5, 10, 15)]
        + [Metric("final_val_accuracy", 0.6 + lam, 0, 10), Metric("best_step", 10, 0, 10),
           Metric("final_val_loss", 1 - lam, 0, 10), Metric("final_test_accuracy", 0.5, 0, 10)],
    )
    params = {"lambda": str(lam), "lr": "0.5", "seed": "0", "model.name": "logistic"}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    weights = folder / f"{lam}" / "weights"
    weights.mkdir(parents=True)
    np.savez(weights / "weights.npz", weights=np.full(784, lam, np.float32), bias=0.0,
             labels=np.array([3, 2]))
    client.log_artifacts(run_id, str(weights.parent))
    if end:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _active(client: MlflowClient, uri: str, n_expected: int) -> sweep.ActiveSweep:
    run_id, exp_id = tracking.start_parent(client, "sweeps", "a sweep", {})
    return sweep.ActiveSweep(tracking_uri=uri, parent=sweep.ParentRef(run_id, exp_id),
                             n_expected=n_expected, swept={"lambda": "0.01,0.1,0.2"})


def test_finishing_a_sweep_draws_the_comparison_and_gives_the_parent_the_best_job(
    tracking_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    active = _active(client, tracking_uri, n_expected=3)
    parent = active.parent
    _child(client, parent, 0.01, tmp_path)
    best = _child(client, parent, 0.1, tmp_path)
    tracking.record_failed_job(client, "sweeps", "diverged job", {}, "diverged",
                               (parent.run_id, parent.experiment_id))

    summary = sweep.finish_parent(active)
    assert (summary.n_jobs, summary.n_failed, summary.first_error) == (3, 1, "diverged")
    run = client.get_run(parent.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("1 of 3 jobs")
    # once-per-run values, named without a '/': MLflow's UI draws them after the curves
    assert run.data.metrics["best_val_loss"] == pytest.approx(0.9)
    assert run.data.metrics["best_lambda"] == pytest.approx(0.1)
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(0.7)
    assert not [key for key in run.data.metrics if "/" in key]
    assert run.data.params["lambda"] == "0.01,0.1,0.2"
    assert run.data.tags["best_run_id"] == best
    assert client.get_run(best).data.tags["best_of_sweep"] == parent.run_id
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
    active.summary = summary
    text = sweep.summary_text(active)
    assert "best job: logistic-2v3 lambda=0.1" in text
    assert f"runs/{parent.run_id}?workflowType=machine_learning" in text


def test_a_sweep_with_jobs_that_never_recorded_a_run_has_failed(
    tracking_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    active = _active(client, tracking_uri, n_expected=3)
    _child(client, active.parent, 0.01, tmp_path)
    summary = sweep.finish_parent(active)
    assert (summary.n_jobs, summary.n_failed) == (3, 2)
    assert "recorded no run" in summary.first_error
    assert client.get_run(active.parent.run_id).info.status == "FAILED"


def test_children_a_killed_process_left_running_end_killed_with_the_sweep(
    tracking_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    active = _active(client, tracking_uri, n_expected=2)
    _child(client, active.parent, 0.01, tmp_path)
    orphan = _child(client, active.parent, 0.1, tmp_path, end=False)  # its process: SIGKILL
    summary = sweep.finish_parent(active)
    run = client.get_run(orphan)
    assert run.info.status == "KILLED" and "SIGKILL" in run.data.tags["error"]
    assert summary.n_failed == 1


def test_an_interrupted_sweep_parent_ends_killed(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    active = _active(client, tracking_uri, n_expected=0)
    sweep.finish_parent(active, interrupted=True)
    assert client.get_run(active.parent.run_id).info.status == "KILLED"


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
    tiny_data: Path, tracking_uri: str, tmp_path: Path, error: BaseException, status: str
) -> None:
    settings = job_settings(tiny_data, "epochs=5", "early_stopping.enabled=false")
    with pytest.raises(type(error)):
        job.run_tracked(settings, job.load_splits(settings), "stopped", {}, "a: 1\n",
                        tmp_path / "job", callbacks=[StopAt(error)])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("logistic-2v3").experiment_id])
    assert run.info.status == status
    assert run.data.tags["error"] == ("interrupted" if status == "KILLED" else "boom")
    # the metrics of the evaluations up to the stop (the buffer sees each one first) are kept
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2


def test_a_finished_job_keeps_every_file_and_logs_them(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    settings = job_settings(tiny_data, "epochs=3")
    done = job.run_tracked(settings, job.load_splits(settings), "kept", {"overrides": "x"},
                           "a: 1\n", tmp_path / "job")
    client = MlflowClient(tracking_uri)
    run = client.get_run(done.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_hash"] and run.data.tags["git_commit"]
    rows = artifacts.read_metrics(done.folder)
    assert len(rows) == len(done.result.history) * 8 + len(done.result.final)
    for key, value, _, step in rows:
        stored = {m.step: m.value for m in client.get_metric_history(done.run_id, key)}
        assert stored[step] == pytest.approx(value)


def test_a_stop_signal_that_a_finalizer_swallowed_still_ends_the_run_killed(
    tiny_data: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python drops a KeyboardInterrupt raised inside a finalizer; the signal is remembered
    and raised again at the next evaluation."""
    from src import errors

    class Swallowed(Callback):  # as if SIGTERM's KeyboardInterrupt was lost in a __del__
        def on_evaluation(self, evaluation: Evaluation) -> None:
            if evaluation.step == 2 * 4:
                monkeypatch.setattr(errors, "_SIGNALS", [15])

    settings = job_settings(tiny_data, "epochs=50", "early_stopping.enabled=false")
    with pytest.raises(KeyboardInterrupt):
        job.run_tracked(settings, job.load_splits(settings), "swallowed", {}, "a: 1\n",
                        tmp_path / "job", callbacks=[Swallowed()])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("logistic-2v3").experiment_id])
    assert run.info.status == "KILLED"
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) < 50


def test_a_stop_signal_during_a_store_write_is_raised_when_the_write_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from src import errors

    monkeypatch.setattr(errors, "_SIGNALS", [])
    done = []
    with pytest.raises(KeyboardInterrupt):
        with errors.whole_writes():
            errors.raise_interrupt(15, None)  # the handler, as SIGTERM calls it mid-write
            done.append("the rest of the write")
    assert done == ["the rest of the write"]
    with pytest.raises(KeyboardInterrupt):
        errors.raise_interrupt(2, None)  # outside a write: at once
