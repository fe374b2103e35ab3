"""Tests of src/training.py: schedule, evaluation steps, early stopping, reproducibility."""

import itertools
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import src.training
from src.data import Dataset, Splits
from src.models import LogisticRegression, SoftmaxRegression
from src.training import (
    Callback,
    DivergenceError,
    Evaluation,
    Schedule,
    TrainConfig,
    TrainResult,
    evaluate,
    evaluation_steps,
    learning_rate,
    prefetched_batches,
    train,
)

METRIC_NAMES = {
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "test/loss",
    "test/accuracy",
    "lr",
    "weights/norm",
}


def clusters(n_classes: int, n_per_class: int, seed: int, n_features: int = 20) -> Dataset:
    """Well-separated clusters in [0, 1]^d: linearly separable, like tiny digits."""
    centres = np.random.default_rng(100).random((n_classes, n_features))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    images = centres[labels] + 0.02 * rng.standard_normal((len(labels), n_features))
    order = rng.permutation(len(labels))
    return Dataset(images=images[order].astype(np.float32), labels=labels[order])


def separable_splits(n_classes: int, n_per_class: int = 30) -> Splits:
    return Splits(
        train=clusters(n_classes, n_per_class, seed=1),
        val=clusters(n_classes, 10, seed=2),
        test=clusters(n_classes, 10, seed=3),
    )


def flipped_val_splits() -> Splits:
    """Binary task whose validation labels are the training ones flipped.

    Every step that fits the training set pushes the validation loss up, so the best
    validation loss is at the first evaluation and every later one is worse.
    """
    train_set = clusters(2, 30, seed=1)
    flipped = Dataset(images=train_set.images, labels=1 - train_set.labels)
    return Splits(train=train_set, val=flipped, test=clusters(2, 10, seed=3))


class Recorder(Callback):
    """Keeps every evaluation and a copy of the weights the model had at that moment."""

    def __init__(self, model) -> None:
        self.model = model
        self.evaluations: list[Evaluation] = []
        self.weights: list[np.ndarray] = []
        self.biases: list = []
        self.results: list[TrainResult] = []

    def on_evaluation(self, evaluation: Evaluation) -> None:
        self.evaluations.append(evaluation)
        self.weights.append(self.model.weights.copy())
        self.biases.append(np.copy(self.model.bias))

    def on_end(self, result: TrainResult) -> None:
        self.results.append(result)


# --- learning-rate schedule -------------------------------------------------------------


def test_constant_schedule():
    schedule = Schedule(name="constant")
    assert [learning_rate(step, 10, 0.3, schedule) for step in (0, 9, 10, 1000)] == [0.3] * 4


def test_exponential_schedule_per_epoch_is_constant_within_an_epoch():
    schedule = Schedule(name="exponential", decay=0.5, per="epoch")
    assert learning_rate(0, 10, 2.0, schedule) == 2.0
    assert learning_rate(9, 10, 2.0, schedule) == 2.0  # last update of epoch 0
    assert learning_rate(10, 10, 2.0, schedule) == pytest.approx(2.0 * math.exp(-0.5))
    assert learning_rate(35, 10, 2.0, schedule) == pytest.approx(2.0 * math.exp(-1.5))


def test_exponential_schedule_per_step():
    schedule = Schedule(name="exponential", decay=0.01, per="step")
    assert learning_rate(0, 10, 1.0, schedule) == 1.0
    assert learning_rate(7, 10, 1.0, schedule) == pytest.approx(math.exp(-0.07))
    assert learning_rate(250, 10, 1.0, Schedule(decay=0.0, per="step")) == 1.0


@pytest.mark.parametrize(
    "arguments",
    [{"name": "cosine"}, {"per": "batch"}, {"decay": -0.1}, {"decay": math.nan}],
)
def test_schedule_refuses_nonsense(arguments):
    with pytest.raises(ValueError, match="schedule"):
        Schedule(**arguments)


@pytest.mark.parametrize(
    "arguments",
    [
        {"lr": 0.0},
        {"lr": -1.0},
        {"l2": -0.1},
        {"batch_size": 0},
        {"epochs": 0},
        {"evals_per_epoch": 0},
        {"patience": 0},
        {"batch_size": 1.5},
    ],
)
def test_train_config_refuses_nonsense(arguments):
    name = next(iter(arguments))
    with pytest.raises(ValueError, match=name):
        TrainConfig(**arguments)


# --- evaluations ------------------------------------------------------------------------


def test_evaluation_steps_are_evenly_spaced_and_end_the_epoch():
    assert evaluation_steps(10, 4) == [2, 5, 7, 10]
    assert evaluation_steps(391, 1) == [391]
    assert evaluation_steps(391, 20)[-1] == 391 and len(evaluation_steps(391, 20)) == 20
    assert evaluation_steps(3, 20) == [1, 2, 3]  # more evaluations than steps: every step


