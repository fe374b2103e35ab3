"""src/serving.py as a user meets it: logged by src.tracking.log_model, loaded back with
``mlflow.pyfunc.load_model`` and served by ``mlflow models serve``, fed what users send."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from src import serving, tracking
from src.models import LogisticRegression, SoftmaxRegression, sigmoid, softmax
from tests.conftest import copy_store

N_PIXELS = 784
BINARY_LABELS = np.array([3, 2])  # as a "2 against 3" run saves them: [negative, positive]
SERVER_START_SECONDS = 120


@dataclass
class Logged:
    """A model logged to its own store, loaded back, and the numpy model it came from."""

    kind: str
    tracking_uri: str
    run_id: str
    numpy_model: LogisticRegression | SoftmaxRegression
    labels: np.ndarray
    served: Any  # mlflow.pyfunc.PyFuncModel

    def digits(self, pixels: np.ndarray) -> np.ndarray:
        """What the numpy model says on pixels scaled as in training (float64 here)."""
        return self.labels[self.numpy_model.predict(np.asarray(pixels, np.float64) / 255.0)]


def numpy_model(kind: str, seed: int = 0) -> tuple[LogisticRegression | SoftmaxRegression, Any]:
    """A model with random weights (summing to zero, so that random images do not all give
    one digit) and the digits of its classes."""
    rng = np.random.default_rng(seed)
    if kind == "logistic":
        model: LogisticRegression | SoftmaxRegression = LogisticRegression(N_PIXELS)
        weights = rng.normal(0.0, 0.1, N_PIXELS)
        model.weights = (weights - weights.mean()).astype(np.float32)
        model.bias = 0.3
        return model, BINARY_LABELS
    model = SoftmaxRegression(N_PIXELS, 10)
    weights = rng.normal(0.0, 0.1, (N_PIXELS, 10))
    model.weights = (weights - weights.mean(axis=0)).astype(np.float32)
    model.bias = rng.normal(0.0, 1.0, 10).astype(np.float32)
    return model, np.arange(10)


def log_and_load(kind: str, folder: Path, template: Path) -> Logged:
    """Write the weights file as src.tracker does, log it in a run of a fresh store, load it."""
    model, labels = numpy_model(kind)
    weights_file = folder / "weights.npz"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(
        weights_file,
        weights=np.asarray(model.weights),
        bias=np.asarray(model.bias),
        labels=np.asarray(labels, dtype=np.int64),
    )
    uri = copy_store(template, folder / "store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(uri)
        # artifacts beside the store, not under the cwd (the Default experiment's ./mlruns)
        experiment = mlflow.create_experiment(
            "serving", artifact_location=(folder / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment) as run:
            tracking.log_model(weights_file)
        served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    return Logged(kind, uri, run.info.run_id, model, labels, served)


@pytest.fixture(scope="module", params=["logistic", "softmax"])
def logged(
    request: pytest.FixtureRequest, mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Logged:
    """Each kind of model, logged once for the module."""
    return log_and_load(request.param, tmp_path_factory.mktemp(request.param), mlflow_template)


def some_pixels(n: int = 6, seed: int = 1) -> np.ndarray:
    """Rows of integer pixel values 0..255 (int64), with a blank and a full-white row."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, N_PIXELS))
    pixels[0] = 0
    pixels[1] = 255
    return pixels


INPUT_KINDS = {
    "uint8": lambda p: p.astype(np.uint8),
    "int64": lambda p: p.astype(np.int64),
    "int32": lambda p: p.astype(np.int32),
    "float32": lambda p: p.astype(np.float32),
    "float64": lambda p: p.astype(np.float64),
    "list of lists": lambda p: p.tolist(),
    "DataFrame of uint8": lambda p: pd.DataFrame(p.astype(np.uint8)),
    "DataFrame of floats": lambda p: pd.DataFrame(p.astype(np.float64)),
}


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_every_input_kind_gives_the_numpy_models_digits(logged: Logged, kind: str) -> None:
    pixels = some_pixels()
    expected = logged.digits(pixels)
    assert len(set(expected)) > 1  # the rows do not all give one digit
    predicted = logged.served.predict(INPUT_KINDS[kind](pixels))
    assert isinstance(predicted, np.ndarray) and predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, expected)


