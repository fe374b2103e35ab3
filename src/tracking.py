"""The one place that speaks MLflow: the tracking process, job runs, models, sweep parents.

A training job is one MLflow run, written by :func:`serve` in a process of its own (the
training process drives it through :class:`src.tracker.JobRun`): creating the run, the
metrics in ``log_batch`` calls, the served model and the artifacts.
A multirun gets one parent run, created by :func:`start_parent` before any job, whose id
travels to the jobs through a small file in the sweep directory (:func:`write_parent`,
:func:`read_parent`), so jobs may run in other processes. :func:`finish_parent` draws the
comparison from the children and closes the parent.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from src import plots
from src.config import PROJECT_ROOT
from src.data import data_hash
from src.tracker import FAILED, FINISHED, KILLED, WEIGHTS_FILE, save

log = logging.getLogger(__name__)

__all__ = ["FAILED", "FINISHED", "KILLED"]  # the run statuses, shared with src.tracker

PARENT_FILE = "mlflow_parent.json"
MAX_METRICS_PER_BATCH = 1000  # the most MLflow accepts in one log_batch call
# The tracking process yields the CPU to the training (the lowest priority): while a job
# trains it writes in the gaps, and at the end of a run the training process waits for it.
NICENESS = 19
ERROR_TAG = "error"  # why a run FAILED or was KILLED


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


_DATA_HASHES: dict[tuple[str, int, int], str] = {}


def cached_data_hash(data_dir: Path) -> str:
    """:func:`src.data.data_hash`, computed once per file version in this process (as DVC
    does, by size and modification time): the jobs of a sweep share their data."""
    from src.data import PROCESSED_FILE

    stat = (data_dir / PROCESSED_FILE).stat()
    key = (str((data_dir / PROCESSED_FILE).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DATA_HASHES:
        _DATA_HASHES[key] = data_hash(data_dir)
    return _DATA_HASHES[key]


def log_model(weights_file: Path, step: int = 0) -> None:
    """Log the served model (src/serving.py, models from code) to the active run as
    ``model``: a pyfunc with signature and input example, the weights as an ``.npz``."""
    import mlflow

    from src import serving

    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PROJECT_ROOT / "src" / "serving.py"),
        artifacts={"weights": str(weights_file)},
        code_paths=[str(PROJECT_ROOT / "src")],
        signature=serving.signature(),
        input_example=serving.input_example(),
        # explicit: inferring requirements would import and time the model in a subprocess
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"],
        # the evaluation whose weights the model holds: MLflow links that step's metrics
        # to the model (shown on its page in `mlflow ui`)
        step=step,
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


class RunWriter:
    """One job's run, in the tracking process: created on "start", closed on "end".

    Metrics arrive in messages of up to ``MAX_METRICS_PER_BATCH`` (the training process
    gathers them) and are written at once, one ``log_batch`` call each. The first error the
    store gives is kept, reported once to the training process (which stops the training),
    and ends the run FAILED.
    """

    def __init__(self, connection: Connection, message: dict[str, Any]) -> None:
        import mlflow

        self.connection = connection
        self.job = message["job"]
        self.error: str | None = None
        self.folder: Path | None = None
        self.run_id: str | None = None
        mlflow.set_tracking_uri(message["tracking_uri"])
        self.client = MlflowClient(message["tracking_uri"])
        parent = message["parent"]
        exp_id = (
            parent["experiment_id"]
            if parent is not None
            else experiment_id(self.client, message["experiment_name"])
        )
        run = mlflow.start_run(
            experiment_id=exp_id,
            run_name=message["run_name"],
            parent_run_id=parent["run_id"] if parent is not None else None,
            tags=message["tags"],
        )
        self.run_id = run.info.run_id
        try:
            params = [Param(k, str(v)) for k, v in message["params"].items()]
            self.client.log_batch(self.run_id, params=params)
        except Exception as error:
            self.end(FAILED, _one_line(error))
            raise

    def reply(self, op: str, **fields: Any) -> None:
        _reply(self.connection, op, self.job, **fields)

    def fail(self, error: BaseException) -> None:
        """Keep the first error; tell the training process (it stops at its next evaluation)."""
        if self.error is None:
            self.error = _one_line(error)
            self.reply("error", error=self.error)

    def add_tags(self, tags: Mapping[str, str]) -> None:
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as error:
            self.fail(error)

    def add_source_tags(self, data_dir: Path) -> None:
        """The tags that take a moment (asking git, hashing ~50 MB): the code and the data."""
        try:
            tags = {"git_commit": git_commit(), "data_hash": cached_data_hash(data_dir)}
        except Exception as error:
            self.fail(error)
            return
        self.add_tags(tags)

    def write_metrics(self, rows: Sequence[Sequence[Any]]) -> None:
        """Write ``[key, value, timestamp_ms, step]`` rows (dropped after an error: the run
        will end FAILED)."""
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in rows]
        for first in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            if self.error is not None:
                return
            try:
                self.client.log_batch(
                    self.run_id, metrics=metrics[first : first + MAX_METRICS_PER_BATCH]
                )
            except Exception as error:
                self.fail(error)

    def finish(self, message: dict[str, Any]) -> None:
        """The final metrics and tags, and the served model (the training process draws the
        figures into the same folder meanwhile)."""
        now = int(time.time() * 1000)
        step = message["final_step"]
        self.write_metrics([[k, v, now, step] for k, v in message["final"].items()])
        if message["tags"]:
            self.add_tags(message["tags"])
        self.folder = Path(message["folder"])
        if self.error is not None:
            return
        try:
            log_model(self.folder / WEIGHTS_FILE, step=message["final_step"])
        except Exception as error:
            self.fail(error)

    def upload(self) -> None:
        """Every file of the run's folder as the run's artifacts."""
        if self.folder is None or self.error is not None:
            return
        try:
            self.client.log_artifacts(self.run_id, str(self.folder))
        except Exception as error:
            self.fail(error)

    def end(self, status: str, error: str | None = None) -> str | None:
        """End the run (FAILED with the kept error when asked to end FINISHED after one);
        returns the kept error, if any."""
        import mlflow

        if status == FINISHED and self.error is not None:
            status, error = FAILED, self.error
        try:
            if error is not None:
                self.client.set_tag(self.run_id, ERROR_TAG, error[:5000])
        finally:
            mlflow.end_run(status=status)
        return self.error


def _one_line(error: BaseException) -> str:
    """What MLflow said, as one line that says who said it."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"MLflow: {text}"