def test_history_steps_epochs_and_metrics():
    splits = separable_splits(3)  # 90 training examples
    config = TrainConfig(
        lr=0.1,
        batch_size=10,
        epochs=2,
        evals_per_epoch=4,
        early_stopping=False,
        schedule=Schedule(decay=0.5, per="epoch"),
    )
    model = SoftmaxRegression(20, 3)
    recorder = Recorder(model)
    result = train(model, splits, config, [recorder])
    # 9 steps per epoch; evaluations after steps 2, 4, 6, 9 of each epoch
    assert [e.step for e in result.history] == [2, 4, 6, 9, 11, 13, 15, 18]
    assert [e.epoch for e in result.history] == [e.step / 9 for e in result.history]
    assert recorder.evaluations == result.history
    for evaluation, weights in zip(result.history, recorder.weights, strict=True):
        metrics = evaluation.metrics
        assert set(metrics) == METRIC_NAMES
        for split in ("train", "val", "test"):
            assert 0.0 <= metrics[f"{split}/accuracy"] <= 1.0
            assert metrics[f"{split}/loss"] > 0.0
        assert metrics["weights/norm"] == pytest.approx(float(np.linalg.norm(weights)))
        # the rate of the last update: epoch 0 ends at step 9 with the undecayed rate
        expected_lr = 0.1 if evaluation.step <= 9 else 0.1 * math.exp(-0.5)
        assert metrics["lr"] == pytest.approx(expected_lr)
    # losses exclude the L2 term: they match the model's own evaluation at those weights
    last = SoftmaxRegression(20, 3)
    last.weights, last.bias = recorder.weights[-1], recorder.biases[-1]
    loss, accuracy = last.loss_and_accuracy(splits.val.images, splits.val.labels)
    assert result.history[-1].metrics["val/loss"] == loss
    assert result.history[-1].metrics["val/accuracy"] == accuracy
    assert recorder.results == [result]


# --- early stopping ---------------------------------------------------------------------


@pytest.mark.parametrize("patience", [1, 4])
def test_early_stopping_fires_after_patience_rising_evaluations_and_restores_best(patience):
    splits = flipped_val_splits()
    model = LogisticRegression(20)
    recorder = Recorder(model)
    config = TrainConfig(
        lr=0.5,
        batch_size=60,  # full batch: deterministic descent, so val loss rises at every step
        epochs=50,
        evals_per_epoch=1,
        schedule=Schedule(name="constant"),
        patience=patience,
    )
    result = train(model, splits, config, [recorder])
    val_losses = [e.metrics["val/loss"] for e in result.history]
    assert all(later > earlier for earlier, later in itertools.pairwise(val_losses))
    # best at the first evaluation, then exactly `patience` rising ones, then stop
    assert len(result.history) == 1 + patience
    assert result.stopped_early
    assert result.best_step == result.history[0].step == 1
    np.testing.assert_array_equal(result.model.weights, recorder.weights[0])
    assert result.model.bias == recorder.biases[0]
    assert result.final["best_step"] == 1
    assert result.final["final_val_loss"] == val_losses[0]
    assert result.final["final_test_accuracy"] == result.history[0].metrics["test/accuracy"]


def expected_stop(val_losses: list[float], patience: int) -> int | None:
    """Index of the evaluation at which the documented rule stops, or None."""
    rising = 0
    for index, (previous, loss) in enumerate(itertools.pairwise([math.inf, *val_losses])):
        rising = rising + 1 if loss > previous else 0
        if rising >= patience:
            return index
    return None


def test_early_stopping_follows_the_rule_on_a_noisy_run():
    """Random validation labels make a noisy validation curve; replay the rule on it."""
    splits = separable_splits(3)
    rng = np.random.default_rng(7)
    noisy_val = Dataset(images=splits.val.images, labels=rng.integers(0, 3, len(splits.val)))
    splits = Splits(train=splits.train, val=noisy_val, test=splits.test)
    patience = 3
    model = SoftmaxRegression(20, 3)
    recorder = Recorder(model)
    config = TrainConfig(lr=0.3, batch_size=8, epochs=30, evals_per_epoch=5, patience=patience)
    result = train(model, splits, config, [recorder])
    # a run without early stopping gives the full curve the rule is replayed on
    full = train(SoftmaxRegression(20, 3), splits, TrainConfig(**{
        **config.__dict__, "early_stopping": False}))
    full_losses = [e.metrics["val/loss"] for e in full.history]
    stop = expected_stop(full_losses, patience)
    assert stop is not None, "the noisy curve should trigger early stopping"
    assert result.stopped_early
    assert result.history == full.history[: stop + 1]
    best_index = int(np.argmin(full_losses[: stop + 1]))
    assert result.best_step == full.history[best_index].step
    np.testing.assert_array_equal(result.model.weights, recorder.weights[best_index])
    np.testing.assert_array_equal(result.model.bias, recorder.biases[best_index])


