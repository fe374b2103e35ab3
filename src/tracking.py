"""The one place that speaks MLflow: the store, a job's run, its metric buffer, the served model.

Everything here goes through MLflow's documented API (``mlflow.start_run``, ``MlflowClient``)
from the job's own process. A job's run is opened by :func:`start_job_run`, fed by
:class:`MetricBuffer` (a training callback that sends the metrics in ``log_batch`` calls of
1,000, and every few seconds so that ``mlflow ui`` shows a long run live), given its files
and model by :func:`finish_job_run`, and closed by :func:`end_run`. A sweep's parent run is
created, its children read back and its summary logged here too; what a sweep does with them
is src/sweep.py's business.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from src.artifacts import ARTIFACTS_DIR, WEIGHTS_FILE
from src.config import PROJECT_ROOT
from src.data import PROCESSED_FILE, data_hash
from src.errors import TrackingError, one_line, whole_writes
from src.training import Callback, Evaluation, StopTraining

log = logging.getLogger(__name__)

FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
ERROR_TAG = "error"  # why a run FAILED or was KILLED
MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value
MAX_METRICS_PER_BATCH = 1000  # the most MLflow accepts in one log_batch call
FLUSH_SECONDS = 5.0  # metrics wait at most this long, so that `mlflow ui` shows a run live
# MLflow 3's UI opens an experiment with this tag in its model-training view.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# A tracking server that is down or hung is found out in seconds, not after MLflow's default
# of 7 retries with a 120 s timeout each (about 20 minutes). A user's own values are kept.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "6",
}


def tag_text(text: str) -> str:
    """``text`` cut to what MLflow keeps in a tag value."""
    return text[:MAX_TAG_CHARS]


def safe_uri(uri: str) -> str:
    """The store's address without a password, for messages."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


# --------------------------------------------------------------------------- the store


def use_short_http_retries() -> None:
    """Set MLflow's HTTP retry and timeout variables to small values, unless the user has."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # each retry would print a warning that quotes the whole exception: the one error line
    # that follows says it all
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold a file lock beside a SQLite store while it is opened: MLflow migrates a new
    store's schema without a lock, and processes that open a fresh store together break it."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        yield
        return
    from filelock import FileLock

    database = Path(tracking_uri[len(prefix) :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(database.with_name(database.name + ".lock"))):
        yield


def open_store(tracking_uri: str) -> MlflowClient:
    """A client on the store, reached once (a new SQLite store is created under the lock).

    Raises
    ------
    TrackingError
        The store cannot be reached or opened: one line naming it and what to do.
    """
    use_short_http_retries()
    # MLflow prints each run's address without the model-training view; ours carry it
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        with store_lock(tracking_uri):
            client = MlflowClient(tracking_uri)
            client.search_experiments(max_results=1)
    except Exception as error:
        advice = (
            "start the tracking server (`make server`) or check MLFLOW_TRACKING_URI"
            if tracking_uri.startswith(("http://", "https://"))
            else "check MLFLOW_TRACKING_URI (or mlflow.tracking_uri) and that the store is writable"
        )
        raise TrackingError(
            f"the MLflow store {safe_uri(tracking_uri)} cannot be reached "
            f"({_short(error)}); {advice}"
        ) from None
    return client


def _short(error: BaseException, limit: int = 300) -> str:
    """What went wrong, in a few words: MLflow's HTTP errors quote whole retry chains."""
    text = one_line(error)
    if "Connection refused" in text:
        return "connection refused"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT')} s"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lost_store(tracking_uri: str, error: BaseException) -> TrackingError:
    """The error of a store that failed in the middle of a run."""
    return TrackingError(f"the MLflow store {safe_uri(tracking_uri)} failed: {_short(error)}")


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
    """The id of the experiment called ``name``, created with :data:`EXPERIMENT_TAGS` if
    needed (safe against a parallel job creating it at the same moment)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name,
            artifact_location=artifact_location(client.tracking_uri, name),
            tags=EXPERIMENT_TAGS,
        )
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


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


_DATA_HASHES: dict[tuple[str, int, int], str] = {}


def cached_data_hash(data_dir: Path) -> str:
    """:func:`src.data.data_hash`, computed once per file version in this process (as DVC
    does, by size and modification time): the jobs of a sweep share their data."""
    path = data_dir / PROCESSED_FILE
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DATA_HASHES:
        _DATA_HASHES[key] = data_hash(data_dir)
    return _DATA_HASHES[key]


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def ui_address(
    tracking_uri: str, experiment_id: str, run_id: str | None = None, view: str | None = None
) -> str:
    """The address of an experiment's runs table (or one of its runs) in MLflow's UI, in its
    model-training view: the tracking server's own address, or `mlflow ui`'s default.
    ``view`` is the key of a view shared by :func:`share_runs_view`."""
    base = safe_uri(tracking_uri) if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI
    path = f"/#/experiments/{experiment_id}"
    path += f"/runs/{run_id}" if run_id is not None else "/runs"
    query = "workflowType=machine_learning"
    if view is not None:
        query += f"&viewStateShareKey={view}"
    return f"{base.rstrip('/')}{path}?{query}"


def run_address(tracking_uri: str, run_id: str) -> str:
    """A run's address in MLflow's UI (:func:`ui_address`); the bare run id if the store
    cannot say which experiment holds it."""
    try:
        experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:
        return run_id
    return ui_address(tracking_uri, experiment, run_id)


# MLflow's UI opens the runs table as a shared view when its address carries
# `viewStateShareKey=<key>`: the view is the JSON of the experiment's tag of this prefix.
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def column(kind: str, key: str) -> str:
    """A runs-table column as MLflow's UI names it: ``metrics.`final_val_loss```."""
    return f"{kind}.`{key}`"


