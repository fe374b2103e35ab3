"""Logistic and softmax regression in numpy: the report's models, losses and gradients.

Notation (docs/derivations.md derives every formula here):

    x^n   one image, a row of X                  (n_samples, n_features)
    z^n   its logits   z = w·x + b  |  z_k = w_k·x + b_k
    y^n   the model's probabilities   sigmoid(z)  |  softmax(z)
    t^n   the target   0/1  |  one-hot of the digit (given as integer labels)

    E(w) = mean_n cross-entropy(t^n, y^n)         the data term (what `loss_and_accuracy` reports)
    J(w) = E(w) + l2 * ||w||^2                    the cost `loss` returns; the bias is not penalised
    dJ/dw = mean_n -(t^n - y^n) x^n + 2 * l2 * w  the gradient `gradients` returns

Losses are computed from the logits (softplus, log-sum-exp with the row maximum
subtracted), never as the log of a probability, so that no logit, however large,
overflows or takes log(0). Every computation follows the dtype of the weights.
"""

from __future__ import annotations

import numpy as np

from src.data import N_PIXELS


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise ``log softmax(z)``, stable for any logit size.

    Parameters
    ----------
    z : ndarray of shape (n_samples, n_classes)

    Returns
    -------
    ndarray of shape (n_samples, n_classes)
        ``z_k - log sum_k' exp(z_k')``, computed with the row maximum subtracted first so
        that ``exp`` sees only values <= 0 (no overflow) and the sum is >= 1 (no log(0)).
    """
    # Class-major copy, as in `softmax`: reductions across classes run on the outer axis.
    shifted = np.ascontiguousarray(z.T)
    shifted -= shifted.max(axis=0)
    shifted -= np.log(np.exp(shifted).sum(axis=0))
    return shifted.T


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise ``softmax(z)`` of shape (n_samples, n_classes), rows summing to 1.

    ``exp(z_k - max z) / sum_k' exp(z_k' - max z)``: the shift changes nothing
    mathematically and keeps ``exp`` from overflowing.
    """
    # Work on a (n_classes, n_samples) copy: numpy reduces across the few classes several
    # times faster when they are the outer axis, and this runs once per mini-batch.
    probabilities = np.ascontiguousarray(z.T)
    probabilities -= probabilities.max(axis=0)
    np.exp(probabilities, out=probabilities)
    probabilities /= probabilities.sum(axis=0)
    return probabilities.T


