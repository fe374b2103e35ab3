"""The Hydra config and its checks, in process with Hydra's compose API (no training).

Every option of every config group composes and passes validation; each refused value is
refused with one line naming the key and the value; params, names and the store address
come out as documented.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from src.config import (
    PROJECT_ROOT,
    ConfigError,
    config_yaml,
    default_tracking_uri,
    did_you_mean,
    flatten,
    run_name,
    task_name,
    unknown_key,
    validate,
)
from src.sweep import BASIC_SWEEPER, job_overrides

CONF = PROJECT_ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides: Sequence[str] = (), hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config", overrides=list(overrides), return_hydra_config=hydra
        )


def test_every_group_has_its_options() -> None:
    assert options("model") == ["logistic", "softmax"]
    assert options("data") == ["mnist"]


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in ("model", "data", "experiment") for o in options(g)],
)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = composed([f"{group}={option}"])
    settings = validate(cfg)
    assert settings.model in ("logistic", "softmax")
    assert settings.data_dir.is_absolute()


def test_the_default_config() -> None:
    cfg = composed()
    assert cfg["lambda"] == 0.0 and cfg.lr == 1.0 and cfg.model.name == "logistic"
    assert list(cfg.model.digits) == [2, 3]
    settings = validate(cfg)
    assert settings.task == "logistic-2v3" and settings.experiment_name == "logistic-2v3"
    assert settings.labels == [3, 2]  # class 0 is the negative digit, class 1 the positive
    assert settings.data_dir == PROJECT_ROOT / "data" / "processed"
    assert settings.train.l2 == 0.0 and settings.train.early_stopping is True
    assert settings.limit_train is None


def test_hydra_settings_keep_the_cwd_and_register_the_sweep_callback() -> None:
    cfg = composed(hydra=True)
    assert cfg.hydra.job.chdir is False
    assert Path(cfg.hydra.sweep.dir).is_absolute() and Path(cfg.hydra.run.dir).is_absolute()
    targets = [c._target_ for c in cfg.hydra.callbacks.values()]
    assert targets == ["src.sweep.SweepCallback"]


def test_softmax_names_its_task_and_has_ten_labels() -> None:
    settings = validate(composed(["model=softmax", "lambda=0.01"]))
    assert settings.task == "softmax" and settings.labels == list(range(10))
    assert run_name(settings, ["model=softmax", "lambda=0.01"]) == "softmax lambda=0.01 lr=1.0"
    assert "model.digits" not in settings.params


def test_run_names_say_what_differs() -> None:
    overrides = ["lambda=0.1", "seed=2", "data.dir=/x", "hydra.verbose=true", "model=logistic"]
    settings = validate(composed(["lambda=0.1", "seed=2", "model.digits=[4,9]"]))
    assert settings.task == "logistic-4v9"
    assert run_name(settings, overrides) == "logistic-4v9 lambda=0.1 lr=1.0 seed=2"


def test_a_sweep_job_is_named_by_what_the_sweep_varies() -> None:
    settings = validate(composed(["lambda=0.01", "lr=0.5", "epochs=3", "seed=1"]))
    job = ["lambda=0.01", "lr=0.5", "epochs=3", "seed=1"]
    assert run_name(settings, job, swept=["lambda", "lr"]) == "lambda=0.01 lr=0.5"
    assert run_name(settings, job, swept=["seed", "lambda"]) == "seed=1 lambda=0.01"
    softmax = validate(composed(["model=softmax", "lambda=0"]))
    assert run_name(softmax, ["model=softmax", "lambda=0"], swept=["model", "lambda"]) == (
        "softmax lambda=0"
    )
    # the value as the params spell it, an unknown swept key as the job's override of it
    flag = validate(composed(["early_stopping.enabled=False"]))
    assert run_name(flag, ["early_stopping.enabled=False"], swept=["early_stopping.enabled"]) \
        == "early_stopping.enabled=false"
    assert run_name(settings, ["experiment=task2_2"], swept=["experiment"]) == "experiment=task2_2"
    # nothing swept that the job knows: named as a single run
    assert run_name(settings, job, swept=["bogus"]) == run_name(settings, job)


def test_task_names() -> None:
    assert task_name("logistic", (2, 3)) == "logistic-2v3"
    assert task_name("softmax", None) == "softmax"


def test_params_are_the_flattened_config_without_paths_or_store() -> None:
    cfg = composed(["mlflow.tracking_uri=sqlite:////secret/place.db", "schedule.decay=0.2"])
    params = validate(cfg).params
    assert params["lambda"] == "0.0" and params["lr"] == "1.0"
    assert params["schedule.decay"] == "0.2" and params["early_stopping.enabled"] == "true"
    assert params["model.name"] == "logistic" and params["limit_train"] == "null"
    assert not any(key.startswith(("data.", "mlflow.")) for key in params)
    assert not any("/" in value for value in params.values())
    assert "secret" not in config_yaml(cfg) and "decay: 0.2" in config_yaml(cfg)


def test_flatten_joins_nested_keys_and_keeps_lists() -> None:
    nested = {"a": 1, "b": {"c": 2, "d": {"e": [1, 2]}}}
    assert flatten(nested) == {"a": 1, "b.c": 2, "b.d.e": [1, 2]}
    assert flatten(OmegaConf.create(nested)) == {"a": 1, "b.c": 2, "b.d.e": [1, 2]}


def test_tracking_uri_from_config_then_environment_then_the_project_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    assert validate(composed()).tracking_uri == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert validate(composed()).tracking_uri == "http://127.0.0.1:5000"
    chosen = validate(composed(["mlflow.tracking_uri=sqlite:////tmp/x.db"])).tracking_uri
    assert chosen == "sqlite:////tmp/x.db"


def test_the_config_can_name_the_experiment() -> None:
    settings = validate(composed(["mlflow.experiment_name=mine"]))
    assert settings.experiment_name == "mine" and settings.task == "logistic-2v3"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lambda=-0.5"], "lambda=-0.5 is refused"),
        (["lr=0"], "lr=0 is refused"),
        (["lr=-1"], "lr=-1 is refused"),
        (["lr=nan"], "lr=nan is refused"),
        (["batch_size=0"], "batch_size=0 is refused"),
        (["batch_size=1.5"], "batch_size=1.5 is refused"),
        (["epochs=0"], "epochs=0 is refused"),
        (["evals_per_epoch=0"], "evals_per_epoch=0 is refused"),
        (["model.name=perceptron"], "model.name=perceptron is refused"),
        (["model.digits=[3,3]"], "model.digits=[3, 3] is refused"),
        (["model.digits=[-1,3]"], "model.digits=[-1, 3] is refused"),
        (["model.digits=[2]"], "model.digits=[2] is refused"),
        (["limit_train=0"], "limit_train=0 is refused"),
        (["schedule.name=cosine"], "schedule.name=cosine is refused"),
        (["schedule.per=week"], "schedule.per=week is refused"),
        (["early_stopping.patience=0"], "early_stopping.patience=0 is refused"),
        (["seed=-1"], "seed=-1 is refused"),
        (["+foo=1"], "unknown key 'foo'"),
        (["+schedule.warmup=5"], "unknown key 'schedule.warmup'"),
        (["model=softmax", "+model.digits=[2,3]"], "unknown key 'model.digits'"),
    ],
)
def test_a_config_that_makes_no_sense_is_refused_in_one_line(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        validate(composed(overrides))
    message = str(refused.value)
    assert expected in message and "\n" not in message


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("lamda", "lambda"),
        ("lrr", "lr"),
        ("epoch", "epochs"),
        ("batchsize", "batch_size"),
        ("patience", "early_stopping.patience"),  # the right name in the wrong place
        ("decay", "schedule.decay"),
        ("schedule.decy", "schedule.decay"),
        ("early_stoping.enabled", "early_stopping.enabled"),
        ("experimnet", "experiment"),  # a config group
        ("foo", None),
        ("schedule.warmup", None),  # a sibling that is not like it is no suggestion
    ],
)
def test_a_typo_gets_a_suggestion(key: str, meant: str | None) -> None:
    assert did_you_mean(key) == meant
    line = unknown_key(key)
    if meant is None:
        assert line.startswith(f"unknown key '{key}' (the keys are listed by")
    else:
        assert line == f"unknown key '{key}'; did you mean '{meant}'?"


def test_validate_suggests_the_key_a_typo_meant() -> None:
    with open_dict(cfg := composed()):
        cfg.lamda = 0.1
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert str(refused.value) == "unknown key 'lamda'; did you mean 'lambda'?"


def test_validate_reads_a_plain_mapping_too() -> None:
    data = OmegaConf.to_container(composed(), resolve=True)
    assert isinstance(data, dict)
    data["lr"] = 0.1
    assert validate(data).train.lr == 0.1
    with open_dict(cfg := composed()):
        cfg.extra = 1
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        validate(cfg)


def test_a_sweep_expands_into_its_jobs_as_the_basic_sweeper_does() -> None:
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"_target_": BASIC_SWEEPER, "params": {"lambda": "0.01,0.001"}},
                "overrides": {"task": ["lr=0.1,0.5", "epochs=2"]},
            }
        }
    )
    jobs = job_overrides(config)
    assert len(jobs) == 4
    assert ["lambda=0.01", "lr=0.1", "epochs=2"] in jobs
    assert all("epochs=2" in job for job in jobs)


def test_another_sweeper_gets_its_fixed_overrides_checked() -> None:
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"_target_": "some.other.Sweeper"},
                "overrides": {"task": ["lr=0.1,0.5", "epochs=2"]},
            }
        }
    )
    assert job_overrides(config) == [["epochs=2"]]


def test_the_overrides_tag_holds_no_local_path_or_store_address() -> None:
    from src.config import overrides_tag

    given = ["lambda=0.1", "data.dir=/home/me/mnist", "mlflow.tracking_uri=http://u:p@h:5000",
             "+hydra.job.env_set.X=1", "epochs=3"]
    assert overrides_tag(given) == "lambda=0.1 epochs=3"
    assert overrides_tag(["data.dir=/x"]) == "(none)"
