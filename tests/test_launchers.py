"""Sweeps whose jobs run in other processes, as the `cluster` extra's launchers run them:
joblib against the real tracking server, submitit's local executor, and a Ray cluster started
by the test inside a private network namespace that holds loopback alone (Ray listens on
every interface, and looks for an outside address, whatever it is told). Each job's run must
nest under the sweep's one parent, handed to it through its config, not through the sweep
directory; a cluster sweep against a local SQLite store is refused before any job.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import all_artifacts, run_train, train_command, train_env

# a short training on the tiny data (80 images of 2 or 3: 4 steps of 20 per epoch)
SHORT = ["epochs=2", "batch_size=20", "early_stopping.enabled=false"]
PARENT_TAG = "mlflow.parentRunId"
# unshare: a private network namespace (loopback only) and a private process namespace,
# whose processes all die with its first one, so that nothing of Ray outlives the test
PRIVATE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]


def sweep_runs(client: MlflowClient, experiment_name: str) -> tuple[Any, list[Any]]:
    """The one parent of the experiment and its children (every other run must be one)."""
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    (parent,) = parents
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert {c.data.tags[PARENT_TAG] for c in children} == {parent.info.run_id}
    return parent, children


def assert_nested_and_finished(
    client: MlflowClient, experiment_name: str, lambdas: list[str]
) -> tuple[Any, list[Any]]:
    parent, children = sweep_runs(client, experiment_name)
    assert parent.info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED"] * len(lambdas)
    assert sorted(c.data.params["lambda"] for c in children) == sorted(lambdas)
    return parent, children


def tiny_two_and_three(tiny_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The tiny test set's 2s and 3s, as pixels (float) and digits."""
    with np.load(tiny_data / "mnist.npz", allow_pickle=False) as saved:
        images, digits = saved["test_images"], saved["test_labels"].astype(np.int64)
    keep = np.isin(digits, [2, 3])
    return images[keep].astype(np.float64), digits[keep]


def test_a_joblib_sweep_on_two_cores_nests_six_jobs_in_the_tracking_server(
    tiny_data: Path, tracking_server: Any, tmp_path: Path
) -> None:
    import mlflow

    experiment = f"launchers-joblib-{uuid.uuid4().hex[:8]}"  # the server is session-wide
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            "lambda=0,0.01,0.1", "lr=0.5,1.0", f"data.dir={tiny_data}", *SHORT,
            f"mlflow.experiment_name={experiment}"]
    done = run_train(args, tracking_server.uri, tmp_path / "work")
    assert done.returncode == 0, done.stderr
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr

    client = MlflowClient(tracking_server.uri)
    parent, children = assert_nested_and_finished(
        client, experiment, ["0", "0", "0.01", "0.01", "0.1", "0.1"]
    )
    assert {(c.data.params["lambda"], c.data.params["lr"]) for c in children} == {
        (lam, lr) for lam in ("0", "0.01", "0.1") for lr in ("0.5", "1.0")
    }
    summary = client.download_artifacts(parent.info.run_id, "tables/sweep_summary.csv", tmp_path)
    assert len(Path(summary).read_text().strip().splitlines()) == 1 + 6

    images, digits = tiny_two_and_three(tiny_data)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server.uri)
    try:
        accuracies = []
        for child in children:
            run_id = child.info.run_id
            history = client.get_metric_history(run_id, "val/loss")
            assert [m.step for m in history] == [4, 8]  # 2 epochs of 4 steps
            assert {"plots/loss_curves.png", "weights/weights.npz"} <= all_artifacts(
                client, run_id
            )
            folder = tmp_path / "download" / run_id
            folder.mkdir(parents=True)
            weights = client.download_artifacts(run_id, "weights/weights.npz", str(folder))
            with np.load(weights, allow_pickle=False) as saved:
                assert saved["weights"].shape[0] == 784 and np.all(np.isfinite(saved["weights"]))
            model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
            predicted = np.asarray(model.predict(images))
            assert set(np.unique(predicted)) <= {2, 3}
            # the served model is the one the run evaluated (lambda=0.1 lr=1.0 learns little)
            accuracy = np.mean(predicted == digits)
            assert accuracy == pytest.approx(child.data.metrics["final_test_accuracy"])
            accuracies.append(accuracy)
    finally:
        mlflow.set_tracking_uri(previous)
    assert max(accuracies) > 0.8


def test_a_submitit_local_sweep_nests_three_jobs_from_their_own_processes(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=3",
            "lambda=0,0.01,0.1", f"data.dir={tiny_data}", *SHORT]
    done = run_train(args, tracking_uri, tmp_path / "work")
    assert done.returncode == 0, done.stderr
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr

    assert_nested_and_finished(MlflowClient(tracking_uri), "logistic-2v3", ["0", "0.01", "0.1"])
    # each job ran in a process of its own, which submitit started and logged
    logs = list((tmp_path / "work" / "sweep" / ".submitit").glob("*/*_log.err"))
    assert len(logs) == 3