def softplus(z: np.ndarray) -> np.ndarray:
    """``ln(1 + e^z)`` elementwise, as ``max(z, 0) + ln(1 + e^-|z|)``: no overflow for any z.

    The value of ``np.logaddexp(0, z)``, by whole-array operations that numpy vectorises:
    several times faster on the long vectors of an evaluation.
    """
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` of shape (n_samples,), written as ``exp(-log(1 + exp(-z)))``.

    ``np.logaddexp(0, -z)`` is ``log(1 + exp(-z))`` without overflow, so this never
    computes ``exp`` of a large positive number.
    """
    return np.exp(-np.logaddexp(0, -z))


class LogisticRegression:
    """Binary logistic regression: ``P(t = 1 | x) = sigmoid(w·x + b)``.

    Parameters
    ----------
    n_features : int
        Length of an input row (784 for MNIST).
    dtype : numpy dtype
        dtype of the weights, and so of every computation (float32 by default).

    Attributes
    ----------
    weights : ndarray of shape (n_features,)
        Starts at zero. Plain attribute: assign saved arrays to rebuild a model.
    bias : float
        Starts at zero. Not penalised by L2.
    n_classes : int
        Always 2; ``predict`` returns 0 or 1.
    """

    n_classes = 2

    def __init__(self, n_features: int = N_PIXELS, dtype: type = np.float32) -> None:
        self.weights = np.zeros(n_features, dtype=dtype)
        self.bias = 0.0

    def logits(self, X: np.ndarray) -> np.ndarray:
        """``z = X w + b``: X (n_samples, n_features) -> (n_samples,)."""
        return X @ self.weights + self.bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``P(t = 1 | x)`` for each row: (n_samples, n_features) -> (n_samples,)."""
        return sigmoid(self.logits(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class 1 where ``z > 0`` (probability > 1/2), else 0: int64 of shape (n_samples,)."""
        return (self.logits(X) > 0).astype(np.int64)

    @staticmethod
    def cross_entropy(z: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy from logits z (n_samples,) and labels y (n_samples,) in {0, 1}.

        ``-[t ln sigmoid(z) + (1 - t) ln(1 - sigmoid(z))]`` is ``ln(1 + e^-z)`` when t = 1
        and ``ln(1 + e^z)`` when t = 0, i.e. ``softplus(-z)`` or ``softplus(z)``.
        """
        signed = np.where(y == 1, -z, z)
        return float(np.mean(softplus(signed)))

    def loss(self, X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> float:
        """Cost ``J = mean cross-entropy + l2 * ||w||^2`` (the bias is not penalised).

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,), integer labels in {0, 1}
        l2 : float, the regularisation strength lambda >= 0
        """
        return self.cross_entropy(self.logits(X), y) + l2 * float(np.sum(self.weights**2))

    def gradients(
        self, X: np.ndarray, y: np.ndarray, l2: float = 0.0
    ) -> tuple[np.ndarray, float]:
        """Gradient of :meth:`loss` with respect to the weights and the bias.

        ``dJ/dw = mean_n -(t^n - y^n) x^n + 2 l2 w`` and ``dJ/db = mean_n -(t^n - y^n)``.

        Returns
        -------
        d_weights : ndarray of shape (n_features,)
        d_bias : float
        """
        n = len(y)
        error = self.predict_proba(X)  # y^n, then y^n - t^n (in place keeps the dtype)
        error -= y
        error /= n  # average over the batch once, on the short vector
        d_weights = X.T @ error
        if l2:
            d_weights += 2 * l2 * self.weights
        return d_weights, float(error.sum())

    def gradient_step(self, X: np.ndarray, y: np.ndarray, lr: float, l2: float = 0.0) -> None:
        """One step of gradient descent on :meth:`loss`, in place: the weights and the bias
        each move by ``-lr`` times their part of :meth:`gradients`.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,), integer labels in {0, 1}
        lr : float, the learning rate
        l2 : float, the regularisation strength lambda >= 0
        """
        d_weights, d_bias = self.gradients(X, y, l2)
        d_weights *= lr
        self.weights -= d_weights
        self.bias -= lr * d_bias

    def loss_and_accuracy(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy (no L2 term) and accuracy in [0, 1], from one pass over X."""
        z = self.logits(X)
        return self.cross_entropy(z, y), float(np.count_nonzero((z > 0) == (y == 1)) / len(y))


class SoftmaxRegression:
    """Multinomial logistic regression: ``P(t = k | x) = softmax(W^T x + b)_k``.

    Parameters
    ----------
    n_features : int
        Length of an input row (784 for MNIST).
    n_classes : int
        Number of classes K (10 digits).
    dtype : numpy dtype
        dtype of the weights, and so of every computation (float32 by default).

    Attributes
    ----------
    weights : ndarray of shape (n_features, n_classes)
        Column k is the template of class k. Starts at zero; plain, assignable attribute.
    bias : ndarray of shape (n_classes,)
        Starts at zero. Not penalised by L2.
    """

    def __init__(
        self, n_features: int = N_PIXELS, n_classes: int = 10, dtype: type = np.float32
    ) -> None:
        self.weights = np.zeros((n_features, n_classes), dtype=dtype)
        self.bias = np.zeros(n_classes, dtype=dtype)
        self.n_classes = n_classes

    def logits(self, X: np.ndarray) -> np.ndarray:
        """``Z = X W + b``: X (n_samples, n_features) -> (n_samples, n_classes)."""
        return X @ self.weights + self.bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), each row summing to 1."""
        return softmax(self.logits(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The most probable class (the largest logit): int64 of shape (n_samples,)."""
        return self.logits(X).argmax(axis=1)

    @staticmethod
    def cross_entropy(z: np.ndarray, y: np.ndarray) -> float:
        """Mean of ``-ln softmax(z)_t`` from logits z (n_samples, K) and labels y (n_samples,)."""
        return float(-np.mean(log_softmax(z)[np.arange(len(y)), y]))

    def loss(self, X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> float:
        """Cost ``J = mean cross-entropy + l2 * ||W||^2`` (the bias is not penalised).

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,), integer labels in 0..n_classes-1
        l2 : float, the regularisation strength lambda >= 0
        """
        return self.cross_entropy(self.logits(X), y) + l2 * float(np.sum(self.weights**2))

    def gradients(
        self, X: np.ndarray, y: np.ndarray, l2: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gradient of :meth:`loss` with respect to the weights and the bias.

        ``dJ/dw_k = mean_n -(t_k^n - y_k^n) x^n + 2 l2 w_k`` (column k of d_weights) and
        ``dJ/db_k = mean_n -(t_k^n - y_k^n)``.

        Returns
        -------
        d_weights : ndarray of shape (n_features, n_classes)
        d_bias : ndarray of shape (n_classes,)
        """
        n = len(y)
        error = self.predict_proba(X)  # y^n, then y^n - t^n: subtract the one-hot in place
        error[np.arange(n), y] -= 1
        error /= n  # average over the batch once, on the small (n, K) matrix
        d_weights = X.T @ error
        if l2:
            d_weights += 2 * l2 * self.weights
        return d_weights, error.sum(axis=0)

    def gradient_step(self, X: np.ndarray, y: np.ndarray, lr: float, l2: float = 0.0) -> None:
        """One step of gradient descent on :meth:`loss`, in place: the weights and the bias
        each move by ``-lr`` times their part of :meth:`gradients`.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,), integer labels in 0..n_classes-1
        lr : float, the learning rate
        l2 : float, the regularisation strength lambda >= 0
        """
        d_weights, d_bias = self.gradients(X, y, l2)
        d_weights *= lr
        self.weights -= d_weights
        self.bias -= lr * d_bias

    def loss_and_accuracy(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy (no L2 term) and accuracy in [0, 1], from one pass over X."""
        z = self.logits(X)
        return self.cross_entropy(z, y), float(np.mean(z.argmax(axis=1) == y))
