"""Plain file I/O under everything else: atomic writes, content digests, plain data.

A leaf (no torch, no other fer module): the data cache, checkpoints, the demo-data
generator and the reports all write through `atomic_write`, so a reader never sees a
half-written file, even when a trial is killed mid-save.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# A digest is reused from the memo only while the file's identity and ctime are unchanged and
# the file had been quiet this long when it was hashed: the "racy git" rule, so a write in the
# same timestamp tick as the hashing can never keep a stale digest (the kernel sets ctime on
# every write and no user can set it).
DIGEST_SETTLE_S = 2.0
DIGEST_MEMO = "digests.json"


def atomic_write(path: Path, write: Callable) -> None:
    """Write via a temp file in the same folder and os.replace: never a half-written `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache folder may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: Path) -> bytes:
    """sha256 of a file's content, read in blocks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.digest()


class DigestMemo:
    """sha256 digests of large source files, remembered by (device, inode, size, mtime, ctime)
    in the cache folder, so a cached reload of a 300 MB CSV does not re-read it."""

    def __init__(self, folder: Path):
        self.path = folder / DIGEST_MEMO
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(self, file: Path) -> bytes:
        st = file.stat()
        stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        name = str(file.resolve())
        entry = self.entries.get(name)
        if entry is not None and entry[:5] == stamp:
            return bytes.fromhex(entry[5])
        digest = file_digest(file)
        if st.st_size >= 1 << 16 and time.time() - st.st_ctime >= DIGEST_SETTLE_S:
            self.entries[name] = stamp + [digest.hex()]
            self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            atomic_write(self.path, lambda f: f.write(json.dumps(self.entries).encode()))


def to_plain(value: Any) -> Any:
    """numpy scalars/arrays -> Python numbers/lists (weights_only loading and JSON accept them)."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