def test_without_early_stopping_all_epochs_run_and_the_last_weights_are_kept():
    splits = flipped_val_splits()
    model = LogisticRegression(20)
    recorder = Recorder(model)
    config = TrainConfig(lr=0.5, batch_size=30, epochs=6, evals_per_epoch=2,
                         early_stopping=False)
    result = train(model, splits, config, [recorder])
    assert len(result.history) == 12 and not result.stopped_early
    assert result.best_step == result.history[0].step  # still reported
    np.testing.assert_array_equal(result.model.weights, recorder.weights[-1])
    last = result.history[-1].metrics
    assert result.final["final_train_loss"] == last["train/loss"]
    assert result.final["final_val_accuracy"] == last["val/accuracy"]


# --- reproducibility, divergence, learning ----------------------------------------------


def test_same_seed_same_bits_and_different_seed_different_weights():
    splits = separable_splits(3)
    config = TrainConfig(lr=0.2, batch_size=7, epochs=3, evals_per_epoch=3, seed=11)
    first = train(SoftmaxRegression(20, 3), splits, config)
    second = train(SoftmaxRegression(20, 3), splits, config)
    np.testing.assert_array_equal(first.model.weights, second.model.weights)
    np.testing.assert_array_equal(first.model.bias, second.model.bias)
    assert first.history == second.history
    assert first.final == second.final
    other = train(SoftmaxRegression(20, 3), splits, TrainConfig(
        lr=0.2, batch_size=7, epochs=3, evals_per_epoch=3, seed=12))
    assert not np.array_equal(first.model.weights, other.model.weights)