def share_runs_view(
    client: MlflowClient,
    experiment_id: str,
    key: str,
    columns: Sequence[str],
    order_by: str,
    ascending: bool = True,
    search: str = "",
) -> None:
    """Store a view of the experiment's runs table that ``ui_address(..., view=key)`` opens:
    the runs matching ``search`` (MLflow's filter syntax), the ``columns``
    (:func:`column`) beside their names, sorted by the column ``order_by``."""
    state = {
        "searchFilter": search,
        "orderByKey": order_by,
        "orderByAsc": ascending,
        "selectedColumns": list(columns),
    }
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))


# --------------------------------------------------------------------------- a job's run


def source_tags() -> dict[str, str]:
    """The tags MLflow's fluent API gives a new run about its source: user, type, commit."""
    return {
        "mlflow.user": getpass.getuser(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": git_commit(),
    }


def start_job_run(
    client: MlflowClient,
    experiment_name: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, str],
    parent: tuple[str, str] | None = None,
) -> str:
    """Open a job's run as MLflow's active run, with its tags and params; returns its id.

    ``parent`` is ``(run_id, experiment_id)`` of a sweep's parent run to nest under.
    """
    exp_id = parent[1] if parent is not None else experiment_id(client, experiment_name)
    all_tags = {**source_tags(), **tags}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent[0]
    # MlflowClient.create_run, then start_run on it: the fluent start_run of a new run would
    # ask GitPython for the same commit (a third of a second to import it)
    with whole_writes():
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    try:
        with whole_writes():
            mlflow.set_tracking_uri(client.tracking_uri)
            mlflow.start_run(run_id=run_id)  # the active run, for log_model
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    except BaseException as error:  # Ctrl-C too: the run never stays RUNNING
        if isinstance(error, KeyboardInterrupt):
            end_run(client, run_id, KILLED, "interrupted")
        else:
            end_run(client, run_id, FAILED, one_line(error))
        if not isinstance(error, Exception):
            raise
        raise lost_store(client.tracking_uri, error) from error
    return run_id


