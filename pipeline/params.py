"""What every data stage shares: its params.yaml section, and its errors as one line."""

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


def error_line(error: Exception) -> str:
    """The one line a stage prints for an error it expects (an OSError names its file)."""
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return str(error)
