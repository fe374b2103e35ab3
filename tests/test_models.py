"""Tests of src/models.py: gradients against finite differences, losses by hand, stability."""

import math

import numpy as np
import pytest

from src.models import LogisticRegression, SoftmaxRegression, softplus

STEP = 1e-5  # centred difference step (float64)
TOLERANCE = 1e-6  # relative error |a - n| / max(|a|, |n|), as in cs231n
LARGE_L2 = 3.0  # large enough that the L2 term dominates the data term


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    scale = np.maximum(np.abs(analytic), np.abs(numeric))
    error = np.abs(analytic - numeric) / np.where(scale == 0, 1.0, scale)
    return float(error.max())


def numeric_gradient(cost, parameter: np.ndarray) -> np.ndarray:
    """Centred differences of ``cost()`` with respect to every entry of ``parameter`` (in place)."""
    gradient = np.zeros_like(parameter)
    for index in np.ndindex(parameter.shape):
        original = parameter[index]
        parameter[index] = original + STEP
        plus = cost()
        parameter[index] = original - STEP
        minus = cost()
        parameter[index] = original
        gradient[index] = (plus - minus) / (2 * STEP)
    return gradient


def make_problem(kind: str, seed: int = 0):
    """A small float64 model with random (non-zero) parameters, and random data for it."""
    rng = np.random.default_rng(seed)
    n_samples, n_features = 12, 6
    X = rng.random((n_samples, n_features))
    if kind == "logistic":
        model = LogisticRegression(n_features, dtype=np.float64)
        model.weights = rng.normal(size=n_features)
        model.bias = float(rng.normal())
        y = rng.integers(0, 2, n_samples)
    else:
        model = SoftmaxRegression(n_features, n_classes=4, dtype=np.float64)
        model.weights = rng.normal(size=(n_features, 4))
        model.bias = rng.normal(size=4)
        y = rng.integers(0, 4, n_samples)
    return model, X, y


class BiasBox:
    """Lets numeric_gradient perturb the logistic model's scalar bias like an array entry."""

    def __init__(self, model: LogisticRegression) -> None:
        self.model = model
        self.value = np.array([model.bias])

    def cost(self, X, y, l2):
        self.model.bias = float(self.value[0])
        return self.model.loss(X, y, l2)


@pytest.mark.parametrize("kind", ["logistic", "softmax"])
@pytest.mark.parametrize("l2", [0.0, LARGE_L2])
def test_weight_gradient_matches_finite_differences(kind, l2):
    model, X, y = make_problem(kind)
    analytic, _ = model.gradients(X, y, l2)
    numeric = numeric_gradient(lambda: model.loss(X, y, l2), model.weights)
    assert analytic.shape == model.weights.shape
    assert relative_error(analytic, numeric) < TOLERANCE


@pytest.mark.parametrize("kind", ["logistic", "softmax"])
@pytest.mark.parametrize("l2", [0.0, LARGE_L2])
def test_bias_gradient_matches_finite_differences(kind, l2):
    model, X, y = make_problem(kind)
    _, analytic = model.gradients(X, y, l2)
    if kind == "logistic":
        box = BiasBox(model)
        numeric = numeric_gradient(lambda: box.cost(X, y, l2), box.value)
        assert isinstance(analytic, float)
        analytic = np.array([analytic])
    else:
        numeric = numeric_gradient(lambda: model.loss(X, y, l2), model.bias)
        assert analytic.shape == model.bias.shape
    assert relative_error(analytic, numeric) < TOLERANCE


@pytest.mark.parametrize("kind", ["logistic", "softmax"])
def test_l2_term_alone_matches_finite_differences(kind):
    """The regularisation gradient on its own: catches a wrong sign or factor of 2."""
    model, X, y = make_problem(kind)
    with_l2_weights, with_l2_bias = model.gradients(X, y, LARGE_L2)
    data_weights, data_bias = model.gradients(X, y, 0.0)
    analytic = with_l2_weights - data_weights

    def penalty() -> float:
        return model.loss(X, y, LARGE_L2) - model.loss(X, y, 0.0)

    numeric = numeric_gradient(penalty, model.weights)
    assert relative_error(analytic, numeric) < TOLERANCE
    # and the same term written out: d(l2 * ||w||^2)/dw = 2 * l2 * w
    np.testing.assert_allclose(analytic, 2 * LARGE_L2 * model.weights, rtol=1e-12)
    # the bias is not penalised
    np.testing.assert_array_equal(np.asarray(with_l2_bias), np.asarray(data_bias))


