"""Regenerate the README's pictures of the report: run each experiment, copy its figures here.

Run from the project root, after `dvc repro` has made data/processed/mnist.npz:

    .venv/bin/python docs/make_figures.py            # runs the experiments (a few minutes)
    .venv/bin/python docs/make_figures.py --no-run   # copies from the newest runs in the store
    .venv/bin/python docs/make_figures.py --only task2_2   # one experiment (repeatable)

Each experiment is the one command the README gives for it (`python -m src.train ...`),
logged to the project's MLflow store (`$MLFLOW_TRACKING_URI`, else `mlflow.db` at the root).
The figures are then downloaded from the runs, under their stable artifact names, into
docs/img/ with the names listed in FIGURES. Nothing here draws: the pictures are exactly
what a reader finds in `mlflow ui`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from src.config import PROJECT_ROOT, default_tracking_uri

IMAGE_DIR = PROJECT_ROOT / "docs" / "img"
MAX_BYTES = 150_000


@dataclass(frozen=True)
class Source:
    """One command of the README: an experiment, maybe with extra overrides, maybe a sweep."""

    experiment: str
    args: tuple[str, ...] = ()
    sweep: bool = False

    def command(self) -> list[str]:
        multirun = ["-m"] if self.sweep else []
        return [
            sys.executable,
            "-m",
            "src.train",
            *multirun,
            f"experiment={self.experiment}",
            *self.args,
        ]


TASK2_1 = Source("task2_1")
TASK2_2 = Source("task2_2", sweep=True)
TASK2_2_SEEDS = Source("task2_2", ("seed=0,1,2",), sweep=True)
TASK3 = Source("task3")
TASK3_OVERFIT = Source("task3_overfit", sweep=True)
SOURCES = (TASK2_1, TASK2_2, TASK2_2_SEEDS, TASK3, TASK3_OVERFIT)

# (source, run: "run" | "parent" | "lambda=<value>" for a child, artifact, file in docs/img/)
FIGURES = (
    (TASK2_1, "run", "plots/loss_curves.png", "task2_1_loss_curves.png"),  # 2.1a
    (TASK2_1, "run", "plots/accuracy_curves.png", "task2_1_accuracy_curves.png"),  # 2.1b
    (TASK2_2, "parent", "plots/sweep_comparison.png", "task2_2_sweep_comparison.png"),  # 2.2b
    (TASK2_2, "parent", "plots/weight_norm_vs_lambda.png", "task2_2_weight_norm.png"),  # 2.2c
    (TASK2_2, "parent", "plots/weights_by_lambda.png", "task2_2_weights_by_lambda.png"),  # 2.2d
    (TASK2_2_SEEDS, "parent", "plots/sweep_comparison.png", "task2_2_seeds_comparison.png"),
    (TASK3, "run", "plots/loss_curves.png", "task3_loss_curves.png"),  # 3a
    (TASK3, "run", "plots/accuracy_curves.png", "task3_accuracy_curves.png"),  # 3a
    (TASK3, "run", "plots/class_means_and_weights.png", "task3_class_means_and_weights.png"),
    (TASK3, "run", "plots/confusion_matrix.png", "task3_confusion_matrix.png"),
    (TASK3_OVERFIT, "lambda=0", "plots/loss_curves.png", "task3_overfit_lambda0_loss.png"),
    (TASK3_OVERFIT, "lambda=0.01", "plots/loss_curves.png", "task3_overfit_lambda0.01_loss.png"),
    (
        TASK3_OVERFIT,
        "lambda=0",
        "plots/accuracy_curves.png",
        "task3_overfit_lambda0_accuracy.png",
    ),
    (TASK3_OVERFIT, "parent", "plots/sweep_comparison.png", "task3_overfit_comparison.png"),
)


def newest_top_run(client: MlflowClient, source: Source, since_ms: int | None):
    """The newest run without a parent of ``source``'s MLflow experiment that it made.

    After a fresh run, that is the newest one started since ``since_ms``; otherwise the
    newest whose ``overrides`` tag holds ``source.args`` and no other seed sweep.
    """
    experiment = client.get_experiment_by_name(f"report-{source.experiment}")
    if experiment is None:
        raise SystemExit(f"no MLflow experiment report-{source.experiment}: run it first")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            continue
        if since_ms is not None:
            if run.info.start_time >= since_ms:
                return run
            continue
        tokens = run.data.tags.get("overrides", "").split()
        others = [t for t in tokens if t not in source.args]
        if all(a in tokens for a in source.args) and not any(t.startswith("seed=") for t in others):
            return run
    raise SystemExit(f"no finished run of {' '.join(source.command()[2:])} in the store")


def child_with_lambda(client: MlflowClient, parent, value: float):
    """The child of ``parent`` trained with that lambda."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    for child in children:
        if float(child.data.params["lambda"]) == value:
            return child
    raise SystemExit(f"the sweep {parent.info.run_id} has no child with lambda={value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-run", action="store_true", help="copy from the newest runs, run nothing"
    )
    parser.add_argument(
        "--only",
        metavar="EXPERIMENT",
        action="append",
        help="only this experiment's figures (repeatable), e.g. --only task2_2",
    )
    options = parser.parse_args()
    client = MlflowClient(tracking_uri=default_tracking_uri())
    tops = {}
    sources = [s for s in SOURCES if not options.only or s.experiment in options.only]
    for source in sources:
        since_ms = None
        if not options.no_run:
            print("$", " ".join(["python", *source.command()[1:]]), flush=True)
            since_ms = int(time.time() * 1000)
            subprocess.run(source.command(), cwd=PROJECT_ROOT, check=True)
        tops[source] = newest_top_run(client, source, since_ms)
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for source, which, artifact, name in FIGURES:
            if source not in tops:
                continue
            run = tops[source]
            if which.startswith("lambda="):
                run = child_with_lambda(client, run, float(which.split("=", 1)[1]))
            local = Path(client.download_artifacts(run.info.run_id, artifact, scratch))
            size = local.stat().st_size
            if size > MAX_BYTES:
                print(f"warning: {name} is {size} bytes (more than {MAX_BYTES})")
            # Copied beside the target and renamed into place: never half a picture.
            staged = IMAGE_DIR / f".{name}.tmp"
            shutil.copyfile(local, staged)
            os.replace(staged, IMAGE_DIR / name)
            print(f"docs/img/{name}  <- run {run.info.run_id} {artifact}")


if __name__ == "__main__":
    main()
