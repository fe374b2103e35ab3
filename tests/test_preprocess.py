"""The preprocess stage on small IDX files the tests write: splits, determinism, failures."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.atomic import TEMP_SUFFIX
from pipeline.idx import write_idx
from pipeline.preprocess import (
    PreprocessError,
    main,
    make_splits,
    preprocess,
    save_npz,
    split_indices,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, VAL_SIZE = 60, 12, 15
KEYS = ["train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels"]


def numbered_images(n: int, offset: int) -> np.ndarray:
    """Images whose first two pixels spell a unique id, so any image can be traced back."""
    images = np.random.default_rng(offset).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
    return images


def image_ids(flat_images: np.ndarray) -> np.ndarray:
    return flat_images[:, 0].astype(np.int64) * 256 + flat_images[:, 1]


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(5)
    write_idx(raw / "train-images-idx3-ubyte", numbered_images(N_TRAIN, 0))
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, N_TRAIN, dtype=np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", numbered_images(N_TEST, 1000))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, N_TEST, dtype=np.uint8))
    return raw


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def test_output_follows_the_contract(raw_dir: Path, tmp_path: Path) -> None:
    out = preprocess(raw_dir, tmp_path / "processed", VAL_SIZE, seed=0)
    assert out == tmp_path / "processed" / "mnist.npz"
    assert [p.name for p in out.parent.iterdir()] == ["mnist.npz"]  # no temporary left
    arrays = load(out)
    assert sorted(arrays) == sorted(KEYS)
    shapes = {key: arrays[key].shape for key in KEYS}
    assert shapes == {
        "train_images": (N_TRAIN - VAL_SIZE, 784),
        "train_labels": (N_TRAIN - VAL_SIZE,),
        "val_images": (VAL_SIZE, 784),
        "val_labels": (VAL_SIZE,),
        "test_images": (N_TEST, 784),
        "test_labels": (N_TEST,),
    }
    assert all(arrays[key].dtype == np.uint8 for key in KEYS)


def test_split_is_a_disjoint_partition_of_train_and_keeps_pairs(raw_dir: Path) -> None:
    arrays = make_splits(raw_dir, VAL_SIZE, seed=3)
    original_images = numbered_images(N_TRAIN, 0).reshape(N_TRAIN, 784)
    original_labels = np.random.default_rng(5).integers(0, 10, N_TRAIN, dtype=np.uint8)
    train_ids, val_ids = image_ids(arrays["train_images"]), image_ids(arrays["val_images"])
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(N_TRAIN))
    # Both keep the original order, and each image keeps its own label and pixels.
    assert list(train_ids) == sorted(train_ids) and list(val_ids) == sorted(val_ids)
    for split, ids in [("train", train_ids), ("val", val_ids)]:
        np.testing.assert_array_equal(arrays[f"{split}_images"], original_images[ids])
        np.testing.assert_array_equal(arrays[f"{split}_labels"], original_labels[ids])


def test_test_set_is_untouched(raw_dir: Path) -> None:
    arrays = make_splits(raw_dir, VAL_SIZE, seed=0)
    np.testing.assert_array_equal(
        arrays["test_images"], numbered_images(N_TEST, 1000).reshape(N_TEST, 784)
    )
    rng = np.random.default_rng(5)
    rng.integers(0, 10, N_TRAIN, dtype=np.uint8)
    np.testing.assert_array_equal(arrays["test_labels"], rng.integers(0, 10, N_TEST, np.uint8))


def test_same_seed_same_bytes_other_seed_other_split(raw_dir: Path, tmp_path: Path) -> None:
    first = preprocess(raw_dir, tmp_path / "a", VAL_SIZE, seed=0).read_bytes()
    again = preprocess(raw_dir, tmp_path / "b", VAL_SIZE, seed=0).read_bytes()
    assert first == again  # bit for bit, so the file's hash names the data
    other = load(preprocess(raw_dir, tmp_path / "c", VAL_SIZE, seed=1))
    same = load(tmp_path / "a" / "mnist.npz")
    assert set(image_ids(other["val_images"])) != set(image_ids(same["val_images"]))


def test_npz_bytes_do_not_depend_on_the_python_release(tmp_path: Path) -> None:
    # The digest of these bytes as written by CPython 3.11.2 and 3.11.7 alike. With zip64
    # headers forced, the two releases wrote different local headers for the same arrays,
    # so dvc.lock changed on a machine whose python3 was another patch release.
    rng = np.random.default_rng(0)
    arrays = {"a": rng.integers(0, 255, (5000, 784), dtype=np.uint8),
              "b": np.arange(10, dtype=np.uint8)}
    save_npz(tmp_path / "x.npz", arrays)
    digest = hashlib.md5((tmp_path / "x.npz").read_bytes()).hexdigest()
    assert digest == "301012b57d0426fae6a7514208556ab8"


def test_split_indices_sizes_and_seed() -> None:
    train, val = split_indices(60000, 10000, seed=0)
    assert (len(train), len(val)) == (50000, 10000)
    assert np.intersect1d(train, val).size == 0
    assert np.union1d(train, val).tolist() == list(range(60000))
    np.testing.assert_array_equal(split_indices(60000, 10000, seed=0)[1], val)


@pytest.mark.parametrize("val_size", [0, N_TRAIN])
def test_val_size_must_leave_both_splits_non_empty(raw_dir: Path, val_size: int) -> None:
    with pytest.raises(PreprocessError, match=f"between 1 and {N_TRAIN - 1}"):
        make_splits(raw_dir, val_size, seed=0)


def write_params(directory: Path, val_size: int = VAL_SIZE, seed: int = 0) -> None:
    (directory / "params.yaml").write_text(
        f"download:\n  timeout: 30\npreprocess:\n  val_size: {val_size}\n  seed: {seed}\n"
    )


def corrupt_truncate(raw: Path) -> Path:
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    return path


def corrupt_label(raw: Path) -> Path:
    path = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[-1] = 12
    path.write_bytes(bytes(data))
    return path


def corrupt_count(raw: Path) -> Path:
    path = raw / "train-labels-idx1-ubyte"
    write_idx(path, np.zeros(N_TRAIN - 1, dtype=np.uint8))
    return path


def corrupt_missing(raw: Path) -> Path:
    path = raw / "t10k-images-idx3-ubyte"
    path.unlink()
    return path


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (corrupt_truncate, "truncated"),
        (corrupt_label, "1 labels outside 0..9"),
        (corrupt_count, "holds 59 labels but"),
        (corrupt_missing, "file not found"),
    ],
)
def test_corrupt_input_leaves_the_output_untouched(
    raw_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    corrupt,
    problem: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    assert main(["--raw", "raw", "--out", "processed"]) == 0
    before = (tmp_path / "processed" / "mnist.npz").read_bytes()
    capsys.readouterr()

    bad_file = corrupt(Path("raw"))
    assert main(["--raw", "raw", "--out", "processed"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {bad_file}")
    assert problem in err
    assert [p.name for p in (tmp_path / "processed").iterdir()] == ["mnist.npz"]
    assert (tmp_path / "processed" / "mnist.npz").read_bytes() == before


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("preprocess:\n  val_size: 10.5\n  seed: 0\n", "preprocess.val_size must be"),
        ("preprocess:\n  val_size: 10\n  seed: -1\n", "preprocess.seed must be"),
        ("preprocess:\n  val_size: 100\n  seed: 0\n", "preprocess.val_size must be between"),
        ("download: {}\n", "no `preprocess:` section"),
    ],
)
def test_bad_params_give_one_line(
    raw_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    params: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(params)
    assert main(["--raw", "raw", "--out", "processed"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err
    assert not (tmp_path / "processed").exists()


def test_a_stale_temporary_is_removed_by_the_next_run(raw_dir: Path, tmp_path: Path) -> None:
    processed = tmp_path / "processed"
    processed.mkdir()
    stale = processed / f".mnist.npz.0123456789ab{TEMP_SUFFIX}"
    stale.write_bytes(b"half an archive")
    preprocess(raw_dir, processed, VAL_SIZE, seed=0)
    assert [p.name for p in processed.iterdir()] == ["mnist.npz"]


# `python -m pipeline.preprocess` that stops for good after writing the first array: the
# temporary file is then half written when the test kills it.
HANG_WHILE_WRITING = """
import sys, time
import numpy as np
from pipeline import preprocess

write_array = np.lib.format.write_array

def write_then_hang(*args, **kwargs):
    write_array(*args, **kwargs)
    time.sleep(600)

np.lib.format.write_array = write_then_hang
sys.exit(preprocess.main(sys.argv[1:]))
"""


def test_the_run_after_a_kill_9_leaves_only_the_output(
    raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_params(tmp_path)
    processed = tmp_path / "processed"
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    child = subprocess.Popen(
        [sys.executable, "-c", HANG_WHILE_WRITING, "--raw", "raw", "--out", "processed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not [p for p in processed.glob(f".*{TEMP_SUFFIX}") if p.stat().st_size > 0]:
            assert child.poll() is None, f"preprocess ended early: {child.stderr.read()!r}"
            assert time.monotonic() < deadline, "preprocess never started writing"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        child.stderr.close()
    leftovers = [p.name for p in processed.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].endswith(TEMP_SUFFIX)  # what kill -9 leaves

    monkeypatch.chdir(tmp_path)
    assert main(["--raw", "raw", "--out", "processed"]) == 0
    assert [p.name for p in processed.iterdir()] == ["mnist.npz"]
    assert sorted(load(processed / "mnist.npz")) == sorted(KEYS)
