"""One tracked job: load the splits, build the model, train it, keep its files, track it.

Used alike by the Hydra entry point (src/train.py), the DVC stage (src/stage.py) and the
benchmarks. :func:`run_tracked` reaches the store before any training (a store that is down
is found out in seconds), trains with the metrics going to one MLflow run as they come,
writes every file of the run into the job's folder (src/artifacts.py), and only then hands
them to the store: if the store goes away in the middle, the run's results stay in that
folder and the error says where.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from src import artifacts, tracking
from src.config import PROJECT_ROOT, Settings, overrides_tag
from src.data import N_PIXELS, PROCESSED_FILE, Splits, binary_task, limit_train, load_processed
from src.errors import check_interrupt, one_line
from src.models import LogisticRegression, SoftmaxRegression
from src.training import Callback, Evaluation, TrainResult, train

log = logging.getLogger(__name__)


_SPLITS: dict[tuple, Splits] = {}


def load_splits(settings: Settings) -> Splits:
    """The task's data: the two digits (label 1 = the first) or all ten, then the limit.

    Loaded once per file version and task in this process (by the file's size and time, as
    DVC does): the jobs of a sweep share their data, and no job changes it.
    """
    path = settings.data_dir / PROCESSED_FILE
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, settings.digits)
    except OSError:
        key = None  # load_processed says what is wrong
    splits = _SPLITS.get(key) if key is not None else None
    if splits is None:
        splits = load_processed(settings.data_dir, digits=settings.digits)
        if settings.digits is not None:
            positive, negative = settings.digits
            splits = binary_task(splits, positive=positive, negative=negative)
        if key is not None:
            _SPLITS.clear()  # one task's data at a time
            _SPLITS[key] = splits
    return limit_train(splits, settings.limit_train)


def build_model(settings: Settings) -> LogisticRegression | SoftmaxRegression:
    """A fresh (zero) model for the task."""
    if settings.model == "logistic":
        return LogisticRegression(n_features=N_PIXELS)
    return SoftmaxRegression(n_features=N_PIXELS, n_classes=10)


class InterruptCheck(Callback):
    """Raises, at the next evaluation, a Ctrl-C or SIGTERM that a finalizer swallowed."""

    def on_evaluation(self, evaluation: Evaluation) -> None:
        check_interrupt()


class Progress(Callback):
    """A progress bar on a terminal (silent otherwise) that counts evaluations, with the
    epoch and the latest losses beside it."""

    def __init__(self, settings: Settings, label: str) -> None:
        from tqdm import tqdm

        config = settings.train
        self.bar = tqdm(
            total=config.epochs * config.evals_per_epoch,
            desc=label,
            unit="eval",
            disable=not sys.stderr.isatty(),
            leave=True,
            dynamic_ncols=True,
        )

    def on_evaluation(self, evaluation: Evaluation) -> None:
        m = evaluation.metrics
        self.bar.set_postfix(
            epoch=f"{evaluation.epoch:.2f}",
            train_loss=f"{m['train/loss']:.4f}",
            val_loss=f"{m['val/loss']:.4f}",
            val_acc=f"{m['val/accuracy']:.4f}",
            refresh=False,
        )
        self.bar.update(1)

    def on_end(self, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()


def stop_line(result: TrainResult, patience: int) -> str | None:
    """What ended the training early, in one line; None if it ran all its epochs."""
    if not result.history:
        return None
    last = result.history[-1]
    steps_per_epoch = last.step / last.epoch
    kept = f"step {result.best_step} (epoch {result.best_step / steps_per_epoch:.2f})"
    if result.stop_reason is not None:
        return f"training stopped at epoch {last.epoch:.2f}: {result.stop_reason}"
    if result.stopped_early:
        return (
            f"early stopping at epoch {last.epoch:.2f}, after {patience} rising validation "
            f"losses in a row; kept the weights of {kept}, the lowest validation loss"
        )
    return None


def source_name() -> str:
    """The entry script, relative to the project root: MLflow would record its absolute path."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(PROJECT_ROOT):
        return str(script.relative_to(PROJECT_ROOT))
    return script.name