def test_logistic_loss_by_hand():
    model = LogisticRegression(2, dtype=np.float64)
    model.weights = np.array([1.0, -1.0])
    model.bias = 0.5
    X = np.array([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]])
    y = np.array([1, 0, 0])
    # z = (1.5, -1.5, 1.5); E = mean(-ln s(1.5), -ln(1 - s(-1.5)), -ln(1 - s(1.5)))
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    by_hand = -(
        math.log(sigmoid(1.5)) + math.log(1 - sigmoid(-1.5)) + math.log(1 - sigmoid(1.5))
    ) / 3
    assert model.loss(X, y) == pytest.approx(by_hand, rel=1e-12)
    # with lambda = 0.25: + 0.25 * (1 + 1)
    assert model.loss(X, y, l2=0.25) == pytest.approx(by_hand + 0.5, rel=1e-12)
    np.testing.assert_allclose(model.predict_proba(X), [sigmoid(1.5), sigmoid(-1.5), sigmoid(1.5)])
    np.testing.assert_array_equal(model.predict(X), [1, 0, 1])


def test_softmax_loss_by_hand():
    model = SoftmaxRegression(2, n_classes=3, dtype=np.float64)
    model.weights = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]])
    model.bias = np.array([0.0, 0.0, 1.0])
    X = np.array([[1.0, 1.0], [2.0, 0.0]])
    y = np.array([2, 0])
    # logits: row 1 = (1, 2, 1), row 2 = (2, 0, -1)
    row1 = -math.log(math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(1)))
    row2 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(-1)))
    assert model.loss(X, y) == pytest.approx((row1 + row2) / 2, rel=1e-12)
    # ||W||^2 = 1 + 1 + 4 + 1 = 7
    assert model.loss(X, y, l2=0.1) == pytest.approx((row1 + row2) / 2 + 0.7, rel=1e-12)
    np.testing.assert_array_equal(model.predict(X), [1, 0])
    np.testing.assert_allclose(model.predict_proba(X).sum(axis=1), 1.0)


