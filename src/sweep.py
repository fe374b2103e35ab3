"""The whole sweep: every job checked first, one MLflow parent run, its hand-off, the summary.

:class:`SweepCallback` is configured under ``hydra.callbacks`` (conf/hydra/default.yaml).
Before any job starts it composes and validates the config of every job (a refused value
stops the sweep before any MLflow run exists), reaches the store, refuses a local SQLite
store for jobs on other machines, and creates the parent run. The parent's id reaches the
jobs in their own config: the callback adds ``hydra.job.env_set`` overrides, which Hydra puts
into every job's config and sets as environment variables while the job runs, whatever the
launcher and wherever the job runs, with no shared filesystem. When the sweep ends it ends
children a killed process left RUNNING, draws the comparison, gives the parent the best
child's metrics and params, and closes it. The job wrapper in src/train.py catches every
job's failure, so Hydra always reaches ``on_multirun_end``; the entry point still closes a
parent left open by an interrupt or a bug (:func:`close_active`).

A search (``hparams_search=optuna``, any sweeper but the grid's) samples its jobs as it goes:
only the fixed part of its config is checked first, a trial whose sampled values are refused
is a FAILED child, the task returns :func:`trial_value` to the sweeper, and the parent also
gets the optimisation history and the search space as figures. Every sweep ends by
registering its best job's model (src/registry.py).
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from src.config import ConfigError, Settings, metric_direction, overrides_tag, validate
from src.data import PROCESSED_FILE, DataError

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# The environment variables that carry the parent run to the jobs (hydra.job.env_set).
PARENT_RUN_ENV, PARENT_EXPERIMENT_ENV = "MNIST_SWEEP_PARENT_RUN", "MNIST_SWEEP_EXPERIMENT"
# The keys the sweep varies, comma-separated, by which each job names its run (same way).
SWEEP_KEYS_ENV = "MNIST_SWEEP_KEYS"
# Launchers whose jobs may run on other machines, which cannot open a local SQLite file.
REMOTE_LAUNCHERS = ("SlurmLauncher", "RayLauncher")
BEST_METRIC = "final_val_loss"  # how the best job of a sweep is chosen, unless configured
# (optimized_metric: val_loss, the lowest; val_accuracy, the highest)
SWEPT_PARAMS = ("lambda", "lr")  # compared on the parent even when not swept


@dataclass(frozen=True)
class ParentRef:
    """Where a sweep's parent run is: what a job needs to nest its run under it."""

    run_id: str
    experiment_id: str


@dataclass
class SweepSummary:
    """How a sweep went, from its children in the store."""

    n_jobs: int
    n_failed: int
    first_error: str | None
    rows: list[dict[str, str]] = field(default_factory=list)
    best: str | None = None  # the best child's run name
    registered: str | None = None  # what the Model Registry did with the best child's model


@dataclass
class ActiveSweep:
    """The sweep this process runs (set in the process that runs Hydra's main)."""

    tracking_uri: str
    parent: ParentRef
    n_expected: int
    swept: dict[str, str]
    summary: SweepSummary | None = None
    error: str | None = None  # why the parent could not be finished
    metric: str = BEST_METRIC  # the best job's: the lowest value, or the highest if not minimize
    minimize: bool = True
    search: bool = False  # sampled by a sweeper (Optuna), not a grid


ACTIVE: ActiveSweep | None = None


