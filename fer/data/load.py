"""The entry point: a `--data` path (or nothing) becomes a `Dataset`, decoded once per node
into the cache and then memory-mapped from it (`open_mapped` reopens it in another process)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fer.data.cache import CacheWriteError, CacheWriter, cache_key, default_cache_dir, entry_lock, read_cache
from fer.data.layouts import LAYOUTS, MemorySink, Sink, decode_fer_csv, detect_layout, source_files
from fer.data.types import Dataset, DataError, Decoded, LoadOptions, MappedOrigin, Split
from fer.io import DigestMemo

EMBEDDED_SEED = 0


def embedded_key() -> tuple[list[bytes], list[Path]]:
    """The embedded data is keyed by the generator's source and numpy's version, not by the
    generated CSV, so a cache hit skips generating it too."""
    origin = importlib.util.find_spec("fer.data.synth").origin  # type: ignore[union-attr]
    return [b"embedded", b"seed %d" % EMBEDDED_SEED, np.__version__.encode()], [Path(origin)]


def decode_embedded(sink: Sink | None = None) -> Decoded:
    from fer.data import synth  # lazy: generating is only needed on a cache miss

    with tempfile.TemporaryDirectory(prefix="fer-demo-") as tmp:
        return Decoded(*decode_fer_csv(Path(synth.write_csv(tmp, seed=EMBEDDED_SEED))))


def warn_missing_classes(classes: list[str], splits: dict[str, Split], source: str) -> None:
    train = set(np.unique(splits["train"].labels).tolist())
    for name in ("val", "test"):
        if name not in splits:
            continue
        for k in sorted(set(np.unique(splits[name].labels).tolist()) - train):
            warnings.warn(f"{source}: class {classes[k]!r} ({k}) is present in {name} but absent "
                          f"from train", stacklevel=3)


def describe_source(path: str | os.PathLike | None, options: LoadOptions, memo: DigestMemo
                    ) -> tuple[str, str, str, Callable[[Sink | None], Decoded]]:
    """(source, layout, cache key, decode function) of a `--data` path or the embedded data."""
    if path is None:
        parts, files = embedded_key()
        return (f"embedded demo data (seed {EMBEDDED_SEED})", "embedded", cache_key(parts, files, memo=memo),
                decode_embedded)
    root = Path(path)
    layout = detect_layout(root)
    # the load options only change DR images; FER keys ignore them, so one entry serves every size
    size = options.key() if layout == "dr_folder" else b""
    key = cache_key([layout.encode(), size], source_files(root, layout), root if root.is_dir() else None, memo)
    return os.fspath(path), layout, key, lambda sink: LAYOUTS[layout](root, options, sink)


def decode_to_cache(entry: Path, decode: Callable[[Sink | None], Decoded]) -> tuple[Decoded, bool]:
    """(the decoded data, whether it is memory-mapped from `entry`). Decoded straight into the
    entry's files, which appear only once complete; when they cannot be written, decoded in
    memory with a warning (a read-only or full disk costs speed, not the run)."""
    with entry_lock(entry):
        cached = read_cache(entry)  # another process may have built it while we waited
        if cached is not None:
            return cached, True
        if entry.exists():  # unreadable (damaged, or cut short by a crash): built again
            shutil.rmtree(entry, ignore_errors=True)
        try:
            writer = CacheWriter(entry)
        except CacheWriteError as e:
            warnings.warn(str(e), stacklevel=3)
            return decode(MemorySink()), False
        try:
            decoded = decode(writer)  # a DataError here leaves nothing behind
            writer.commit(decoded)
        except CacheWriteError as e:
            writer.discard()
            warnings.warn(str(e), stacklevel=3)
            return decode(MemorySink()), False
        except BaseException:  # bad data, Ctrl-C: the temporary folder goes, nothing is trusted later
            writer.discard()
            raise
    reopened = read_cache(entry)  # read-only maps of the finished files
    if reopened is None:
        raise CacheWriteError(f"the data cache {entry} was written but cannot be read back")
    return reopened, True


def check_skipped(decoded: Decoded, options: LoadOptions, source: str) -> None:
    """A cached entry built with skip_bad still fails a load without it, as decoding would."""
    if decoded.skipped and not options.skip_bad:
        more = f" (and {len(decoded.skipped) - 1} more bad images)" if len(decoded.skipped) > 1 else ""
        raise DataError(f"{decoded.skipped[0]}{more} (pass --skip-bad / skip_bad=True to leave bad images out)")
    if decoded.skipped:
        warnings.warn(f"{source}: left out {len(decoded.skipped)} bad images (skip_bad), first: "
                      f"{decoded.skipped[0]}", stacklevel=3)


def load_dataset(path: str | os.PathLike | None = None, *, load_size: int = 128, load_crop: str = "retina",
                 load_filter: str = "none", skip_bad: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a FER2013 CSV, a split folder, a DR folder, or (None) the embedded demo data.

    Decoded once per node into the cache in `cache_dir` ($FER_CACHE_DIR or
    ~/.cache/fer-search), then memory-mapped read-only from it; a change to any source file
    or load option gives a new key. `load_size`, `load_crop` and `load_filter` shape DR
    images (fer.data.fundus); `skip_bad` leaves unreadable, missing or unlisted images out
    (counted in `Dataset.skipped`) instead of raising DataError.
    """
    options = LoadOptions(load_size, load_crop, load_filter, skip_bad)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    memo = DigestMemo(cache)
    source, layout, key, decode = describe_source(path, options, memo)
    entry = cache / f"{layout}-{key[:32]}"
    cached = read_cache(entry)
    decoded, mapped = (cached, True) if cached is not None else decode_to_cache(entry, decode)
    try:
        memo.save()
    except OSError:
        pass  # the memo only saves re-hashing time
    check_skipped(decoded, options, source)
    warn_missing_classes(decoded.classes, decoded.splits, source)
    origin = MappedOrigin(str(entry), tuple(decoded.splits), source, None if path is None else os.fspath(path),
                          options, str(cache)) if mapped else None
    return Dataset(decoded.classes, decoded.splits, source, origin, list(decoded.skipped))


def open_mapped(origin: MappedOrigin) -> Dataset:
    """The data set `origin` describes, in this process: its splits memory-mapped from the
    cache entry (never the splits it leaves out); on a node without the entry, the source is
    decoded into this node's cache first."""
    decoded = read_cache(Path(origin.entry), origin.splits)
    if decoded is None or set(decoded.splits) != set(origin.splits):
        data = load_dataset(origin.path, load_size=origin.options.size, load_crop=origin.options.crop,
                            load_filter=origin.options.filter, skip_bad=origin.options.skip_bad,
                            cache_dir=origin.cache_dir)
        return data.without(*(set(data.splits) - set(origin.splits)))
    return Dataset(decoded.classes, decoded.splits, origin.source, origin, list(decoded.skipped))


def load_configured(path: str | os.PathLike | None, config: Mapping[str, Any], *,
                    crop_default: str = "retina") -> Dataset:
    """`load_dataset` with the load fields of a TrialConfig mapping: a run's config, a
    checkpoint's saved one or a space's fixed values. `crop_default` is the crop of a config
    that names none (a checkpoint from before load_crop was trained on squashed photographs)."""
    return load_dataset(path, load_size=int(config.get("load_size", 128)),
                        load_crop=config.get("load_crop", crop_default), load_filter=config.get("load_filter", "none"),
                        skip_bad=bool(config.get("skip_bad", False)))
