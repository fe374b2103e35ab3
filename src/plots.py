"""Every figure of the project: learning curves, weight heatmaps, confusion matrices, sweeps.

Pure functions of numpy arrays and plain data. Nothing here knows about MLflow or Hydra;
``src/artifacts.py`` calls these functions and writes what they return. Figures are plain
``matplotlib.figure.Figure`` objects on an Agg canvas (no pyplot state), so nothing leaks
from one run to the next, and they are small (80 dpi) because they are drawn at the
end of every run and must stay cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator

from src.data import IMAGE_SIDE, N_PIXELS

Curves = dict[str, tuple[np.ndarray, np.ndarray]]
"""Metric name (``"train/loss"``, ``"val/accuracy"``, ...) -> (epochs, values), both (n,)."""

DPI = 80  # small PNGs, fast to render: every run draws its figures at its end
SPLITS = ("train", "val", "test")
SPLIT_LABELS = {"train": "training", "val": "validation", "test": "test"}
SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
KIND_TITLES = {"loss": "Cross-entropy loss (without the L2 term)", "accuracy": "Accuracy"}
DIVERGING_CMAP = "RdBu_r"
HEATMAP_PANEL_INCHES = 1.1
# Blank pixels between mosaic panels, and above each panel for its title.
PANEL_GAP = 3
PANEL_TITLE_GAP = 8
# Parameters that identify a job but are not compared on an axis of their own.
SEED_PARAM = "seed"


@dataclass(frozen=True)
class SweepJob:
    """One finished job of a sweep, as the sweep figures need it.

    Attributes
    ----------
    name : str
        The run name (``"logistic lambda=0.01 lr=0.5"``).
    params : dict
        At least ``"lambda"``, ``"lr"``, ``"seed"`` and ``"model"``; any other swept
        parameter may be present too.
    curves : Curves
        Per-evaluation metrics; the comparison uses ``"val/accuracy"``.
    final : dict[str, float]
        The ``final_*`` and ``best_step`` metrics, plus ``"weights/norm"``.
    weights : ndarray of shape (784,) or (784, k), optional
        The kept weights, for the heatmaps.
    """

    name: str
    params: dict[str, float | int | str]
    curves: Curves
    final: dict[str, float]
    weights: np.ndarray | None = None


# --------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot registry, so no global state)."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _symmetric_limit(*arrays: np.ndarray) -> float:
    """Largest absolute value over ``arrays``; 1.0 when all are zero (e.g. untrained weights)."""
    m = max((float(np.max(np.abs(a))) if a.size else 0.0) for a in arrays)
    return m if m > 0 and math.isfinite(m) else 1.0


def _draw_heatmap(
    ax: Axes,
    panels: Sequence[np.ndarray],
    titles: Sequence[str],
    n_cols: int,
    limit: float,
    cmap: str = DIVERGING_CMAP,
) -> AxesImage:
    """Draw 28x28 panels as one mosaic image on ``ax``: the one place that draws a heatmap.

    One image for all panels (rather than an axes each) keeps a 20-panel figure cheap to
    render, and makes the shared colour scale a fact rather than a convention. ``limit`` fixes
    the scale to [-limit, limit] for the diverging map (zero is the neutral colour in every
    panel) or to [0, limit] for grey mean images. Gaps between panels are NaN (blank).

    Parameters
    ----------
    panels : sequence of ndarray of shape (784,)
    titles : sequence of str, one per panel
    n_cols : int
        Panels per row of the mosaic.
    """
    n_rows = math.ceil(len(panels) / n_cols)
    step_x, step_y = IMAGE_SIDE + PANEL_GAP, IMAGE_SIDE + PANEL_TITLE_GAP
    mosaic = np.full((n_rows * step_y, n_cols * step_x - PANEL_GAP), np.nan)
    for index, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        row, col = divmod(index, n_cols)
        top, left = row * step_y + PANEL_TITLE_GAP, col * step_x
        mosaic[top : top + IMAGE_SIDE, left : left + IMAGE_SIDE] = np.asarray(
            panel, dtype=np.float64
        ).reshape(IMAGE_SIDE, IMAGE_SIDE)
        ax.text(left + IMAGE_SIDE / 2, top - 1.5, title, ha="center", va="bottom", fontsize=7)
    vmin = -limit if cmap == DIVERGING_CMAP else 0.0
    image = ax.imshow(mosaic, cmap=cmap, vmin=vmin, vmax=limit, interpolation="nearest")
    ax.set_axis_off()
    return image


def _mosaic_inches(n_panels: int, n_cols: int) -> tuple[float, float]:
    """Width and height in inches of the mosaic that ``_draw_heatmap`` draws."""
    n_rows = math.ceil(n_panels / n_cols)
    # A lone panel (the logistic model's weights) is drawn larger: it is the whole figure.
    inches_per_pixel = HEATMAP_PANEL_INCHES * (1.6 if n_panels == 1 else 1.0) / IMAGE_SIDE
    width = n_cols * (IMAGE_SIDE + PANEL_GAP) - PANEL_GAP
    height = n_rows * (IMAGE_SIDE + PANEL_TITLE_GAP)
    return width * inches_per_pixel, height * inches_per_pixel


def _heatmap_grid(
    panels: Sequence[np.ndarray],
    titles: Sequence[str],
    n_cols: int,
    suptitle: str,
) -> Figure:
    """Weight panels in a grid on one diverging colour scale centred on zero, one colour bar."""
    width, height = _mosaic_inches(len(panels), n_cols)
    # Margins in inches: 0.1 left, 0.9 right for the colour bar, 0.1 below, 0.3 for the title.
    fig_width, fig_height = width + 1.0, height + 0.4
    fig = _new_figure(fig_width, fig_height)
    ax = fig.add_axes((0.1 / fig_width, 0.1 / fig_height, width / fig_width, height / fig_height))
    image = _draw_heatmap(ax, panels, titles, n_cols, _symmetric_limit(*panels))
    fig.suptitle(suptitle, fontsize=9)
    colour_axes = fig.add_axes(
        ((width + 0.3) / fig_width, 0.15 / fig_height, 0.12 / fig_width, 0.85 * height / fig_height)
    )
    fig.colorbar(image, cax=colour_axes)
    colour_axes.tick_params(labelsize=7)
    return fig


def _as_columns(weights: np.ndarray) -> np.ndarray:
    """Weights as (784, k) columns; raises ValueError naming the shape when it is not 784 rows."""
    weights = np.asarray(weights)
    if weights.ndim == 1:
        weights = weights[:, None]
    if weights.ndim != 2 or weights.shape[0] != N_PIXELS:
        raise ValueError(f"weights must have shape (784,) or (784, k), got {weights.shape}")
    return weights


def _sort_key(value: object) -> tuple[int, float, str]:
    """Numbers in numeric order first, then everything else by text."""
    try:
        return (0, float(value), "")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _format_value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _varying_params(jobs: Sequence[SweepJob], exclude: Sequence[str] = ()) -> list[str]:
    """Names of the parameters whose value differs between jobs (sorted, ``exclude`` dropped)."""
    names = sorted({name for job in jobs for name in job.params} - set(exclude))
    return [
        name for name in names if len({_format_value(job.params.get(name)) for job in jobs}) > 1
    ]


def _group(jobs: Sequence[SweepJob], ignore: Sequence[str]) -> list[tuple[dict, list[SweepJob]]]:
    """Jobs grouped by every parameter not in ``ignore``; groups and members in a stable order."""
    groups: dict[tuple, list[SweepJob]] = {}
    for job in jobs:
        key = tuple(sorted((k, _format_value(v)) for k, v in job.params.items() if k not in ignore))
        groups.setdefault(key, []).append(job)
    ordered = []
    for members in groups.values():
        members.sort(key=lambda job: _sort_key(job.params.get(SEED_PARAM, 0)))
        params = {k: v for k, v in members[0].params.items() if k not in ignore}
        ordered.append((params, members))
    ordered.sort(key=lambda item: [(k, _sort_key(v)) for k, v in sorted(item[0].items())])
    return ordered


def _label(params: dict, names: Sequence[str], fallback: str) -> str:
    parts = [f"{name}={_format_value(params[name])}" for name in names if name in params]
    return " ".join(parts) if parts else fallback


def _set_parameter_scale(ax: Axes, values: Sequence[float], name: str) -> None:
    """Log x when the values span a decade or more; symlog when 0 is among them."""
    positive = sorted({v for v in values if v > 0})
    if len(positive) >= 2 and positive[-1] / positive[0] >= 10:
        if any(v == 0 for v in values):
            # Linear up to the smallest positive value, so lambda=0 gets its own place.
            ax.set_xscale("symlog", linthresh=positive[0])
        else:
            ax.set_xscale("log")
    ax.set_xlabel(name)


def _mean_and_spread(
    jobs: Sequence[SweepJob], metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, minimum and maximum of ``metric`` over jobs, on the longest job's epochs.

    Jobs that stopped early contribute only to the epochs they reached (NaN after).

    Returns
    -------
    epochs, mean, low, high : ndarray of shape (n,)
    count : ndarray of shape (n,)
        How many jobs each point averages.
    """
    curves = [job.curves[metric] for job in jobs if metric in job.curves]
    epochs = np.asarray(max(curves, key=lambda curve: len(curve[0]))[0], dtype=np.float64)
    stacked = np.full((len(curves), epochs.size), np.nan)
    for row, (x, y) in enumerate(curves):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.size == 0:
            continue
        inside = (epochs >= x[0]) & (epochs <= x[-1])
        stacked[row, inside] = np.interp(epochs[inside], x, y)
    count = np.sum(~np.isnan(stacked), axis=0)
    reached = count > 0
    stacked = stacked[:, reached]
    return (
        epochs[reached],
        np.nanmean(stacked, axis=0),
        np.nanmin(stacked, axis=0),
        np.nanmax(stacked, axis=0),
        count[reached],
    )


