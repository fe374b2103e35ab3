"""The rooms keep to themselves: no two modules import each other (directly or round a
longer circle), the numerics import no tracking, configuration or plotting library, and the
data stages import none of the learning code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

PACKAGES = ("src", "pipeline")


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function (absolute names)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            # `from src import tracking` imports the module src.tracking
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    """Module name -> the project modules it imports."""
    modules = {
        f"{package}.{path.stem}": path
        for package in PACKAGES
        for path in sorted((PROJECT_ROOT / package).glob("*.py"))
        if path.stem != "__init__"
    }
    return {name: imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_no_two_modules_import_each_other() -> None:
    graph = project_graph()
    assert len(graph) > 10  # the walk found the modules
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in trail:
                cycles.append([*trail[trail.index(target) :], target])
            elif len(trail) < len(graph):
                visit(target, [*trail, target])

    for module in graph:
        visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("module", ["models", "training"])
def test_the_numerics_import_no_tracking_config_or_plotting(module: str) -> None:
    names = imports(PROJECT_ROOT / "src" / f"{module}.py")
    roots = {name.split(".")[0] for name in names}
    assert roots.isdisjoint({"mlflow", "hydra", "omegaconf", "matplotlib"}), roots


def test_the_data_stages_import_no_learning_code() -> None:
    for path in (PROJECT_ROOT / "pipeline").glob("*.py"):
        assert not any(name.startswith("src") for name in imports(path)), path.name


def test_usage_statistics_stay_off_unless_the_user_turns_them_on() -> None:
    script = "import os, src.train; print(os.environ['MLFLOW_DISABLE_TELEMETRY'], " \
             "os.environ['RAY_USAGE_STATS_ENABLED'])"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.split() == ["true", "0"]
    env["MLFLOW_DISABLE_TELEMETRY"] = "false"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.split() == ["false", "0"]
