"""Turn a composed Hydra config into checked run settings: validation, params, names, store.

This is the one place that knows the config schema (conf/config.yaml): it refuses a config
that makes no sense with one clear line (:class:`ConfigError`), flattens the resolved config
into MLflow params, and names tasks, runs and the default tracking store.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from src.training import Schedule, TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("logistic", "softmax")
SCHEDULES = ("exponential", "constant")
SCHEDULE_UNITS = ("epoch", "step")
# What a sweep may choose its best job by (``optimized_metric``, the job's ``final_<name>``
# metric), and which way: a search optimises it, every sweep registers its best job's model.
OPTIMIZED_METRICS = {"val_loss": "minimize", "val_accuracy": "maximize"}

# Every key a job config may hold (after `hydra` is stripped), with its kind. A key outside
# this map, e.g. from `+foo=1`, is refused like any other unknown key.
SCHEMA: dict[str, str] = {
    "lambda": "number",
    "lr": "number",
    "seed": "int",
    "batch_size": "int",
    "epochs": "int",
    "evals_per_epoch": "int",
    "schedule.name": "str",
    "schedule.decay": "number",
    "schedule.per": "str",
    "early_stopping.enabled": "bool",
    "early_stopping.patience": "int",
    "limit_train": "int?",
    "model.name": "str",
    "model.digits": "list",
    "data.dir": "str",
    "mlflow.tracking_uri": "str?",
    "mlflow.experiment_name": "str?",
    "optimized_metric": "str",
    "register": "bool",
}

# Keys that say where things live rather than what is trained: kept out of MLflow params
# (absolute paths and store addresses differ between machines and may hold secrets).
NOT_PARAMS = ("data.dir", "mlflow.tracking_uri", "mlflow.experiment_name")
# Overrides kept out of the `overrides` tag for the same reason (and Hydra's own settings).
NOT_IN_TAGS = ("data.dir", "mlflow.tracking_uri")


def overrides_tag(overrides: Sequence[str]) -> str:
    """The command-line overrides as the runs' ``overrides`` tag: without local paths, store
    addresses (which may hold credentials) and Hydra's own settings."""
    kept = [o for o in overrides
            if o.lstrip("+~").partition("=")[0] not in NOT_IN_TAGS
            and not o.lstrip("+~").startswith("hydra")]
    return " ".join(kept) or "(none)"


def _register_resolvers() -> None:
    # `${root:}` is the project root, so paths in conf/ are absolute whatever the cwd.
    if not OmegaConf.has_resolver("root"):
        OmegaConf.register_new_resolver("root", lambda: str(PROJECT_ROOT))
    # `${metric_direction:${optimized_metric}}`: the Optuna sweeper's direction
    if not OmegaConf.has_resolver("metric_direction"):
        OmegaConf.register_new_resolver("metric_direction", metric_direction)


def metric_direction(name: str) -> str:
    """``minimize`` for ``val_loss``, ``maximize`` for ``val_accuracy`` (an unknown name is
    refused by :func:`validate`)."""
    return OPTIMIZED_METRICS.get(str(name), "minimize")


_register_resolvers()


class ConfigError(ValueError):
    """A config that makes no sense; the message is one user-facing line."""


@dataclass(frozen=True)
class Settings:
    """Everything one training job needs, checked.

    Attributes
    ----------
    model : str
        "logistic" or "softmax".
    digits : tuple of int or None
        (positive, negative) for the logistic model, None for softmax.
    train : TrainConfig
        The training loop's settings.
    limit_train : int or None
        Use only the first n training images.
    data_dir : Path
        Folder holding the processed ``mnist.npz``.
    tracking_uri : str
        Where MLflow stores runs.
    experiment_name : str
        MLflow experiment of the run.
    params : dict of str to str
        The flattened, resolved config as MLflow params.
    optimized_metric : str
        What a sweep chooses its best job by: ``val_loss`` (lowest) or ``val_accuracy``.
    register : bool
        Register a single run's model in the Model Registry (a sweep registers its best).
    """

    model: str
    digits: tuple[int, int] | None
    train: TrainConfig
    limit_train: int | None
    data_dir: Path
    tracking_uri: str
    experiment_name: str
    params: dict[str, str]
    optimized_metric: str = "val_loss"
    register: bool = False

    @property
    def task(self) -> str:
        """The task name, e.g. ``logistic-2v3`` or ``softmax``."""
        return task_name(self.model, self.digits)

    @property
    def labels(self) -> list[int]:
        """The digits the model predicts, in the order of its classes (label 0 first)."""
        if self.digits is None:
            return list(range(10))
        positive, negative = self.digits
        return [negative, positive]


