"""Load the processed MNIST splits that `dvc repro` writes, and cut the task views from them.

The pipeline (pipeline/preprocess.py) writes ``data/processed/mnist.npz`` with six uint8
arrays; this module is the only reader. It checks what the file holds, converts the
images to float32 in [0, 1] once, and hands out frozen :class:`Splits`. The task views
(:func:`binary_task`, :func:`limit_train`) return new ``Splits`` and never modify their input.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROCESSED_FILE = "mnist.npz"
IMAGE_SIDE = 28  # MNIST images are 28 x 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE  # 784 values in a row of pixels
MAX_PIXEL = 255  # pixel values are 0..255 in the files, 0..1 for the models
N_CLASSES = 10
SPLIT_NAMES = ("train", "val", "test")


class DataError(Exception):
    """The processed data is missing or not what the pipeline writes (one-line message)."""


@dataclass(frozen=True)
class Dataset:
    """Images and their labels.

    Attributes
    ----------
    images : ndarray of shape (n_samples, n_features)
        float32 pixel values in [0, 1] (784 features for MNIST).
    labels : ndarray of shape (n_samples,)
        int64 class labels: 0..9 for the digits, 0/1 for a binary task.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 2 or self.labels.ndim != 1:
            raise ValueError(
                f"Dataset wants images of shape (n, d) and labels of shape (n,), "
                f"got {self.images.shape} and {self.labels.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"Dataset has {len(self.images)} images but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Splits:
    """The three splits: train (to fit), val (to early-stop and choose), test (to report)."""

    train: Dataset
    val: Dataset
    test: Dataset


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """Pixel values 0..255 as the models see them: float32 in [0, 1], in one pass."""
    return np.divide(pixels, np.float32(MAX_PIXEL), dtype=np.float32)


def _read_split(
    archive: np.lib.npyio.NpzFile, path: Path, split: str, digits: Sequence[int] | None = None
) -> Dataset:
    """Check one split's two arrays against the contract and convert them (only the images
    of ``digits``, if given)."""
    images_key, labels_key = f"{split}_images", f"{split}_labels"
    for key in (images_key, labels_key):
        if key not in archive.files:
            raise DataError(f"{path}: missing array '{key}'; run `dvc repro` to rebuild it")
    images, labels = archive[images_key], archive[labels_key]
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != N_PIXELS:
        raise DataError(
            f"{path}: '{images_key}' should be uint8 of shape (n, {N_PIXELS}), "
            f"got {images.dtype} {images.shape}; run `dvc repro` to rebuild it"
        )
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DataError(
            f"{path}: '{labels_key}' should be uint8 of shape ({len(images)},), "
            f"got {labels.dtype} {labels.shape}; run `dvc repro` to rebuild it"
        )
    if len(labels) == 0:
        raise DataError(f"{path}: split '{split}' is empty; run `dvc repro` to rebuild it")
    if labels.max() >= N_CLASSES:
        raise DataError(
            f"{path}: '{labels_key}' holds label {labels.max()}, expected 0..{N_CLASSES - 1}"
        )
    if digits is not None:  # before converting: a binary task needs a fifth of the images
        keep = np.isin(labels, np.asarray(digits, dtype=np.uint8))
        images, labels = images[keep], labels[keep]
    # Divide once here (one pass, straight into float32) so training never converts again.
    return Dataset(
        images=scale_pixels(images),
        labels=labels.astype(np.int64),
    )


def load_processed(directory: Path, digits: Sequence[int] | None = None) -> Splits:
    """Load ``directory / PROCESSED_FILE`` as train/val/test splits.

    Parameters
    ----------
    directory : Path
        The folder ``dvc repro`` writes to (``data/processed``).
    digits : sequence of int, optional
        Keep only the images of these digits (labels unchanged, 0..9), in their order.

    Returns
    -------
    Splits
        Images as float32 arrays of shape (n, 784) in [0, 1], labels as int64 (n,).

    Raises
    ------
    DataError
        If the file is missing (run ``dvc repro``), unreadable, or its arrays do not have
        the names, dtypes and shapes the pipeline writes.
    """
    path = Path(directory) / PROCESSED_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro` to download and preprocess MNIST")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return Splits(*(_read_split(archive, path, split, digits) for split in SPLIT_NAMES))
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # ValueError also covers object arrays, which allow_pickle=False refuses.
        raise DataError(
            f"{path}: not a readable .npz archive ({error}); run `dvc repro` to rebuild it"
        ) from error


def _binary(dataset: Dataset, positive: int, negative: int) -> Dataset:
    keep = (dataset.labels == positive) | (dataset.labels == negative)
    return Dataset(
        images=dataset.images[keep],
        labels=(dataset.labels[keep] == positive).astype(np.int64),
    )


def binary_task(splits: Splits, positive: int = 2, negative: int = 3) -> Splits:
    """Keep only two digits and relabel them: 1 for ``positive``, 0 for ``negative``.

    Parameters
    ----------
    splits : Splits
        Ten-class splits, labels 0..9.
    positive, negative : int
        The two digits (different, each in 0..9). The report's task is 2 against 3.

    Returns
    -------
    Splits
        New splits holding only those digits, in their original order, labels 0/1.
    """
    for digit in (positive, negative):
        if not 0 <= digit < N_CLASSES:
            raise ValueError(f"binary_task: digit {digit} is not in 0..{N_CLASSES - 1}")
    if positive == negative:
        raise ValueError(f"binary_task: the two digits must differ, got {positive} twice")
    return Splits(
        train=_binary(splits.train, positive, negative),
        val=_binary(splits.val, positive, negative),
        test=_binary(splits.test, positive, negative),
    )


def limit_train(splits: Splits, n: int | None) -> Splits:
    """Keep the first ``n`` training examples (val and test untouched).

    Parameters
    ----------
    splits : Splits
    n : int or None
        How many training examples to keep; ``None`` keeps all. A value larger than the
        training set keeps all of it.

    Returns
    -------
    Splits
        The training arrays are views of the input's (no copy).
    """
    if n is None:
        return splits
    if n < 1:
        raise ValueError(f"limit_train: n must be a positive number of images, got {n}")
    train = Dataset(images=splits.train.images[:n], labels=splits.train.labels[:n])
    return Splits(train=train, val=splits.val, test=splits.test)


def data_hash(directory: Path) -> str:
    """SHA-256 (hex) of ``directory / PROCESSED_FILE``, to tag runs with the exact data."""
    path = Path(directory) / PROCESSED_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro` to download and preprocess MNIST")
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
