"""The MLflow Model Registry: a run's logged model as a new version, and the ``champion``.

At the end of every sweep its best job's model (and a single run's, with ``register=true``)
becomes a new version of the registered model named after the experiment (``logistic-2v3``,
``softmax``, ...), tagged with its validation and test accuracy and the sweep's parent run.
The alias ``champion`` moves to the new version only when its validation accuracy beats the
current champion's; otherwise the version is kept without it, and the log says so. Serve the
champion with ``mlflow models serve -m "models:/<name>@champion" --env-manager local``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"  # the alias of the version to serve
MODEL_PATH = "model"  # where a run logs its model (src/tracking.py's log_model)


@dataclass(frozen=True)
class Registered:
    """What :func:`register_run` did."""

    name: str
    version: str
    val_accuracy: float
    champion: bool  # the alias points at this version now
    previous: str | None = None  # the champion before, if any
    previous_accuracy: float | None = None

    def line(self) -> str:
        """One line for the log and the sweep's summary."""
        head = (f"registered model {self.name} version {self.version} "
                f"(validation accuracy {self.val_accuracy:.4f})")
        if self.previous is None:
            return f"{head}: the first {CHAMPION}"
        before = f"version {self.previous} ({self.previous_accuracy:.4f})"
        if self.champion:
            return f"{head}: the new {CHAMPION}, after {before}"
        return f"{head}: not the {CHAMPION}, which stays {before}, as good or better"


def champion(client: MlflowClient, name: str) -> tuple[str, float] | None:
    """The champion's version and validation accuracy; None if the model has none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        # no such model; no such alias (MLflow says INVALID_PARAMETER_VALUE); else a store
        # that failed, which must not pass for "no champion"
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    # a version registered by hand, without the tag, is beaten by any version
    accuracy = float(version.tags.get("val_accuracy", "nan"))
    return version.version, accuracy if math.isfinite(accuracy) else -math.inf


def logged_model_id(client: MlflowClient, run_id: str) -> str:
    """The id of the model the run logged (the last one, if it logged several).

    Raises
    ------
    MlflowException
        The run logged no model.
    """
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    if not outputs:
        raise MlflowException(f"the run {run_id} has no logged model")
    return max(outputs, key=lambda output: output.step).model_id


def register_run(
    client: MlflowClient,
    run_id: str,
    name: str,
    val_accuracy: float,
    test_accuracy: float | None = None,
    parent_run_id: str | None = None,
) -> Registered:
    """Register the model of ``run_id`` as a new version of ``name``, its accuracies and
    the sweep's parent run as tags; move the alias ``champion`` to it if ``val_accuracy``
    beats the champion's (or there is no champion).

    Raises
    ------
    MlflowException
        The store refused (no model in the run, a store that failed).
    """
    val_accuracy = float(val_accuracy)
    tags = {"val_accuracy": repr(val_accuracy)}  # repr: compared exactly with the next one
    if test_accuracy is not None:
        tags["test_accuracy"] = repr(float(test_accuracy))
    if parent_run_id is not None:
        tags["parent_run_id"] = parent_run_id
    before = champion(client, name)
    model_id = logged_model_id(client, run_id)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # MLflow 3 keeps a logged model apart from the run's artifacts: its source is models:/<id>
    version = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
    )
    wins = before is None or val_accuracy > before[1]
    if wins:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    done = Registered(
        name=name,
        version=str(version.version),
        val_accuracy=val_accuracy,
        champion=wins,
        previous=None if before is None else str(before[0]),
        previous_accuracy=None if before is None else before[1],
    )
    return done