def _final_against(
    ax: Axes,
    jobs: Sequence[SweepJob],
    parameter: str,
    metrics: Sequence[tuple[str, str]],
) -> None:
    """Final metrics against one parameter: one line per (metric, other-parameter group).

    Jobs that differ only by seed are averaged; the error bars span their minimum to maximum.
    """
    others = _varying_params(jobs, exclude=(parameter, SEED_PARAM))
    groups = _group(jobs, ignore=(parameter, SEED_PARAM))
    styles = ["-", "--", ":", "-."]
    xs_all: list[float] = []
    for group_index, (params, members) in enumerate(groups):
        by_value: dict[float, list[SweepJob]] = {}
        for job in members:
            by_value.setdefault(float(job.params[parameter]), []).append(job)
        xs = sorted(by_value)
        xs_all.extend(xs)
        for metric, colour in metrics:
            values = [[job.final[metric] for job in by_value[x] if metric in job.final] for x in xs]
            points = [(x, v) for x, v in zip(xs, values, strict=True) if v]
            if not points:
                continue
            x = np.array([p[0] for p in points])
            mean = np.array([np.mean(p[1]) for p in points])
            low = mean - np.array([np.min(p[1]) for p in points])
            high = np.array([np.max(p[1]) for p in points]) - mean
            name = metric.split("/")[-1].removeprefix("final_").replace("_", " ")
            group_label = _label(params, others, "")
            ax.errorbar(
                x,
                mean,
                # Rounding in the mean can put it a hair outside [min, max].
                yerr=np.clip(np.vstack([low, high]), 0.0, None),
                color=colour,
                linestyle=styles[group_index % len(styles)],
                marker="o",
                markersize=4,
                capsize=3,
                label=f"{name} {group_label}".strip(),
            )
    _set_parameter_scale(ax, xs_all, parameter)
    ax.grid(alpha=0.3)
    if len(ax.containers) > 1:  # one line needs no legend: the title names it
        ax.legend(fontsize=6)


