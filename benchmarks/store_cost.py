"""What a metric costs to store: ``MlflowClient.log_batch`` on SQLite against the team server.

A run sends its metrics in full ``log_batch`` calls of 1,000 (src/tracking.py). This times
such calls on the two stores a run can have: a SQLite file (the default, in-process) and the
team's tracking server (``make server``: ``mlflow server`` on PostgreSQL, over HTTP on
127.0.0.1), each in a fresh temporary folder, the server started and stopped here through
src.tracking_server. Each store gets a run and one untimed warm-up call; then the timed
calls alternate between the stores (``--repeats`` each), so that a busy machine slows both
alike. A call's metrics are a training curve's: four keys, 250 new steps each. The median
call, per metric, is what is reported, with the server's cost over SQLite's. Then the
mission's sweep (`python -m src.train -m lambda=0,0.01,0.1`, real data) runs as a whole
process against each store, alternating, ``--sweeps`` times each (the median is reported).
Run from the project root after `dvc repro` (Linux; PostgreSQL's programs installed, or root
to have them installed):

    python -m benchmarks.store_cost [--repeats 7] [--sweeps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from src import tracking_server
from src.config import PROJECT_ROOT

BATCH = 1000  # metrics per log_batch call, the most MLflow takes (src/tracking.py sends these)
KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Store:
    """One store, one run in it, and the steps it has been sent so far."""

    def __init__(self, name: str, uri: str) -> None:
        self.name, self.client = name, MlflowClient(uri)
        experiment_id = self.client.create_experiment(f"store-cost-{name}")
        self.run_id = self.client.create_run(experiment_id).info.run_id
        self.step = 0
        self.seconds: list[float] = []

    def batch(self) -> list[Metric]:
        now = int(time.time() * 1000)
        steps = range(self.step, self.step + BATCH // len(KEYS))
        self.step += len(steps)
        return [Metric(key, 1.0 / (s + 1), now, s) for s in steps for key in KEYS]

    def call(self) -> float:
        metrics = self.batch()
        start = time.perf_counter()
        self.client.log_batch(self.run_id, metrics=metrics)
        return time.perf_counter() - start

    def us_per_metric(self) -> float:
        return statistics.median(self.seconds) / BATCH * 1e6

    def check(self) -> None:
        """Every metric sent is in the store."""
        history = self.client.get_metric_history(self.run_id, KEYS[0])
        if len(history) != self.step:
            sys.exit(f"error: {self.name} holds {len(history)} of {self.step} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per store")
    parser.add_argument("--sweeps", type=int, default=3, help="timed sweeps per store")
    args = parser.parse_args()
    sweep_seconds: dict[str, list[float]] = {"sqlite": [], "server": []}

    scratch = Path(tempfile.mkdtemp(prefix="store-cost-", dir="/tmp"))
    scratch.chmod(0o755)  # PostgreSQL's user reaches its cluster inside
    port = free_port()
    try:
        began = time.perf_counter()
        try:
            server = tracking_server.start(scratch / "server", "127.0.0.1", port)
        except tracking_server.ServerError as error:
            sys.exit(f"error: {error}")
        print(f"server: {server.uri} on PostgreSQL, up in {time.perf_counter() - began:.1f} s")
        stores = [
            Store("sqlite", f"sqlite:///{scratch / 'mlflow.db'}"),
            Store("server", server.uri),
        ]
        for store in stores:
            store.call()  # warm-up: connections, caches, the run's first rows
        for _ in range(args.repeats):
            for store in stores:
                store.seconds.append(store.call())
        for store in stores:
            store.check()
        uris = {"sqlite": f"sqlite:///{scratch / 'sweep.db'}", "server": server.uri}
        for uri in uris.values():  # warm-up: a new SQLite store is created (migrated) first
            timed_sweep(uri, scratch / "multirun")
        for _ in range(args.sweeps):
            for name, uri in uris.items():
                sweep_seconds[name].append(timed_sweep(uri, scratch / "multirun"))
    finally:
        tracking_server.stop(scratch / "server", port)
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"log_batch of {BATCH} metrics, {args.repeats} calls per store, interleaved:")
    for store in stores:
        calls = " ".join(f"{s * 1000:.0f}" for s in store.seconds)
        print(
            f"  {store.name:6s}: median {statistics.median(store.seconds) * 1000:6.1f} ms a call, "
            f"{store.us_per_metric():6.1f} us a metric (calls, ms: {calls})"
        )
    sqlite, server = (store.us_per_metric() for store in stores)
    print(f"  the server costs {server / sqlite:.2f} x SQLite per metric")
    sweep = {name: statistics.median(values) for name, values in sweep_seconds.items()}
    print(f"the mission's sweep (3 jobs), {args.sweeps} per store, interleaved: "
          + ", ".join(f"{name} median {sweep[name]:.2f} s "
                      f"({' '.join(f'{v:.2f}' for v in values)})"
                      for name, values in sweep_seconds.items()))
    print(f"  the server's sweep takes {sweep['server'] / sweep['sqlite']:.2f} x SQLite's")
    print(
        f"RESULT sqlite_us_per_metric={sqlite:.1f} server_us_per_metric={server:.1f} "
        f"ratio={server / sqlite:.2f} sqlite_sweep_s={sweep['sqlite']:.2f} "
        f"server_sweep_s={sweep['server']:.2f} "
        f"sweep_ratio={sweep['server'] / sweep['sqlite']:.2f} load={os.getloadavg()[0]:.2f}"
    )


def timed_sweep(uri: str, folder: Path) -> float:
    """Wall seconds of `python -m src.train -m lambda=0,0.01,0.1` against the store ``uri``."""
    command = [sys.executable, "-m", "src.train", "-m", "lambda=0,0.01,0.1",
               f"hydra.sweep.dir={folder / str(time.monotonic_ns())}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: the sweep against {uri} failed: {done.stderr.strip()[-500:]}")
    return seconds


if __name__ == "__main__":
    main()