class SweepRefused(BaseException):
    """A sweep refused before any job: carries the one-line reason (``.error``).

    A BaseException on purpose: Hydra turns an Exception raised by a callback into a warning
    and goes on with the sweep; this one reaches the entry point like Ctrl-C does.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class TrialFailed(Exception):
    """Raised by the Hydra task for a search's trial that failed: the sweeper marks the
    trial FAILED and goes on (its MLflow run has ended FAILED with the reason already)."""


def is_search(sweeper: Any) -> bool:
    """Whether ``hydra.sweeper`` samples its jobs (Optuna...) rather than expanding a grid."""
    target = OmegaConf.select(sweeper, "_target_") if sweeper is not None else None
    return target not in (None, BASIC_SWEEPER)


def metric_key(name: str) -> str:
    """The job metric that ``optimized_metric`` names: ``val_loss`` -> ``final_val_loss``."""
    return f"final_{name}"


def trial_value(final: dict[str, float] | None, optimized_metric: str) -> float:
    """What a search's task returns: the job's ``final_<optimized_metric>``.

    Raises
    ------
    TrialFailed
        The job failed (or has no such metric): optuna<3 takes a NaN for a bug, not a
        failed trial, and would stop the search.
    """
    value = None if final is None else final.get(metric_key(optimized_metric))
    if value is None or not math.isfinite(value):
        raise TrialFailed("the trial failed; its MLflow run ended FAILED with the reason")
    return float(value)


def finish_search_on_error(error: Exception) -> bool:
    """Finish a search whose sweeper stopped on ``error`` after its trials (optuna<3 raises
    when no trial completed): the parent gets what the children did. False if there is no
    such search open."""
    if ACTIVE is None or ACTIVE.summary is not None or not ACTIVE.search:
        return False
    from src.errors import one_line

    log.error("the search stopped: %s", one_line(error))
    ACTIVE.summary = finish_parent(ACTIVE)
    return True


def job_parent() -> ParentRef | None:
    """The parent run of the job running now, from its environment (no MLflow needed)."""
    run_id = os.environ.get(PARENT_RUN_ENV)
    if not run_id:
        return None
    return ParentRef(run_id=run_id, experiment_id=os.environ[PARENT_EXPERIMENT_ENV])


def job_swept_keys() -> list[str]:
    """The keys the sweep of the job running now varies (``["lambda", "lr"]``), from its
    environment; empty outside a sweep."""
    return [key for key in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if key]


def sweep_arguments(config: DictConfig) -> list[str]:
    """The sweep's overrides as Hydra's BasicSweeper sees them: ``hydra.sweeper.params``
    (set by an experiment file) first, then the command line's."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    return arguments


def swept_values(config: DictConfig) -> dict[str, str]:
    """What the sweep varies, key -> the values as given (``{"lambda": "0,0.01,0.1"}``)."""
    parsed = OverridesParser.create().parse_overrides(sweep_arguments(config))
    return {o.get_key_element(): o.input_line.partition("=")[2]
            for o in parsed if o.is_sweep_override() and o.input_line}


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