# --------------------------------------------------------------------------- per run


def learning_curves(curves: Curves, kind: str) -> Figure:
    """Training, validation and test curves of one kind against epochs (report fig 2.1a/b, 3a).

    Parameters
    ----------
    curves : Curves
        Metric name -> (epochs, values), each of shape (n,). Uses ``"{split}/{kind}"`` for
        the splits train, val and test that are present; other metrics are ignored.
    kind : {"loss", "accuracy"}

    Returns
    -------
    Figure
        One axes titled after ``kind``.
    """
    if kind not in KIND_TITLES:
        raise ValueError(f"kind must be 'loss' or 'accuracy', got {kind!r}")
    present = [split for split in SPLITS if f"{split}/{kind}" in curves]
    if not present:
        raise ValueError(f"no curve named train/{kind}, val/{kind} or test/{kind} to plot")
    fig = _new_figure(5.0, 3.2)
    ax = fig.add_subplot()
    for split in present:
        epochs, values = curves[f"{split}/{kind}"]
        ax.plot(
            np.asarray(epochs),
            np.asarray(values),
            color=SPLIT_COLOURS[split],
            linewidth=1.2,
            label=SPLIT_LABELS[split],
        )
    ax.set_title(KIND_TITLES[kind], fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(kind)
    ax.grid(alpha=0.3)
    # Where the curves are not (losses fall, accuracies rise): loc="best" searches every
    # point of every line and costs a quarter of the drawing time.
    ax.legend(fontsize=8, loc="upper right" if kind == "loss" else "lower right")
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)
    return fig