def test_zero_weights_give_chance_level_loss():
    X = np.random.default_rng(1).random((50, 784), dtype=np.float32)
    digits = np.arange(50) % 10
    assert SoftmaxRegression().loss(X, digits) == pytest.approx(math.log(10), rel=1e-6)
    assert LogisticRegression().loss(X, digits % 2) == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softplus_is_logaddexp(dtype):
    """ln(1 + e^z) by the vectorised formula: the value of logaddexp, to a few ulps."""
    z = np.concatenate([np.linspace(-30, 30, 1001), [-1e4, -100, 0.0, 100, 1e4]]).astype(dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        values = softplus(z)
    assert values.dtype == dtype
    exact = np.logaddexp(0, z.astype(np.float64))
    close = {"rtol": 8 * np.finfo(dtype).eps, "atol": np.finfo(dtype).tiny}  # e^-100: subnormal
    np.testing.assert_allclose(values, exact, **close)
    np.testing.assert_allclose(values, np.logaddexp(0, z), **close)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_are_stable(dtype):
    """Logits of +-1e4: no overflow, no nan, no log(0). Underflow of e^-1e4 to 0 is correct."""
    logistic = LogisticRegression(1, dtype=dtype)
    logistic.weights = np.array([1e4], dtype=dtype)
    X = np.array([[1.0], [-1.0]], dtype=dtype)  # logits +1e4 and -1e4
    softmax = SoftmaxRegression(1, n_classes=3, dtype=dtype)
    softmax.weights = np.array([[1e4, -1e4, 0.0]], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        assert logistic.loss(X, np.array([1, 0])) == pytest.approx(0.0, abs=1e-6)
        assert logistic.loss(X, np.array([0, 1])) == pytest.approx(1e4, rel=1e-6)
        assert softmax.loss(X, np.array([0, 1])) == pytest.approx(0.0, abs=1e-6)
        assert softmax.loss(X, np.array([1, 0])) == pytest.approx(2e4, rel=1e-6)
        for model, y in ((logistic, np.array([0, 1])), (softmax, np.array([2, 2]))):
            probabilities = model.predict_proba(X)
            d_weights, d_bias = model.gradients(X, y, l2=0.5)
            assert np.isfinite(probabilities).all()
            assert np.isfinite(d_weights).all()
            assert np.isfinite(d_bias).all()
        np.testing.assert_allclose(softmax.predict_proba(X).sum(axis=1), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_computation_follows_the_weights_dtype(dtype):
    X = np.random.default_rng(2).random((8, 5)).astype(np.float32)
    for model, y in (
        (LogisticRegression(5, dtype=dtype), np.arange(8) % 2),
        (SoftmaxRegression(5, 3, dtype=dtype), np.arange(8) % 3),
    ):
        d_weights, d_bias = model.gradients(X, y, l2=0.1)
        assert model.weights.dtype == dtype
        assert model.logits(X).dtype == dtype
        assert model.predict_proba(X).dtype == dtype
        assert d_weights.dtype == dtype
        assert np.asarray(d_bias).dtype == (dtype if model.n_classes > 2 else np.float64)
        assert model.predict(X).dtype == np.int64


def test_default_shapes_and_zero_start():
    logistic, softmax = LogisticRegression(), SoftmaxRegression()
    assert logistic.weights.shape == (784,) and logistic.bias == 0.0
    assert softmax.weights.shape == (784, 10) and softmax.bias.shape == (10,)
    assert logistic.n_classes == 2 and softmax.n_classes == 10
    assert not logistic.weights.any() and not softmax.weights.any() and not softmax.bias.any()
    X = np.zeros((3, 784), np.float32)
    assert logistic.logits(X).shape == (3,) and softmax.logits(X).shape == (3, 10)


def test_models_rebuild_from_saved_arrays():
    source, X, _ = make_problem("softmax", seed=3)
    rebuilt = SoftmaxRegression(6, 4, dtype=np.float64)
    rebuilt.weights, rebuilt.bias = source.weights.copy(), source.bias.copy()
    np.testing.assert_array_equal(rebuilt.predict_proba(X), source.predict_proba(X))
    np.testing.assert_array_equal(rebuilt.predict(X), source.predict_proba(X).argmax(axis=1))


@pytest.mark.parametrize("kind", ["logistic", "softmax"])
def test_loss_and_accuracy_agree_with_loss_and_predict(kind):
    model, X, y = make_problem(kind, seed=4)
    loss, accuracy = model.loss_and_accuracy(X, y)
    assert loss == pytest.approx(model.loss(X, y, l2=0.0), rel=1e-12)
    assert accuracy == pytest.approx(np.mean(model.predict(X) == y))


@pytest.mark.parametrize("kind", ["logistic", "softmax"])
@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("n_samples", [12, 150])
def test_gradient_step_is_the_gradients_update(kind, l2, n_samples):
    """The training loop's fast step equals ``w - lr * gradients()``, to float32 rounding."""
    rng = np.random.default_rng(5)
    n_features, n_classes = 30, (2 if kind == "logistic" else 4)
    X = rng.random((n_samples, n_features)).astype(np.float32)
    y = rng.integers(0, n_classes, n_samples)
    if kind == "logistic":
        model = LogisticRegression(n_features)
        model.weights = rng.normal(size=n_features).astype(np.float32)
        model.bias = float(rng.normal())
    else:
        model = SoftmaxRegression(n_features, n_classes)
        model.weights = rng.normal(size=(n_features, n_classes)).astype(np.float32)
        model.bias = rng.normal(size=n_classes).astype(np.float32)
    lr = 0.7
    d_weights, d_bias = model.gradients(X, y, l2)
    expected_weights = model.weights - lr * d_weights
    expected_bias = model.bias - lr * d_bias
    weights = model.weights  # updated in place
    model.gradient_step(X, y, lr, l2)
    assert model.weights is weights and model.weights.dtype == np.float32
    np.testing.assert_allclose(model.weights, expected_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bias, expected_bias, rtol=1e-5, atol=1e-6)
    if kind == "logistic":
        assert isinstance(model.bias, float)
    else:
        assert model.bias.dtype == np.float32
