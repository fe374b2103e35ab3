"""Search and select: ``hparams_search=optuna`` as a user runs it (real subprocesses on tiny
data), the best model of every sweep in the Model Registry, its champion served."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from src import sweep
from tests.conftest import all_artifacts, copy_store, run_train
from tests.test_serving import post, serve

TASK = "logistic-2v3"  # the default model, its experiment and its registered model
LR_RANGE, LAMBDA_RANGE = (0.05, 2.0), (1e-6, 0.1)  # conf/hparams_search/optuna.yaml


@dataclass
class Done:
    """A command run against a store."""

    uri: str
    client: MlflowClient
    stderr: str
    returncode: int
    output: str  # stdout (Hydra's log) and stderr


def run(args: list[str], uri: str, workdir: Path) -> Done:
    done = run_train(args, uri, workdir)
    return Done(uri, MlflowClient(uri), done.stderr, done.returncode,
                done.stdout + done.stderr)


def parents_and_children(client: MlflowClient) -> tuple[list, list]:
    (experiment,) = [e for e in client.search_experiments() if e.name == TASK]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, sorted(children, key=lambda r: r.info.start_time)


def search_args(tiny_data: Path, *more: str) -> list[str]:
    return ["-m", "hparams_search=optuna", f"data.dir={tiny_data}", "epochs=2", *more]


@pytest.fixture(scope="module")
def searched(
    tiny_data: Path, mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Done:
    """One search of three trials on tiny data, in its own store."""
    folder = tmp_path_factory.mktemp("search")
    uri = copy_store(mlflow_template, folder / "store")
    return run(search_args(tiny_data, "hydra.sweeper.n_trials=3"), uri, folder / "work")


def test_a_search_nests_its_trials_under_one_parent_that_holds_the_best(
    searched: Done, tmp_path: Path
) -> None:
    assert searched.returncode == 0, searched.stderr
    client = searched.client
    (parent,), children = parents_and_children(client)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith(f"{TASK} search ")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    # each trial samples lr and lambda on their log ranges; no two trials alike
    lrs = [float(c.data.params["lr"]) for c in children]
    lambdas = [float(c.data.params["lambda"]) for c in children]
    assert all(LR_RANGE[0] <= v <= LR_RANGE[1] for v in lrs) and len(set(lrs)) == 3
    assert all(LAMBDA_RANGE[0] <= v <= LAMBDA_RANGE[1] for v in lambdas)
    assert {c.data.params["optimized_metric"] for c in children} == {"val_loss"}

    # the best trial: the lowest validation loss, its params and metrics on the parent
    best = min(children, key=lambda c: c.data.metrics["final_val_loss"])
    m = parent.data.metrics
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert m["best_lr"] == pytest.approx(float(best.data.params["lr"]))
    assert m["best_lambda"] == pytest.approx(float(best.data.params["lambda"]))
    for key in ("val_loss", "val_accuracy", "test_accuracy"):
        assert m[f"best_{key}"] == pytest.approx(best.data.metrics[f"final_{key}"])
    files = all_artifacts(client, parent.info.run_id)
    assert {"plots/optimization_history.png", "plots/search_space.png",
            "tables/sweep_summary.csv", "plots/sweep_comparison.png"} <= files
    table = client.download_artifacts(parent.info.run_id, "tables/sweep_summary.csv",
                                      str(tmp_path))
    rows = list(csv.DictReader(Path(table).open()))
    assert [r["run_id"] for r in rows] == [c.info.run_id for c in children]
    assert {r["lr"] for r in rows} == {c.data.params["lr"] for c in children}
    assert "best job:" in searched.stderr and "(lowest validation loss)" in searched.stderr

    # the best trial's model is the first version of the task's model, and its champion
    champion = client.get_model_version_by_alias(TASK, "champion")
    assert str(champion.version) == "1" and champion.run_id == best.info.run_id
    assert champion.tags["parent_run_id"] == parent.info.run_id
    assert float(champion.tags["val_accuracy"]) == best.data.metrics["final_val_accuracy"]
    assert float(champion.tags["test_accuracy"]) == best.data.metrics["final_test_accuracy"]
    assert parent.data.tags["registered_model"] == f"{TASK}/1"


def test_the_configured_metric_sets_the_direction_and_the_best_job(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    for metric, direction in (("val_loss", "minimize"), ("val_accuracy", "maximize")):
        done = run_train(["--cfg", "all", "--resolve", "-p", "hydra.sweeper.direction",
                          "hparams_search=optuna", f"optimized_metric={metric}"],
                         tracking_uri, tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == direction
    # a sweep's best job follows the metric too: the highest accuracy, the lowest loss
    runs = [SimpleNamespace(info=SimpleNamespace(status="FINISHED"),
                            data=SimpleNamespace(metrics={"final_val_accuracy": a,
                                                          "final_val_loss": loss}))
            for a, loss in ((0.9, 0.2), (0.95, 0.3), (0.8, 0.1))]
    assert sweep.best_child(runs, "final_val_accuracy", minimize=False) is runs[1]
    assert sweep.best_child(runs, "final_val_loss") is runs[2]
    done = run_train(["-m", "hparams_search=optuna", "optimized_metric=test_accuracy"],
                     tracking_uri, tmp_path)
    assert done.returncode == 2
    assert "optimized_metric=test_accuracy is refused" in done.stderr.strip().splitlines()[-1]


def test_a_refused_trial_ends_failed_and_the_search_goes_on(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    # the search space can sample a refused lambda: the seeded sampler does so in trial 0
    done = run(search_args(tiny_data, "hydra.sweeper.n_trials=3", "lambda=choice(-1,0.01)",
                           "epochs=1"), tracking_uri, tmp_path)
    assert done.returncode == 1, done.stderr
    (parent,), children = parents_and_children(done.client)
    assert len(children) == 3
    refused = [c for c in children if c.info.status == "FAILED"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert refused and finished  # the search went on after the refusal
    for run_ in refused:
        assert run_.data.tags["error"] == "lambda=-1 is refused: the L2 strength must be >= 0"
        assert run_.data.params["lambda"] == "-1"  # the sampled values are kept
    assert {c.data.params["lambda"] for c in finished} == {"0.01"}
    assert parent.info.status == "FAILED"
    assert parent.data.tags["error"].startswith(f"{len(refused)} of 3 jobs failed")
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in finished}
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {len(refused)} of 3 jobs failed (first: lambda=-1 is refused")


def test_a_search_whose_every_trial_fails_still_closes_its_parent(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    done = run(search_args(tiny_data, "hydra.sweeper.n_trials=2", "lambda=choice(-1)"),
               tracking_uri, tmp_path)
    assert done.returncode == 1, done.stderr
    (parent,), children = parents_and_children(done.client)
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert parent.info.status == "FAILED" and parent.data.tags["error"].startswith("2 of 2")
    assert "Traceback" not in done.stderr
    assert done.client.search_registered_models() == []  # no best job, nothing registered


def test_a_refused_fixed_value_stops_the_search_before_any_run(
    tiny_data: Path, tracking_uri: str, tmp_path: Path
) -> None:
    done = run(search_args(tiny_data, "epochs=0"), tracking_uri, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: epochs=0 is refused")
    assert not [e for e in done.client.search_experiments() if e.name == TASK]


# --- the Model Registry over several sweeps, and its champion served -----------------------


@pytest.fixture(scope="module")
def registry_store(
    tiny_data: Path, mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Done, Done, Done]:
    """A store after a poor grid sweep (one training image), a good search, and a poor single
    run with ``register=true``."""
    folder = tmp_path_factory.mktemp("registry")
    uri = copy_store(mlflow_template, folder / "store")
    poor = [f"data.dir={tiny_data}", "limit_train=1", "epochs=1"]
    grid = run(["-m", "lr=0.5", *poor], uri, folder / "grid")
    search = run(search_args(tiny_data, "hydra.sweeper.n_trials=2"), uri, folder / "search")
    single = run(["register=true", *poor], uri, folder / "single")
    return grid, search, single


def test_every_sweep_registers_its_best_and_the_champion_moves_only_on_improvement(
    registry_store: tuple[Done, Done, Done],
) -> None:
    grid, search, single = registry_store
    for done in registry_store:
        assert done.returncode == 0, done.stderr
    client = grid.client
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{TASK}'")}
    assert sorted(versions) == ["1", "2", "3"]
    accuracy = {k: float(v.tags["val_accuracy"]) for k, v in versions.items()}
    assert accuracy["2"] > accuracy["1"] and accuracy["3"] <= accuracy["2"]
    assert "registered model logistic-2v3 version 1" in grid.stderr
    assert "the first champion" in grid.stderr
    assert "version 2" in search.stderr and "the new champion, after version 1" in search.stderr
    assert "version 3" in single.output  # a single run says so in its log
    assert "not the champion, which stays version 2" in single.output
    assert str(client.get_model_version_by_alias(TASK, "champion").version) == "2"
    # each version knows its run, its test accuracy and (for a sweep) its parent run
    parents, _ = parents_and_children(client)
    assert {versions[v].tags["parent_run_id"] for v in ("1", "2")} == {
        p.info.run_id for p in parents
    }
    assert "parent_run_id" not in versions["3"].tags and "test_accuracy" in versions["3"].tags
    (single_run,) = [r for r in client.search_runs(
        [parents[0].info.experiment_id], filter_string="params.register = 'true'")]
    assert versions["3"].run_id == single_run.info.run_id


def test_the_champion_is_served_and_answers_integer_pixels(
    registry_store: tuple[Done, Done, Done], tiny_data: Path, tmp_path: Path
) -> None:
    uri = registry_store[0].uri
    with np.load(tiny_data / "mnist.npz") as data:
        images, labels = data["test_images"], data["test_labels"]
    keep = np.isin(labels, [2, 3])
    pixels = images[keep].astype(np.int64)  # integer pixels 0..255, as a user sends them
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        local = mlflow.pyfunc.load_model(f"models:/{TASK}@champion").predict(pixels)
    with serve(f"models:/{TASK}@champion", uri, tmp_path) as base:
        status, answer = post(f"{base}/invocations", {"inputs": pixels.tolist()})
    assert status == 200, answer
    assert answer["predictions"] == local.tolist()
    assert np.mean(np.array(answer["predictions"]) == labels[keep]) > 0.9
