"""The DVC ``train`` stage: train the default experiments, track them, write reports/ for DVC.

    dvc repro                          # runs this after the data stages
    python -m src.stage                # the same by hand
    python -m src.stage epochs=5       # any override of conf/ applies to both experiments

Trains logistic regression (2 against 3) and softmax regression (ten digits) with the
defaults of conf/, one MLflow run each (in the default store, ``MLFLOW_TRACKING_URI`` if set),
and writes ``reports/metrics/<task>.json`` (a few final metrics of each, for
``dvc metrics show``: one row per task) and ``reports/plots/<task>.csv`` (the curves, for
``dvc plots show``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from src import job, tracking
from src.artifacts import write_atomic
from src.config import PROJECT_ROOT, ConfigError, config_yaml, run_name, validate
from src.data import DataError
from src.errors import TrackingError, check_interrupt, stop_on_signals
from src.train import error_line
from src.training import DivergenceError, TrainResult

# The default experiments: each one's overrides of conf/config.yaml.
EXPERIMENTS = {"logistic-2v3": ["model=logistic"], "softmax": ["model=softmax"]}
# Significant digits of the report files: BLAS on another CPU changes the last digits of a
# float32 loss, and a fresh clone's `dvc repro` must write the same dvc.lock on any machine.
DIGITS = 4
# The metrics of reports/metrics/<task>.json: `dvc metrics show` prints one row per task and
# one column per key, so that it fits a terminal; MLflow has every metric of the run.
REPORTED = ("test_accuracy", "val_accuracy", "best_step")
CURVE_COLUMNS = ["train/loss", "train/accuracy", "val/loss", "val/accuracy",
                 "test/loss", "test/accuracy"]


def curves_csv(result: TrainResult) -> str:
    """The per-evaluation metrics as CSV: step, epoch, then ``train_loss``, ``val_accuracy``..."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "epoch", *(name.replace("/", "_") for name in CURVE_COLUMNS)])
    for evaluation in result.history:
        row = [evaluation.metrics[name] for name in CURVE_COLUMNS]
        writer.writerow([evaluation.step, f"{evaluation.epoch:.4f}",
                         *(f"{v:.{DIGITS}g}" for v in row)])
    return out.getvalue()


def summary(result: TrainResult) -> dict[str, float | int]:
    """The :data:`REPORTED` metrics of a run, for ``dvc metrics show`` (``test_accuracy``...),
    to :data:`DIGITS` significant digits."""
    metrics: dict[str, float | int] = {}
    for key in REPORTED:
        if key == "best_step":
            metrics[key] = int(result.best_step)
        else:
            metrics[key] = float(f"{result.final[f'final_{key}']:.{DIGITS}g}")
    return metrics


def run(overrides: Sequence[str], reports: Path) -> dict[str, dict]:
    """Train and track every default experiment; write the reports; return the metrics."""
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        configs = {
            task: compose(config_name="config", overrides=[*base, *overrides])
            for task, base in EXPERIMENTS.items()
        }
    checked = {task: validate(cfg) for task, cfg in configs.items()}  # all, before any work
    metrics: dict[str, dict] = {}
    outputs = PROJECT_ROOT / "outputs" / "stage" / time.strftime("%Y-%m-%d_%H-%M-%S")
    for task, settings in checked.items():
        given = [*EXPERIMENTS[task], *overrides]
        splits = job.load_splits(settings)
        tags = {**job.job_tags(settings, given, None), "source": "dvc repro (src.stage)"}
        name = run_name(settings, given)
        progress = job.Progress(settings, task)
        try:
            done = job.run_tracked(
                settings, splits, name, tags, config_yaml(configs[task]), outputs / task,
                callbacks=[progress],
            )
        finally:
            progress.close()
        metrics[task] = summary(done.result)
        write_atomic(reports / "plots" / f"{task}.csv", curves_csv(done.result))
        write_atomic(reports / "metrics" / f"{task}.json",
                     json.dumps(metrics[task], indent=2) + "\n")
        print(f"{name}: test accuracy {done.result.final['final_test_accuracy']:.4f}; "
              f"MLflow run {tracking.run_address(settings.tracking_uri, done.run_id)}")
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. epochs=5")
    parser.add_argument("--reports", type=Path, default=PROJECT_ROOT / "reports",
                        help="where metrics/ and plots/ go (default: reports/)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a log, not a TTY
    stop_on_signals()
    try:
        run(args.overrides, args.reports)
        check_interrupt()  # a stop signal that a finalizer swallowed at the very end
    except (ConfigError, DataError, DivergenceError, TrackingError, HydraException,
            OmegaConfBaseException) as error:
        line, code = error_line(error)
        print(f"error: {line}", file=sys.stderr)
        sys.exit(code)
    except KeyboardInterrupt:
        print("error: interrupted; the active MLflow run ended KILLED", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