@pytest.mark.parametrize("as_list", [False, True])
def test_one_row_gives_one_digit(logged: Logged, as_list: bool) -> None:
    row = some_pixels()[3].astype(np.uint8)
    predicted = logged.served.predict(row.tolist() if as_list else row)
    np.testing.assert_array_equal(predicted, logged.digits(row[np.newaxis]))


def test_blank_and_binary_images_are_not_taken_for_scaled_pixels(logged: Logged) -> None:
    zeros_and_ones = (some_pixels() > 128).astype(np.int64)  # integers: a faint image
    assert len(logged.served.predict(np.zeros((2, N_PIXELS)))) == 2
    np.testing.assert_array_equal(
        logged.served.predict(zeros_and_ones), logged.digits(zeros_and_ones)
    )


def test_probabilities_one_column_per_digit_in_increasing_order(logged: Logged) -> None:
    pixels = some_pixels()
    probabilities = logged.served.predict(pixels, params={"output": "probabilities"})
    scaled = pixels / 255.0
    if logged.kind == "logistic":
        assert list(probabilities.columns) == [2, 3]
        p_two = sigmoid(scaled @ logged.numpy_model.weights + logged.numpy_model.bias)
        expected = np.column_stack([p_two, 1 - p_two])  # 2 is the positive digit
    else:
        assert list(probabilities.columns) == list(range(10))
        expected = softmax(scaled @ logged.numpy_model.weights + logged.numpy_model.bias)
    np.testing.assert_allclose(probabilities.to_numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    most_probable = probabilities.columns[probabilities.to_numpy().argmax(axis=1)]
    np.testing.assert_array_equal(most_probable, logged.digits(pixels))
    # "digits" is the default, also when asked for by name
    np.testing.assert_array_equal(
        logged.served.predict(pixels, params={"output": "digits"}), logged.digits(pixels)
    )


def bad_pixel(value: float, row: int = 3, column: int = 17) -> np.ndarray:
    pixels = some_pixels().astype(np.float64)
    pixels[row, column] = value
    return pixels


REFUSALS = {
    "above 255": (bad_pixel(300), "row 3 has a pixel value 300 outside 0..255 (pixel 17"),
    "negative": (bad_pixel(-1, row=0), "row 0 has a pixel value -1 outside 0..255"),
    "fraction above 255": (bad_pixel(255.5, row=5), "row 5 has a pixel value 255.5 outside"),
    "NaN": (bad_pixel(np.nan, row=2), "row 2 has a pixel value nan that is not a finite number"),
    "infinity": (bad_pixel(np.inf), "row 3 has a pixel value inf that is not a finite number"),
    "scaled to 0..1": (
        some_pixels() / 255.0,
        "every pixel value lies in 0..1, but the model expects 0..255 pixel values: "
        "scale the images by 255",
    ),
    "too narrow": (np.zeros((2, 100)), "expected rows of 784 pixel values"),
    "one short row": (np.zeros(100), "expected rows of 784 pixel values"),
    "28x28 images": (np.zeros((2, 28, 28)), "expected rows of 784 pixel values"),
    "not numbers": ([["a"] * N_PIXELS], "could not read the input as numbers"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_is_refused_with_a_clear_message(logged: Logged, case: str) -> None:
    model_input, message = REFUSALS[case]
    with pytest.raises(MlflowException, match=re.escape(message)) as refused:
        logged.served.predict(model_input)
    assert isinstance(refused.value, ValueError)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 when served


def test_an_unknown_output_is_refused(logged: Logged) -> None:
    with pytest.raises(MlflowException, match="'output' must be 'digits' or 'probabilities'"):
        logged.served.predict(some_pixels(), params={"output": "logits"})


def test_the_signature_documents_digits_out_and_the_output_param(logged: Logged) -> None:
    metadata = logged.served.metadata
    assert metadata.get_input_schema() is None  # any input schema refuses some user input
    (output,) = metadata.get_output_schema().inputs
    assert output.type == np.dtype(np.int64) and output.shape == (-1,)
    (param,) = metadata.get_params_schema().params
    assert (param.name, param.dtype.name, param.default) == ("output", "string", "digits")
    # the input example shows users two rows of 784 pixel values, and the model takes it
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
        mlflow.set_tracking_uri(logged.tracking_uri)
        local = mlflow.artifacts.download_artifacts(f"runs:/{logged.run_id}/model")
    example = json.loads((Path(local) / "serving_input_example.json").read_text())
    rows = np.asarray(example["inputs"])
    assert rows.shape == (2, N_PIXELS) and rows.max() == 255
    assert len(logged.served.predict(rows)) == 2


def test_the_model_file_has_one_pixel_count() -> None:
    from src import data

    assert serving.N_PIXELS is data.N_PIXELS


# --- through `mlflow models serve` --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextmanager
def serve(model_uri: str, tracking_uri: str, folder: Path) -> Iterator[str]:
    """``mlflow models serve -m model_uri`` on 127.0.0.1 (its log in ``folder``), until /ping
    answers; yields its base address, and stops it by its process group (the CLI starts
    uvicorn in a child process) at the end."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    # the CLI starts `uvicorn` by name: the venv's, whether or not the venv is activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log_file = (folder / "server.log").open("wb")
    command = [sys.executable, "-m", "mlflow", "models", "serve"]
    command += ["-m", model_uri, "--env-manager", "local", "--workers", "1"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        command,
        cwd=folder,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, to stop uvicorn with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited: {(folder / 'server.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping answer in {SERVER_START_SECONDS} s")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield base
    finally:
        stop(process)
        log_file.close()


@pytest.fixture(scope="module")
def server(mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``mlflow models serve`` of the binary model, on 127.0.0.1, for the module."""
    folder = tmp_path_factory.mktemp("served")
    model = log_and_load("logistic", folder, mlflow_template)
    with serve(f"runs:/{model.run_id}/model", model.tracking_uri, folder) as base:
        yield model, f"{base}/invocations"


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL if it does not end within 20 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    process.wait(timeout=20)


def test_the_server_predicts_digits_from_integer_pixels(server: tuple[Logged, str]) -> None:
    model, url = server
    pixels = some_pixels()
    status, answer = post(url, {"inputs": pixels.tolist()})
    assert status == 200, answer
    assert answer["predictions"] == model.digits(pixels).tolist()
    # a DataFrame in "split" form, and one image as a single row
    split = {"columns": list(range(N_PIXELS)), "data": pixels.tolist()}
    assert post(url, {"dataframe_split": split})[1]["predictions"] == answer["predictions"]
    status, one = post(url, {"inputs": pixels[3].tolist()})
    assert status == 200 and one["predictions"] == answer["predictions"][3:4]


def test_the_server_gives_probabilities_when_asked(server: tuple[Logged, str]) -> None:
    model, url = server
    pixels = some_pixels()
    status, answer = post(url, {"inputs": pixels.tolist(), "params": {"output": "probabilities"}})
    assert status == 200, answer
    rows = answer["predictions"]
    assert [sorted(row) for row in rows] == [["2", "3"]] * len(pixels)
    assert all(abs(row["2"] + row["3"] - 1) < 1e-6 for row in rows)
    most_probable = [int(max(row, key=row.get)) for row in rows]
    assert most_probable == model.digits(pixels).tolist()


def test_the_server_refuses_pixels_scaled_to_0_1(server: tuple[Logged, str]) -> None:
    _, url = server
    status, answer = post(url, {"inputs": (some_pixels() / 255.0).tolist()})
    assert status == 400
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "the model expects 0..255 pixel values: scale the images by 255" in answer["message"]
    status, answer = post(url, {"inputs": bad_pixel(300, row=1).tolist()})
    assert status == 400 and "row 1 has a pixel value 300 outside 0..255" in answer["message"]
