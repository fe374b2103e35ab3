"""Train one model per Hydra job and track it in MLflow: ``python -m src.train [-m] key=value``.

    python -m src.train                                # the default: logistic, 2 against 3
    python -m src.train model=softmax lambda=0.01      # one run
    python -m src.train -m lambda=0,0.01,0.1           # a sweep: one parent run, three children
    python -m src.train -m hparams_search=optuna       # an Optuna search over lr and lambda
    python -m src.train --cfg job                      # the composed config; --help lists groups

A refused config or missing data stops with one ``error: ...`` line on stderr and a
non-zero exit, before any MLflow run exists. A job that fails (divergence, bad data) ends
its run FAILED with the reason as the ``error`` tag; in a sweep the other jobs still run and
the command exits non-zero at the end. Ctrl-C ends the active runs KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src import sweep
from src.config import (
    NOT_PARAMS,
    SCHEMA,
    ConfigError,
    Settings,
    config_yaml,
    default_tracking_uri,
    overrides_tag,
    run_name,
    unknown_key,
    validate,
)
from src.data import DataError
from src.errors import TrackingError, check_interrupt, one_line, stop_on_signals
from src.training import DivergenceError

log = logging.getLogger("src.train")
# conf/hydra/launcher/ray.yaml has the plugin's name so that `hydra/launcher=ray` picks it;
# Hydra then checks it against the plugin's schema of that name and warns it is deprecated.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema"
)

# The error that stopped this process's single run, reported by main() on one line.
JOB_ERRORS: list[Exception] = []

# Failures a user can cause: reported on one line, without a traceback (a TrackingError is
# the store's message: an unreachable server, a read-only database).
USER_ERRORS = (ConfigError, DataError, DivergenceError, TrackingError)
EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 1, 2, 130


def run_job(cfg: DictConfig) -> dict[str, float] | None:
    """Train and track one job; returns its final metrics, or None if it failed.

    A failure a user can cause (refused config, missing data, divergence, the store) is
    kept for main() to report on one line: raising it would make Hydra print more, and in a
    sweep stop the sweep before its end. The job's run, if it started, ended FAILED already.
    """
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        settings = validate(cfg)  # in a sweep, the callback has already checked every job
        return _run_checked(cfg, settings, multirun, overrides)
    except USER_ERRORS as error:
        parent = sweep.job_parent() if multirun else None
        if isinstance(error, ConfigError) and parent is not None:
            # a search's sampled values (not known before the sweep): a FAILED trial
            _record_refused(cfg, overrides, one_line(error), parent)
            return None
        if multirun:  # only when the sweeper's jobs could not be checked in advance
            log.error("job failed: %s", one_line(error))
        JOB_ERRORS.append(error)
        return None


def _run_checked(
    cfg: DictConfig, settings: Settings, multirun: bool, overrides: list[str]
) -> dict[str, float] | None:
    from src import job, tracking  # MLflow loads in a second: not for a refused config

    hydra_cfg = HydraConfig.get()
    # a sweep's job is named by what the sweep varies (the callback hands its keys over)
    name = run_name(settings, overrides, sweep.job_swept_keys() if multirun else ())
    tags = job.job_tags(settings, overrides, hydra_cfg.runtime.choices.get("experiment"))
    parent = sweep.job_parent() if multirun else None
    try:
        splits = job.load_splits(settings)
    except DataError as error:
        if not multirun:
            raise
        _record_failed(settings, name, tags, one_line(error), parent)
        return None

    progress = job.Progress(settings, settings.task)
    folder = Path(hydra_cfg.runtime.output_dir)
    try:
        done = job.run_tracked(
            settings, splits, name, tags, config_yaml(cfg), folder,
            None if parent is None else (parent.run_id, parent.experiment_id), [progress],
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
    final = done.result.final
    log.info(
        "%s: val accuracy %.4f, test accuracy %.4f; MLflow run %s",
        name,
        final.get("final_val_accuracy", float("nan")),
        final.get("final_test_accuracy", float("nan")),
        tracking.run_address(settings.tracking_uri, done.run_id),
    )
    if settings.register and not multirun:  # a sweep registers its best job's model
        _register(settings, done.run_id, final)
    return final


def _register(settings: Settings, run_id: str, final: dict[str, float]) -> None:
    """``register=true``: the run's model as a new version in the Model Registry."""
    from src import registry, tracking

    client = tracking.open_store(settings.tracking_uri)
    try:
        done = registry.register_run(
            client, run_id, settings.experiment_name, final[sweep.metric_key("val_accuracy")],
            final.get(sweep.metric_key("test_accuracy")),
        )
    except Exception as error:
        raise TrackingError(
            f"the model of run {run_id} was not registered: {one_line(error)}"
        ) from None
    log.info("%s", done.line())


