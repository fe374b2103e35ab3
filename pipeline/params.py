"""Read one section of params.yaml for a pipeline stage, with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or holds a bad value; the message is one line."""


def load_section(path: Path, section: str) -> dict[str, Any]:
    """Return the mapping under `section` in the YAML file at `path`.

    Raises
    ------
    ParamsError
        When the file is missing, is not valid YAML, or the section is not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ParamsError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise ParamsError(f"{path}: not valid YAML: {first_line}") from None
    if not isinstance(document, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    values = document.get(section)
    if not isinstance(values, dict):
        raise ParamsError(f"{path}: no `{section}:` section (a mapping) found")
    return values
