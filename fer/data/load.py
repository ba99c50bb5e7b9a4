"""The entry point: a `--data` path (or nothing) becomes an in-memory `Dataset`, decoded
once and then read from the cache."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from fer.data.cache import cache_key, default_cache_dir, read_cache, save_cache
from fer.data.layouts import LAYOUTS, decode_fer_csv, detect_layout, source_files
from fer.data.types import Dataset, Split
from fer.io import DigestMemo

EMBEDDED_SEED = 0


def embedded_key() -> tuple[list[bytes], list[Path]]:
    """The embedded data is keyed by the generator's source and numpy's version, not by the
    generated CSV, so a cache hit skips generating it too."""
    origin = importlib.util.find_spec("fer.synth").origin  # type: ignore[union-attr]
    return [b"embedded", b"seed %d" % EMBEDDED_SEED, np.__version__.encode()], [Path(origin)]


def decode_embedded() -> tuple[list[str], dict[str, Split]]:
    from fer import synth  # lazy: generating is only needed on a cache miss

    with tempfile.TemporaryDirectory(prefix="fer-demo-") as tmp:
        return decode_fer_csv(Path(synth.write_csv(tmp, seed=EMBEDDED_SEED)))


def warn_missing_classes(classes: list[str], splits: dict[str, Split], source: str) -> None:
    train = set(np.unique(splits["train"].labels).tolist())
    for name in ("val", "test"):
        for k in sorted(set(np.unique(splits[name].labels).tolist()) - train):
            warnings.warn(f"{source}: class {classes[k]!r} ({k}) is present in {name} but absent "
                          f"from train", stacklevel=3)


def describe_source(path: str | os.PathLike | None, load_size: int, memo: DigestMemo
                    ) -> tuple[str, str, str, Callable[[], tuple[list[str], dict[str, Split]]]]:
    """(source, layout, cache key, decode function) of a `--data` path or the embedded data."""
    if path is None:
        parts, files = embedded_key()
        return (f"embedded demo data (seed {EMBEDDED_SEED})", "embedded", cache_key(parts, files, memo=memo),
                decode_embedded)
    root = Path(path)
    layout = detect_layout(root)
    # load_size only changes DR images; FER keys ignore it, so one entry serves every size
    size = b"size %d" % load_size if layout == "dr_folder" else b""
    key = cache_key([layout.encode(), size], source_files(root, layout), root if root.is_dir() else None, memo)
    return os.fspath(path), layout, key, lambda: LAYOUTS[layout](root, load_size)


def load_dataset(path: str | os.PathLike | None = None, *, load_size: int = 128,
                 cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a FER2013 CSV, a split folder, a DR folder, or (None) the embedded demo data.

    Decoded once, then read from the cache in `cache_dir` ($FER_CACHE_DIR or
    ~/.cache/fer-search); a change to any source file gives a new key.
    """
    if load_size < 1:
        raise ValueError(f"load_size must be a positive integer, got {load_size}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    memo = DigestMemo(cache)
    source, layout, key, decode = describe_source(path, load_size, memo)
    file = cache / f"{layout}-{key[:32]}.npz"
    cached = read_cache(file) if file.is_file() else None
    if cached is None:
        cached = decode()  # raises DataError before anything is written
        try:
            save_cache(file, *cached)
        except OSError as e:  # a read-only or full disk costs speed, not the run
            warnings.warn(f"could not write the data cache {file}: {e}", stacklevel=2)
    try:
        memo.save()
    except OSError:
        pass  # the memo only saves re-hashing time
    classes, splits = cached
    warn_missing_classes(classes, splits, source)
    return Dataset(classes=classes, splits=splits, source=source)
