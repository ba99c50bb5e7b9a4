"""Checks on where a search will write, made before Ray starts.

A search that cannot write its experiment folder otherwise fails minutes later, inside
Ray, as a traceback from a trial or from Tune's own state files; a full disk fails
mid-trial while a checkpoint is being copied. Both are cheaper to refuse up front.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Free space a search needs at the start. A mobilenet_v3_small checkpoint is about 6 MB and
# Tune keeps every reported one (each stage's best so far), so even a --smoke search of two
# trials writes about 40 MB with its study, logs and ONNX export.
MIN_FREE_BYTES = 64 * 2**20


def existing_ancestor(path: Path) -> Path:
    """`path` itself or its deepest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(folder: str | os.PathLike, min_free: int | None = None) -> str | None:
    """Why `folder` (created on demand) cannot take a search's output, or None if it can.

    Writes and removes one temporary file in the deepest existing ancestor: permission
    bits alone do not tell (root ignores them; a read-only mount does not show in them).
    Creates nothing that stays.
    """
    base = existing_ancestor(Path(folder))
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".fer-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"cannot write in {base} ({err.strerror or err})"
    free = shutil.disk_usage(base).free
    min_free = MIN_FREE_BYTES if min_free is None else min_free
    if free < min_free:
        return (f"only {free / 2**20:.1f} MB free in {base}; a search needs at least "
                f"{min_free / 2**20:.0f} MB for checkpoints, logs and the export")
    return None


def storage_failure(experiment: str, err: BaseException) -> str:
    """One line for a search that stopped on a storage error mid-run (a full disk shows up
    inside Tune as OSError, or as EOFError / UnpicklingError when Tune reads back a file it
    could only write in part)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    line = f"the search stopped on a storage error in {experiment}: {type(err).__name__}: {first}"
    if "://" not in experiment:
        base = existing_ancestor(Path(experiment))
        line += f" ({shutil.disk_usage(base).free / 2**20:.1f} MB free in {base})"
    return line + "; fix the storage, then continue with --resume"


class Held:
    """What `held_stderr` held back (filled when the block ends, however it ends)."""

    text: str = ""


@contextlib.contextmanager
def held_stderr() -> Iterator[Held]:
    """Hold back everything written to file descriptor 2 (Python's and Ray's C++ logging
    alike) while the block runs; replay it when the block succeeds, drop it when it raises
    (the caller can still read it from the yielded `Held`).

    Joining a cluster with a wrong token makes Ray's GCS client log one warning a second
    for 20 s before ray.init gives up; the caller's one-line error says what they meant."""
    sys.stderr.flush()
    saved, result, succeeded = os.dup(2), Held(), False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield result
            succeeded = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            result.text = held.read().decode(errors="replace")
    if succeeded and result.text:
        sys.stderr.write(result.text)
        sys.stderr.flush()