def weight_heatmaps(weights: np.ndarray, titles: Sequence[str]) -> Figure:
    """Weights as 28x28 images, one panel per class, on one colour scale centred on zero.

    Parameters
    ----------
    weights : ndarray of shape (784,) or (784, k)
    titles : sequence of str, length k
        One title per panel (``"2 (+) vs 3 (-)"``, ``"digit 0"``, ...).

    Returns
    -------
    Figure
        k image panels (5 per row at most) with ``vmin=-m, vmax=m``, m the largest absolute
        weight, and one colour bar.
    """
    columns = _as_columns(weights)
    if len(titles) != columns.shape[1]:
        raise ValueError(f"{len(titles)} titles for {columns.shape[1]} weight columns")
    images = [columns[:, j] for j in range(columns.shape[1])]
    return _heatmap_grid(images, list(titles), min(len(images), 5), "Learned weights")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Count how often each true label was predicted as each label.

    Parameters
    ----------
    y_true, y_pred : ndarray of shape (n,)
        Integer labels, each one of ``labels``.
    labels : sequence of int, length k

    Returns
    -------
    ndarray of shape (k, k), int64
        ``matrix[i, j]`` = number of examples with true label ``labels[i]`` predicted as
        ``labels[j]``.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    label_array = np.asarray(list(labels))
    order = np.argsort(label_array, kind="stable")
    sorted_labels = label_array[order]
    k = label_array.size
    indices = []
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        position = np.searchsorted(sorted_labels, values).clip(0, max(k - 1, 0))
        if k == 0 or not np.array_equal(sorted_labels[position], values):
            unknown = sorted(set(values.tolist()) - set(label_array.tolist()))
            raise ValueError(f"{name} holds labels {unknown[:5]} that are not in labels")
        indices.append(order[position])
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (indices[0], indices[1]), 1)
    return matrix


def confusion_figure(matrix: np.ndarray, labels: Sequence[int]) -> Figure:
    """The confusion matrix as an image with the counts written in (rows = true labels).

    Parameters
    ----------
    matrix : ndarray of shape (k, k)
        From :func:`confusion_matrix`.
    labels : sequence of int, length k
    """
    matrix = np.asarray(matrix)
    k = len(labels)
    if matrix.shape != (k, k):
        raise ValueError(f"matrix has shape {matrix.shape}, expected ({k}, {k}) for the labels")
    # At least 3.4 x 2.9 inches, so that a 2x2 matrix still has room for its labels.
    fig = _new_figure(max(3.4, 1.4 + 0.42 * k), max(2.9, 1.0 + 0.38 * k))
    ax = fig.add_axes((0.2, 0.18, 0.58, 0.7))
    artist = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    ax.set_xticks(range(k), [str(label) for label in labels], fontsize=8)
    ax.set_yticks(range(k), [str(label) for label in labels], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test set)", fontsize=10)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                fontsize=6,
                color="white" if matrix[i, j] > threshold else "black",
            )
    colour_axes = fig.add_axes((0.82, 0.18, 0.035, 0.7))
    fig.colorbar(artist, cax=colour_axes).ax.tick_params(labelsize=7)
    return fig


