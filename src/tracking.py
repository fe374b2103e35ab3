"""The one place that speaks MLflow: job runs, batched metrics, artifacts, models, sweep parents.

A training job is one MLflow run (:class:`JobRun`). Metrics reach MLflow in batches through
:class:`MetricLogger`, a :class:`src.training.Callback` that writes from a background
thread, because one SQLite write per metric per step would cost more than the training.
A multirun gets one parent run, created by :func:`start_parent` before any job, whose id
travels to the jobs through a small file in the sweep directory (:func:`write_parent`,
:func:`read_parent`), so jobs may run in other processes. :func:`finish_parent` draws the
comparison from the children and closes the parent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from src import plots
from src.config import PROJECT_ROOT, Settings
from src.data import Splits
from src.training import Callback, Evaluation, TrainResult

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
MAX_METRICS_PER_BATCH = 1000  # the most MLflow accepts in one log_batch call
FLUSH_SECONDS = 5.0  # live curves in `mlflow ui` at most this old, few writes per run
# Batches waiting for the writer at most: a run that makes metrics faster than the store
# takes them waits for it, so the backlog (and the wait at the end or at Ctrl-C) stays short.
MAX_QUEUED_BATCHES = 2
FIGURE_DPI = 80  # small PNGs, fast to render
ERROR_TAG = "error"  # why a run FAILED or was KILLED
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # MLflow's RunStatus names


def git_commit() -> str:
    """The project's current git commit, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def artifact_location(tracking_uri: str, name: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file, so that runs
    and artifacts stay together whatever the working directory (MLflow's default is
    ``./mlruns`` under the cwd); None (the server's choice) for any other store."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    folder = Path(tracking_uri[len(prefix) :]).resolve().parent / "mlartifacts"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return (folder / safe).as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment called ``name``, created if needed (safe against a
    parallel job creating it at the same moment)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location(client.tracking_uri, name)
        )
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class MetricLogger(Callback):
    """Buffers the per-evaluation metrics and writes them with ``log_batch`` from a
    background thread, so that the store's writes overlap the training's numpy work.

    The queued metrics leave every ``FLUSH_SECONDS`` (so `mlflow ui` shows a live run) or
    when they fill one ``log_batch`` call of ``MAX_METRICS_PER_BATCH``; at most
    ``MAX_QUEUED_BATCHES`` wait for the writer, so training never runs far ahead of the
    store. :meth:`close` writes the rest and waits for the thread, raising the first error
    the store gave.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.error: BaseException | None = None
        self.batches: queue.Queue[list[Metric] | Callable[[], None] | None] = queue.Queue(
            maxsize=MAX_QUEUED_BATCHES
        )
        self.writer = threading.Thread(target=self._write, name="mlflow-metrics", daemon=True)
        self.writer.start()

    def _write(self) -> None:
        while (batch := self.batches.get()) is not None:
            if self.error is not None:
                continue  # keep draining; the first error is reported by close()
            try:
                if callable(batch):
                    batch()
                    continue
                for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
                    self.client.log_batch(
                        self.run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH]
                    )
            except BaseException as error:  # handed to the training thread by close()
                self.error = error

    def submit(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the writer thread, in order with the metric batches (for slow
        bookkeeping that need not delay the training, such as hashing the data)."""
        self.batches.put(work)

    def on_evaluation(self, evaluation: Evaluation) -> None:
        now = int(time.time() * 1000)
        self.pending.extend(
            Metric(key, float(value), now, evaluation.step)
            for key, value in evaluation.metrics.items()
        )
        # By time only: writing while training competes with it for the GIL (measured by
        # benchmarks/tracking_overhead.py), so a short run writes once, at the end.
        if len(self.pending) >= MAX_METRICS_PER_BATCH and self.writer.is_alive():
            # a full log_batch call leaves now; the rest waits for the next one
            self.batches.put(self.pending[:MAX_METRICS_PER_BATCH])
            self.pending = self.pending[MAX_METRICS_PER_BATCH:]
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def log(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Queue metrics that are not per evaluation (``final/*``, ``best/step``)."""
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        """Hand the queued metrics to the writer thread (it cuts them into batches)."""
        if self.pending and self.writer.is_alive():
            self.batches.put(self.pending)
        self.pending = []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        """Write what is left, wait for the writer; raise the store's first error, if any."""
        if self.writer.is_alive():
            self.flush()
            self.batches.put(None)
            self.writer.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def curves_from_history(history: Sequence[Evaluation]) -> plots.Curves:
    """Per-step metrics as curves against the epoch: name -> (epochs, values)."""
    if not history:
        return {}
    epochs = np.array([e.epoch for e in history], dtype=np.float64)
    return {
        name: (epochs, np.array([e.metrics[name] for e in history], dtype=np.float64))
        for name in history[0].metrics
    }


def _weights_file(result: TrainResult, labels: Sequence[int], path: Path) -> Path:
    np.savez(
        path,
        weights=np.asarray(result.model.weights),
        bias=np.asarray(result.model.bias),
        labels=np.asarray(labels, dtype=np.int64),
    )
    return path


def write_artifacts(
    result: TrainResult, splits: Splits, settings: Settings, config_yaml: str, folder: Path
) -> Path:
    """Render a run's figures and tables into ``folder`` under the stable artifact names.

    Returns the weights file ``weights/weights.npz`` (weights, bias and the digit of each
    class), which also goes into the served model.
    """
    labels = settings.labels  # class index -> digit
    for sub in ("plots", "tables", "config", "weights"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    curves = curves_from_history(result.history)

    def save(fig: Any, name: str) -> None:
        fig.set_dpi(FIGURE_DPI)
        plots.save_figure(fig, folder / "plots" / name)

    if curves:
        save(plots.learning_curves(curves, "loss"), "loss_curves.png")
        save(plots.learning_curves(curves, "accuracy"), "accuracy_curves.png")
    weights = np.asarray(result.model.weights)
    if weights.ndim == 1:
        titles = [f"{labels[1]} (+) vs {labels[0]} (-)"]
    else:
        titles = [str(d) for d in labels]
    save(plots.weight_heatmaps(weights, titles), "weights.png")

    digits = np.asarray(labels)
    y_true = digits[splits.test.labels]
    y_pred = digits[result.model.predict(splits.test.images)]
    shown = sorted(labels)
    matrix = plots.confusion_matrix(y_true, y_pred, shown)
    save(plots.confusion_figure(matrix, shown), "confusion_matrix.png")
    pairs = plots.most_confused_pairs(matrix, shown)
    (folder / "tables" / "most_confused_pairs.json").write_text(json.dumps(pairs, indent=2))
    if weights.ndim == 2:
        save(
            plots.class_means_and_weights(splits.train.images, splits.train.labels, weights),
            "class_means_and_weights.png",
        )
    (folder / "config" / "config.yaml").write_text(config_yaml)
    return _weights_file(result, labels, folder / "weights" / "weights.npz")


def log_model(weights_file: Path) -> None:
    """Log the served model (src/serving.py, models from code) to the active run as
    ``model``: a pyfunc with signature and input example, the weights as an ``.npz``."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    with np.load(weights_file, allow_pickle=False) as saved:
        n_features = saved["weights"].shape[0]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float64), (-1, n_features))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
    )
    # two rows of pixel values, as a user sends them
    example = np.zeros((2, n_features), dtype=np.float64)
    example[1, : n_features // 2] = 255.0
    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PROJECT_ROOT / "src" / "serving.py"),
        artifacts={"weights": str(weights_file)},
        code_paths=[str(PROJECT_ROOT / "src")],
        signature=signature,
        input_example=example,
        # explicit: inferring requirements would import and time the model in a subprocess
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"],
    )


@dataclass(frozen=True)
class ParentRef:
    """Where a sweep's parent run is: what a job needs to nest its run under it."""

    run_id: str
    experiment_id: str


def write_parent(sweep_dir: Path, parent: ParentRef) -> None:
    """Leave the parent's id in the sweep directory for the jobs (written atomically)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f".{PARENT_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": parent.run_id, "experiment_id": parent.experiment_id}))
    os.replace(tmp, sweep_dir / PARENT_FILE)


def read_parent(sweep_dir: Path) -> ParentRef | None:
    """The parent run a job of this sweep nests under, or None if there is none."""
    path = sweep_dir / PARENT_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return ParentRef(run_id=data["run_id"], experiment_id=data["experiment_id"])


def start_parent(
    tracking_uri: str, experiment_name: str, run_name: str, tags: Mapping[str, str]
) -> ParentRef:
    """Create a sweep's parent run (RUNNING until :func:`finish_parent` or :func:`end_run`)."""
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment_name)
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    return ParentRef(run_id=run.info.run_id, experiment_id=exp_id)


def end_run(tracking_uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """End a run with ``status`` (FINISHED, FAILED, KILLED), recording ``error`` as a tag.
    A run that has already ended is left alone."""
    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return
    if error is not None:
        client.set_tag(run_id, ERROR_TAG, error[:5000])
    client.set_terminated(run_id, status=status)


def failed_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    tags: Mapping[str, str],
    error: str,
    parent: ParentRef | None,
) -> str:
    """Record a job that failed before its run started (e.g. unreadable data) as a FAILED run,
    so that a sweep shows every job."""
    client = MlflowClient(tracking_uri)
    exp_id = parent.experiment_id if parent else experiment_id(client, experiment_name)
    all_tags = {**tags, ERROR_TAG: error[:5000]}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    client.set_terminated(run.info.run_id, status=FAILED)
    return run.info.run_id


class JobRun:
    """The MLflow run of one training job, from start to FINISHED, FAILED or KILLED."""

    def __init__(
        self,
        settings: Settings,
        run_name: str,
        tags: Mapping[str, str],
        parent: ParentRef | None = None,
        slow_tags: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """Start the run with ``tags`` and the params; ``slow_tags`` (the git commit, the
        data's hash) are computed and logged on the writer thread while training runs."""
        import mlflow

        self.settings = settings
        mlflow.set_tracking_uri(settings.tracking_uri)
        self.client = MlflowClient(settings.tracking_uri)
        exp_id = (
            parent.experiment_id
            if parent is not None
            else experiment_id(self.client, settings.experiment_name)
        )
        active = mlflow.start_run(
            experiment_id=exp_id,
            run_name=run_name,
            parent_run_id=parent.run_id if parent else None,
            tags=dict(tags),
        )
        self.run_id = active.info.run_id
        try:
            self.client.log_batch(
                self.run_id, params=[Param(k, v) for k, v in settings.params.items()]
            )
            self.metrics = MetricLogger(self.client, self.run_id)
        except BaseException as error:  # the run exists: it must not stay RUNNING
            interrupted = isinstance(error, KeyboardInterrupt)
            reason = "interrupted" if interrupted else " ".join(str(error).split())
            self.client.set_tag(self.run_id, ERROR_TAG, reason[:5000])
            mlflow.end_run(status=KILLED if interrupted else FAILED)
            raise
        if slow_tags is not None:
            self.metrics.submit(
                lambda: self.client.log_batch(
                    self.run_id, tags=[RunTag(k, v) for k, v in slow_tags().items()]
                )
            )

    def log_result(self, result: TrainResult, splits: Splits, config_yaml: str) -> None:
        """Log the final metrics, every artifact and the served model."""
        if result.history:  # lets the sweep parent plot the children's curves by epoch
            first = result.history[0]
            self.client.set_tag(self.run_id, "steps_per_epoch", f"{first.step / first.epoch:.6g}")
        final = dict(result.final)
        final.setdefault("best/step", result.best_step)
        self.metrics.log(final, step=result.best_step)
        self.metrics.close()  # every metric is in the store before the run's other writes
        with tempfile.TemporaryDirectory(prefix="mnist-run-") as tmp:
            folder = Path(tmp)
            weights_file = write_artifacts(result, splits, self.settings, config_yaml, folder)
            self.client.log_artifacts(self.run_id, str(folder))
            log_model(weights_file)

    def end(self, status: str, error: str | None = None) -> None:
        """End the run; queued metrics are written first when possible."""
        import mlflow

        interrupted = False
        try:
            self.metrics.close()
        except KeyboardInterrupt:  # a second Ctrl-C while the last metrics are written
            status, error, interrupted = KILLED, "interrupted", True
        except Exception:  # the run must still end, whatever the store says about metrics
            log.warning("could not write the last metrics of run %s", self.run_id)
        if error is not None:
            self.client.set_tag(self.run_id, ERROR_TAG, error[:5000])
        mlflow.end_run(status=status)
        if interrupted:
            raise KeyboardInterrupt


@dataclass(frozen=True)
class SweepSummary:
    """How a sweep went, from its children in MLflow."""

    n_jobs: int
    n_failed: int
    first_error: str | None


def _float(value: str | None) -> float | str:
    try:
        return float(value) if value is not None else math.nan
    except ValueError:
        return value  # type: ignore[return-value]


def _sweep_job(client: MlflowClient, run: Any, folder: Path) -> plots.SweepJob | None:
    """A finished child as the data plots.sweep_comparison needs; None if it has no curves."""
    run_id = run.info.run_id
    steps_per_epoch = float(run.data.tags.get("steps_per_epoch", "1"))
    curves: plots.Curves = {}
    for name in ("train/accuracy", "val/accuracy", "test/accuracy", "val/loss", "weights/norm"):
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        if history:
            curves[name] = (
                np.array([m.step / steps_per_epoch for m in history]),
                np.array([m.value for m in history]),
            )
    if "val/accuracy" not in curves:
        return None
    weights = None
    try:
        local = client.download_artifacts(run_id, "weights/weights.npz", str(folder))
        with np.load(local, allow_pickle=False) as saved:
            weights = saved["weights"]
    except (MlflowException, OSError):
        log.warning("run %s has no weights artifact", run_id)
    final = {k: v for k, v in run.data.metrics.items() if k.startswith(("final/", "best/"))}
    if weights is not None:
        final["weights/norm"] = float(np.linalg.norm(weights))  # of the weights the run kept
    elif "weights/norm" in curves:
        final["weights/norm"] = float(curves["weights/norm"][1][-1])
    else:
        final["weights/norm"] = math.nan
    p = run.data.params
    params = {
        "lambda": _float(p.get("lambda")),
        "lr": _float(p.get("lr")),
        "seed": int(_float(p.get("seed", "0"))),
        "model": p.get("model.name", "?"),
    }
    return plots.SweepJob(
        name=run.info.run_name, params=params, curves=curves, final=final, weights=weights
    )


def finish_parent(tracking_uri: str, parent: ParentRef, interrupted: bool = False) -> SweepSummary:
    """Draw the sweep comparison from the parent's children, log it to the parent, end it.

    The parent ends FINISHED when every child finished, FAILED (with the count as its
    ``error`` tag) when some failed, KILLED when ``interrupted``.
    """
    client = MlflowClient(tracking_uri)
    children = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        max_results=10000,
    )
    children = sorted(children, key=lambda r: r.info.start_time or 0)
    failed = [r for r in children if r.info.status != FINISHED]
    first_error = next((r.data.tags.get(ERROR_TAG) for r in failed if ERROR_TAG in r.data.tags),
                       None)
    try:
        with tempfile.TemporaryDirectory(prefix="mnist-sweep-") as tmp:
            folder = Path(tmp)
            (folder / "download").mkdir()
            jobs = []
            for run in children:
                if run.info.status == FINISHED:
                    job = _sweep_job(client, run, folder / "download")
                    if job is not None:
                        jobs.append(job)
            out = folder / "artifacts"
            (out / "plots").mkdir(parents=True)
            (out / "tables").mkdir()
            _summary_table(children, out / "tables" / "sweep_summary.csv")
            if jobs:
                figures = {
                    "sweep_comparison.png": plots.sweep_comparison,
                    "weight_norm_vs_lambda.png": plots.weight_norm_vs_lambda,
                }
                if all(j.weights is not None for j in jobs):
                    figures["weights_by_lambda.png"] = plots.weights_side_by_side
                for name, draw in figures.items():
                    fig = draw(jobs)
                    fig.set_dpi(FIGURE_DPI)
                    plots.save_figure(fig, out / "plots" / name)
            client.log_artifacts(parent.run_id, str(out))
    finally:
        if interrupted:
            end_run(tracking_uri, parent.run_id, KILLED)
        elif failed:
            end_run(
                tracking_uri,
                parent.run_id,
                FAILED,
                error=f"{len(failed)} of {len(children)} jobs failed; first: {first_error}",
            )
        else:
            end_run(tracking_uri, parent.run_id, FINISHED)
    return SweepSummary(n_jobs=len(children), n_failed=len(failed), first_error=first_error)


def _summary_table(children: Sequence[Any], path: Path) -> None:
    """One CSV row per job: name, status, what was swept, final metrics, error."""
    import csv

    metric_names = sorted(
        {k for r in children for k in r.data.metrics if k.startswith(("final/", "best/"))}
    )
    columns = ["run_name", "run_id", "status", "model.name", "lambda", "lr", "seed",
               *metric_names, ERROR_TAG]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in children:
            row = [r.info.run_name, r.info.run_id, r.info.status]
            row += [r.data.params.get(k, "") for k in ("model.name", "lambda", "lr", "seed")]
            row += [r.data.metrics.get(k, "") for k in metric_names]
            row.append(r.data.tags.get(ERROR_TAG, ""))
            writer.writerow(row)
