"""Read and write MNIST's IDX files, validating everything a file claims against what it holds.

The IDX format is a 4-byte big-endian magic number -- two zero bytes, a dtype byte and
the number of dimensions -- followed by one big-endian uint32 per dimension and then the
data. MNIST uses dtype 0x08 (unsigned byte): magic 2051 for images (3 dimensions:
count, rows, columns) and 2049 for labels (1 dimension: count).

This module is the project's one IDX reader. Every problem raises `IdxError` whose
message is a single line naming the file and what is wrong with it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
UBYTE = 0x08
IMAGE_SHAPE = (28, 28)
N_CLASSES = 10

_HEADER = struct.Struct(">BBBB")


class IdxError(ValueError):
    """A file is missing or is not the IDX file it should be; the message is one line."""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdxError(f"{path}: file not found") from None
    except OSError as error:
        raise IdxError(f"{path}: cannot read: {error.strerror or error}") from None


def _parse(path: Path, data: bytes, magic: int) -> np.ndarray:
    """Validate the header of `data` against `magic` and return the payload, shaped."""
    expected_ndim = magic & 0xFF
    if len(data) < _HEADER.size:
        raise IdxError(f"{path}: truncated: {len(data)} bytes, too short for an IDX header")
    zero0, zero1, dtype, ndim = _HEADER.unpack_from(data)
    found_magic = int.from_bytes(data[:4], "big")
    if zero0 != 0 or zero1 != 0 or (dtype == UBYTE and ndim != expected_ndim):
        raise IdxError(
            f"{path}: wrong magic number {found_magic} (0x{found_magic:08x}), "
            f"expected {magic} (0x{magic:08x})"
        )
    if dtype != UBYTE:
        raise IdxError(
            f"{path}: unsupported data type 0x{dtype:02x}, expected 0x{UBYTE:02x} (unsigned byte)"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxError(
            f"{path}: truncated: {len(data)} bytes, too short for the {ndim} dimension sizes"
        )
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    expected_size = header_size + int(np.prod(shape, dtype=np.int64))
    dims = " x ".join(str(size) for size in shape)
    if len(data) < expected_size:
        raise IdxError(
            f"{path}: truncated: header declares {dims} "
            f"({expected_size} bytes in all) but the file holds {len(data)} bytes"
        )
    if len(data) > expected_size:
        raise IdxError(
            f"{path}: {len(data) - expected_size} trailing bytes after the {dims} "
            f"declared by the header ({expected_size} bytes expected)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX image file.

    Parameters
    ----------
    path : path-like
        An IDX file with magic 2051 and 28 x 28 images.

    Returns
    -------
    images : ndarray of shape (n_images, 28, 28), dtype uint8
        Read-only view of the file's pixels.

    Raises
    ------
    IdxError
        If the file is missing, has the wrong magic, dtype or dimensions, or holds more
        or fewer bytes than its header declares.
    """
    path = Path(path)
    images = _parse(path, _read_bytes(path), IMAGES_MAGIC)
    if images.shape[1:] != IMAGE_SHAPE:
        raise IdxError(
            f"{path}: images are {images.shape[1]} x {images.shape[2]}, "
            f"expected {IMAGE_SHAPE[0]} x {IMAGE_SHAPE[1]}"
        )
    return images


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX label file and check that every label is a digit 0..9.

    Parameters
    ----------
    path : path-like
        An IDX file with magic 2049.

    Returns
    -------
    labels : ndarray of shape (n_labels,), dtype uint8
        Read-only view of the file's labels.

    Raises
    ------
    IdxError
        If the file is malformed (see `read_images`) or a label is outside 0..9.
    """
    path = Path(path)
    labels = _parse(path, _read_bytes(path), LABELS_MAGIC)
    bad = np.flatnonzero(labels >= N_CLASSES)
    if bad.size:
        raise IdxError(
            f"{path}: {bad.size} labels outside 0..{N_CLASSES - 1}, "
            f"the first is {labels[bad[0]]} at index {bad[0]}"
        )
    return labels


def read_dataset(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Read a pair of image and label files and check that they hold as many items.

    Returns
    -------
    images : ndarray of shape (n, 28, 28), dtype uint8
    labels : ndarray of shape (n,), dtype uint8

    Raises
    ------
    IdxError
        If either file is invalid or their counts differ.
    """
    images = read_images(images_path)
    labels = read_labels(labels_path)
    if len(images) != len(labels):
        raise IdxError(
            f"{labels_path}: holds {len(labels)} labels but {images_path} "
            f"holds {len(images)} images"
        )
    return images, labels


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array of 1 to 255 dimensions as IDX bytes (magic 0x08, ndim)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX arrays must be uint8, got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX arrays need 1 to 255 dimensions, got {array.ndim}")
    header = _HEADER.pack(0, 0, UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, atomically (temporary name, then rename).

    Parameters
    ----------
    path : path-like
        Destination; images of shape (n, 28, 28) get magic 2051, labels of shape (n,) 2049.
    array : ndarray, dtype uint8
    """
    path = Path(path)
    data = encode_idx(array)
    with atomic_write(path) as handle:
        handle.write(data)