def _reply(connection: Connection, op: str, job: int, **fields: Any) -> None:
    connection.send_bytes(json.dumps({"op": op, "job": job, **fields}).encode())


def main(fd: int) -> None:
    """The tracking process (``python -m src.tracking FD``, started by
    :class:`src.tracker.TrackingProcess`), talking over the socket ``fd``.

    Ctrl-C is ignored here: the training process gets it too, and ends its run KILLED.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):
        os.nice(NICENESS)
    # MLflow, SQLAlchemy and matplotlib leave some 200,000 long-lived objects that every full
    # garbage collection would walk again; a run's thousands of ORM rows trigger many.
    gc.freeze()
    serve(Connection(fd))


def serve(connection: Connection) -> None:
    """Carry out the runs that the training process describes (:class:`src.tracker.JobRun`),
    one at a time, until the pipe closes. A run the training process leaves open (it died,
    or gave up waiting) ends KILLED; so does one whose messages stop making sense. Whatever
    happens, no run is left for MLflow's exit hook, which would end it FINISHED."""
    writer: RunWriter | None = None
    try:
        while True:
            try:
                message = json.loads(connection.recv_bytes())
            except (EOFError, OSError):
                if writer is not None:
                    writer.end(KILLED, "the training process ended without ending the run")
                    writer = None
                return
            writer = _carry_out(connection, writer, message)
    finally:
        if writer is not None:  # a bug, or a message cut in two: say so on the run
            writer.end(KILLED, "the tracking process stopped on an error (see its log)")


def _carry_out(
    connection: Connection, writer: RunWriter | None, message: dict[str, Any]
) -> RunWriter | None:
    """Do what ``message`` says; returns the run being written afterwards, if any."""
    op, job = message["op"], message["job"]
    if op == "start":
        if writer is not None:  # the training process gave up on it (a second Ctrl-C)
            writer.end(KILLED, "interrupted")
        try:
            writer = RunWriter(connection, message)
        except Exception as error:
            _reply(connection, "started", job, run_id=None, error=_one_line(error))
            return None
        _reply(connection, "started", job, run_id=writer.run_id)
        writer.add_source_tags(Path(message["data_dir"]))
    elif writer is None or writer.job != job:
        if op == "end":  # the run never started: nothing to end
            _reply(connection, "ended", job)
    elif op == "metrics":
        writer.write_metrics(message["metrics"])
    elif op == "finish":
        writer.finish(message)
    elif op == "upload":
        writer.upload()
    elif op == "end":
        try:
            kept = writer.end(message["status"], message["error"])
        except Exception as error:
            kept = _one_line(error)
        _reply(connection, "ended", job, error=kept)
        return None
    return writer


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
                    save(draw(jobs), out / "plots" / name)
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


if __name__ == "__main__":
    main(int(sys.argv[1]))