class MetricBuffer(Callback):
    """The training callback that sends every evaluation's metrics to a run.

    Metrics wait here and leave in ``log_batch`` calls of :data:`MAX_METRICS_PER_BATCH`
    (one call per metric costs milliseconds on SQLite and would dominate the run), or when
    the oldest has waited :data:`FLUSH_SECONDS`. Every metric is kept in :attr:`rows` too,
    for the run's local copy. If the store fails, the error is kept, nothing more is sent,
    and the training stops at this evaluation (:class:`src.training.StopTraining`), with its
    results intact for the job to keep on disk.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.rows: list[Metric] = []  # every metric of the run, in order
        self.sent = 0  # rows[:sent] are in the store
        self.sent_at = time.monotonic()
        self.error: TrackingError | None = None

    def on_evaluation(self, evaluation: Evaluation) -> None:
        now, step = int(time.time() * 1000), evaluation.step
        self.rows.extend(Metric(k, float(v), now, step) for k, v in evaluation.metrics.items())
        waiting = len(self.rows) - self.sent
        if waiting >= MAX_METRICS_PER_BATCH:
            self.flush(full_only=True)
        elif time.monotonic() - self.sent_at > FLUSH_SECONDS:
            self.flush()
        if self.error is not None:
            raise StopTraining(str(self.error))

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics outside the evaluations (the final ones), sent with the next flush."""
        now = int(time.time() * 1000)
        self.rows.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())

    def link_model(self, model_id: str, step: int) -> None:
        """Link the waiting metrics of ``step`` to the logged model ``model_id``, as MLflow's
        ``log_model`` links the ones already in the store."""
        for index in range(self.sent, len(self.rows)):
            row = self.rows[index]
            if row.step == step:
                self.rows[index] = Metric(row.key, row.value, row.timestamp, row.step,
                                          model_id=model_id)

    def flush(self, full_only: bool = False) -> None:
        """Send what waits (only whole calls of 1,000 if asked); keeps the first store error."""
        least = MAX_METRICS_PER_BATCH if full_only else 1
        while self.error is None and len(self.rows) - self.sent >= least:
            batch = self.rows[self.sent : self.sent + MAX_METRICS_PER_BATCH]
            try:
                with whole_writes():
                    self.client.log_batch(self.run_id, metrics=batch)
            except Exception as error:
                self.error = lost_store(self.client.tracking_uri, error)
                return
            self.sent += len(batch)
        self.sent_at = time.monotonic()


