"""A job's MLflow run as the training process drives it: messages to the tracking process.

MLflow's store costs about 100 µs of Python per metric (SQLAlchemy objects), and figures
and model logging cost a few hundred milliseconds more. Done in the training process, that
work would compete with the training for the interpreter lock and roughly double a short
run. So the MLflow side of every job runs in a second process, :func:`src.tracking.serve`,
started once per training process (on the first job) and reused by the later jobs of a
sweep. This module is the training side: :class:`JobRun` sends the run's description, the
metrics of each evaluation and, at the end, a folder of artifacts, as JSON over a pipe (no
pickle), and waits only when the run ends. At the end both processes work: this one draws
the figures while the tracking process writes the last metrics and logs the served model.

Nothing here imports MLflow (nor matplotlib, until the first figure), so a job that is
refused or finds no data never loads them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from src.config import PROJECT_ROOT, Settings
from src.data import Splits
from src.training import Callback, Evaluation, TrainResult

log = logging.getLogger(__name__)

FIGURE_DPI = 80  # small PNGs, fast to render
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # MLflow's RunStatus names
WEIGHTS_FILE = "weights/weights.npz"  # in the artifacts; also the served model's weights
POLL_SECONDS = 0.5  # how often a wait checks that the tracking process is still alive
# Metrics leave for the tracking process in messages of one full log_batch call (the most
# MLflow takes in one), or when the oldest is FLUSH_SECONDS old (live curves in `mlflow ui`):
# a message per evaluation would wake that process hundreds of times a second, and each
# wake-up takes a core from the training for a moment.
METRICS_PER_MESSAGE = 1000
FLUSH_SECONDS = 2.0


class TrackingError(RuntimeError):
    """MLflow refused or lost part of a run (the store's message), or the tracking process
    stopped."""


# --------------------------------------------------------------------------- the process


@contextlib.contextmanager
def whole_messages() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the message being sent or read is whole.

    A message is a length and then the bytes, written or read in several steps; a
    KeyboardInterrupt between two of them would cut it, and every message after it would
    be read wrongly. A signal that arrives meanwhile is raised again at the end of the block.
    (Signal handlers belong to the main thread; elsewhere this does nothing.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number in previous:
        signal.signal(number, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])


class TrackingProcess:
    """The second process that speaks MLflow (``python -m src.tracking``), and its pipe.

    A plain subprocess of this Python, not a ``multiprocessing`` child: it imports nothing
    of this process (not its ``__main__``, not its start method, which a parallel launcher
    such as joblib's sets to its own), and shares no locks or database connections with it.
    Messages are JSON objects, one per ``send_bytes``, over a socket pair. The process
    ignores Ctrl-C (the whole terminal's process group gets it) and ends a run only when
    told, or when this process disappears (the socket closes).
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)  # with the project importable, whatever the working directory
        paths = [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "src.tracking", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.connection = Connection(ours.detach())

    def alive(self) -> bool:
        return self.process.poll() is None

    def stopped(self) -> TrackingError:
        """The error that says the process has gone."""
        return TrackingError(
            f"the MLflow tracking process stopped (exit code {self.process.poll()}); "
            "its messages are above"
        )

    def send(self, message: Mapping[str, Any]) -> None:
        data = json.dumps(message).encode()
        try:
            with whole_messages():
                self.connection.send_bytes(data)
        except OSError as error:
            raise self.stopped() from error

    def receive(self, timeout: float | None) -> dict[str, Any] | None:
        """The next reply, or None if none came within ``timeout`` seconds (0: don't wait)."""
        try:
            if not self.connection.poll(timeout):
                return None
            with whole_messages():
                data = self.connection.recv_bytes()
            return json.loads(data)
        except (EOFError, OSError) as error:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(POLL_SECONDS)  # for its exit code
            raise self.stopped() from error

    def close(self, timeout: float = 30.0) -> None:
        """Let the process finish what it was sent and exit."""
        with contextlib.suppress(OSError):
            self.connection.close()  # the process sees the end of the socket and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_PROCESS: TrackingProcess | None = None


def tracking_process() -> TrackingProcess:
    """This process's tracking process, started on first use (again if it has died)."""
    global _PROCESS
    if _PROCESS is None or not _PROCESS.alive():
        if _PROCESS is None:
            atexit.register(_stop_tracking_process)
        _PROCESS = TrackingProcess()
    return _PROCESS


def _stop_tracking_process() -> None:
    global _PROCESS
    if _PROCESS is not None:
        _PROCESS.close()
        _PROCESS = None


# --------------------------------------------------------------------------- artifacts


def curves_from_history(history: Sequence[Evaluation]) -> dict[str, tuple[np.ndarray, ...]]:
    """Per-step metrics as curves against the epoch: name -> (epochs, values)."""
    if not history:
        return {}
    epochs = np.array([e.epoch for e in history], dtype=np.float64)
    return {
        name: (epochs, np.array([e.metrics[name] for e in history], dtype=np.float64))
        for name in history[0].metrics
    }


def heatmap_titles(labels: Sequence[int], n_columns: int) -> list[str]:
    """Panel titles of the weight heatmaps: the digit pair, or one digit per class."""
    if n_columns == 1:
        return [f"{labels[1]} (+) vs {labels[0]} (-)"]
    return [str(d) for d in labels]


def save(fig: Any, path: Path) -> None:
    """Write a figure of the run at the artifacts' resolution."""
    from src import plots

    fig.set_dpi(FIGURE_DPI)
    plots.save_figure(fig, path)


def write_weights(result: TrainResult, labels: Sequence[int], folder: Path) -> Path:
    """``weights/weights.npz`` in ``folder``: weights, bias and the digit of each class."""
    path = folder / WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        weights=np.asarray(result.model.weights),
        bias=np.asarray(result.model.bias),
        labels=np.asarray(labels, dtype=np.int64),
    )
    return path


def write_artifacts(
    result: TrainResult, splits: Splits, labels: Sequence[int], config_yaml: str, folder: Path
) -> None:
    """A run's figures and tables under their stable names: learning curves, weight
    heatmaps, confusion matrix and most-confused pairs, the class means beside the weights
    (softmax), the resolved config. (The weights file is :func:`write_weights`.)"""
    from src import plots  # matplotlib loads in a moment: only for a run that got here

    for sub in ("plots", "tables", "config"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "config" / "config.yaml").write_text(config_yaml)
    curves = curves_from_history(result.history)
    if curves:
        save(plots.learning_curves(curves, "loss"), folder / "plots" / "loss_curves.png")
        save(plots.learning_curves(curves, "accuracy"), folder / "plots" / "accuracy_curves.png")
    weights = np.asarray(result.model.weights)
    titles = heatmap_titles(labels, 1 if weights.ndim == 1 else weights.shape[1])
    save(plots.weight_heatmaps(weights, titles), folder / "plots" / "weights.png")
    digits = np.asarray(labels)  # class index -> digit
    y_true = digits[splits.test.labels]
    y_pred = digits[result.model.predict(splits.test.images)]
    shown = sorted(labels)
    matrix = plots.confusion_matrix(y_true, y_pred, shown)
    save(plots.confusion_figure(matrix, shown), folder / "plots" / "confusion_matrix.png")
    pairs = plots.most_confused_pairs(matrix, shown)
    (folder / "tables" / "most_confused_pairs.json").write_text(json.dumps(pairs, indent=2))
    if weights.ndim == 2:
        save(
            plots.class_means_and_weights(splits.train.images, splits.train.labels, weights),
            folder / "plots" / "class_means_and_weights.png",
        )


# --------------------------------------------------------------------------- the run


class JobRun(Callback):
    """The MLflow run of one training job, from start to FINISHED, FAILED or KILLED.

    A :class:`src.training.Callback`: pass it to ``train()`` and every evaluation's metrics
    go to the run. Then :meth:`log_result` and :meth:`end` (FINISHED), or :meth:`end` with
    FAILED / KILLED and the reason. A store error reported by the tracking process stops the
    training at the next evaluation with a :class:`TrackingError`.
    """

    _jobs = 0  # numbers the jobs of this process, so that a reply is never taken for another

    def __init__(
        self,
        settings: Settings,
        run_name: str,
        tags: Mapping[str, str],
        parent: Any = None,
        process: TrackingProcess | None = None,
    ) -> None:
        """Ask for the run: the tracking process creates it with ``tags`` and the params
        (nested under ``parent``, a :class:`src.tracking.ParentRef`, in a sweep), then adds
        the tags that take a moment (git commit, data hash) while the training runs.
        ``process`` defaults to this process's :func:`tracking_process`."""
        JobRun._jobs += 1
        self.job = JobRun._jobs
        self.settings = settings
        self.process = process or tracking_process()
        self._run_id: str | None = None
        self.started = self.ended = False
        self.error: str | None = None  # the first error the tracking process reported
        self.end_error: str | None = None
        self.folder: tempfile.TemporaryDirectory | None = None
        self.rows: list[list[Any]] = []  # metrics not sent yet: [key, value, time_ms, step]
        self.sent_at = time.monotonic()
        self._send(
            "start",
            tracking_uri=settings.tracking_uri,
            experiment_name=settings.experiment_name,
            parent=None
            if parent is None
            else {"run_id": parent.run_id, "experiment_id": parent.experiment_id},
            run_name=run_name,
            tags=dict(tags),
            params=dict(settings.params),
            data_dir=str(settings.data_dir),
        )

    def _send(self, op: str, **fields: Any) -> None:
        self.process.send({"op": op, "job": self.job, **fields})

    def _take(self, reply: dict[str, Any]) -> str | None:
        """Note what a reply says; returns its op (None for another job's leftover reply)."""
        if reply.get("job") != self.job:
            return None
        op = reply["op"]
        if op == "started":
            self.started, self._run_id = True, reply["run_id"]
        elif op == "ended":
            self.ended, self.end_error = True, reply.get("error")
        if reply.get("error") and self.error is None:
            self.error = reply["error"]
        return op

    def _wait_for(self, op: str) -> None:
        while True:
            reply = self.process.receive(POLL_SECONDS)
            if reply is not None:
                if self._take(reply) == op:
                    return
            elif not self.process.alive():
                raise self.process.stopped()

    @property
    def run_id(self) -> str:
        """The MLflow run id (waits for the run to exist)."""
        if not self.started:
            self._wait_for("started")
        if self._run_id is None:
            raise TrackingError(self.error or "the MLflow run could not be created")
        return self._run_id

    # ----------------------------------------------------------------- callback

    def on_evaluation(self, evaluation: Evaluation) -> None:
        now, step = int(time.time() * 1000), evaluation.step
        self.rows.extend([k, float(v), now, step] for k, v in evaluation.metrics.items())
        if len(self.rows) >= METRICS_PER_MESSAGE:
            self._send_metrics(full_only=True)
        elif time.monotonic() - self.sent_at > FLUSH_SECONDS:
            self._send_metrics()
        while (reply := self.process.receive(0)) is not None:
            self._take(reply)
        if self.error is not None:  # the store refused something: stop the training
            raise TrackingError(self.error)

    def _send_metrics(self, full_only: bool = False) -> None:
        """Send the waiting metrics (only whole messages of METRICS_PER_MESSAGE if asked)."""
        while len(self.rows) >= (METRICS_PER_MESSAGE if full_only else 1):
            self._send("metrics", metrics=self.rows[:METRICS_PER_MESSAGE])
            del self.rows[:METRICS_PER_MESSAGE]
        self.sent_at = time.monotonic()

    # ----------------------------------------------------------------- the end

    def log_result(self, result: TrainResult, splits: Splits, config_yaml: str) -> None:
        """Hand over the final metrics, every artifact and the served model; :meth:`end`
        waits until they are written."""
        labels = self.settings.labels
        self._send_metrics()
        self.folder = tempfile.TemporaryDirectory(prefix="mnist-run-")
        folder = Path(self.folder.name)
        write_weights(result, labels, folder)
        tags = {}
        if result.history:  # lets the sweep parent plot the children's curves by epoch
            first = result.history[0]
            tags["steps_per_epoch"] = f"{first.step / first.epoch:.6g}"
        # The tracking process writes the last metrics and logs the model while this one
        # draws the figures; "upload" tells it that the folder is complete.
        self._send(
            "finish",
            folder=str(folder),
            final=result.final,
            final_step=result.best_step,
            tags=tags,
        )
        write_artifacts(result, splits, labels, config_yaml, folder)
        self._send("upload")

    def end(self, status: str, error: str | None = None) -> None:
        """End the run with ``status``, recording ``error`` as its ``error`` tag, once the
        tracking process has written everything; ending twice does nothing.

        Raises :class:`TrackingError` if a FINISHED run could not be written whole (the run
        then ends FAILED with the reason). If the tracking process has died, the run is
        ended from here, so that it never stays RUNNING.
        """
        try:
            if not self.ended:
                self._send_metrics()  # those of the evaluations up to a stop are kept
                self._send("end", status=status, error=error)
                self._wait_for("ended")
        except TrackingError as lost:
            self._end_here(FAILED if status == FINISHED else status, error or str(lost))
            if status == FINISHED:
                raise
            log.warning("%s", lost)  # the caller raises what stopped the run
        finally:
            if self.folder is not None:
                self.folder.cleanup()
                self.folder = None
        if status == FINISHED and self.end_error:
            raise TrackingError(self.end_error)

    def _end_here(self, status: str, error: str) -> None:
        if self._run_id is None or self.ended:
            return
        from src.tracking import end_run  # MLflow, in this process, only for this

        end_run(self.settings.tracking_uri, self._run_id, status, error)
        self.ended = True