def most_confused_pairs(matrix: np.ndarray, labels: Sequence[int], top: int = 10) -> list[dict]:
    """The off-diagonal cells of a confusion matrix with the most examples.

    Parameters
    ----------
    matrix : ndarray of shape (k, k)
        Counts, rows = true labels.
    labels : sequence of int, length k
    top : int
        At most this many pairs.

    Returns
    -------
    list of dict
        ``{"true": int, "predicted": int, "count": int, "rate": float}``, where ``rate`` is
        the share of the true label's examples predicted as ``predicted``; most frequent
        first (ties: higher rate, then by labels). Pairs never confused are left out.
    """
    matrix = np.asarray(matrix)
    k = len(labels)
    if matrix.shape != (k, k):
        raise ValueError(f"matrix has shape {matrix.shape}, expected ({k}, {k}) for the labels")
    row_totals = matrix.sum(axis=1)
    pairs = [
        {
            "true": int(labels[i]),
            "predicted": int(labels[j]),
            "count": int(matrix[i, j]),
            "rate": float(matrix[i, j] / row_totals[i]),
        }
        for i in range(k)
        for j in range(k)
        if i != j and matrix[i, j] > 0
    ]
    pairs.sort(key=lambda p: (-p["count"], -p["rate"], p["true"], p["predicted"]))
    return pairs[: max(top, 0)]


