"""Write a file under a temporary name in its directory and rename it into place when done."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".part"


def temp_path(path: Path) -> Path:
    """A fresh hidden name next to `path` (same filesystem, so the rename is atomic)."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temporary files that a killed process left in `directory`."""
    for stale in directory.glob(f".*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file for writing; on success rename it to `path`.

    If the block raises (or the process is interrupted), the temporary file is removed and
    `path` keeps its previous content, or stays absent: never half a file.
    """
    tmp = temp_path(path)
    try:
        # "x" creates with the default mode (0666 minus the umask), unlike mkstemp's 0600.
        with tmp.open("xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
