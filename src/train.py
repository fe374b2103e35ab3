"""Train one model per Hydra job and track it in MLflow: ``python -m src.train [-m] key=value``.

    python -m src.train                                # the default: logistic, 2 against 3
    python -m src.train model=softmax lambda=0.01      # one run
    python -m src.train -m lambda=0,0.01,0.1           # a sweep: one parent run, three children
    python -m src.train --cfg job                      # the composed config; --help lists groups

A refused config or missing data stops with one ``error: ...`` line on stderr and a
non-zero exit, before any MLflow run exists. A job that fails (divergence, bad data) ends
its run FAILED with the reason as the ``error`` tag; in a sweep the other jobs still run and
the command exits non-zero at the end. Ctrl-C ends the active runs KILLED.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from src import sweep
from src.config import PROJECT_ROOT, ConfigError, Settings, config_yaml, run_name, validate
from src.data import DataError, Splits, binary_task, limit_train, load_processed
from src.models import LogisticRegression, SoftmaxRegression
from src.tracker import TrackingError
from src.training import Callback, DivergenceError, Evaluation, TrainResult, train

if TYPE_CHECKING:
    from src.tracking import ParentRef

log = logging.getLogger("src.train")

# The error that stopped this process's single run, reported by main() on one line.
JOB_ERRORS: list[Exception] = []

# Failures a user can cause: reported on one line, without a traceback (a TrackingError is
# the store's message: an unreachable server, a read-only database).
USER_ERRORS = (ConfigError, DataError, DivergenceError, TrackingError)
EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 1, 2, 130


def load_splits(settings: Settings) -> Splits:
    """The task's data: the two digits (label 1 = the first) or all ten, then the limit."""
    splits = load_processed(settings.data_dir)
    if settings.digits is not None:
        splits = binary_task(splits, positive=settings.digits[0], negative=settings.digits[1])
    return limit_train(splits, settings.limit_train)


def build_model(settings: Settings) -> LogisticRegression | SoftmaxRegression:
    """A fresh (zero) model for the task."""
    if settings.model == "logistic":
        return LogisticRegression(n_features=784)
    return SoftmaxRegression(n_features=784, n_classes=10)


class Progress(Callback):
    """One progress bar over the epochs on a terminal; silent otherwise."""

    def __init__(self, epochs: int, description: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=epochs,
            desc=description,
            unit="epoch",
            disable=not sys.stderr.isatty(),
            leave=True,
        )

    def on_evaluation(self, evaluation: Evaluation) -> None:
        done = int(evaluation.epoch + 1e-9)
        if done > self.bar.n:
            m = evaluation.metrics
            self.bar.set_postfix(
                train_loss=f"{m['train/loss']:.4f}",
                val_loss=f"{m['val/loss']:.4f}",
                val_acc=f"{m['val/accuracy']:.4f}",
                refresh=False,
            )
            self.bar.update(done - self.bar.n)

    def on_end(self, result: TrainResult) -> None:
        self.bar.close()

    def close(self) -> None:
        self.bar.close()


def one_line(error: BaseException) -> str:
    """An exception as one line: its message, or its type when it has none."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def source_name() -> str:
    """The entry script, relative to the project root: MLflow would record its absolute path."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(PROJECT_ROOT):
        return str(script.relative_to(PROJECT_ROOT))
    return script.name


def job_tags(settings: Settings, overrides: Sequence[str], experiment: str | None) -> dict:
    """Tags of a job's run known at once: the overrides, the task, the experiment, the source."""
    tags = {
        "overrides": " ".join(overrides) or "(none)",
        "task": settings.task,
        "mlflow.source.name": source_name(),
    }
    if experiment:
        tags["experiment"] = experiment
    return tags


def train_tracked(
    settings: Settings,
    splits: Splits,
    name: str,
    tags: dict[str, str],
    config_text: str,
    parent: ParentRef | None = None,
    callbacks: Sequence[Callback] = (),
) -> tuple[TrainResult, str]:
    """Train one model inside one MLflow run and log everything; returns the result and the
    run id. The run ends FINISHED, or FAILED (reason in the ``error`` tag) / KILLED, and then
    the error is raised again."""
    from src import tracker

    job = tracker.JobRun(settings, name, tags, parent)
    try:
        result = train(build_model(settings), splits, settings.train, [job, *callbacks])
        job.log_result(result, splits, config_text)
    except KeyboardInterrupt:
        job.end(tracker.KILLED, "interrupted")
        raise
    except Exception as error:
        job.end(tracker.FAILED, one_line(error))
        raise
    job.end(tracker.FINISHED)
    return result, job.run_id