def class_means_and_weights(images: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> Figure:
    """The mean image of each digit above the learned weights of that digit (report fig 3c).

    Parameters
    ----------
    images : ndarray of shape (n, 784)
        Pixel values in [0, 1].
    labels : ndarray of shape (n,)
        Integer labels in 0..k-1.
    weights : ndarray of shape (784, k)

    Returns
    -------
    Figure
        2 rows of k panels: row 1 the mean images (grey, 0..1), row 2 the weights on one
        diverging colour scale centred on zero.
    """
    columns = _as_columns(weights)
    images = np.asarray(images)
    labels = np.asarray(labels).ravel()
    if images.ndim != 2 or images.shape[1] != N_PIXELS or images.shape[0] != labels.size:
        raise ValueError(
            f"images {images.shape} and labels {labels.shape} must be (n, 784) and (n,)"
        )
    k = columns.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in 0..{k - 1} for {k} weight columns")
    counts = np.bincount(labels, minlength=k)
    # One-hot rows times the images: one matrix product instead of a slow scatter-add over
    # the whole training set (50,000 x 784).
    one_hot = (labels[None, :] == np.arange(k)[:, None]).astype(images.dtype)
    means = (one_hot @ images).astype(np.float64) / np.maximum(counts, 1)[:, None]
    width, height = _mosaic_inches(k, k)
    fig_width, fig_height = width + 1.0, 2 * height + 0.55
    fig = _new_figure(fig_width, fig_height)
    mean_ax = fig.add_axes(
        (0.1 / fig_width, (height + 0.15) / fig_height, width / fig_width, height / fig_height)
    )
    weight_ax = fig.add_axes(
        (0.1 / fig_width, 0.1 / fig_height, width / fig_width, height / fig_height)
    )
    _draw_heatmap(
        mean_ax, list(means), [f"mean {j}" for j in range(k)], k, max(1.0, means.max()), "gray"
    )
    image = _draw_heatmap(
        weight_ax, list(columns.T), [f"weights {j}" for j in range(k)], k, _symmetric_limit(columns)
    )
    fig.suptitle("Mean image of each digit (top) and its learned weights (bottom)", fontsize=9)
    colour_axes = fig.add_axes(
        ((width + 0.3) / fig_width, 0.15 / fig_height, 0.12 / fig_width, 0.85 * height / fig_height)
    )
    fig.colorbar(image, cax=colour_axes)
    colour_axes.tick_params(labelsize=7)
    return fig


# --------------------------------------------------------------------------- per sweep


def sweep_comparison(jobs: Sequence[SweepJob]) -> Figure:
    """Compare the jobs of a sweep (report fig 2.2b, and more).

    Left: the validation accuracy of every job against epochs on one axes. Jobs that differ
    only by seed are folded into their mean (line) and minimum-to-maximum spread (band), so
    that a reader sees which differences are larger than the seed's noise; past the point
    where a seed stopped early, the mean of the remaining seeds is dashed and has no band.
    Right: final training, validation and test accuracies, and the weight norm, against lambda
    (top) and against lr (bottom), log x when the values span a decade (symlog when lambda=0
    is swept).

    Parameters
    ----------
    jobs : sequence of SweepJob

    Returns
    -------
    Figure
        Five axes: curves, accuracy vs lambda, norm vs lambda, accuracy vs lr, norm vs lr.
    """
    if not jobs:
        raise ValueError("sweep_comparison needs at least one job")
    fig = _new_figure(12.0, 5.6)
    grid = fig.add_gridspec(2, 3, width_ratios=(1.5, 1.0, 1.0))
    curve_ax = fig.add_subplot(grid[:, 0])
    names = _varying_params(jobs, exclude=(SEED_PARAM,))
    colours = [f"C{i}" for i in range(10)]
    partial = False
    for index, (params, members) in enumerate(_group(jobs, ignore=(SEED_PARAM,))):
        members = [job for job in members if "val/accuracy" in job.curves]
        if not members:
            continue
        colour = colours[index % len(colours)]
        label = _label(params, names, members[0].name)
        if len(members) == 1:
            epochs, values = members[0].curves["val/accuracy"]
            curve_ax.plot(np.asarray(epochs), np.asarray(values), color=colour, label=label)
            continue
        epochs, mean, low, high, count = _mean_and_spread(members, "val/accuracy")
        # The mean of every seed, solid with its band, only where every seed still ran; where
        # some stopped early the mean of the others goes on dashed, so that a reader does not
        # take one seed's tail for a mean.
        every = count == len(members)
        curve_ax.plot(
            epochs[every],
            mean[every],
            color=colour,
            label=f"{label} (mean of {len(members)} seeds)",
        )
        curve_ax.fill_between(
            epochs[every], low[every], high[every], color=colour, alpha=0.2, linewidth=0
        )
        if not every.all():
            tail = slice(max(int(np.argmin(every)) - 1, 0), None)
            curve_ax.plot(epochs[tail], mean[tail], color=colour, linestyle="--", linewidth=0.8)
            partial = True
    curve_ax.set_title("Validation accuracy", fontsize=10)
    if partial:
        curve_ax.text(
            0.02,
            0.02,
            "dashed: mean of the seeds that had not stopped early",
            transform=curve_ax.transAxes,
            fontsize=7,
        )
    curve_ax.set_xlabel("epoch")
    curve_ax.set_ylabel("accuracy")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=7)

    accuracies = [(f"final_{split}_accuracy", SPLIT_COLOURS[split]) for split in SPLITS]
    norm = [("weights/norm", "tab:purple")]
    for row, parameter in enumerate(("lambda", "lr")):
        usable = [job for job in jobs if parameter in job.params]
        accuracy_ax = fig.add_subplot(grid[row, 1])
        norm_ax = fig.add_subplot(grid[row, 2])
        values = {_format_value(job.params[parameter]) for job in usable}
        if len(values) > 1:
            _final_against(accuracy_ax, usable, parameter, accuracies)
            _final_against(norm_ax, usable, parameter, norm)
        else:
            # One value (or none) is no comparison: say so rather than draw a lone point.
            note = f"{parameter}={values.pop()} in every job" if values else f"no {parameter}"
            for ax in (accuracy_ax, norm_ax):
                ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
        accuracy_ax.set_title(f"Final accuracy against {parameter}", fontsize=9)
        norm_ax.set_title(f"Weight norm against {parameter}", fontsize=9)
        accuracy_ax.set_ylabel("accuracy")
        norm_ax.set_ylabel("||w||")
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.09, top=0.94, wspace=0.3, hspace=0.45)
    return fig


