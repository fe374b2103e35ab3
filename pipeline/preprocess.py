"""DVC stage `preprocess`: turn data/raw/'s IDX files into data/processed/mnist.npz.

The validation set is held out from the training images by a seeded permutation
(`preprocess.val_size`, `preprocess.seed` in params.yaml); the test set is untouched.
Both the training and the validation images keep their original order, so the seed
decides only which images are held out. The output is an uncompressed .npz (no pickle), written
to a temporary name and renamed into place; on any error the previous output is left
as it was. Temporary files that a killed run left behind are removed before writing, as
the download stage does, so that DVC never caches them as part of the output.

Run as `python -m pipeline.preprocess` from the project root.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write, remove_stale_temporaries
from pipeline.idx import IdxError, read_dataset
from pipeline.params import ParamsError, error_line, load_section

RAW_DIR = Path("data/raw")
PROCESSED_DIR = Path("data/processed")
PROCESSED_FILE = "mnist.npz"
N_PIXELS = 28 * 28
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can carry

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"


class PreprocessError(ValueError):
    """The raw data or the parameters do not allow the split; the message is one line."""


def split_indices(n_train: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose which of `n_train` training images are held out for validation.

    Parameters
    ----------
    n_train : int
        Number of training images.
    val_size : int
        Number held out, 0 < val_size < n_train.
    seed : int
        Seed of the permutation that picks them.

    Returns
    -------
    train_index : ndarray of shape (n_train - val_size,), dtype int64, sorted
    val_index : ndarray of shape (val_size,), dtype int64, sorted
    """
    if not 0 < val_size < n_train:
        raise PreprocessError(
            f"preprocess.val_size must be between 1 and {n_train - 1} "
            f"(there are {n_train} training images), got {val_size}"
        )
    permutation = np.random.default_rng(seed).permutation(n_train)
    return np.sort(permutation[val_size:]), np.sort(permutation[:val_size])


def make_splits(raw_dir: Path, val_size: int, seed: int) -> dict[str, np.ndarray]:
    """Read the four IDX files in `raw_dir` and return the six arrays of the processed set.

    Returns
    -------
    arrays : dict of str to ndarray
        train_images (n_train, 784) uint8, train_labels (n_train,) uint8,
        val_images (val_size, 784) uint8, val_labels (val_size,) uint8,
        test_images (n_test, 784) uint8, test_labels (n_test,) uint8.

    Raises
    ------
    IdxError
        When a file is missing or invalid, or image and label counts differ.
    PreprocessError
        When `val_size` does not fit the training set.
    """
    train_images, train_labels = read_dataset(raw_dir / TRAIN_IMAGES, raw_dir / TRAIN_LABELS)
    test_images, test_labels = read_dataset(raw_dir / TEST_IMAGES, raw_dir / TEST_LABELS)
    train_index, val_index = split_indices(len(train_images), val_size, seed)
    train_flat = train_images.reshape(len(train_images), N_PIXELS)
    return {
        "train_images": train_flat[train_index],
        "train_labels": train_labels[train_index],
        "val_images": train_flat[val_index],
        "val_labels": train_labels[val_index],
        "test_images": test_images.reshape(len(test_images), N_PIXELS).copy(),
        "test_labels": test_labels.copy(),
    }


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` as an uncompressed .npz (what `np.savez` writes, no pickle), atomically.

    The zip entries get a fixed timestamp, which `np.savez` does not allow: the same arrays
    then give the same bytes, so the file's hash (DVC's, and the data hash tagged on every
    MLflow run) changes only when the data does. No zip64 headers (the members are far
    below 4 GiB): how zipfile rewrites a forced zip64 header changed within Python 3.11,
    and the bytes must not depend on the interpreter's patch release.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_write(path) as handle,
        zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED) as archive,
    ):
        for key, array in arrays.items():
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE_TIME)
            with archive.open(entry, mode="w") as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def _int_param(params: Mapping[str, Any], key: str) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParamsError(f"preprocess.{key} must be a non-negative integer, got {value!r}")
    return value


def preprocess(raw_dir: Path, out_dir: Path, val_size: int, seed: int) -> Path:
    """Make `out_dir`/mnist.npz from the IDX files in `raw_dir`; return its path.

    The temporary files of an earlier run that was killed while writing (``.*.part``) are
    deleted first: `out_dir` then holds only the output.
    """
    arrays = make_splits(raw_dir, val_size, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    out_path = out_dir / PROCESSED_FILE
    save_npz(out_path, arrays)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m pipeline.preprocess`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw", type=Path, default=RAW_DIR, help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=PROCESSED_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        params = load_section(args.params, "preprocess")
        val_size, seed = _int_param(params, "val_size"), _int_param(params, "seed")
        out_path = preprocess(args.raw, args.out, val_size, seed)
    except (ParamsError, IdxError, PreprocessError, OSError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 1
    print(f"preprocess: wrote {out_path} (val_size={val_size}, seed={seed})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
