"""The IDX reader on files the tests write: valid ones, and each way a file can be corrupt."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.idx import (
    IdxError,
    encode_idx,
    read_dataset,
    read_images,
    read_labels,
    write_idx,
)


def make_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def make_labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, size=n, dtype=np.uint8)


@pytest.fixture
def valid_pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    images, labels = make_images(7), make_labels(7)
    images_path, labels_path = tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    write_idx(images_path, images)
    write_idx(labels_path, labels)
    return images_path, labels_path, images, labels


def assert_one_line_naming(error: pytest.ExceptionInfo[IdxError], path: Path, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_header_is_the_published_format() -> None:
    data = encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))
    assert data[:4] == struct.pack(">I", 2051)
    assert struct.unpack(">III", data[4:16]) == (2, 28, 28)
    assert len(data) == 16 + 2 * 28 * 28
    labels = encode_idx(np.array([3, 1, 4], dtype=np.uint8))
    assert labels == struct.pack(">II", 2049, 3) + bytes([3, 1, 4])


def test_valid_files_round_trip(valid_pair) -> None:
    images_path, labels_path, images, labels = valid_pair
    read_back = read_images(images_path)
    assert read_back.shape == (7, 28, 28)
    assert read_back.dtype == np.uint8
    np.testing.assert_array_equal(read_back, images)
    np.testing.assert_array_equal(read_labels(labels_path), labels)
    pair = read_dataset(images_path, labels_path)
    np.testing.assert_array_equal(pair[0], images)
    np.testing.assert_array_equal(pair[1], labels)
    assert sorted(p.name for p in images_path.parent.iterdir()) == [
        "images-idx3-ubyte",
        "labels-idx1-ubyte",
    ]


def test_empty_but_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    write_idx(path, np.zeros((0, 28, 28), dtype=np.uint8))
    assert read_images(path).shape == (0, 28, 28)


def test_labels_file_read_as_images_is_wrong_magic(valid_pair) -> None:
    _, labels_path, _, _ = valid_pair
    with pytest.raises(IdxError) as error:
        read_images(labels_path)
    assert_one_line_naming(error, labels_path, "wrong magic number 2049", "expected 2051")


def test_garbage_magic(tmp_path: Path) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(IdxError) as error:
        read_labels(path)
    assert_one_line_naming(error, path, "wrong magic number", "expected 2049")


def test_wrong_dtype(tmp_path: Path) -> None:
    path = tmp_path / "floats"
    # dtype 0x0D is float32 in the IDX format; MNIST is unsigned bytes only.
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + bytes(8))
    with pytest.raises(IdxError) as error:
        read_labels(path)
    assert_one_line_naming(error, path, "data type 0x0d")


@pytest.mark.parametrize("missing", [1, 28 * 28 + 1])
def test_truncated_data(valid_pair, missing: int) -> None:
    images_path, _, _, _ = valid_pair
    data = images_path.read_bytes()
    images_path.write_bytes(data[:-missing])
    with pytest.raises(IdxError) as error:
        read_images(images_path)
    assert_one_line_naming(error, images_path, "truncated", "7 x 28 x 28")


@pytest.mark.parametrize("length", [0, 3, 10])
def test_truncated_header(tmp_path: Path, length: int) -> None:
    path = tmp_path / "short"
    path.write_bytes(encode_idx(make_images(1))[:length])
    with pytest.raises(IdxError) as error:
        read_images(path)
    assert_one_line_naming(error, path, "truncated")


def test_trailing_bytes(valid_pair) -> None:
    _, labels_path, _, _ = valid_pair
    labels_path.write_bytes(labels_path.read_bytes() + b"\x00\x01")
    with pytest.raises(IdxError) as error:
        read_labels(labels_path)
    assert_one_line_naming(error, labels_path, "2 trailing bytes")


def test_wrong_image_size(tmp_path: Path) -> None:
    path = tmp_path / "small-images"
    write_idx(path, np.zeros((3, 27, 28), dtype=np.uint8))
    with pytest.raises(IdxError) as error:
        read_images(path)
    assert_one_line_naming(error, path, "27 x 28", "expected 28 x 28")


def test_count_mismatch_between_images_and_labels(tmp_path: Path) -> None:
    images_path, labels_path = tmp_path / "images", tmp_path / "labels"
    write_idx(images_path, make_images(5))
    write_idx(labels_path, make_labels(4))
    with pytest.raises(IdxError) as error:
        read_dataset(images_path, labels_path)
    assert_one_line_naming(error, labels_path, "4 labels", "5 images", str(images_path))


def test_out_of_range_label(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx(path, np.array([0, 9, 3, 10, 255], dtype=np.uint8))
    with pytest.raises(IdxError) as error:
        read_labels(path)
    assert_one_line_naming(error, path, "2 labels outside 0..9", "10 at index 3")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere"
    with pytest.raises(IdxError) as error:
        read_images(path)
    assert_one_line_naming(error, path, "file not found")


def test_writer_refuses_what_idx_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    assert not any(tmp_path.iterdir())