def test_jobs_that_cannot_see_the_sweep_directory_still_nest_under_the_parent(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    # The sweep directory is resolved by each process: the launching one (no submitit job id)
    # writes to machines/launcher, each job to machines/<its own job id>, as on machines that
    # share no folder. submitit's own folder (on SLURM, a shared one) is apart from both.
    machines = tmp_path / "machines"
    command = [
        sys.executable, "-m", "src.train", "-m", "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=3", f"hydra.launcher.submitit_folder={tmp_path}/submitit/%j",
        f"hydra.sweep.dir={machines}/${{oc.env:SUBMITIT_LOCAL_JOB_ID,launcher}}",
        "lambda=0,0.01,0.1", f"data.dir={tiny_data}", *SHORT,
    ]
    workdir = tmp_path / "work"
    workdir.mkdir()
    done = subprocess.run(command, cwd=workdir, env=train_env(tracking_uri), capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr

    parent, _ = assert_nested_and_finished(
        MlflowClient(tracking_uri), "logistic-2v3", ["0", "0.01", "0.1"]
    )
    # the launching process's sweep directory holds its own file alone
    launcher = machines / "launcher"
    assert [p.name for p in launcher.iterdir()] == ["multirun.yaml"]
    jobs = sorted(p for p in machines.iterdir() if p != launcher)
    assert len(jobs) == 3
    for job in jobs:
        (folder,) = job.iterdir()  # the job's own folder, named by its number
        assert (folder / "train.log").exists()
        # what the job knew of its parent came with its config
        assert parent.info.run_id in (folder / ".hydra" / "hydra.yaml").read_text()


@pytest.mark.parametrize(
    ("launcher", "name"),
    [
        (["hydra/launcher=submitit_slurm"], "SlurmLauncher"),
        # refused before Ray is started: nothing is sent to that address
        (["hydra/launcher=ray", "hydra.launcher.ray.init.address=10.11.12.13:6379"],
         "RayLauncher"),
    ],
)
def test_a_cluster_sweep_against_a_local_sqlite_store_is_refused_before_any_job(
    launcher: list[str], name: str, tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    args = ["-m", *launcher, "lambda=0,0.1", f"data.dir={tiny_data}", *SHORT]
    done = run_train(args, tracking_uri, tmp_path / "work")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith(f"error: the {name} runs jobs on other machines")
    assert "a cluster needs a tracking server (`make server`" in lines[-1]
    client = MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(ids) == []
    assert not (tmp_path / "work" / "sweep").exists()


def test_hydra_launcher_ray_is_the_project_config(tracking_uri: str, tmp_path: Path) -> None:
    done = run_train(["--cfg", "hydra", "-p", "hydra.launcher", "hydra/launcher=ray"],
                     tracking_uri, tmp_path / "work")
    assert done.returncode == 0, done.stderr
    assert "address: local" in done.stdout
    assert "object_store_memory: null" in done.stdout
    assert "deprecated" not in done.stderr  # Hydra's warning on the plugin's schema: muted


@pytest.mark.parametrize("uri", [
    "sqlite:////tmp/a folder/mlflow.db",
    "http://127.0.0.1:5000",
    "postgresql://user:pass@host/db?sslmode=require&x=1,2",
    "odd'quote\\",
    "back\\slash\\'quote",
])
def test_the_store_handed_to_the_jobs_reads_back_as_given(uri: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from src.sweep import quoted

    override = OverridesParser.create().parse_override(f"+hydra.job.env_set.X={quoted(uri)}")
    assert override.value() == uri


def private_namespace_refusal() -> str | None:
    """Why the test cannot make a private network namespace here; None if it can."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) is not installed"
    for probe in (["unshare", "--net", "true"], [*PRIVATE, "true"]):
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return f"`{' '.join(probe)}` is not permitted here: {done.stderr.strip()}"
    return None


def processes_in_namespace(namespace: str) -> list[int]:
    """The pids of the processes, seen from here, whose network namespace is ``namespace``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "net") == namespace:
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile, or not ours to read
    return pids


def test_a_ray_sweep_on_a_private_cluster_nests_three_jobs_from_ray_workers(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    refusal = private_namespace_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    # Ray's own folder (sockets, logs, the address of the current cluster) is the test's:
    # short, for the sockets' paths, and removed at the end.
    ray_folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = train_env(tracking_uri)
    env.update({
        "RAY_TMPDIR": str(ray_folder),
        "RAY_AUTH_MODE": "token",  # Ray 2.5x: the head and the driver need the same token
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
    })
    # The workers get the environment of `ray start`, here another store: the sweep must
    # hand its own store to the jobs.
    elsewhere = f"sqlite:///{tmp_path / 'workers.db'}"
    workdir = tmp_path / "work"
    workdir.mkdir()
    sweep = shlex.join(train_command([
        "-m", "hydra/launcher=ray", "hydra.launcher.ray.init.address=127.0.0.1:6379",
        "lambda=0,0.01,0.1", f"data.dir={tiny_data}", *SHORT,
    ], workdir))
    namespace_file = tmp_path / "namespace"
    # inside the namespace nothing else listens: Ray's fixed ports are free
    script = (
        f"readlink /proc/self/ns/net > {shlex.quote(str(namespace_file))} && "
        f"ip link set lo up && MLFLOW_TRACKING_URI={shlex.quote(elsewhere)} "
        "ray start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=2 "
        "--include-dashboard=false --disable-usage-stats && "
        f"{sweep}; status=$?; ray stop; exit $status"
    )
    process = subprocess.Popen([*PRIVATE, "bash", "-c", script], cwd=workdir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # --kill-child: the namespace dies with it
        out, err = process.communicate()
    finally:
        shutil.rmtree(ray_folder, ignore_errors=True)
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else None
    left = processes_in_namespace(namespace) if namespace else []
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes of the Ray namespace outlived it"
    assert process.returncode == 0, err[-3000:]
    assert "Connected to Ray cluster" in out + err
    assert len(set(re.findall(r"\(_run_job pid=(\d+)", out + err))) >= 1  # in Ray workers

    assert_nested_and_finished(MlflowClient(tracking_uri), "logistic-2v3", ["0", "0.01", "0.1"])
    assert not (tmp_path / "workers.db").exists()