@pytest.mark.parametrize("model_class", [LogisticRegression, SoftmaxRegression])
def test_diverging_learning_rate_raises_divergence_error_without_warnings(model_class):
    n_classes = 2 if model_class is LogisticRegression else 3
    model = model_class(20) if n_classes == 2 else model_class(20, 3)
    config = TrainConfig(lr=1e3, l2=10.0, batch_size=10, epochs=5,
                         schedule=Schedule(name="constant"), early_stopping=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy overflow warning would fail the test
        with pytest.raises(DivergenceError) as error:
            train(model, separable_splits(n_classes), config)
    # each update multiplies the weights by about (1 - 2 * lr * l2) = -19999
    assert 1 <= error.value.step < 20
    assert not math.isfinite(error.value.value)
    assert f"step {error.value.step}" in str(error.value)
    assert str(error.value.value) in str(error.value)


@pytest.mark.parametrize("model_class", [LogisticRegression, SoftmaxRegression])
def test_separable_problem_is_learned_to_100_percent(model_class):
    n_classes = 2 if model_class is LogisticRegression else 4
    model = model_class(20) if n_classes == 2 else model_class(20, n_classes)
    config = TrainConfig(lr=1.0, batch_size=16, epochs=30, evals_per_epoch=2)
    result = train(model, separable_splits(n_classes), config)
    assert result.final["final_train_accuracy"] == 1.0
    assert result.final["final_test_accuracy"] == 1.0
    assert result.history[-1].metrics["train/loss"] < result.history[0].metrics["train/loss"]


def test_labels_that_do_not_fit_the_model_are_refused():
    with pytest.raises(ValueError, match="2 classes"):
        train(LogisticRegression(20), separable_splits(3), TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="features"):
        train(SoftmaxRegression(784, 3), separable_splits(3), TrainConfig(epochs=1))


def test_training_leaves_the_data_untouched_and_keeps_the_weights_dtype():
    splits = separable_splits(3)
    before = [getattr(splits, name).images.copy() for name in ("train", "val", "test")]
    model = SoftmaxRegression(20, 3, dtype=np.float64)
    train(model, splits, TrainConfig(lr=0.5, batch_size=16, epochs=2, evals_per_epoch=2))
    for name, images in zip(("train", "val", "test"), before, strict=True):
        np.testing.assert_array_equal(getattr(splits, name).images, images)
    assert model.weights.dtype == np.float64 and model.bias.dtype == np.float64


# --- the helper thread: prefetched batches, cleanup -------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 16])
def test_prefetched_batches_cut_every_order_into_the_batches_of_the_plain_loop(
    monkeypatch, chunk
):
    monkeypatch.setattr(src.training, "GATHER_CHUNK", chunk)
    rng = np.random.default_rng(0)
    images = rng.random((23, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 23)
    orders = [rng.permutation(23) for _ in range(3)]
    expected = [
        (images[order[start : start + 5]], labels[order[start : start + 5]])
        for order in orders
        for start in range(0, 23, 5)  # 5 batches an epoch, the last of 3 rows
    ]
    with ThreadPoolExecutor(max_workers=1) as helper:
        # copies: a batch is a view into a buffer that a later chunk reuses
        got = [(batch_images.copy(), batch_labels.copy()) for batch_images, batch_labels
               in prefetched_batches(images, labels, iter(orders), 5, helper)]
    assert len(got) == len(expected) == 15
    for (got_images, got_labels), (want_images, want_labels) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(got_images, want_images)
        np.testing.assert_array_equal(got_labels, want_labels)


@pytest.mark.parametrize("kind", ["logistic", "softmax"])
@pytest.mark.parametrize("piece_rows", [7, 16, 6144])  # many pieces, uneven ones, one per split
def test_an_evaluation_shared_with_a_helper_gives_the_same_figures(monkeypatch, kind, piece_rows):
    monkeypatch.setattr(src.training, "EVAL_PIECE_ROWS", piece_rows)
    splits = separable_splits(2 if kind == "logistic" else 3)  # 60 / 20 / 20 or 90 / 30 / 30 rows
    rng = np.random.default_rng(3)
    if kind == "logistic":
        model = LogisticRegression(20, dtype=np.float64)
        model.weights, model.bias = rng.normal(size=20), float(rng.normal())
    else:
        model = SoftmaxRegression(20, 3, dtype=np.float64)
        model.weights, model.bias = rng.normal(size=(20, 3)), rng.normal(size=3)
    alone = evaluate(model, splits)
    with ThreadPoolExecutor(max_workers=1) as helper:
        shared = evaluate(model, splits, helper)
        # the helper busy when the evaluation starts (gathering mini-batches in train())
        busy = helper.submit(time.sleep, 0.05)
        late = evaluate(model, splits, helper)
        busy.result()
    names = [f"{name}/{figure}" for name in ("train", "val", "test")
             for figure in ("loss", "accuracy")]
    assert list(alone) == list(shared) == list(late) == names
    assert shared == alone and late == alone  # the pieces are added in the same order
    for name in ("train", "val", "test"):  # row-weighted means of the pieces: the whole split's
        dataset = getattr(splits, name)
        loss, accuracy = model.loss_and_accuracy(dataset.images, dataset.labels)
        assert alone[f"{name}/loss"] == pytest.approx(loss, rel=1e-12)
        assert alone[f"{name}/accuracy"] == pytest.approx(accuracy, rel=1e-12)


def helper_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("train-helper")]


def blas_threads() -> list[int]:
    return [library["num_threads"] for library in threadpool_info()
            if library["user_api"] == "blas"]


class Interrupt(Callback):
    """Presses Ctrl-C at the second evaluation."""

    def __init__(self) -> None:
        self.evaluations = 0

    def on_evaluation(self, evaluation: Evaluation) -> None:
        self.evaluations += 1
        if self.evaluations == 2:
            raise KeyboardInterrupt


class Watcher(Callback):
    """Notes, at every evaluation, whether the helper thread is alive."""

    def __init__(self) -> None:
        self.alive: list[bool] = []

    def on_evaluation(self, evaluation: Evaluation) -> None:
        self.alive.append(bool(helper_threads()))


@pytest.mark.parametrize("ending", ["normal", "early stop", "divergence", "interrupt"])
def test_no_helper_thread_outlives_training_and_blas_threads_come_back(ending):
    before = blas_threads()
    assert helper_threads() == []
    watcher = Watcher()
    if ending == "divergence":
        config = TrainConfig(lr=1e3, l2=10.0, batch_size=10, epochs=5,
                             schedule=Schedule(name="constant"), early_stopping=False)
        with pytest.raises(DivergenceError):
            train(SoftmaxRegression(20, 3), separable_splits(3), config, [watcher])
    elif ending == "interrupt":
        config = TrainConfig(lr=0.1, batch_size=10, epochs=5, evals_per_epoch=2)
        with pytest.raises(KeyboardInterrupt):
            train(SoftmaxRegression(20, 3), separable_splits(3), config, [watcher, Interrupt()])
        assert watcher.alive == [True, True]
    elif ending == "early stop":
        config = TrainConfig(lr=0.5, batch_size=60, epochs=50, evals_per_epoch=1,
                             schedule=Schedule(name="constant"), patience=2)
        result = train(LogisticRegression(20), flipped_val_splits(), config, [watcher])
        assert result.stopped_early and all(watcher.alive)
    else:
        config = TrainConfig(lr=0.1, batch_size=7, epochs=3, evals_per_epoch=2)
        train(SoftmaxRegression(20, 3), separable_splits(3), config, [watcher])
        assert len(watcher.alive) == 6 and all(watcher.alive)
    assert helper_threads() == []
    assert blas_threads() == before
