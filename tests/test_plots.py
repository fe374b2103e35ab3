"""Tests of src/plots.py on small hand-made data: what each figure draws, not how it looks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from PIL import Image

from src import artifacts, plots
from src.plots import SweepJob

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _curves(n: int = 40, shift: float = 0.0) -> plots.Curves:
    epochs = np.arange(1, n + 1) / 20
    return {
        "train/loss": (epochs, 1.0 / (1 + epochs) + shift),
        "val/loss": (epochs, 1.1 / (1 + epochs) + shift),
        "test/loss": (epochs, 1.2 / (1 + epochs) + shift),
        "train/accuracy": (epochs, 1 - 0.5 / (1 + epochs) - shift),
        "val/accuracy": (epochs, 1 - 0.6 / (1 + epochs) - shift),
        "test/accuracy": (epochs, 1 - 0.7 / (1 + epochs) - shift),
        "lr": (epochs, 0.5 * np.exp(-0.1 * epochs)),
    }


def _images(fig: Figure) -> list:
    return [image for ax in fig.axes for image in ax.get_images()]


def _texts(fig: Figure) -> list[str]:
    return [text.get_text() for ax in fig.axes for text in ax.texts]


def _job(lam: float, seed: int = 0, lr: float = 0.5, n: int = 40, weights=None) -> SweepJob:
    shift = 0.01 * seed + lam
    return SweepJob(
        name=f"logistic lambda={lam:g} lr={lr:g} seed={seed}",
        params={"lambda": lam, "lr": lr, "seed": seed, "model": "logistic"},
        curves=_curves(n, shift),
        final={
            "final_train_accuracy": 0.97 - lam - 0.001 * seed,
            "final_val_accuracy": 0.96 - lam - 0.002 * seed,
            "final_test_accuracy": 0.95 - lam - 0.003 * seed,
            "best_step": 100.0,
            "weights/norm": 10.0 / (1 + 100 * lam) + seed,
        },
        weights=weights,
    )


# --------------------------------------------------------------------------- learning curves


@pytest.mark.parametrize("kind", ["loss", "accuracy"])
def test_learning_curves_draws_train_val_test_against_epoch(kind):
    curves = _curves()
    fig = plots.learning_curves(curves, kind)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_title() == plots.KIND_TITLES[kind]
    assert ax.get_xlabel() == "epoch"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"training", "validation", "test"}
    for split, label in plots.SPLIT_LABELS.items():
        epochs, values = curves[f"{split}/{kind}"]
        np.testing.assert_array_equal(lines[label].get_xdata(), epochs)
        np.testing.assert_array_equal(lines[label].get_ydata(), values)


def test_learning_curves_draws_only_the_splits_present():
    curves = {k: v for k, v in _curves().items() if k != "test/loss"}
    (ax,) = plots.learning_curves(curves, "loss").axes
    assert sorted(line.get_label() for line in ax.get_lines()) == ["training", "validation"]


def test_learning_curves_refuses_an_unknown_kind_and_missing_curves():
    with pytest.raises(ValueError, match="kind"):
        plots.learning_curves(_curves(), "precision")
    with pytest.raises(ValueError, match="no curve"):
        plots.learning_curves({"lr": _curves()["lr"]}, "loss")


# --------------------------------------------------------------------------- heatmaps


def test_weight_heatmaps_one_symmetric_scale_for_all_panels():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(784, 10))
    weights[5, 7] = -9.0  # the largest magnitude is negative: the scale must still be symmetric
    titles = [f"digit {j}" for j in range(10)]
    fig = plots.weight_heatmaps(weights, titles)
    images = _images(fig)
    assert len(images) == 1, "all panels share one image, so one colour scale"
    image = images[0]
    assert image.get_clim() == (-9.0, 9.0)
    assert image.get_cmap().name == plots.DIVERGING_CMAP
    assert _texts(fig) == titles
    assert len(fig.axes) == 2, "the panels and one colour bar"
    mosaic = np.ma.filled(image.get_array(), np.nan)
    np.testing.assert_array_equal(np.sort(mosaic[~np.isnan(mosaic)]), np.sort(weights.ravel()))
    # Panel 7 (row 1, column 2 with 5 panels a row) shows column 7 as a 28x28 image.
    top = 1 * (28 + plots.PANEL_TITLE_GAP) + plots.PANEL_TITLE_GAP
    left = 2 * (28 + plots.PANEL_GAP)
    np.testing.assert_array_equal(
        mosaic[top : top + 28, left : left + 28], weights[:, 7].reshape(28, 28)
    )


def test_weight_heatmaps_of_a_vector_and_of_zero_weights():
    fig = plots.weight_heatmaps(np.zeros(784, dtype=np.float32), ["2 (+) vs 3 (-)"])
    (image,) = _images(fig)
    assert image.get_clim() == (-1.0, 1.0), "untrained weights still get a usable scale"
    assert image.get_array().shape == (28 + plots.PANEL_TITLE_GAP, 28)
    assert _texts(fig) == ["2 (+) vs 3 (-)"]


def test_weight_heatmaps_refuses_bad_shapes_and_titles():
    with pytest.raises(ValueError, match=r"\(784,\) or \(784, k\)"):
        plots.weight_heatmaps(np.zeros((28, 28)), ["x"])
    with pytest.raises(ValueError, match="titles"):
        plots.weight_heatmaps(np.zeros((784, 3)), ["a", "b"])


def test_class_means_and_weights_two_rows_of_k_panels():
    k = 4
    labels = np.array([0, 1, 1, 2, 3, 3, 3])
    images = np.zeros((labels.size, 784))
    images[:, 0] = labels / 10  # pixel 0 of every image encodes its digit
    images[2, 1] = 0.8  # one of the two ones differs: the mean halves it
    weights = np.linspace(-2.0, 3.0, 784 * k).reshape(784, k)
    fig = plots.class_means_and_weights(images, labels, weights)
    means_image, weights_image = _images(fig)
    assert means_image.get_clim() == (0.0, 1.0)
    assert weights_image.get_clim() == (-3.0, 3.0)
    assert weights_image.get_cmap().name == plots.DIVERGING_CMAP
    assert _texts(fig) == [f"mean {j}" for j in range(k)] + [f"weights {j}" for j in range(k)]
    means = np.ma.filled(means_image.get_array(), np.nan)
    top, step = plots.PANEL_TITLE_GAP, 28 + plots.PANEL_GAP
    for digit in range(k):
        panel = means[top : top + 28, digit * step : digit * step + 28].ravel()
        assert panel[0] == pytest.approx(digit / 10)
    assert means[top, step + 1] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="labels"):
        plots.class_means_and_weights(images, labels + 1, weights)


# --------------------------------------------------------------------------- confusion


def test_confusion_matrix_counts_a_hand_example():
    y_true = np.array([0, 0, 1, 2, 2, 2, 1])
    y_pred = np.array([0, 1, 1, 2, 0, 2, 1])
    matrix = plots.confusion_matrix(y_true, y_pred, [0, 1, 2])
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 2]])
    assert matrix.sum() == y_true.size


def test_confusion_matrix_follows_the_order_of_labels():
    y_true = np.array([3, 3, 2, 2, 2])
    y_pred = np.array([3, 2, 2, 2, 3])
    np.testing.assert_array_equal(plots.confusion_matrix(y_true, y_pred, [3, 2]), [[1, 1], [1, 2]])


def test_confusion_matrix_refuses_unknown_labels_and_mismatched_lengths():
    with pytest.raises(ValueError, match=r"y_pred holds labels \[7\]"):
        plots.confusion_matrix(np.array([0, 1]), np.array([0, 7]), [0, 1])
    with pytest.raises(ValueError, match="y_true has 2 labels but y_pred has 3"):
        plots.confusion_matrix(np.array([0, 1]), np.array([0, 1, 1]), [0, 1])


def test_confusion_figure_shows_the_counts():
    matrix = np.array([[50, 3], [7, 40]])
    fig = plots.confusion_figure(matrix, [2, 3])
    images = _images(fig)
    assert len(images) == 1
    np.testing.assert_array_equal(images[0].get_array(), matrix)
    assert sorted(_texts(fig)) == sorted(["50", "3", "7", "40"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2", "3"]


def test_most_confused_pairs_orders_by_count_then_rate():
    matrix = np.array(
        [
            [5, 2, 0],  # 2 of 7 zeros taken for ones: rate 0.286
            [1, 7, 4],
            [2, 2, 6],  # twos taken for zeros and for ones equally often: rate 0.2 each
        ]
    )
    pairs = plots.most_confused_pairs(matrix, [0, 1, 2])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        (1, 2, 4),
        (0, 1, 2),
        (2, 0, 2),
        (2, 1, 2),
        (1, 0, 1),
    ]
    assert pairs[0]["rate"] == pytest.approx(4 / 12)
    assert pairs[1]["rate"] == pytest.approx(2 / 7)
    assert all(type(p["true"]) is int and type(p["count"]) is int for p in pairs)
    assert plots.most_confused_pairs(matrix, [0, 1, 2], top=2) == pairs[:2]


# --------------------------------------------------------------------------- sweeps


def test_sweep_comparison_folds_seeds_into_a_mean_line_and_a_band():
    jobs = [_job(lam, seed) for lam in (0.01, 0.0) for seed in (2, 0, 1)]
    fig = plots.sweep_comparison(jobs)
    assert len(fig.axes) == 5
    curve_ax = fig.axes[0]
    assert curve_ax.get_title() == "Validation accuracy"
    lines = curve_ax.get_lines()
    assert [line.get_label() for line in lines] == [
        "lambda=0 (mean of 3 seeds)",
        "lambda=0.01 (mean of 3 seeds)",
    ]
    bands = [c for c in curve_ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    seeds = np.stack([_curves(40, 0.01 * seed)["val/accuracy"][1] for seed in (0, 1, 2)])
    np.testing.assert_allclose(lines[0].get_ydata(), seeds.mean(axis=0))
    band = bands[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(seeds.min())
    assert band[:, 1].max() == pytest.approx(seeds.max())


def test_sweep_comparison_without_seeds_draws_one_line_per_job_and_no_band():
    jobs = [_job(lam) for lam in (0.01, 0.001, 0.0001)]
    curve_ax = plots.sweep_comparison(jobs).axes[0]
    assert len(curve_ax.get_lines()) == 3
    assert not [c for c in curve_ax.collections if isinstance(c, PolyCollection)]


def test_sweep_comparison_dashes_the_mean_once_a_seed_stopped_early():
    jobs = [_job(0.0, seed=0, n=40), _job(0.0, seed=1, n=20)]
    curve_ax = plots.sweep_comparison(jobs).axes[0]
    solid, dashed = curve_ax.get_lines()
    both = np.stack(
        [_curves(40, 0.0)["val/accuracy"][1][:20], _curves(20, 0.01)["val/accuracy"][1]]
    )
    np.testing.assert_allclose(solid.get_ydata(), both.mean(axis=0))
    assert solid.get_linestyle() == "-"
    assert dashed.get_linestyle() == "--"
    assert dashed.get_label().startswith("_"), "the tail is no entry of its own in the legend"
    # The tail starts at the last mean of both seeds and then follows the seed that went on.
    assert dashed.get_ydata()[0] == pytest.approx(both.mean(axis=0)[-1])
    np.testing.assert_allclose(dashed.get_ydata()[1:], _curves(40, 0.0)["val/accuracy"][1][20:])
    (band,) = [c for c in curve_ax.collections if isinstance(c, PolyCollection)]
    assert band.get_paths()[0].vertices[:, 0].max() == pytest.approx(1.0), "band ends at epoch 1"
    assert "dashed" in curve_ax.texts[0].get_text()


def test_sweep_comparison_against_lambda_and_lr():
    jobs = [_job(lam, lr=lr) for lam in (0.0, 0.001, 0.1) for lr in (0.1, 0.5)]
    fig = plots.sweep_comparison(jobs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "Validation accuracy",
        "Final accuracy against lambda",
        "Weight norm against lambda",
        "Final accuracy against lr",
        "Weight norm against lr",
    ]
    assert fig.axes[1].get_xscale() == "symlog", "lambda=0 beside decades of lambda"
    # One errorbar line per (metric, lr): 3 accuracies x 2 learning rates.
    assert len(fig.axes[1].containers) == 6
    assert len(fig.axes[2].containers) == 2
    assert len(fig.axes[3].containers) == 9
    assert fig.axes[3].get_xscale() == "linear", "0.1 and 0.5 do not span a decade"


def test_sweep_comparison_says_when_lr_was_not_swept():
    fig = plots.sweep_comparison([_job(0.0), _job(0.01)])
    assert "lr=0.5 in every job" in [t.get_text() for t in fig.axes[3].texts]
    assert not fig.axes[3].containers


def test_weight_norm_vs_lambda_averages_seeds():
    jobs = [_job(lam, seed) for lam in (0.01, 0.0001, 0.001) for seed in (0, 1)]
    fig = plots.weight_norm_vs_lambda(jobs)
    (ax,) = fig.axes
    (container,) = ax.containers
    data_line = container.lines[0]
    np.testing.assert_allclose(data_line.get_xdata(), [0.0001, 0.001, 0.01])
    expected = [10.0 / (1 + 100 * lam) + 0.5 for lam in (0.0001, 0.001, 0.01)]
    np.testing.assert_allclose(data_line.get_ydata(), expected)
    assert ax.get_xscale() == "log"
    with pytest.raises(ValueError, match="weights/norm"):
        plots.weight_norm_vs_lambda([SweepJob("x", {"lambda": 0.0}, {}, {})])


def test_weights_side_by_side_one_panel_per_lambda_one_scale():
    rng = np.random.default_rng(1)
    weights = {lam: rng.normal(scale=1 + 10 * lam, size=784) for lam in (0.0001, 0.1)}
    jobs = [
        _job(lam, seed, weights=weights[lam] + seed) for lam in (0.1, 0.0001) for seed in (1, 0)
    ]
    fig = plots.weights_side_by_side(jobs)
    (image,) = _images(fig)
    limit = max(np.abs(w).max() for w in weights.values())  # seed 0 is drawn: weights + 0
    assert image.get_clim() == (-limit, limit)
    assert _texts(fig) == ["lambda=0.0001", "lambda=0.1"]
    mosaic = np.ma.filled(image.get_array(), np.nan)
    top = plots.PANEL_TITLE_GAP
    np.testing.assert_array_equal(mosaic[top:, :28], weights[0.0001].reshape(28, 28))


def test_weights_side_by_side_of_softmax_jobs_one_row_per_job():
    jobs = [_job(lam, weights=np.full((784, 10), lam - 0.005)) for lam in (0.0, 0.01)]
    fig = plots.weights_side_by_side(jobs)
    (image,) = _images(fig)
    assert image.get_array().shape == (
        2 * (28 + plots.PANEL_TITLE_GAP),
        10 * 28 + 9 * plots.PANEL_GAP,
    )
    assert len(_texts(fig)) == 20
    with pytest.raises(ValueError, match="no job has weights"):
        plots.weights_side_by_side([_job(0.0)])


# --------------------------------------------------------------------------- saving


def _small_figure() -> Figure:
    return plots.learning_curves(_curves(5), "loss")


def test_saving_a_figure_writes_a_png_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "plots" / "loss_curves.png"
    artifacts.save(_small_figure(), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
    assert os.listdir(path.parent) == ["loss_curves.png"]


def test_saving_a_figure_replaces_an_existing_file_only_on_success(tmp_path):
    path = tmp_path / "weights.png"
    path.write_bytes(b"old")
    fig = _small_figure()

    def failing_savefig(stream, **kwargs):
        stream.write(PNG_SIGNATURE + b"half a picture")
        raise RuntimeError("disk full")

    fig.savefig = failing_savefig  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="disk full"):
        artifacts.save(fig, path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.png"]

    artifacts.save(_small_figure(), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert os.listdir(tmp_path) == ["weights.png"]