def run_job(cfg: DictConfig) -> dict[str, float] | None:
    """Train and track one job; returns its final metrics, or None if it failed.

    A failure a user can cause (refused config, missing data, divergence) is kept for
    main() to report on one line: raising it would make Hydra print more, and in a sweep
    stop the sweep before its end. The job's run, if it started, ended FAILED already.
    """
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        settings = validate(cfg)  # in a sweep, the callback has already checked every job
        return _run_checked(cfg, settings, multirun, overrides)
    except USER_ERRORS as error:
        if multirun:  # only when the sweeper's jobs could not be checked in advance
            log.error("job failed: %s", one_line(error))
        JOB_ERRORS.append(error)
        return None


def _run_checked(
    cfg: DictConfig, settings: Settings, multirun: bool, overrides: list[str]
) -> dict[str, float] | None:
    hydra_cfg = HydraConfig.get()
    name = run_name(settings, overrides)
    tags = job_tags(settings, overrides, hydra_cfg.runtime.choices.get("experiment"))
    data_error: DataError | None = None
    try:
        splits = load_splits(settings)
    except DataError as error:
        if not multirun:
            raise
        data_error = error
    from src import tracking  # after the data: a missing file is reported without MLflow

    parent = tracking.read_parent(Path(hydra_cfg.sweep.dir)) if multirun else None
    if data_error is not None:  # a sweep shows every job, this one FAILED
        tracking.failed_run(
            settings.tracking_uri, settings.experiment_name, name, tags, one_line(data_error),
            parent,
        )
        log.error("job %s failed: %s", name, one_line(data_error))
        return None

    log.info("training %s (%d training images)", name, len(splits.train))
    progress = Progress(settings.train.epochs, name)
    try:
        result, run_id = train_tracked(
            settings, splits, name, tags, config_yaml(cfg), parent, [progress]
        )
    except Exception as error:
        if not multirun:
            raise
        if isinstance(error, USER_ERRORS):
            log.error("job %s failed: %s", name, one_line(error))
        else:  # a bug: keep the traceback in the job's log
            log.exception("job %s failed", name)
        return None
    finally:
        progress.close()
    final = result.final
    log.info(
        "%s: val accuracy %.4f, test accuracy %.4f (MLflow run %s)",
        name,
        final.get("final/val_accuracy", float("nan")),
        final.get("final/test_accuracy", float("nan")),
        run_id,
    )
    return final


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> dict[str, float] | None:
    """The Hydra task: one job."""
    return run_job(cfg)


def hydra_error_line(error: Exception) -> str:
    """Hydra's and OmegaConf's multi-line errors as one line a user can act on."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        options = ", ".join(error.options or [])
        if group:
            return f"{group}={option} is unknown (choose from {options})"
        return f"config '{option}' not found"
    cause = error.__cause__
    key = getattr(cause, "full_key", None) or getattr(error, "full_key", None)
    text = one_line(error)
    if cause is not None and "not in struct" in str(cause) and key:
        return (
            f"unknown key '{key}' (the keys are listed by `python -m src.train --cfg job`)"
        )
    if cause is not None:
        text = f"{text} {one_line(cause)}"
    return text


def _raise_interrupt(signum: int, frame: FrameType | None) -> Any:
    # SIGTERM (a scheduler, `kill`) ends the runs the same way Ctrl-C does
    raise KeyboardInterrupt


def error_line(error: BaseException) -> tuple[str, int]:
    """The one line and the exit code for an error a user can cause."""
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        return hydra_error_line(error), EXIT_REFUSED
    code = EXIT_REFUSED if isinstance(error, ConfigError) else EXIT_FAILED
    return one_line(error), code


def main() -> None:
    """Entry point: run Hydra, turn its errors into one line, close any open sweep parent."""
    # Hydra re-raises errors to us whole instead of printing them over several lines.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # MLflow draws a download bar when it checks the logged model: noise in the log
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        hydra_main()
    except KeyboardInterrupt:
        sweep.close_active(interrupted=True)
        print("error: interrupted; the active MLflow runs ended KILLED", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except sweep.SweepRefused as refused:
        JOB_ERRORS.append(refused.error)
    except (*USER_ERRORS, HydraException, OmegaConfBaseException) as error:
        sweep.close_active(interrupted=False)
        JOB_ERRORS.append(error)
    except BaseException:
        sweep.close_active(interrupted=False)
        raise
    if JOB_ERRORS:
        line, code = error_line(JOB_ERRORS[0])
        print(f"error: {line}", file=sys.stderr)
        sys.exit(code)
    active = sweep.ACTIVE
    if active is not None and active.summary is not None and active.summary.n_failed:
        summary = active.summary
        print(
            f"error: {summary.n_failed} of {summary.n_jobs} jobs failed "
            f"(first: {summary.first_error}); see the parent run {active.parent.run_id}",
            file=sys.stderr,
        )
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