def _record_refused(
    cfg: DictConfig, overrides: list[str], error: str, parent: sweep.ParentRef
) -> None:
    """A search's trial whose sampled values are refused: a FAILED run under the parent,
    with those values as its params, so that the search shows it and goes on."""
    from src import tracking

    uri = OmegaConf.select(cfg, "mlflow.tracking_uri") or default_tracking_uri()
    values = dict(o.lstrip("+~").partition("=")[::2] for o in overrides)
    params = {k: v for k, v in values.items() if k in SCHEMA and k not in NOT_PARAMS}
    name = " ".join(["refused", *(f"{k}={v}" for k, v in params.items())])
    tags = {"overrides": overrides_tag(overrides)}
    client = tracking.open_store(uri)
    run_id = tracking.record_failed_job(
        client, "", name, tags, error, (parent.run_id, parent.experiment_id)
    )
    for key, value in params.items():
        client.log_param(run_id, key, value)
    log.error("job %s: %s", name, error)


def _record_failed(
    settings: Settings, name: str, tags: dict[str, str], error: str,
    parent: sweep.ParentRef | None,
) -> None:
    """A sweep shows every job: one that found no data is a FAILED run under the parent."""
    from src import tracking

    client = tracking.open_store(settings.tracking_uri)
    tracking.record_failed_job(
        client, settings.experiment_name, name, tags, error,
        None if parent is None else (parent.run_id, parent.experiment_id),
    )
    log.error("job %s failed: %s", name, error)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> dict[str, float] | float | None:
    """The Hydra task: one job. In a search, the number the sweeper optimises (the job's
    ``final_<optimized_metric>``); a failed trial raises :class:`sweep.TrialFailed`, which
    the sweeper records as a FAILED trial before it goes on."""
    final = run_job(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and sweep.is_search(hydra_cfg.sweeper):
        return sweep.trial_value(final, OmegaConf.select(cfg, "optimized_metric") or "val_loss")
    return final


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
        return unknown_key(key)
    if cause is not None:
        text = f"{text} {one_line(cause)}"
    return text


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
    stop_on_signals()
    try:
        hydra_main()
        check_interrupt()  # a stop signal that a finalizer swallowed at the very end
    except KeyboardInterrupt:
        sweep.close_active(interrupted=True)
        print("error: interrupted; the active MLflow runs ended KILLED", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except sweep.SweepRefused as refused:
        JOB_ERRORS.append(refused.error)
    except (*USER_ERRORS, HydraException, OmegaConfBaseException) as error:
        sweep.close_active(interrupted=False)
        JOB_ERRORS.append(error)
    except Exception as error:
        if not sweep.finish_search_on_error(error):  # optuna<3 when no trial completed
            sweep.close_active(interrupted=False)
            raise
    except BaseException:
        sweep.close_active(interrupted=False)
        raise
    if JOB_ERRORS:
        line, code = error_line(JOB_ERRORS[0])
        print(f"error: {line}", file=sys.stderr)
        sys.exit(code)
    active = sweep.ACTIVE
    if active is None:
        return
    if active.summary is None:  # Hydra turned the callback's error into a warning
        with contextlib.suppress(Exception):  # the store may be what failed
            sweep.close_active(interrupted=False)
        print(f"error: the sweep could not be finished: {active.error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    summary = active.summary
    print(sweep.summary_text(active), file=sys.stderr)
    if summary.n_failed:
        print(
            f"error: {summary.n_failed} of {summary.n_jobs} jobs failed "
            f"(first: {summary.first_error}); see the parent run {active.parent.run_id}",
            file=sys.stderr,
        )
        sys.exit(EXIT_FAILED)

if __name__ == "__main__":
    main()
