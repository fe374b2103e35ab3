"""Log a job's kept folder to MLflow: ``python -m src.upload <folder> [<folder> ...]``.

A job whose store went away in the middle of its run keeps everything in its output folder
(src/artifacts.py: ``artifacts/``, ``metrics.csv``, ``run.json``) and says where. Once the
store is back, this makes one new run per folder in the store of ``MLFLOW_TRACKING_URI``
(or the default SQLite store), in the job's experiment, with its name, params, tags, every
metric at its step, the artifacts and the served model, and ends it FINISHED. The run is
tagged ``uploaded_from`` with the folder's name, so that it can be told from one logged live;
the run the store lost, if the store kept it RUNNING, ends FAILED with a tag naming the new one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow.entities import Metric

from src import artifacts, tracking
from src.config import default_tracking_uri
from src.errors import TrackingError, one_line


def upload(folder: Path, tracking_uri: str) -> str:
    """Log the run kept in ``folder`` to the store; returns the new run's id.

    Raises
    ------
    FileNotFoundError
        ``folder`` holds no kept run (no ``run.json`` / ``metrics.csv`` / ``artifacts/``).
    TrackingError
        The store cannot be reached or failed.
    """
    for name in (artifacts.RUN_FILE, artifacts.METRICS_FILE, artifacts.ARTIFACTS_DIR):
        if not (folder / name).exists():
            raise FileNotFoundError(
                f"{folder} holds no kept run: {name} is missing (a job's output folder has "
                f"{artifacts.ARTIFACTS_DIR}/, {artifacts.METRICS_FILE} and {artifacts.RUN_FILE})"
            )
    try:
        record = artifacts.read_run_record(folder)
        rows = artifacts.read_metrics(folder)
        experiment, name = record["experiment_name"], record["run_name"]
        tags, params, step = record["tags"], record["params"], int(record["model_step"])
        parent = tuple(record["parent"]) if record.get("parent") else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FileNotFoundError(
            f"{folder}: its kept run cannot be read ({type(error).__name__}: {error})"
        ) from None
    client = tracking.open_store(tracking_uri)
    tags = {**tags, "uploaded_from": folder.name}
    run_id = tracking.start_job_run(client, experiment, name, tags, params, parent)
    buffer = tracking.MetricBuffer(client, run_id)
    buffer.rows = [Metric(key, value, timestamp, step) for key, value, timestamp, step in rows]
    try:
        tracking.finish_job_run(client, buffer, folder, {}, "model", step)
    except KeyboardInterrupt:
        tracking.end_run(client, run_id, tracking.KILLED, "interrupted")
        raise
    except TrackingError as error:
        tracking.end_run(client, run_id, tracking.FAILED, str(error))
        raise
    tracking.end_run(client, run_id, tracking.FINISHED)
    lost = record.get("run_id")
    if lost:  # the run the store lost mid-way, if the store kept it, points to this one
        tracking.end_run(client, lost, tracking.FAILED,
                         f"the store was lost during the run; logged again as run {run_id}")
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="a job's output folder")
    args = parser.parse_args(argv)
    uri = default_tracking_uri()
    failed = 0
    for folder in args.folders:  # one bad folder does not stop the others
        try:
            run_id = upload(folder, uri)
        except (FileNotFoundError, TrackingError) as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            failed += 1
            continue
        print(f"{folder}: logged as MLflow run {run_id} in {tracking.safe_uri(uri)}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
