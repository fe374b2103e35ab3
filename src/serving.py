"""The served model: MLflow loads this file ("models from code") to predict digits from pixels.

No pickle anywhere: the learned arrays travel as the ``weights`` artifact (an ``.npz`` file
written by :func:`src.tracking.log_model`), and this file rebuilds the model from them with
the same classes that trained it. ``mlflow.pyfunc.load_model(uri).predict(rows)`` takes
rows of 784 pixel values in 0..255, as a user would send them, and returns digit labels.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from src.models import LogisticRegression, SoftmaxRegression

N_PIXELS = 784


def signature() -> Any:
    """The logged model's signature: rows of 784 pixel values in, digits out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float64), (-1, N_PIXELS))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
    )


def input_example() -> np.ndarray:
    """Two rows of pixel values, as a user sends them: a blank image and a half-white one."""
    example = np.zeros((2, N_PIXELS), dtype=np.float64)
    example[1, : N_PIXELS // 2] = 255.0
    return example


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
    """Predicts digit labels from rows of 784 pixel values (0..255)."""

    # The logged signature (rows of 784 numbers in, digits out) checks the input; MLflow's
    # type-hint validation would want hints it can read as a schema, and warn without them.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.model, self.labels = load_weights(context.artifacts["weights"])

    # No type hints on predict: MLflow would read them as an input schema (see above).
    def predict(self, context, model_input, params=None):
        """Digit labels, shape (n_rows,), for ``model_input`` of shape (n_rows, 784)."""
        pixels = np.asarray(model_input, dtype=np.float32)
        if pixels.ndim == 1:
            pixels = pixels[np.newaxis, :]
        if pixels.ndim != 2 or pixels.shape[1] != N_PIXELS:
            raise ValueError(f"expected rows of {N_PIXELS} pixel values, got shape {pixels.shape}")
        # the model was trained on pixels scaled to [0, 1] (src.data)
        classes = self.model.predict(pixels / np.float32(255.0))
        return self.labels[classes]


mlflow.models.set_model(DigitClassifier())
