"""Mini-batch gradient descent for the numpy models: schedule, evaluation, early stopping.

One loop, top to bottom, in the manner of nanoGPT's train.py: each epoch draws a seeded
permutation of the training set, walks it in mini-batches, takes a gradient step, and
every so often evaluates on train/val/test and hands the figures to the callbacks. The
learning rate is a pure function of the step; the best-validation weights are kept by a
plain comparison. Nothing here knows about MLflow, Hydra or plotting: tracking and
progress bars plug in through :class:`Callback`. For speed, one helper thread copies the
next mini-batches out of the training matrix while the loop trains on the current ones
(:func:`prefetched_batches`), and shares the evaluations (:func:`evaluate`).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from src.data import Dataset, Splits

SCHEDULES = ("constant", "exponential")
SCHEDULE_UNITS = ("epoch", "step")
GATHER_CHUNK = 16  # mini-batches whose rows the helper thread copies at a time
# Rows of an evaluation that a thread takes at a time: enough pieces for the two threads
# to finish together, few enough that the fixed cost of each call does not show (the
# logistic evaluation, a matrix-vector product bound by memory bandwidth, is the tightest).
EVAL_PIECE_ROWS = 6144


@dataclass(frozen=True)
class Schedule:
    """How the learning rate decays: ``lr0`` (constant) or ``lr0 * exp(-decay * t)``.

    Attributes
    ----------
    name : {"exponential", "constant"}
    decay : float
        k in ``lr0 * exp(-k * t)``, >= 0 (ignored by "constant").
    per : {"epoch", "step"}
        What t counts: completed epochs (the rate is constant within an epoch) or
        completed mini-batch updates.
    """

    name: str = "exponential"
    decay: float = 0.1
    per: str = "epoch"

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule name must be one of {SCHEDULES}, got {self.name!r}")
        if self.per not in SCHEDULE_UNITS:
            raise ValueError(f"schedule per must be one of {SCHEDULE_UNITS}, got {self.per!r}")
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise ValueError(f"schedule decay must be a finite number >= 0, got {self.decay}")


def learning_rate(step: int, steps_per_epoch: int, lr0: float, schedule: Schedule) -> float:
    """The learning rate of update number ``step`` (0-based), a pure function of the step.

    Parameters
    ----------
    step : int
        Updates done before this one; the update belongs to epoch ``step // steps_per_epoch``.
    steps_per_epoch : int
        Mini-batches per epoch.
    lr0 : float
        The initial learning rate, > 0.
    schedule : Schedule

    Returns
    -------
    float
        ``lr0`` for "constant"; ``lr0 * exp(-decay * t)`` for "exponential", with
        ``t = step // steps_per_epoch`` (per="epoch") or ``t = step`` (per="step").
    """
    if schedule.name == "constant":
        lr = lr0
    else:
        t = step // steps_per_epoch if schedule.per == "epoch" else step
        lr = lr0 * math.exp(-schedule.decay * t)
    assert 0 <= lr <= lr0, f"learning rate {lr} outside [0, {lr0}] at step {step}"
    return lr


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (with the seed, the run is reproducible bit for bit).

    Attributes
    ----------
    lr : float
        Initial learning rate lr0, > 0.
    l2 : float
        L2 strength lambda >= 0 in ``J = E + lambda * ||w||^2``.
    batch_size : int
        Examples per mini-batch (the last batch of an epoch may be smaller).
    epochs : int
        Maximum number of passes over the training set.
    schedule : Schedule
        Learning-rate decay.
    evals_per_epoch : int
        Evaluations per epoch on train/val/test, at evenly spaced steps, the last one at
        the end of the epoch (the report used 20).
    early_stopping : bool
        Stop once the validation loss has risen ``patience`` evaluations in a row (each
        higher than the one before), and keep the weights of the lowest validation loss
        seen. When False, all epochs run and the last weights are kept.
    patience : int
        See ``early_stopping`` (the report stopped after 4 rising checks in a row). It
        counts evaluations, not epochs.
    seed : int
        Seeds the per-epoch permutation of the training set.
    """

    lr: float = 0.5
    l2: float = 0.0
    batch_size: int = 128
    epochs: int = 20
    schedule: Schedule = field(default_factory=Schedule)
    evals_per_epoch: int = 20
    early_stopping: bool = True
    patience: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ValueError(f"l2 (lambda) must be a finite number >= 0, got {self.l2}")
        for name in ("batch_size", "epochs", "evals_per_epoch", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Evaluation:
    """The figures of one evaluation.

    Attributes
    ----------
    step : int
        Mini-batch updates done so far (the MLflow step).
    epoch : float
        ``step / steps_per_epoch``.
    metrics : dict[str, float]
        ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/accuracy``, ``test/loss``,
        ``test/accuracy`` (losses: mean cross-entropy without the L2 term; accuracy in
        [0, 1]), ``lr`` (the rate of the last update) and ``weights/norm`` (||w||, no bias).
    """

    step: int
    epoch: float
    metrics: dict[str, float]


@dataclass
class TrainResult:
    """What a run leaves behind.

    Attributes
    ----------
    model
        The trained model, holding the kept weights: the best-validation ones when early
        stopping is on, the last ones otherwise.
    history : list[Evaluation]
        Every evaluation, in order.
    best_step : int
        Step of the lowest validation loss seen.
    stopped_early : bool
        True if early stopping ended the run before the last epoch.
    stop_reason : str or None
        Why a callback stopped the run (:class:`StopTraining`), if one did.
    final : dict[str, float]
        ``final_{train,val,test}_{accuracy,loss}`` on the kept weights, and ``best_step``
        (names without a ``/``: MLflow's UI draws these once-per-run values after the curves).
    """

    model: Any
    history: list[Evaluation]
    best_step: int
    stopped_early: bool
    final: dict[str, float]
    stop_reason: str | None = None


class Callback:
    """Receives the run as it happens; subclass and override what you need (no-ops here)."""

    def on_evaluation(self, evaluation: Evaluation) -> None:
        """Called after every evaluation, in step order."""

    def on_end(self, result: TrainResult) -> None:
        """Called once when training ends normally (not when it raises)."""


class StopTraining(Exception):
    """Raised by a callback to end the training after this evaluation, keeping the result
    (the weights kept as early stopping would keep them); the message says why."""


class DivergenceError(RuntimeError):
    """The loss became non-finite (inf or nan).

    ``step`` is the update (counted from 1, as ``Evaluation.step``) after which it was
    found; ``value`` is the non-finite loss.
    """

    def __init__(self, step: int, value: float) -> None:
        super().__init__(
            f"training diverged at step {step}: the loss is {value}; "
            f"lower the learning rate (lr) or lambda"
        )
        self.step = step
        self.value = value


def evaluation_steps(steps_per_epoch: int, evals_per_epoch: int) -> list[int]:
    """Steps within an epoch (1..steps_per_epoch) after which to evaluate, evenly spaced.

    The last is always ``steps_per_epoch`` (the end of the epoch). With more evaluations
    than steps, every step is evaluated once.
    """
    return sorted({(i + 1) * steps_per_epoch // evals_per_epoch for i in range(evals_per_epoch)}
                  - {0})


def evaluate(model: Any, splits: Splits, helper: Executor | None = None) -> dict[str, float]:
    """Loss (mean cross-entropy, no L2 term) and accuracy of ``model`` on every split.

    The rows are cut into pieces of at most ``EVAL_PIECE_ROWS``. With ``helper`` (an
    executor), this thread and the helper take the pieces from one list, each the next
    one as soon as it is free, so that the two finish together even when the helper
    starts late (it may be gathering mini-batches). A split's figures are the
    row-weighted means of its pieces' figures, added in the pieces' order: the same
    numbers with or without the helper.
    """
    names = ("train", "val", "test")
    pieces = [(name, start, min(start + EVAL_PIECE_ROWS, len(getattr(splits, name))))
              for name in names
              for start in range(0, len(getattr(splits, name)), EVAL_PIECE_ROWS)]

    def work(queue: Iterator[tuple[str, int, int]]) -> dict[tuple[str, int, int], tuple]:
        figures = {}
        with np.errstate(over="ignore", invalid="ignore"):  # numpy's error state is per thread
            for piece in queue:  # next() on a list iterator is atomic: a piece is taken once
                name, start, stop = piece
                dataset: Dataset = getattr(splits, name)
                figures[piece] = model.loss_and_accuracy(dataset.images[start:stop],
                                                         dataset.labels[start:stop])
        return figures

    queue = iter(pieces)
    if helper is None:
        figures = work(queue)
    else:
        theirs = helper.submit(work, queue)
        figures = work(queue)
        figures.update(theirs.result())
    metrics = {}
    for name in names:
        own = [piece for piece in pieces if piece[0] == name]
        rows = len(getattr(splits, name))
        for index, figure in enumerate(("loss", "accuracy")):
            weighted = sum(figures[piece][index] * (piece[2] - piece[1]) for piece in own)
            metrics[f"{name}/{figure}"] = weighted / rows
    return metrics


def _copy(parameter: Any) -> Any:
    # The softmax bias is an array (copy it); the logistic bias is an immutable float.
    return parameter.copy() if isinstance(parameter, np.ndarray) else parameter


def _check_inputs(model: Any, splits: Splits) -> None:
    n_features = model.weights.shape[0]
    for name in ("train", "val", "test"):
        dataset: Dataset = getattr(splits, name)
        if len(dataset) == 0:
            raise ValueError(f"the {name} split is empty")
        if dataset.images.shape[1] != n_features:
            raise ValueError(
                f"the {name} images have {dataset.images.shape[1]} features, "
                f"the model expects {n_features}"
            )
        if dataset.labels.min() < 0 or dataset.labels.max() >= model.n_classes:
            raise ValueError(
                f"the {name} labels span {dataset.labels.min()}..{dataset.labels.max()} "
                f"but the model has {model.n_classes} classes (binary_task gives 0/1 labels)"
            )


def prefetched_batches(
    images: np.ndarray,
    labels: np.ndarray,
    orders: Iterable[np.ndarray],
    batch_size: int,
    helper: Executor,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The mini-batches ``(images[rows], labels[rows])`` of every epoch, in turn.

    Each order (a permutation of the training set, one per epoch) is cut into batches of
    ``batch_size`` rows, the last one of the epoch possibly smaller. Copying the random rows
    of a batch out of the training matrix costs about as much as the gradient step, so
    ``helper`` (an executor with one thread) copies the next ``GATHER_CHUNK`` batches
    into one of two buffers while the caller trains on the other (``np.take`` releases the
    GIL). A yielded batch is a view into a buffer: it holds its rows until the next batch
    is drawn.
    """
    chunk_rows = GATHER_CHUNK * batch_size  # whole batches: the epochs are cut as before
    chunks = (order[start : start + chunk_rows] for order in orders
              for start in range(0, len(order), chunk_rows))
    buffers = [np.empty((chunk_rows, images.shape[1]), images.dtype) for _ in range(2)]

    def gather(buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        # On the helper thread, one call at a time: the next chunk's rows (drawing the
        # next permutation when an epoch is used up), or None after the last epoch.
        # mode="clip" copies straight into `out` (the default mode copies twice); the rows
        # are a permutation's, never out of range.
        rows = next(chunks, None)
        if rows is None:
            return None
        chunk_images = np.take(images, rows, axis=0, out=buffer[: len(rows)], mode="clip")
        return chunk_images, labels[rows]

    pending = helper.submit(gather, buffers[0])
    for chunk_number in itertools.count(1):
        chunk = pending.result()
        if chunk is None:
            return
        # into the buffer the caller has finished with
        pending = helper.submit(gather, buffers[chunk_number % 2])
        chunk_images, chunk_labels = chunk
        for start in range(0, len(chunk_labels), batch_size):
            yield chunk_images[start : start + batch_size], chunk_labels[start : start + batch_size]


def train(
    model: Any, splits: Splits, config: TrainConfig, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Fit ``model`` to ``splits.train`` by mini-batch gradient descent.

    Each epoch visits the training set in the order of a fresh permutation from
    ``np.random.default_rng(config.seed)``. After update ``step`` the weights move by
    ``-learning_rate(step) * gradients(batch, l2)``. Evaluations (train, val, test) happen
    ``evals_per_epoch`` times per epoch. Early stopping rule (the report's): an evaluation
    *rises* if its validation loss is strictly higher than the previous evaluation's; once
    ``patience`` evaluations in a row have risen, training stops and the weights of the
    evaluation with the lowest validation loss are restored. While it runs, BLAS is limited
    to one thread, and a helper thread gathers the mini-batches and shares the evaluations;
    both end with the call, however it ends.

    Parameters
    ----------
    model : LogisticRegression or SoftmaxRegression
        Trained in place (its ``weights`` array is updated, its ``bias`` reassigned).
    splits : Splits
        Labels must fit the model (0/1 for the logistic model: see ``binary_task``).
    config : TrainConfig
    callbacks : sequence of Callback
        Told about every evaluation and about the end of the run.

    Returns
    -------
    TrainResult

    Raises
    ------
    DivergenceError
        As soon as a mini-batch gradient or an evaluated loss is not finite.
    """
    _check_inputs(model, splits)
    images, labels = splits.train.images, splits.train.labels
    n_train = len(labels)
    batch_size = min(config.batch_size, n_train)
    steps_per_epoch = math.ceil(n_train / batch_size)
    evaluate_after = set(evaluation_steps(steps_per_epoch, config.evals_per_epoch))
    rng = np.random.default_rng(config.seed)
    orders = (rng.permutation(n_train) for _epoch in range(config.epochs))

    history: list[Evaluation] = []
    best_val_loss, best_step, best_metrics = math.inf, 0, {}
    best_weights, best_bias = model.weights.copy(), _copy(model.bias)
    previous_val_loss, rising_in_a_row = math.inf, 0
    stopped_early = False
    stop_reason: str | None = None
    step = 0
    # The per-batch products are too small to share between BLAS threads: they run on one
    # while the helper thread copies the next batches. Evaluations share the work between
    # this thread and the helper rather than between BLAS threads: after a threaded product,
    # OpenBLAS's idle threads spin for about 0.1 s on the core the helper needs. Leaving the
    # `with`, at the end or by an exception, joins the helper and restores BLAS's threads.
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-helper") as helper,
        threadpool_limits(limits=1, user_api="blas"),
    ):
        batches = prefetched_batches(images, labels, orders, batch_size, helper)
        for _epoch in range(config.epochs):
            for batch_number in range(1, steps_per_epoch + 1):
                batch_images, batch_labels = next(batches)
                lr = learning_rate(step, steps_per_epoch, config.lr, config.schedule)
                step += 1
                # A diverging run overflows; that is reported as a DivergenceError naming
                # the step (a non-finite bias after the update: the bias step sums the
                # batch's errors), not as a stream of numpy warnings.
                with np.errstate(over="ignore", invalid="ignore"):
                    model.gradient_step(batch_images, batch_labels, lr, config.l2)
                    if not np.isfinite(model.bias).all():
                        raise DivergenceError(
                            step, model.loss(batch_images, batch_labels, config.l2))

                if batch_number not in evaluate_after:
                    continue
                metrics = evaluate(model, splits, helper)
                metrics["lr"] = lr
                with np.errstate(over="ignore", invalid="ignore"):
                    metrics["weights/norm"] = float(np.linalg.norm(model.weights))
                for name in ("train/loss", "val/loss", "test/loss"):
                    if not math.isfinite(metrics[name]):
                        raise DivergenceError(step, metrics[name])
                evaluation = Evaluation(step=step, epoch=step / steps_per_epoch, metrics=metrics)
                history.append(evaluation)
                try:
                    for callback in callbacks:
                        callback.on_evaluation(evaluation)
                except StopTraining as stop:
                    stop_reason = str(stop)

                # The kept weights: a plain comparison with the lowest validation loss so far.
                val_loss = metrics["val/loss"]
                if val_loss < best_val_loss:
                    best_val_loss, best_step, best_metrics = val_loss, step, metrics
                    if config.early_stopping:
                        best_weights, best_bias = model.weights.copy(), _copy(model.bias)
                # Early stopping: `patience` rising validation losses in a row.
                rising_in_a_row = rising_in_a_row + 1 if val_loss > previous_val_loss else 0
                previous_val_loss = val_loss
                if config.early_stopping and rising_in_a_row >= config.patience:
                    stopped_early = True
                if stopped_early or stop_reason is not None:
                    break
            if stopped_early or stop_reason is not None:
                break

    kept = history[-1].metrics
    if config.early_stopping:
        model.weights, model.bias, kept = best_weights, best_bias, best_metrics
    final: dict[str, float] = {
        f"final_{split}_{name}": kept[f"{split}/{name}"]
        for split in ("train", "val", "test")
        for name in ("accuracy", "loss")
    }
    final["best_step"] = best_step
    result = TrainResult(
        model=model,
        history=history,
        best_step=best_step,
        stopped_early=stopped_early,
        final=final,
        stop_reason=stop_reason,
    )
    for callback in callbacks:
        callback.on_end(result)
    return result