def task_name(model: str, digits: tuple[int, int] | None) -> str:
    """Name a task: ``logistic-2v3`` for the digits (2, 3), ``softmax`` for ten digits."""
    if model == "logistic" and digits is not None:
        return f"logistic-{digits[0]}v{digits[1]}"
    return model


def to_container(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved job config as plain Python data, without Hydra's own node."""
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True)
    else:
        data = dict(cfg)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data


def config_yaml(cfg: DictConfig | Mapping[str, Any]) -> str:
    """The resolved job config as YAML (the run's ``config/config.yaml`` artifact), without
    the tracking URI, which may hold credentials."""
    data = to_container(cfg)
    if isinstance(data.get("mlflow"), dict):
        data["mlflow"].pop("tracking_uri", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: ``{"schedule": {"decay": 0.1}}`` gives
    ``{"schedule.decay": 0.1}``. Lists stay values. The one place that flattens config."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, DictConfig)):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, (list, ListConfig)) else value
    return flat


def config_groups() -> list[str]:
    """The config groups of conf/ a command line may choose from (``model``, ``experiment``...)."""
    conf = PROJECT_ROOT / "conf"
    return sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name != "hydra")


def did_you_mean(key: str, known: Sequence[str] | None = None) -> str | None:
    """The known key a mistyped ``key`` most likely meant, or None: ``lamda`` -> ``lambda``,
    ``patience`` -> ``early_stopping.patience``, ``schedule.decy`` -> ``schedule.decay``.

    ``known`` defaults to the keys of :data:`SCHEMA` and the config groups.
    """
    keys = list(known) if known is not None else [*SCHEMA, *config_groups()]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k != key and k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:  # the right name in the wrong place
        return same_leaf[0]
    parent = key.rpartition(".")[0]

    def likeness(k: str) -> float:  # beside a sibling, only the last part counts
        if k.rpartition(".")[0] == parent:
            return difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio()
        return difflib.SequenceMatcher(None, key, k).ratio()

    best = max(keys, key=likeness, default=None)
    if best is not None and likeness(best) >= 0.75:
        return best
    leaves: dict[str, str] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
    return leaves[close[0]] if close else None


def unknown_key(key: str, known: Sequence[str] | None = None) -> str:
    """The one line refusing an unknown key, with the key it most likely meant if any:
    ``unknown key 'lamda'; did you mean 'lambda'?``."""
    meant = did_you_mean(key, known)
    if meant is not None:
        return f"unknown key '{key}'; did you mean '{meant}'?"
    return f"unknown key '{key}' (the keys are listed by `python -m src.train --cfg job`)"