def weight_norm_vs_lambda(jobs: Sequence[SweepJob]) -> Figure:
    """The length of the weight vector against lambda (report fig 2.2c).

    Parameters
    ----------
    jobs : sequence of SweepJob
        Each with ``params["lambda"]`` and ``final["weights/norm"]``. Jobs that differ only
        by seed are averaged (error bars: minimum to maximum); other swept parameters get a
        line each.
    """
    usable = [job for job in jobs if "lambda" in job.params and "weights/norm" in job.final]
    if not usable:
        raise ValueError("no job has both params['lambda'] and final['weights/norm']")
    fig = _new_figure(5.0, 3.4)
    ax = fig.add_subplot()
    _final_against(ax, usable, "lambda", [("weights/norm", "tab:purple")])
    ax.set_title("Length of the weight vector against lambda", fontsize=10)
    ax.set_ylabel("||w||")
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)
    return fig


def weights_side_by_side(jobs: Sequence[SweepJob]) -> Figure:
    """The weights of each lambda as 28x28 heatmaps side by side on one colour scale (fig 2.2d).

    Parameters
    ----------
    jobs : sequence of SweepJob
        Those with weights are drawn; of jobs that differ only by seed, the lowest seed.
        Weights of shape (784,) give one row with a panel per job; (784, k) give a row per
        job with k panels.
    """
    with_weights = [job for job in jobs if job.weights is not None]
    if not with_weights:
        raise ValueError("no job has weights to draw")
    names = _varying_params(with_weights, exclude=(SEED_PARAM,))
    chosen = [(params, members[0]) for params, members in _group(with_weights, (SEED_PARAM,))]
    images: list[np.ndarray] = []
    titles: list[str] = []
    columns = [_as_columns(job.weights) for _, job in chosen]  # type: ignore[arg-type]
    k = columns[0].shape[1]
    if any(c.shape[1] != k for c in columns):
        raise ValueError("jobs have weights of different shapes")
    for (params, job), column in zip(chosen, columns, strict=True):
        label = _label(params, names, job.name)
        for j in range(k):
            images.append(column[:, j])
            titles.append(label if k == 1 else f"{label}\nclass {j}")
    n_cols = len(images) if k == 1 else k
    return _heatmap_grid(images, titles, n_cols, "Learned weights, one colour scale")


# --------------------------------------------------------------------------- searches


def _metric_label(metric: str) -> str:
    return metric.replace("val_", "validation ").replace("_", " ")


def _searched_scale(ax: Axes, values: np.ndarray, axis: str) -> None:
    """A searched parameter's axis: log when every value is positive (searches sample on a
    log scale), symlog when 0 is among them."""
    positive = values[values > 0]
    if positive.size == 0 or (values < 0).any():
        return
    scale = getattr(ax, f"set_{axis}scale")
    if positive.size == values.size:
        scale("log")
    else:
        scale("symlog", linthresh=float(positive.min()))


def _best_index(values: np.ndarray, minimize: bool) -> int | None:
    finite = np.isfinite(values)
    if not finite.any():
        return None
    scored = np.where(finite, values if minimize else -values, np.inf)
    return int(np.argmin(scored))


