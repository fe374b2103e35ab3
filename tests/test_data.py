"""Tests of src/data.py: loading and checking the processed file, task views, data hash."""

import hashlib

import numpy as np
import pytest

from src.data import (
    PROCESSED_FILE,
    DataError,
    Dataset,
    Splits,
    binary_task,
    data_hash,
    limit_train,
    load_processed,
)

SIZES = {"train": 30, "val": 10, "test": 12}


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Small arrays in the exact format pipeline/preprocess.py writes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 10).astype(np.uint8)
    return arrays


def write(directory, arrays) -> None:
    np.savez(directory / PROCESSED_FILE, **arrays)


def test_load_processed_converts_once_to_float32_and_int64(tmp_path):
    arrays = make_arrays()
    write(tmp_path, arrays)
    splits = load_processed(tmp_path)
    for split, n in SIZES.items():
        dataset = getattr(splits, split)
        assert dataset.images.dtype == np.float32 and dataset.images.shape == (n, 784)
        assert dataset.labels.dtype == np.int64 and dataset.labels.shape == (n,)
        assert len(dataset) == n
        np.testing.assert_allclose(dataset.images, arrays[f"{split}_images"] / 255.0, rtol=1e-7)
        np.testing.assert_array_equal(dataset.labels, arrays[f"{split}_labels"])
    assert splits.train.images.min() >= 0 and splits.train.images.max() <= 1


def test_missing_file_tells_the_user_to_run_dvc_repro(tmp_path):
    with pytest.raises(DataError, match=r"dvc repro") as error:
        load_processed(tmp_path)
    assert str(tmp_path / PROCESSED_FILE) in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("key", sorted(make_arrays()))
def test_missing_array_is_named(tmp_path, key):
    arrays = make_arrays()
    del arrays[key]
    write(tmp_path, arrays)
    with pytest.raises(DataError, match=key) as error:
        load_processed(tmp_path)
    assert PROCESSED_FILE in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("train_images", np.zeros((30, 783), np.uint8)),  # wrong width
        ("val_images", np.zeros((10, 28, 28), np.uint8)),  # not flattened
        ("test_images", np.zeros((12, 784), np.float64)),  # wrong dtype
        ("train_labels", np.zeros(30, np.int64)),  # wrong dtype
        ("val_labels", np.zeros(9, np.uint8)),  # one label short
        ("test_labels", np.full(12, 10, np.uint8)),  # not a digit
    ],
)
def test_wrong_shape_or_dtype_is_refused_with_one_line(tmp_path, key, bad):
    arrays = make_arrays()
    arrays[key] = bad
    write(tmp_path, arrays)
    with pytest.raises(DataError, match=key) as error:
        load_processed(tmp_path)
    assert PROCESSED_FILE in str(error.value) and "\n" not in str(error.value)


def test_corrupt_file_is_a_data_error(tmp_path):
    (tmp_path / PROCESSED_FILE).write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_processed(tmp_path)


def test_pickled_arrays_are_refused(tmp_path):
    arrays = make_arrays()
    arrays["train_labels"] = np.array([{"label": 1}] * 30, dtype=object)
    write(tmp_path, arrays)  # np.savez pickles object arrays; we must not unpickle them
    with pytest.raises(DataError, match=PROCESSED_FILE):
        load_processed(tmp_path)


def small_splits() -> Splits:
    def dataset(labels):
        labels = np.asarray(labels, dtype=np.int64)
        images = np.repeat(labels[:, None], 4, axis=1).astype(np.float32) / 10
        return Dataset(images=images, labels=labels)

    return Splits(
        train=dataset([2, 3, 5, 2, 7, 3, 3]),
        val=dataset([3, 1, 2]),
        test=dataset([9, 2, 3, 2]),
    )


def test_binary_task_keeps_two_digits_and_maps_the_first_to_1():
    task = binary_task(small_splits())
    np.testing.assert_array_equal(task.train.labels, [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(task.val.labels, [0, 1])
    np.testing.assert_array_equal(task.test.labels, [1, 0, 1])
    # the images travel with their labels, in order
    np.testing.assert_allclose(task.train.images[:, 0], [0.2, 0.3, 0.2, 0.3, 0.3])
    assert task.train.labels.dtype == np.int64


def test_binary_task_other_pair_and_bad_digits():
    task = binary_task(small_splits(), positive=7, negative=5)
    np.testing.assert_array_equal(task.train.labels, [0, 1])
    with pytest.raises(ValueError, match="differ"):
        binary_task(small_splits(), positive=3, negative=3)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        binary_task(small_splits(), positive=10)


def test_limit_train_takes_the_first_n_and_leaves_val_test():
    splits = small_splits()
    limited = limit_train(splits, 3)
    np.testing.assert_array_equal(limited.train.labels, [2, 3, 5])
    assert limited.train.images.shape == (3, 4)
    assert limited.val is splits.val and limited.test is splits.test
    assert limit_train(splits, None) is splits
    assert len(limit_train(splits, 100).train) == 7
    with pytest.raises(ValueError, match="positive"):
        limit_train(splits, 0)


def test_dataset_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="labels"):
        Dataset(images=np.zeros((3, 4), np.float32), labels=np.zeros(2, np.int64))


def test_data_hash_is_the_sha256_of_the_file(tmp_path):
    write(tmp_path, make_arrays())
    expected = hashlib.sha256((tmp_path / PROCESSED_FILE).read_bytes()).hexdigest()
    assert data_hash(tmp_path) == expected
    write(tmp_path, make_arrays(seed=1))
    assert data_hash(tmp_path) != expected
    with pytest.raises(DataError, match="dvc repro"):
        data_hash(tmp_path / "elsewhere")