def job_tags(settings: Settings, overrides: Sequence[str], experiment: str | None) -> dict:
    """Tags of a job's run known at once: the overrides, the task, the experiment, the source."""
    tags = {
        "overrides": overrides_tag(overrides),
        "task": settings.task,
        "mlflow.source.name": source_name(),
    }
    if experiment:
        tags["experiment"] = experiment
    return tags


@dataclass(frozen=True)
class JobResult:
    """A tracked job's result, its run's id and the folder that holds its files."""

    result: TrainResult
    run_id: str
    folder: Path


def kept_in(folder: Path) -> str:
    """The end of a store error's line: where the run's results are, and how to log them."""
    return (
        f"; the run's results are kept in {folder} "
        f"(log them later with `python -m src.upload {folder}`)"
    )


def run_tracked(
    settings: Settings,
    splits: Splits,
    name: str,
    tags: Mapping[str, str],
    config_yaml: str,
    folder: Path,
    parent: tuple[str, str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> JobResult:
    """Train one model inside one MLflow run, keep its files in ``folder``, log them.

    ``parent`` is the ``(run id, experiment id)`` of a sweep's parent run. The run ends
    FINISHED; or FAILED (the reason in its ``error`` tag) or KILLED (Ctrl-C, SIGTERM), and
    the error is raised again.

    Raises
    ------
    TrackingError
        The store cannot be reached (before any training) or failed during the run (the
        message then names ``folder``, which holds the run's results).
    """
    check_interrupt()  # one that landed in the previous job's cleanup
    client = tracking.open_store(settings.tracking_uri)
    all_tags = {
        **tags,
        "git_commit": tracking.git_commit(),
        "data_hash": tracking.cached_data_hash(settings.data_dir),
    }
    run_id = tracking.start_job_run(
        client, settings.experiment_name, name, all_tags, settings.params, parent
    )
    buffer = tracking.MetricBuffer(client, run_id)
    log.info("training %s (%d training images; MLflow run %s)", name, len(splits.train), run_id)
    try:
        watchers = [buffer, InterruptCheck(), *callbacks]
        result = train(build_model(settings), splits, settings.train, watchers)
        line = stop_line(result, settings.train.patience)
        if line is not None:
            log.info("%s", line)
        buffer.add(result.final, result.best_step)
        end_tags = {}
        if result.history:  # lets the sweep parent plot the children's curves by epoch
            first = result.history[0]
            end_tags["steps_per_epoch"] = f"{first.step / first.epoch:.6g}"
        keep_files(folder, result, splits, settings, config_yaml, buffer, name,
                   {**all_tags, **end_tags}, parent)
        tracking.finish_job_run(client, buffer, folder, end_tags, "model", result.best_step)
    except KeyboardInterrupt:
        buffer.flush()  # the evaluations up to the stop are kept
        tracking.end_run(client, run_id, tracking.KILLED, "interrupted")
        raise
    except tracking.TrackingError as error:
        tracking.end_run(client, run_id, tracking.FAILED, str(error))
        raise tracking.TrackingError(f"{error}{kept_in(folder)}") from None
    except Exception as error:
        buffer.flush()
        tracking.end_run(client, run_id, tracking.FAILED, one_line(error))
        raise
    tracking.end_run(client, run_id, tracking.FINISHED)
    return JobResult(result=result, run_id=run_id, folder=folder)


def keep_files(
    folder: Path,
    result: TrainResult,
    splits: Splits,
    settings: Settings,
    config_yaml: str,
    buffer: tracking.MetricBuffer,
    name: str,
    tags: Mapping[str, str],
    parent: tuple[str, str] | None = None,
) -> None:
    """Write the run's files into ``folder``: its artifacts, every metric, and the record
    that ``python -m src.upload`` needs to log them to a store later."""
    artifacts.write_run_files(folder, result, splits, settings.labels, config_yaml)
    artifacts.write_metrics(folder, buffer.rows)
    artifacts.write_run_record(
        folder,
        {
            "experiment_name": settings.experiment_name,
            "run_name": name,
            "params": dict(settings.params),
            "tags": dict(tags),
            "model_step": result.best_step,
            "run_id": buffer.run_id,  # the run the store lost, if it does
            "parent": list(parent) if parent is not None else None,
        },
    )