def optimization_history(values: np.ndarray, metric: str, minimize: bool = True) -> Figure:
    """A search's trials in order: each one's value of the optimised metric, the best so far
    as a step line, and the failed trials (NaN) as crosses along the bottom.

    Parameters
    ----------
    values : ndarray of shape (n,)
        The metric of trial 0, 1, ...; NaN for a trial that failed.
    metric : str
        Its name (``val_loss``, ``val_accuracy``).
    minimize : bool
        Whether lower is better (the best so far is the running minimum).
    """
    values = np.asarray(values, dtype=np.float64)
    trials = np.arange(values.size)
    finite = np.isfinite(values)
    fig = _new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    label = _metric_label(metric)
    ax.plot(trials[finite], values[finite], "o", color="tab:blue", markersize=5,
            label=f"trial's {label}")
    if finite.any():
        worst = np.inf if minimize else -np.inf
        running = np.where(finite, values, worst)
        best = np.minimum.accumulate(running) if minimize else np.maximum.accumulate(running)
        reached = np.isfinite(best)
        ax.step(trials[reached], best[reached], where="post", color="tab:red",
                label="best so far")
        index = _best_index(values, minimize)
        assert index is not None
        ax.plot([index], [values[index]], "*", color="tab:red", markersize=14,
                label=f"best: trial {index}")
    if (~finite).any():
        ax.plot(trials[~finite], np.zeros(int((~finite).sum())), "x", color="tab:gray",
                transform=ax.get_xaxis_transform(), clip_on=False, markersize=7,
                label=f"failed ({int((~finite).sum())})")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(label)
    ax.set_xlim(-0.5, max(values.size - 0.5, 0.5))
    way = "lower" if minimize else "higher"
    ax.set_title(f"Optimisation history: {label} ({way} is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)
    return fig


def search_space(
    params: dict[str, np.ndarray], values: np.ndarray, metric: str, minimize: bool = True
) -> Figure:
    """The search space a search explored: the metric against each parameter (log x when it
    spans a decade), and the first two parameters against each other, coloured by the metric;
    the best trial is a red star, failed trials grey crosses.

    Parameters
    ----------
    params : dict of str to ndarray of shape (n,)
        Each parameter's value in trial 0, 1, ... (``{"lr": ..., "lambda": ...}``); NaN
        where a trial did not record it.
    values : ndarray of shape (n,)
        The metric of each trial; NaN for a trial that failed.
    """
    values = np.asarray(values, dtype=np.float64)
    names = list(params)
    if not names:
        raise ValueError("search_space needs at least one parameter")
    finite = np.isfinite(values)
    best = _best_index(values, minimize)
    label = _metric_label(metric)
    panels = len(names) + (1 if len(names) >= 2 else 0)
    fig = _new_figure(3.8 * panels, 3.4)
    cmap = "viridis_r" if minimize else "viridis"  # the better trials bright
    for index, name in enumerate(names):
        x = np.asarray(params[name], dtype=np.float64)
        ax = fig.add_subplot(1, panels, index + 1)
        known = np.isfinite(x)
        ax.scatter(x[known & finite], values[known & finite], c="tab:blue", s=18)
        if best is not None and known[best]:
            ax.plot([x[best]], [values[best]], "*", color="tab:red", markersize=13)
        failed = known & ~finite
        if failed.any():
            ax.plot(x[failed], np.zeros(int(failed.sum())), "x", color="tab:gray",
                    transform=ax.get_xaxis_transform(), clip_on=False)
        _searched_scale(ax, x[known], "x")
        ax.set_xlabel(name)
        ax.set_ylabel(label)
        ax.set_title(f"{label} against {name}", fontsize=9)
        ax.grid(alpha=0.3)
    if len(names) >= 2:
        ax = fig.add_subplot(1, panels, panels)
        x = np.asarray(params[names[0]], dtype=np.float64)
        y = np.asarray(params[names[1]], dtype=np.float64)
        known = np.isfinite(x) & np.isfinite(y)
        shown = known & finite
        if shown.any():
            points = ax.scatter(x[shown], y[shown], c=values[shown], cmap=cmap, s=24)
            fig.colorbar(points, ax=ax, label=label)
        if (known & ~finite).any():
            ax.plot(x[known & ~finite], y[known & ~finite], "x", color="tab:gray",
                    label="failed")
            ax.legend(fontsize=7)
        if best is not None and known[best]:
            ax.plot([x[best]], [y[best]], "*", color="tab:red", markersize=14)
        _searched_scale(ax, x[known], "x")
        _searched_scale(ax, y[known], "y")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title(f"{names[0]} and {names[1]} tried", fontsize=9)
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.95, bottom=0.15, top=0.88, wspace=0.45)
    return fig


# --------------------------------------------------------------------------- output


def png_bytes(fig: Figure) -> bytes:
    """``fig`` as PNG bytes at its own resolution; the figure is done with afterwards.

    Our figures are never registered with pyplot, so there is no global figure list to close
    them in: the figure is freed when the caller drops it.
    """
    buffer = io.BytesIO()
    # The lowest zlib level: these PNGs are small, and encoding is a large share of the time.
    fig.savefig(buffer, format="png", dpi="figure", pil_kwargs={"compress_level": 1})
    return buffer.getvalue()
