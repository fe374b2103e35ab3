"""The served model: MLflow loads this file ("models from code") to predict digits from pixels.

No pickle anywhere: the learned arrays travel as the ``weights`` artifact (an ``.npz`` file
written by :func:`src.tracking.log_model`), and this file rebuilds the model from them with
the same classes that trained it. ``mlflow.pyfunc.load_model(uri).predict(rows)`` takes
rows of 784 pixel values in 0..255, as a user would send them, and returns digit labels;
``predict(rows, params={"output": "probabilities"})`` returns the class probabilities.

Served with ``mlflow models serve -m runs:/<run id>/model``, the same holds over REST::

    POST /invocations  {"inputs": [[0, 0, 255, ...], ...]}
                       {"inputs": [[...]], "params": {"output": "probabilities"}}
                       {"dataframe_split": {"columns": [...], "data": [[...], ...]}}

Why the signature has no input schema: MLflow enforces an input schema before the model
sees the data (``mlflow.models.utils._enforce_schema``, from ``PyFuncModel.predict``,
which ``mlflow models serve`` calls too), and no schema lets through all that users send. A float64
``TensorSpec((-1, 784))`` wants exactly its dtype (it refuses uint8, int64 and float32
arrays, and DataFrames of integers), exactly its shape (it refuses one 1-D row) and no
list of lists; an object ``TensorSpec((-1,))`` still refuses lists and DataFrames.
784 unnamed ``ColSpec`` columns cast only what is safe (doubles refuse int64, longs refuse
floats) and read one 1-D row as 784 rows of one column, which they refuse. So the
signature holds the output (digits) and the ``output`` parameter, the input example
(``serving_input_example.json`` beside the model) shows two rows of 784 pixel values, and
:func:`pixel_rows` checks the input itself, with messages meant for the user.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from src.data import MAX_PIXEL, N_PIXELS, scale_pixels
from src.models import LogisticRegression, SoftmaxRegression

OUTPUT_PARAM = "output"  # the predict parameter that chooses what predict returns
DIGITS = "digits"  # one digit per row (the default)
PROBABILITIES = "probabilities"  # one probability per digit the model knows, per row
OUTPUTS = (DIGITS, PROBABILITIES)


class InvalidInput(MlflowException, ValueError):
    """What a user sent is not rows of 784 pixel values in 0..255 (the message says why).

    An MlflowException with INVALID_PARAMETER_VALUE, so that ``mlflow models serve``
    answers 400 with this message; also a ValueError, as a bad argument.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def signature() -> Any:
    """The logged model's signature: digits out and the ``output`` parameter; no input schema.

    The input is rows of 784 pixel values, shown by :func:`input_example` and checked by
    :func:`pixel_rows`: any input schema would refuse input users send (see the module's
    docstring). The ``output`` parameter (a string, ``"digits"`` by default, or
    ``"probabilities"``) is declared so that MLflow passes it to ``predict`` (it drops, with
    a warning, any parameter the signature does not declare), also from the ``"params"``
    of a REST request.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        params=ParamSchema([ParamSpec(OUTPUT_PARAM, DataType.string, DIGITS)]),
    )


def input_example() -> np.ndarray:
    """Two rows of 784 pixel values, as a user sends them: a blank image and a ``1`` (a
    vertical white stroke in the middle columns of a 28x28 image)."""
    example = np.zeros((2, 28, 28), dtype=np.uint8)
    example[1, 4:24, 13:15] = MAX_PIXEL
    return example.reshape(2, N_PIXELS)


def _number(value: float) -> str:
    """A pixel value as a user wrote it: ``300``, not ``300.0``; ``nan``, ``inf``."""
    return f"{value:.10g}"


def pixel_rows(model_input: Any) -> np.ndarray:
    """What a user sent, as a float64 array of shape (n_rows, 784), or :class:`InvalidInput`.

    Takes a numpy array of any numeric dtype (uint8, integers, float32, float64), a list of
    lists, a pandas DataFrame (784 columns), or one row of 784 values (1-D: one image).
    Refuses rows that are not 784 values wide; pixel values that are not finite or lie
    outside 0..255, naming the first bad row (counting from 0); and input whose values all
    lie in 0..1 with some fraction among them: pixels scaled to 0..1, which the model would
    read as nearly black images (all zeros, or only 0s and 1s, pass: they may be 0..255).
    """
    try:
        pixels = np.asarray(model_input, dtype=np.float64)  # a DataFrame gives its values
    except (TypeError, ValueError) as error:
        raise InvalidInput(
            f"expected rows of {N_PIXELS} pixel values (numbers in 0..{MAX_PIXEL}), "
            f"could not read the input as numbers: {error}"
        ) from error
    if pixels.ndim == 1 and pixels.shape[0] == N_PIXELS:
        pixels = pixels[np.newaxis, :]  # one image
    if pixels.ndim != 2 or pixels.shape[1] != N_PIXELS:
        raise InvalidInput(
            f"expected rows of {N_PIXELS} pixel values (28x28 images, flattened row by "
            f"row), got input of shape {pixels.shape}"
        )
    bad = ~np.isfinite(pixels) | (pixels < 0) | (pixels > MAX_PIXEL)  # NaN compares False
    if bad.any():
        row = int(bad.any(axis=1).argmax())
        column = int(bad[row].argmax())
        value = pixels[row, column]
        what = f"outside 0..{MAX_PIXEL}" if np.isfinite(value) else "that is not a finite number"
        raise InvalidInput(
            f"row {row} has a pixel value {_number(value)} {what} (pixel {column}; rows and "
            f"pixels count from 0): pixel values must be numbers in 0..{MAX_PIXEL}"
        )
    if pixels.size and pixels.max() <= 1 and np.any(pixels != np.floor(pixels)):
        raise InvalidInput(
            f"every pixel value lies in 0..1, but the model expects 0..{MAX_PIXEL} pixel "
            f"values: scale the images by {MAX_PIXEL} (pixels * {MAX_PIXEL}) before sending them"
        )
    return pixels


def load_weights(path: str) -> tuple[LogisticRegression | SoftmaxRegression, np.ndarray]:
    """Rebuild a trained model from its ``.npz`` file.

    Returns
    -------
    model : LogisticRegression or SoftmaxRegression
        With the saved ``weights`` (784,) or (784, k) and ``bias``.
    labels : ndarray of shape (n_classes,)
        The digit each class index stands for (``[negative, positive]`` for the binary model).
    """
    with np.load(path, allow_pickle=False) as saved:
        weights, bias, labels = saved["weights"], saved["bias"], saved["labels"]
    if weights.ndim == 1:
        model: LogisticRegression | SoftmaxRegression = LogisticRegression(n_features=N_PIXELS)
        model.bias = float(bias)
    else:
        model = SoftmaxRegression(n_features=N_PIXELS, n_classes=weights.shape[1])
        model.bias = bias
    model.weights = weights
    return model, labels


class DigitClassifier(PythonModel):
    """Predicts digits (or their probabilities) from rows of 784 pixel values (0..255)."""

    # predict checks its input itself (pixel_rows); MLflow's type-hint validation would
    # want hints it can read as a schema, and warn without them.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.model, self.labels = load_weights(context.artifacts["weights"])

    # No type hints on predict: MLflow would read them as an input schema (see above).
    def predict(self, context, model_input, params=None):
        """Digits, or with ``params={"output": "probabilities"}`` their probabilities.

        Parameters
        ----------
        model_input : array-like of shape (n_rows, 784), or (784,) for one image
            Pixel values 0..255 (28x28 images flattened row by row, as MNIST stores them):
            a numpy array of any numeric dtype, a list of lists, or a pandas DataFrame.
        params : dict, optional
            ``{"output": "digits"}`` (the default) or ``{"output": "probabilities"}``.

        Returns
        -------
        digits : ndarray of shape (n_rows,), int64
            The predicted digit of each row (``output="digits"``).
        probabilities : pandas DataFrame of shape (n_rows, n_digits), float64
            (``output="probabilities"``) One column per digit the model tells apart, named
            by the digit (an int), in increasing order: ten columns 0, 1, ..., 9 for the
            softmax model; two for the binary logistic model, e.g. 2 and 3 for "2 against
            3" (P(3) = 1 - P(2)). Each row sums to 1. Over REST each row is a record
            ``{"2": 0.97, "3": 0.03}``.

        Raises
        ------
        InvalidInput
            Input that is not rows of 784 numbers, pixel values outside 0..255 or not
            finite, pixels scaled to 0..1, or an unknown ``output``.
        """
        output = (params or {}).get(OUTPUT_PARAM) or DIGITS
        if output not in OUTPUTS:
            raise InvalidInput(
                f"params {OUTPUT_PARAM!r} must be {DIGITS!r} or {PROBABILITIES!r}, got {output!r}"
            )
        # the model was trained on pixels scaled to [0, 1] in float32 (src.data)
        scaled = scale_pixels(pixel_rows(model_input))
        if output == DIGITS:
            return self.labels[self.model.predict(scaled)]
        return self.probabilities(scaled)

    def probabilities(self, scaled: np.ndarray) -> Any:
        """The DataFrame of :meth:`predict`'s probabilities, from pixels scaled to [0, 1]."""
        import pandas as pd  # installed with MLflow

        by_class = self.model.predict_proba(scaled).astype(np.float64)
        if by_class.ndim == 1:  # the binary model gives P(class 1), the positive digit
            by_class = np.column_stack([1.0 - by_class, by_class])
        order = np.argsort(self.labels, kind="stable")
        return pd.DataFrame(by_class[:, order], columns=[int(d) for d in self.labels[order]])


mlflow.models.set_model(DigitClassifier())