def remote_launcher(config: DictConfig) -> str | None:
    """The launcher's name if its jobs may run on other machines, else None."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
    name = target.rsplit(".", 1)[-1]
    if name not in REMOTE_LAUNCHERS:
        return None
    if name == "RayLauncher":  # a cluster started here, for this sweep, is this machine
        address = OmegaConf.select(config, "hydra.launcher.ray.init.address")
        if address in (None, "local") or str(address).startswith(("127.0.0.1", "localhost")):
            return None
    return name


def sweep_name(
    jobs: list[Settings], swept: dict[str, str], search: bool = False
) -> tuple[str, str]:
    """The parent's experiment (the jobs' one, or their names joined by '+') and run name."""
    names = sorted({s.experiment_name for s in jobs})
    experiment = names[0] if len(names) == 1 else "+".join(names)
    tasks = sorted({s.task for s in jobs})
    varied = [f"{key}={value}" for key, value in swept.items()]
    kind = "search" if search else "sweep"
    return experiment, " ".join(["+".join(tasks), kind, *varied]).strip()


def expected_jobs(config: DictConfig, jobs: Sequence[Settings]) -> int:
    """How many jobs the sweep will launch: the grid's size, or the search's trials."""
    if OmegaConf.select(config, "hydra.sweeper._target_") == BASIC_SWEEPER:
        return len(jobs)
    trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
    return int(trials) if trials is not None else len(jobs)


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks``) giving each multirun one MLflow parent run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global ACTIVE
        try:
            ACTIVE = start_sweep(config, kwargs.get("config_name"))
        except Exception as error:  # Hydra would only warn and launch the jobs anyway
            raise SweepRefused(error) from error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if ACTIVE is None:
            return
        try:
            ACTIVE.summary = finish_parent(ACTIVE)
        except Exception as error:  # Hydra would only warn: the entry point reports it
            from src.errors import one_line

            ACTIVE.error = one_line(error)
            raise


def start_sweep(config: DictConfig, config_name: str | None) -> ActiveSweep:
    """Check every job, reach the store, create the parent run and hand it to the jobs.

    Raises
    ------
    ConfigError, DataError, HydraException, OmegaConfBaseException
        A job that would be refused, missing data.
    TrackingError
        The store cannot be reached: no parent is created.
    """
    jobs = check_jobs(config, config_name)
    if len({s.tracking_uri for s in jobs}) != 1:
        raise ConfigError("mlflow.tracking_uri must be the same for every job of a sweep")
    uri = jobs[0].tracking_uri
    if len({s.optimized_metric for s in jobs}) != 1:
        raise ConfigError("optimized_metric must be the same for every job of a sweep")
    metric = jobs[0].optimized_metric
    search = is_search(OmegaConf.select(config, "hydra.sweeper"))
    remote = remote_launcher(config)
    if remote is not None and uri.startswith("sqlite:"):
        raise ConfigError(
            f"the {remote} runs jobs on other machines, which cannot reach the local "
            f"SQLite store {uri}: a cluster needs a tracking server (`make server`, "
            "then MLFLOW_TRACKING_URI=http://HOST:PORT)"
        )
    from src import tracking  # MLflow loads in a second: not for a refused sweep

    client = tracking.open_store(uri)
    swept = swept_values(config)
    experiment, name = sweep_name(jobs, swept, search)
    tags = {
        "git_commit": tracking.git_commit(),
        "overrides": overrides_tag(sweep_arguments(config)),
        "sweep": "parent",
    }
    run_id, exp_id = tracking.start_parent(client, experiment, name, tags)
    parent = ParentRef(run_id=run_id, experiment_id=exp_id)
    try:
        hand_off(config, parent, uri, list(swept))
        share_sweep_view(client, parent, list(swept), metric_key(metric),
                         metric_direction(metric) == "minimize")
    except Exception as error:
        tracking.end_run(client, run_id, tracking.FAILED, str(error))
        raise
    log.info("MLflow parent run %s (%s) in experiment %s; its jobs: %s", run_id, name,
             experiment, tracking.ui_address(uri, exp_id, view=sweep_view_key(parent)))
    return ActiveSweep(
        tracking_uri=uri, parent=parent, n_expected=expected_jobs(config, jobs), swept=swept,
        metric=metric_key(metric), minimize=metric_direction(metric) == "minimize",
        search=search,
    )


def hand_off(
    config: DictConfig, parent: ParentRef, uri: str | None = None, swept: Sequence[str] = ()
) -> None:
    """Put the parent's id into every job's config: Hydra composes each job's config from
    ``hydra.overrides.hydra`` and sets ``hydra.job.env_set`` while the job runs. The keys
    the sweep varies, ``swept``, go along too: each job's run is named by them.

    ``uri``, the sweep's store, goes along as ``MLFLOW_TRACKING_URI``: a job on a Ray worker
    has the environment of the machine's ``ray start``, not the launching shell's, and
    would otherwise write to another store than its parent's."""
    overrides = [
        f"+hydra.job.env_set.{PARENT_RUN_ENV}={parent.run_id}",
        f"+hydra.job.env_set.{PARENT_EXPERIMENT_ENV}={parent.experiment_id}",
    ]
    if uri is not None:
        overrides.append(f"+hydra.job.env_set.MLFLOW_TRACKING_URI={quoted(uri)}")
    if swept:
        keys = ",".join(key.lstrip("+~") for key in swept)
        overrides.append(f"+hydra.job.env_set.{SWEEP_KEYS_ENV}={quoted(keys)}")
    with read_write(config), open_dict(config):
        config.hydra.overrides.hydra.extend(overrides)


def quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (a URI may hold ``=``, ``,``, spaces):
    its quotes escaped, the backslashes before a quote or at the end doubled."""
    body = re.sub(r"(\\*)('|$)", lambda m: 2 * m[1] + ("\\'" if m[2] else ""), value)
    return f"'{body}'"


def _float(value: str | None) -> float | str:
    try:
        return float(value) if value is not None else math.nan
    except ValueError:
        return value  # type: ignore[return-value]


def sweep_job(client: Any, run: Any, folder: Path) -> Any:
    """A finished child as :class:`src.plots.SweepJob`; None if it has no curves."""
    import numpy as np

    from src import plots, tracking

    run_id = run.info.run_id
    steps_per_epoch = float(run.data.tags.get("steps_per_epoch", "1"))
    curves: plots.Curves = {}
    for name in ("train/accuracy", "val/accuracy", "test/accuracy", "val/loss", "weights/norm"):
        steps, values = tracking.metric_history(client, run_id, name)
        if len(steps):
            curves[name] = (steps / steps_per_epoch, values)
    if "val/accuracy" not in curves:
        return None
    weights = None
    local = tracking.download(client, run_id, "weights/weights.npz", folder)
    if local is not None:
        with np.load(local, allow_pickle=False) as saved:
            weights = saved["weights"]
    else:
        log.warning("run %s has no weights artifact", run_id)
    final = {k: v for k, v in run.data.metrics.items() if k.startswith(("final_", "best_"))}
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


def best_child(
    children: Sequence[Any], metric: str = BEST_METRIC, minimize: bool = True
) -> Any | None:
    """The finished child with the lowest ``metric`` (the highest if not ``minimize``);
    None if no child has it."""
    from src import tracking

    scored = [r for r in children
              if r.info.status == tracking.FINISHED and metric in r.data.metrics]
    sign = 1.0 if minimize else -1.0
    return min(scored, key=lambda r: sign * r.data.metrics[metric], default=None)


def search_trials(children: Sequence[Any], metric: str) -> dict[str, Any]:
    """A search's trials in order, as arrays for its figures: ``value`` (the optimised
    metric; NaN for a trial that failed), ``lr`` and ``lambda`` (NaN where not recorded)."""
    import numpy as np

    from src import tracking

    def number(run: Any, key: str) -> float:
        value = _float(run.data.params.get(key))
        return value if isinstance(value, float) else math.nan

    finished = [r.info.status == tracking.FINISHED for r in children]
    return {
        "value": np.array([r.data.metrics.get(metric, math.nan) if ok else math.nan
                           for r, ok in zip(children, finished, strict=True)]),
        "lr": np.array([number(r, "lr") for r in children]),
        "lambda": np.array([number(r, "lambda") for r in children]),
    }


def register_best(client: Any, best: Any, parent: ParentRef) -> str:
    """Register the best child's model under its experiment's name; the line saying what
    the registry did (an error is that line too: the sweep itself is done)."""
    from src import registry
    from src.errors import one_line

    name = client.get_experiment(parent.experiment_id).name
    try:
        metrics = best.data.metrics
        done = registry.register_run(
            client, best.info.run_id, name, metrics[metric_key("val_accuracy")],
            metrics.get(metric_key("test_accuracy")), parent_run_id=parent.run_id,
        )
    except Exception as error:
        line = f"the best job's model was not registered: {one_line(error)}"
        log.error("%s", line)
        return line
    client.set_tag(parent.run_id, "registered_model", f"{done.name}/{done.version}")
    return done.line()


def summary_rows(children: Sequence[Any], swept: Sequence[str]) -> list[dict[str, str]]:
    """One row per job: name, the swept values, val and test accuracy, status, error."""
    from src import tracking

    rows = []
    for number, run in enumerate(children):
        m, p = run.data.metrics, run.data.params
        row = {"job": str(number), "run_name": run.info.run_name, "run_id": run.info.run_id}
        row.update({key: p.get(key, "") for key in swept})
        for key in ("final_val_accuracy", "final_test_accuracy", "final_val_loss"):
            row[key] = f"{m[key]:.4f}" if key in m else ""
        row["status"] = run.info.status
        row[tracking.ERROR_TAG] = run.data.tags.get(tracking.ERROR_TAG, "")
        rows.append(row)
    return rows


def finish_parent(sweep: ActiveSweep, interrupted: bool = False) -> SweepSummary:
    """End the sweep's children left RUNNING, draw the comparison, give the parent the
    best child's metrics and params, and end it: FINISHED when every job finished, FAILED
    (the count as its ``error`` tag) when some failed or never ran, KILLED when
    ``interrupted``."""
    from src import artifacts, tracking

    client = tracking.open_store(sweep.tracking_uri)
    parent = sweep.parent
    runs = tracking.children(client, parent.run_id, parent.experiment_id)
    killed = tracking.mark_killed(
        client, runs, "the job's process ended without ending its run (killed with SIGKILL?)"
    )
    if killed:
        runs = tracking.children(client, parent.run_id, parent.experiment_id)
    failed = [r for r in runs if r.info.status != tracking.FINISHED]
    n_jobs = max(sweep.n_expected, len(runs))
    n_failed = n_jobs - (len(runs) - len(failed))
    first_error = next(
        (r.data.tags[tracking.ERROR_TAG] for r in failed if tracking.ERROR_TAG in r.data.tags),
        None,
    )
    if first_error is None and n_failed:
        first_error = f"{n_jobs - len(runs)} jobs recorded no run (see their logs)"
    swept = list(dict.fromkeys([*sweep.swept, *SWEPT_PARAMS]))
    rows = summary_rows(runs, swept)
    best = best_child(runs, sweep.metric, sweep.minimize)
    registered = None
    try:
        with tempfile.TemporaryDirectory(prefix="mnist-sweep-") as tmp:
            folder = Path(tmp)
            out = folder / "artifacts"
            jobs = [job for r in runs if r.info.status == tracking.FINISHED
                    if (job := sweep_job(client, r, folder / "download")) is not None]
            artifacts.write_sweep_figures(out, jobs)
            if sweep.search and runs:
                trials = search_trials(runs, sweep.metric)
                artifacts.write_search_figures(
                    out, trials, sweep.metric.removeprefix("final_"), sweep.minimize
                )
            columns = list(rows[0]) if rows else ["job", "run_name", "status"]
            artifacts.write_table(out / "tables" / "sweep_summary.csv", columns,
                                  [list(row.values()) for row in rows])
            metrics, params, tags = {}, dict(sweep.swept), {}
            if best is not None:
                for key in ("val_accuracy", "test_accuracy", "val_loss", "train_accuracy"):
                    if f"final_{key}" in best.data.metrics:
                        metrics[f"best_{key}"] = best.data.metrics[f"final_{key}"]
                for key in swept:
                    value = _float(best.data.params.get(key))
                    if isinstance(value, float) and math.isfinite(value):
                        metrics[f"best_{key}"] = value
                tags = {"best_run_id": best.info.run_id, "best_run_name": best.info.run_name}
                client.set_tag(best.info.run_id, "best_of_sweep", parent.run_id)
            tracking.log_parent_summary(client, parent.run_id, out, params, metrics, tags)
            if best is not None and not interrupted:
                registered = register_best(client, best, parent)
    except Exception as error:
        from src.errors import one_line

        tracking.end_run(client, parent.run_id, tracking.FAILED,
                         f"the sweep's summary failed: {one_line(error)}")
        raise
    finally:
        if interrupted:
            tracking.end_run(client, parent.run_id, tracking.KILLED, "interrupted")
        elif n_failed:
            tracking.end_run(
                client, parent.run_id, tracking.FAILED,
                f"{n_failed} of {n_jobs} jobs failed; first: {first_error}",
            )
        else:
            tracking.end_run(client, parent.run_id, tracking.FINISHED)
    return SweepSummary(
        n_jobs=n_jobs, n_failed=n_failed, first_error=first_error, rows=rows,
        best=best.info.run_name if best is not None else None, registered=registered,
    )


def summary_text(sweep: ActiveSweep) -> str:
    """The sweep's closing lines: a table of its jobs, the best one, the parent run's
    address in ``mlflow ui``."""
    from src import tracking

    summary = sweep.summary
    assert summary is not None
    swept = list(dict.fromkeys([*sweep.swept, *SWEPT_PARAMS]))
    columns = ["job", *swept, "final_val_accuracy", "final_test_accuracy", "status"]
    headers = ["job", *swept, "val acc", "test acc", "status"]
    table = [headers] + [[row.get(c, "") for c in columns] for row in summary.rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(headers))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
             for line in table]
    if summary.best is not None:
        way = "lowest" if sweep.minimize else "highest"
        what = sweep.metric.removeprefix("final_").replace("val_", "validation ")
        lines.append(f"best job: {summary.best} ({way} {what})")
    if summary.registered is not None:
        lines.append(summary.registered)
    lines.append("parent run: " + tracking.ui_address(
        sweep.tracking_uri, sweep.parent.experiment_id, sweep.parent.run_id))
    lines.append("its jobs side by side: " + tracking.ui_address(
        sweep.tracking_uri, sweep.parent.experiment_id, view=sweep_view_key(sweep.parent)))
    return "\n".join(lines)


# The once-per-job metrics a sweep's jobs are compared by, as columns of their table.
VIEW_METRICS = ("final_val_accuracy", "final_test_accuracy", "final_val_loss", "best_step")


def sweep_view_key(parent: ParentRef) -> str:
    """The key of the view of a sweep's jobs (:func:`share_sweep_view`)."""
    return f"sweep-{parent.run_id}"


