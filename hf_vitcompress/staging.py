"""Folders written whole or not at all: what every command that saves (``compress``, ``export``, ...) writes into."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_directory(output: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside ``output``; on success it replaces ``output`` (one rename), on any error it
    is removed and ``output`` stays as it was, so a failed run leaves nothing half-written and loses nothing.

    The staging folder is made private by ``mkdtemp``; it gets the permissions of any new folder (the umask's)
    before it takes ``output``'s place."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        yield staging
        staging.chmod(0o777 & ~_umask())
        previous = None
        if output.exists():  # set aside first, removed once the new folder is in place: never neither
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}-old-", dir=output.parent))
            output.rename(previous / output.name)
        staging.rename(output)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