def _fail(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key}={_show(value)} is refused: {why}")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _check_kind(key: str, value: Any, kind: str) -> None:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        if optional:
            return
        raise _fail(key, value, "a value is required")
    ok = {
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        article = "an" if kind == "int" else "a"
        raise _fail(key, value, f"expected {article} {'integer' if kind == 'int' else kind}")
    if kind == "number" and not math.isfinite(value):
        raise _fail(key, value, "expected a finite number")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the SQLite store at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def validate(cfg: DictConfig | Mapping[str, Any]) -> Settings:
    """Check a composed config and turn it into :class:`Settings`.

    Parameters
    ----------
    cfg : DictConfig or mapping
        The job config as Hydra composes it (the ``hydra`` node, if any, is ignored).

    Returns
    -------
    Settings
        The checked settings.

    Raises
    ------
    ConfigError
        One line naming the first offending key and its value.
    """
    flat = flatten(to_container(cfg))
    for key in flat:
        if key not in SCHEMA:
            raise ConfigError(unknown_key(key))
    for key, kind in SCHEMA.items():
        if key == "model.digits":
            continue  # only the logistic model has digits; checked below
        _check_kind(key, flat.get(key), kind)

    model = flat["model.name"]
    if model not in MODELS:
        raise _fail("model.name", model, f"unknown model (choose from {', '.join(MODELS)})")
    digits: tuple[int, int] | None = None
    if model == "logistic":
        raw = flat.get("model.digits")
        if (
            not isinstance(raw, list)
            or len(raw) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw)
        ):
            raise _fail("model.digits", raw, "expected two digits, e.g. [2, 3]")
        if not all(0 <= d <= 9 for d in raw):
            raise _fail("model.digits", raw, "digits must lie in 0..9")
        if raw[0] == raw[1]:
            raise _fail("model.digits", raw, "the two digits must differ")
        digits = (raw[0], raw[1])
    elif "model.digits" in flat:
        raise ConfigError("unknown key 'model.digits' (only the logistic model has digits)")

    checks = [
        ("lambda", flat["lambda"] >= 0, "the L2 strength must be >= 0"),
        ("lr", flat["lr"] > 0, "the learning rate must be > 0"),
        ("batch_size", flat["batch_size"] >= 1, "the batch size must be >= 1"),
        ("epochs", flat["epochs"] >= 1, "at least one epoch is needed"),
        ("evals_per_epoch", flat["evals_per_epoch"] >= 1, "at least one evaluation per epoch"),
        ("seed", flat["seed"] >= 0, "the seed must be >= 0"),
        ("schedule.name", flat["schedule.name"] in SCHEDULES, f"choose from {SCHEDULES}"),
        ("schedule.per", flat["schedule.per"] in SCHEDULE_UNITS, f"choose from {SCHEDULE_UNITS}"),
        ("schedule.decay", flat["schedule.decay"] >= 0, "the decay must be >= 0"),
        ("early_stopping.patience", flat["early_stopping.patience"] >= 1, "must be >= 1"),
        (
            "limit_train",
            flat["limit_train"] is None or flat["limit_train"] >= 1,
            "the training-set limit must be >= 1 (or null for all)",
        ),
        (
            "optimized_metric",
            flat["optimized_metric"] in OPTIMIZED_METRICS,
            f"choose from {', '.join(OPTIMIZED_METRICS)}",
        ),
    ]
    for key, ok, why in checks:
        if not ok:
            raise _fail(key, flat[key], why)

    train = TrainConfig(
        lr=float(flat["lr"]),
        l2=float(flat["lambda"]),
        batch_size=flat["batch_size"],
        epochs=flat["epochs"],
        schedule=Schedule(
            name=flat["schedule.name"],
            decay=float(flat["schedule.decay"]),
            per=flat["schedule.per"],
        ),
        evals_per_epoch=flat["evals_per_epoch"],
        early_stopping=flat["early_stopping.enabled"],
        patience=flat["early_stopping.patience"],
        seed=flat["seed"],
    )
    params = {
        key: _show(value)
        for key, value in flat.items()
        if key not in NOT_PARAMS
    }
    tracking_uri = flat["mlflow.tracking_uri"] or default_tracking_uri()
    experiment_name = flat["mlflow.experiment_name"] or task_name(model, digits)
    return Settings(
        model=model,
        digits=digits,
        train=train,
        limit_train=flat["limit_train"],
        data_dir=Path(flat["data.dir"]),
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        params=params,
        optimized_metric=flat["optimized_metric"],
        register=flat["register"],
    )


# Overrides that say where things live or what the run name already says.
_NOT_IN_RUN_NAME = (
    "lambda", "lr", "model", "model.name", "experiment", "hparams_search", "data.dir",
)


def run_name(
    settings: Settings, overrides: Sequence[str] = (), swept: Sequence[str] = ()
) -> str:
    """Name a run by what differs: ``softmax lambda=0.01 lr=0.5`` plus any other override
    given on the command line (``seed=1``, ``epochs=5`` ...).

    A sweep's job is named by what the sweep varies alone, ``swept`` (its keys):
    ``lambda=0.01 lr=0.5``; what all its jobs share is in the parent's name. A swept model
    shows as its task (``softmax``), a key that is no param as the job's override of it.
    """
    if swept:
        given = dict(o.lstrip("+~").partition("=")[::2] for o in overrides)
        named = []
        for key in dict.fromkeys(k.lstrip("+~") for k in swept):
            if key in ("model", "model.name", "model.digits"):
                named.append(settings.task)
            elif key in settings.params:
                named.append(f"{key}={settings.params[key]}")
            elif key in given:
                named.append(f"{key}={given[key]}")
        if named:
            return " ".join(dict.fromkeys(named))
    parts = [settings.task, f"lambda={settings.params['lambda']}", f"lr={settings.params['lr']}"]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in _NOT_IN_RUN_NAME or key.startswith(("hydra", "mlflow", "data.")):
            continue
        # the resolved value, spelled as in the params (a sweep writes `false` as `False`)
        parts.append(f"{key}={settings.params.get(key, value)}")
    return " ".join(parts)