def share_sweep_view(
    client: Any, parent: ParentRef, swept: Sequence[str], metric: str, minimize: bool
) -> None:
    """Store the view of the sweep's jobs in MLflow's runs table: its children only, with
    the swept params (and lambda, lr) and the final metrics as columns, the best first."""
    from src import tracking

    params = []
    for key in dict.fromkeys([*(k.lstrip("+~") for k in swept), *SWEPT_PARAMS]):
        params.append("model.name" if key == "model" else key)
    metrics = list(dict.fromkeys([metric, *VIEW_METRICS]))
    tracking.share_runs_view(
        client, parent.experiment_id, sweep_view_key(parent),
        columns=[*(tracking.column("params", k) for k in dict.fromkeys(params)),
                 *(tracking.column("metrics", k) for k in metrics)],
        order_by=tracking.column("metrics", metric),
        ascending=minimize,
        search=f"tags.mlflow.parentRunId = '{parent.run_id}'",
    )


def close_active(interrupted: bool) -> None:
    """Close this process's sweep parent if it is still open: KILLED after an interrupt,
    FAILED after an error. Called by the entry point on its way out."""
    if ACTIVE is None or ACTIVE.summary is not None:
        return
    from src import tracking

    client = tracking.open_store(ACTIVE.tracking_uri)
    status = tracking.KILLED if interrupted else tracking.FAILED
    reason = "interrupted" if interrupted else "the sweep stopped on an error"
    for run in tracking.children(client, ACTIVE.parent.run_id, ACTIVE.parent.experiment_id):
        if run.info.status == tracking.RUNNING and interrupted:
            tracking.end_run(client, run.info.run_id, tracking.KILLED, "interrupted")
    tracking.end_run(client, ACTIVE.parent.run_id, status, error=reason)