def log_model(weights_file: Path, step: int = 0, name: str = "model") -> str:
    """Log the served model (src/serving.py, models from code) to the active run as an
    artifact called ``model``, the weights as an ``.npz``; returns the model's id. ``name``
    names the logged model in the experiment's models tab."""
    from src import serving

    # MLflow checks the input example against the signature and says so at INFO level:
    # the job's log keeps that line, the console does not need it.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
    info = mlflow.pyfunc.log_model(
        name=name,
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
    return info.model_id


def finish_job_run(
    client: MlflowClient,
    buffer: MetricBuffer,
    folder: Path,
    tags: Mapping[str, str],
    model_name: str,
    model_step: int,
) -> None:
    """Send the tags known at the end, the files of ``folder`` (its ``artifacts/``), the
    served model and the last metrics to the buffer's run.

    Raises
    ------
    TrackingError
        The store failed; what it had not received is still in ``folder``.
    """
    if buffer.error is not None:  # the store failed during the training
        raise buffer.error
    try:
        with whole_writes():
            client.log_batch(buffer.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            client.log_artifacts(buffer.run_id, str(folder / ARTIFACTS_DIR))
        # Logged before the waiting metrics: MLflow links the model to the metrics of its
        # step that the store holds by reading back every metric history of the run; the
        # ones still waiting here are linked by the buffer as they are sent.
        model_id = log_model(folder / ARTIFACTS_DIR / WEIGHTS_FILE, step=model_step,
                             name=model_name)
    except Exception as error:
        raise lost_store(client.tracking_uri, error) from error
    buffer.link_model(model_id, model_step)
    buffer.flush()
    if buffer.error is not None:
        raise buffer.error


def end_run(client: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
    """End a run with ``status`` (FINISHED, FAILED, KILLED), ``error`` as its ``error`` tag;
    a run that has already ended is left alone. Ends MLflow's active run if it is this one.
    A store that fails here is reported in the log, not raised: the caller's error wins."""
    with whole_writes():
        _end_run(client, run_id, status, error)


def _end_run(client: MlflowClient, run_id: str, status: str, error: str | None) -> None:
    active = mlflow.active_run()
    try:
        if client.get_run(run_id).info.status == RUNNING:
            if error is not None:
                client.set_tag(run_id, ERROR_TAG, tag_text(error))
            client.set_terminated(run_id, status=status)
    except Exception as lost:
        log.warning("could not end the MLflow run %s: %s", run_id, one_line(lost))
    finally:
        if active is not None and active.info.run_id == run_id:
            # the run has its status already: MLflow ends it again with the same status and
            # pops its active-run stack (on a store that is gone, that raises once more)
            try:
                mlflow.end_run(status=status)
            except Exception as lost:
                log.warning("could not end the MLflow run %s: %s", run_id, one_line(lost))
                _forget_active_run()


def _forget_active_run() -> None:
    from mlflow.tracking.fluent import _active_run_stack

    _active_run_stack.get().clear()


def record_failed_job(
    client: MlflowClient,
    experiment_name: str,
    run_name: str,
    tags: Mapping[str, str],
    error: str,
    parent: tuple[str, str] | None,
) -> str:
    """Record a job that failed before its run started (e.g. unreadable data) as a FAILED
    run, so that a sweep shows every job; returns its id."""
    exp_id = parent[1] if parent else experiment_id(client, experiment_name)
    all_tags = {**tags, ERROR_TAG: tag_text(error)}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent[0]
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    client.set_terminated(run.info.run_id, status=FAILED)
    return run.info.run_id


# --------------------------------------------------------------------------- sweep parents


def start_parent(
    client: MlflowClient, experiment_name: str, run_name: str, tags: Mapping[str, str]
) -> tuple[str, str]:
    """Create a sweep's parent run (RUNNING until ended); returns (run id, experiment id)."""
    exp_id = experiment_id(client, experiment_name)
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id, exp_id


def children(client: MlflowClient, parent_id: str, experiment: str) -> list[Any]:
    """The runs nested under ``parent_id``, oldest first."""
    runs = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=10000,
    )
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def metric_history(client: MlflowClient, run_id: str, name: str) -> tuple[np.ndarray, ...]:
    """(steps, values) of one metric of a run, in step order."""
    history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
    return (np.array([m.step for m in history], dtype=np.float64),
            np.array([m.value for m in history], dtype=np.float64))


def download(client: MlflowClient, run_id: str, path: str, folder: Path) -> Path | None:
    """One artifact of a run, downloaded into ``folder``; None if the run has none there."""
    try:
        return Path(client.download_artifacts(run_id, path, str(folder)))
    except (MlflowException, OSError):
        return None


def log_parent_summary(
    client: MlflowClient,
    parent_id: str,
    folder: Path,
    params: Mapping[str, str],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
) -> None:
    """A finished sweep's files (``folder``), and the best job's params, metrics and tags."""
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.log_artifacts(parent_id, str(folder))


def mark_killed(client: MlflowClient, runs: Sequence[Any], reason: str) -> int:
    """End every run of ``runs`` still RUNNING as KILLED with ``reason``; returns how many."""
    stale = [r for r in runs if r.info.status == RUNNING]
    for run in stale:
        client.set_tag(run.info.run_id, ERROR_TAG, reason)
        client.set_terminated(run.info.run_id, status=KILLED)
    return len(stale)
