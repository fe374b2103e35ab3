"""A run's files in its output folder: weights (.npz), figures, tables, config, metrics.

A job writes everything it keeps here before the store sees any of it, so that a store lost
in the middle of a run loses nothing: ``<folder>/artifacts/`` holds what becomes the run's
artifacts (``plots/``, ``tables/``, ``config/config.yaml``, ``weights/weights.npz``), and
beside it ``metrics.csv`` (every metric with its step) and ``run.json`` (name, experiment,
params, tags) let ``python -m src.upload <folder>`` log the run to MLflow later. Figures are
drawn by src/plots.py. Every file is written under a temporary name and renamed into place.
No MLflow here.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from src.data import Splits
from src.training import Evaluation, TrainResult

ARTIFACTS_DIR = "artifacts"  # uploaded whole as the run's artifacts
WEIGHTS_FILE = "weights/weights.npz"  # in the artifacts; also the served model's weights
METRICS_FILE = "metrics.csv"  # beside the artifacts: key, value, timestamp (ms), step
RUN_FILE = "run.json"  # beside the artifacts: what src.upload needs to recreate the run
METRIC_COLUMNS = ("key", "value", "timestamp", "step")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place: an
    interrupted write leaves the old file or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(fig: Any, path: Path) -> None:
    """Write a figure of src/plots.py as a PNG."""
    from src import plots

    write_atomic(path, plots.png_bytes(fig))


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


def write_weights(model: Any, labels: Sequence[int], path: Path) -> Path:
    """The weights file: ``weights``, ``bias`` and ``labels`` (the digit of each class)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        weights=np.asarray(model.weights),
        bias=np.asarray(model.bias),
        labels=np.asarray(labels, dtype=np.int64),
    )
    write_atomic(path, buffer.getvalue())
    return path


def write_run_files(
    folder: Path, result: TrainResult, splits: Splits, labels: Sequence[int], config_yaml: str
) -> Path:
    """A run's artifacts under ``folder/artifacts``: the weights, the resolved config, the
    learning curves, the weight heatmaps, the confusion matrix and the most-confused pairs,
    and the class means beside the weights (softmax); returns that folder."""
    from src import plots  # matplotlib loads in a moment: only for a run that got here

    out = folder / ARTIFACTS_DIR
    write_weights(result.model, labels, out / WEIGHTS_FILE)
    write_atomic(out / "config" / "config.yaml", config_yaml)
    curves = curves_from_history(result.history)
    if curves:
        save(plots.learning_curves(curves, "loss"), out / "plots" / "loss_curves.png")
        save(plots.learning_curves(curves, "accuracy"), out / "plots" / "accuracy_curves.png")
    weights = np.asarray(result.model.weights)
    titles = heatmap_titles(labels, 1 if weights.ndim == 1 else weights.shape[1])
    save(plots.weight_heatmaps(weights, titles), out / "plots" / "weights.png")
    digits = np.asarray(labels)  # class index -> digit
    y_true = digits[splits.test.labels]
    y_pred = digits[result.model.predict(splits.test.images)]
    shown = sorted(labels)
    matrix = plots.confusion_matrix(y_true, y_pred, shown)
    save(plots.confusion_figure(matrix, shown), out / "plots" / "confusion_matrix.png")
    pairs = plots.most_confused_pairs(matrix, shown)
    write_atomic(out / "tables" / "most_confused_pairs.json", json.dumps(pairs, indent=2))
    if weights.ndim == 2:
        save(
            plots.class_means_and_weights(splits.train.images, splits.train.labels, weights),
            out / "plots" / "class_means_and_weights.png",
        )
    return out


def write_metrics(folder: Path, rows: Iterable[Any]) -> None:
    """Every metric of a run as ``metrics.csv``: rows with ``key``, ``value``, ``timestamp``
    and ``step`` attributes (MLflow's ``Metric``) or 4-tuples in that order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in rows:
        if not isinstance(row, tuple):
            row = (row.key, row.value, row.timestamp, row.step)
        writer.writerow([row[0], repr(float(row[1])), int(row[2]), int(row[3])])
    write_atomic(folder / METRICS_FILE, out.getvalue())


def read_metrics(folder: Path) -> list[tuple[str, float, int, int]]:
    """The rows of :func:`write_metrics`."""
    with (folder / METRICS_FILE).open(newline="") as handle:
        reader = csv.DictReader(handle)
        return [(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                for r in reader]


def write_run_record(folder: Path, record: Mapping[str, Any]) -> None:
    """``run.json``: the run's experiment, name, params, tags and model step."""
    write_atomic(folder / RUN_FILE, json.dumps(dict(record), indent=2, sort_keys=True) + "\n")


def read_run_record(folder: Path) -> dict[str, Any]:
    """The record of :func:`write_run_record`."""
    return json.loads((folder / RUN_FILE).read_text())


def write_table(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV table with a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    write_atomic(path, out.getvalue())


def write_sweep_figures(folder: Path, jobs: Sequence[Any]) -> None:
    """The comparison of a sweep's finished jobs (:class:`src.plots.SweepJob`) under
    ``folder/plots``: validation accuracy of every job, weight norm against lambda, and the
    weights side by side when every job has them."""
    from src import plots

    if not jobs:
        return
    figures = {
        "sweep_comparison.png": plots.sweep_comparison,
        "weight_norm_vs_lambda.png": plots.weight_norm_vs_lambda,
    }
    if all(job.weights is not None for job in jobs):
        figures["weights_by_lambda.png"] = plots.weights_side_by_side
    for name, draw in figures.items():
        save(draw(jobs), folder / "plots" / name)


def write_search_figures(
    folder: Path, trials: Mapping[str, np.ndarray], metric: str, minimize: bool
) -> None:
    """A search's figures under ``folder/plots``: the optimisation history and the search
    space explored. ``trials`` holds ``value`` (the metric of each trial, NaN if it failed)
    and one array per searched parameter (``lr``, ``lambda``)."""
    from src import plots

    values = np.asarray(trials["value"], dtype=np.float64)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in trials.items() if k != "value"}
    save(plots.optimization_history(values, metric, minimize),
         folder / "plots" / "optimization_history.png")
    save(plots.search_space(params, values, metric, minimize),
         folder / "plots" / "search_space.png")
