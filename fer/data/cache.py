"""The decode cache: every source is decoded once and kept on disk as one uncompressed `.npz`
(written atomically), keyed by the sha256 of its files, `load_size` (DR only) and
`CACHE_VERSION`; a digest memo (`fer.io.DigestMemo`) spares re-hashing a settled 300 MB CSV
on every reload."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from fer.data.types import SPLITS, Split
from fer.io import DigestMemo, atomic_write, file_digest

CACHE_VERSION = 1  # bump when the decoded arrays change meaning; old cache files are then ignored


def cache_key(parts: Iterable[bytes], files: Iterable[Path], root: Path | None = None,
              memo: DigestMemo | None = None) -> str:
    """sha256 over the parts and every file's relative name and content."""
    key = hashlib.sha256(b"fer-search data cache v%d\0" % CACHE_VERSION)
    for part in parts:
        key.update(part + b"\0")
    for file in files:
        if root is not None:  # in a folder the names matter too; a single file is just content
            key.update(file.relative_to(root).as_posix().encode() + b"\0")
        key.update(memo.digest(file) if memo is not None else file_digest(file))
    return key.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("FER_CACHE_DIR") or Path.home() / ".cache" / "fer-search")


def save_cache(path: Path, classes: list[str], splits: dict[str, Split]) -> None:
    arrays = {"classes": np.array(classes, dtype=str)}
    for name, split in splits.items():
        arrays[f"{name}_images"] = split.images
        if split.labels is not None:
            arrays[f"{name}_labels"] = split.labels
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_cache(path: Path) -> tuple[list[str], dict[str, Split]] | None:
    """The cached arrays, or None when the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            classes = [str(c) for c in z["classes"]]
            splits = {}
            for name in SPLITS + ("unlabeled",):
                if f"{name}_images" in z.files:
                    labels = z[f"{name}_labels"] if f"{name}_labels" in z.files else None
                    splits[name] = Split(z[f"{name}_images"], labels)
        return classes, splits
    except (OSError, ValueError, KeyError, EOFError):
        return None
