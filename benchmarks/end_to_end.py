"""What a user waits for: a run and a sweep as whole processes, against `import mlflow`.

The default run (`python -m src.train`, logistic 2 against 3 on the real data) and the
mission's sweep (`python -m src.train -m lambda=0,0.01,0.1`) are timed as the user types
them, with the time Python needs to `import mlflow` (the one cost no version of the project
can avoid) as the reference, in interleaved rounds on a store that already exists (in a
temporary folder, made by one warm-up run). Targets: the run at most 2.5 times the
reference, the sweep at most 4 times. Run from the project root after `dvc repro`:

    python -m benchmarks.end_to_end [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from src.config import PROJECT_ROOT

MAX_RUN_RATIO, MAX_SWEEP_RATIO = 2.5, 4.0


def commands(folder: Path) -> dict[str, list[str]]:
    """The three commands, with Hydra's folders inside ``folder``."""
    train = [sys.executable, "-m", "src.train"]
    return {
        "import mlflow": [sys.executable, "-c", "import mlflow"],
        "run": [*train, f"hydra.run.dir={folder / 'run'}"],
        "sweep": [*train, "-m", "lambda=0,0.01,0.1", f"hydra.sweep.dir={folder / 'sweep'}"],
    }


def timed(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one command, which must succeed."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command[1:])} failed: {done.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="end-to-end-"))
    try:
        measure(max(args.rounds, 3), folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(rounds: int, folder: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    todo = commands(folder)
    timed(todo["run"], env)  # creates the store; warms the disk cache
    times: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(rounds):
        for name, command in todo.items():
            times[name].append(timed(command, env))
    median = {name: statistics.median(values) for name, values in times.items()}
    reference = median["import mlflow"]
    load = os.getloadavg()[0]
    print(f"{rounds} interleaved rounds, load average {load:.2f} at the end")
    for name, values in times.items():
        print(f"  {name:<13} median {median[name]:6.2f} s  ratio {median[name] / reference:5.2f}"
              f"  (runs: {', '.join(f'{v:.2f}' for v in values)})")
    run_ratio, sweep_ratio = median["run"] / reference, median["sweep"] / reference
    print(f"targets: run <= {MAX_RUN_RATIO} x, sweep <= {MAX_SWEEP_RATIO} x the reference")
    ok = run_ratio <= MAX_RUN_RATIO and sweep_ratio <= MAX_SWEEP_RATIO
    print(f"RESULT import_mlflow_s={reference:.3f} run_s={median['run']:.3f} "
          f"sweep_s={median['sweep']:.3f} run_ratio={run_ratio:.2f} "
          f"sweep_ratio={sweep_ratio:.2f} load={load:.2f} within_target={int(ok)}")


if __name__ == "__main__":
    main()
