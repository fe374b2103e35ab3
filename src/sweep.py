"""Hydra's side of a multirun: check every job first, then one MLflow parent run per sweep.

:class:`SweepCallback` is configured under ``hydra.callbacks`` (conf/hydra/default.yaml).
Before any job starts it composes and validates the config of every job of the sweep, so a
refused value stops the sweep before any MLflow run exists; then it creates the parent run
and leaves its id in the sweep directory, where the jobs, in this process or another, find
it. When the sweep ends it draws the comparison and closes the parent. The job wrapper in
src/train.py catches every job's failure, so Hydra always reaches ``on_multirun_end``; the
entry point still closes a parent left open by an interrupt or a bug (:func:`close_active`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.config import ConfigError, Settings, validate
from src.data import PROCESSED_FILE, DataError

if TYPE_CHECKING:
    from src import tracking

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class ActiveSweep:
    """The sweep this process runs (set in the process that runs Hydra's main)."""

    tracking_uri: str
    parent: tracking.ParentRef
    summary: tracking.SweepSummary | None = None


ACTIVE: ActiveSweep | None = None


class SweepRefused(BaseException):
    """A sweep refused before any job: carries the one-line reason (``.error``).

    A BaseException on purpose: Hydra turns an Exception raised by a callback into a warning
    and goes on with the sweep; this one reaches the entry point like Ctrl-C does.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def sweep_arguments(config: DictConfig) -> list[str]:
    """The sweep's overrides as Hydra's BasicSweeper sees them: ``hydra.sweeper.params``
    (set by an experiment file) first, then the command line's."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    return arguments


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The overrides of every job of the sweep, expanded as the BasicSweeper will.

    For another sweeper (one that samples, say), the jobs are not known in advance: only the
    fixed overrides are returned, as one job, so that at least those are checked.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(sweep_arguments(config))
    if OmegaConf.select(config, "hydra.sweeper._target_") == BASIC_SWEEPER:
        try:
            return BasicSweeper.split_arguments(parsed, None)[0]
        except HydraException:
            pass
    return [[o.input_line for o in parsed if not o.is_sweep_override() and o.input_line]]


def check_jobs(config: DictConfig, config_name: str | None) -> list[Settings]:
    """Compose and validate every job's config; raise the first refusal as one line.

    Raises
    ------
    ConfigError
        A refused value or key (the job's overrides are named).
    DataError
        The processed data of a job is missing.
    """
    from hydra import compose

    checked = []
    for overrides in job_overrides(config):
        job_cfg = compose(config_name=config_name or "config", overrides=list(overrides))
        try:
            settings = validate(job_cfg)
        except ConfigError as error:
            where = f" (in the sweep job {' '.join(overrides)})" if overrides else ""
            raise ConfigError(f"{error}{where}") from None
        data_file = settings.data_dir / PROCESSED_FILE
        if not data_file.exists():
            raise DataError(
                f"{data_file} not found; run `dvc repro` to download and preprocess MNIST"
            )
        checked.append(settings)
    return checked


def sweep_name(jobs: list[Settings], arguments: list[str]) -> tuple[str, str]:
    """The parent's experiment (the jobs' one, or their names joined by '+') and run name."""
    names = sorted({s.experiment_name for s in jobs})
    experiment = names[0] if len(names) == 1 else "+".join(names)
    tasks = sorted({s.task for s in jobs})
    swept = [a for a in arguments if "," in a or "(" in a] or arguments
    return experiment, " ".join(["+".join(tasks), "sweep", *swept]).strip()


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks``) giving each multirun one MLflow parent run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global ACTIVE
        try:
            jobs = check_jobs(config, kwargs.get("config_name"))
            if len({s.tracking_uri for s in jobs}) != 1:
                raise ConfigError("mlflow.tracking_uri must be the same for every job of a sweep")
        except (ConfigError, DataError, HydraException, OmegaConfBaseException) as error:
            raise SweepRefused(error) from error
        from src import tracking  # MLflow loads in a second: not for a refused sweep

        uri = jobs[0].tracking_uri
        arguments = sweep_arguments(config)
        experiment, name = sweep_name(jobs, arguments)
        tags = {
            "git_commit": tracking.git_commit(),
            "overrides": " ".join(arguments) or "(none)",
            "n_jobs": str(len(jobs)),
        }
        parent = tracking.start_parent(uri, experiment, name, tags)
        tracking.write_parent(Path(config.hydra.sweep.dir), parent)
        ACTIVE = ActiveSweep(tracking_uri=uri, parent=parent)
        log.info("MLflow parent run %s (%s) in experiment %s", parent.run_id, name, experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from src import tracking

        if ACTIVE is None:
            return
        ACTIVE.summary = tracking.finish_parent(ACTIVE.tracking_uri, ACTIVE.parent)


def close_active(interrupted: bool) -> None:
    """Close this process's sweep parent if it is still open: KILLED after an interrupt,
    FAILED after an error. Called by the entry point on its way out."""
    if ACTIVE is None or ACTIVE.summary is not None:
        return
    from src import tracking

    status = tracking.KILLED if interrupted else tracking.FAILED
    reason = "interrupted" if interrupted else "the sweep stopped on an error"
    tracking.end_run(ACTIVE.tracking_uri, ACTIVE.parent.run_id, status, error=reason)
