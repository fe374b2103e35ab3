"""A grid against a search: the best validation accuracy each finds, and its wall time.

On logistic regression (2 against 3) and on softmax regression (ten digits), the real data,
this runs the 12-job grid ``lambda=0,0.001,0.01,0.1 lr=0.1,0.5,1.0`` and a 12-trial Optuna
search (``hparams_search=optuna hydra.sweeper.n_trials=12``: TPE over lr and lambda on log
scales, minimising the validation loss) as a user types them, ``python -m src.train -m ...``
subprocesses against one temporary SQLite store, and reads what they found from the store:
the highest validation accuracy among the sweep's jobs, the job the sweep chose (the lowest
validation loss) with its validation and test accuracy, the failed jobs, the wall time. Run
from the project root after `dvc repro`, with nothing else heavy running:

    python -m benchmarks.search
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.tracking import MlflowClient

from src import sweep, tracking
from src.config import PROJECT_ROOT

TASKS = {"logistic": ["model=logistic"], "softmax": ["model=softmax"]}
SWEEPS = {
    "grid": ["lambda=0,0.001,0.01,0.1", "lr=0.1,0.5,1.0"],
    "search": ["hparams_search=optuna", "hydra.sweeper.n_trials=12"],
}
VAL_ACCURACY, TEST_ACCURACY = sweep.metric_key("val_accuracy"), sweep.metric_key("test_accuracy")


def run_sweep(args: list[str], folder: Path, env: dict[str, str]) -> float:
    """Wall seconds of ``python -m src.train -m args``; exit 1 (some jobs failed) is a result."""
    command = [sys.executable, "-m", "src.train", "-m", *args,
               f"hydra.sweep.dir={folder}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"error: {' '.join(args)} failed: {done.stderr.strip()[-800:]}")
    return seconds


def latest_parent(client: MlflowClient) -> object:
    """The sweep parent run created last in the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, filter_string="tags.sweep = 'parent'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
    return parent


def found(client: MlflowClient) -> dict[str, float]:
    """What the last sweep found, read from the store."""
    parent = latest_parent(client)
    runs = tracking.children(client, parent.info.run_id, parent.info.experiment_id)
    done = [r for r in runs
            if r.info.status == tracking.FINISHED and VAL_ACCURACY in r.data.metrics]
    top = max(done, key=lambda r: r.data.metrics[VAL_ACCURACY])
    chosen = sweep.best_child(runs)
    assert chosen is not None, "no job finished"
    return {
        "val_acc": top.data.metrics[VAL_ACCURACY],
        "top_lr": float(top.data.params["lr"]),
        "top_lambda": float(top.data.params["lambda"]),
        "chosen_val_acc": chosen.data.metrics[VAL_ACCURACY],
        "chosen_test_acc": chosen.data.metrics[TEST_ACCURACY],
        "jobs": len(runs),
        "failed": len(runs) - len(done),
    }


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="search-bench-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    print(f"load average {os.getloadavg()[0]:.2f} at the start; store {uri}")
    results: dict[str, float] = {}
    try:
        client = MlflowClient(uri)
        for task, task_args in TASKS.items():
            for kind, sweep_args in SWEEPS.items():
                seconds = run_sweep([*task_args, *sweep_args], folder / f"{task}-{kind}", env)
                f = found(client)
                print(f"{task:<8} {kind:<6} {f['jobs']:>2} jobs ({f['failed']} failed) "
                      f"{seconds:6.1f} s: best val acc {f['val_acc']:.4f} "
                      f"(lr={f['top_lr']:.3g} lambda={f['top_lambda']:.3g}); chosen by val loss: "
                      f"val {f['chosen_val_acc']:.4f}, test {f['chosen_test_acc']:.4f}")
                results[f"{task}_{kind}_val_acc"] = f["val_acc"]
                results[f"{task}_{kind}_chosen_test_acc"] = f["chosen_test_acc"]
                results[f"{task}_{kind}_s"] = seconds
                results[f"{task}_{kind}_failed"] = f["failed"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for task in TASKS:
        gain = results[f"{task}_search_val_acc"] - results[f"{task}_grid_val_acc"]
        ratio = results[f"{task}_search_s"] / results[f"{task}_grid_s"]
        print(f"{task}: the search finds {gain:+.4f} validation accuracy over the grid "
              f"in {ratio:.2f} x its wall time")
    load = os.getloadavg()[0]
    fields = " ".join(
        f"{k}={v:.4f}" if k.endswith("acc") else f"{k}={v:.1f}" if k.endswith("_s")
        else f"{k}={int(v)}"
        for k, v in results.items()
    )
    print(f"RESULT {fields} load={load:.2f}")


if __name__ == "__main__":
    main()
