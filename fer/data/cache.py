"""The decode cache: every source is decoded once per node into a folder of uint8 `.npy`
files, one per split, that loads memory-mapped (`np.load(mmap_mode='r')`): trials on a
node share the page cache and no process holds the whole data set. Keyed by the sha256 of
the source files, the load options (DR only) and `CACHE_VERSION`; a digest memo
(`fer.io.DigestMemo`) spares re-hashing a settled 300 MB CSV on every reload.

    <layout>-<key>/   meta.json (written last), <split>.images.npy, <split>.labels.npy

An entry is built in a temporary folder beside it (`<name>.<random>.tmp`) and renamed into
place when complete, so a failure or Ctrl-C leaves nothing a later load would trust; a lock
file makes concurrent loads on one node decode once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fer.data.types import Decoded, Split
from fer.io import DigestMemo, file_digest

# 2: a folder of memory-mapped .npy files per entry (1 was one .npz read whole); bump when the
# decoded arrays change meaning; old entries are then ignored
CACHE_VERSION = 2
META = "meta.json"
KEEP_CHUNK = 256  # images copied at a time when skipped files are dropped from a split


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


def read_cache(folder: Path, splits: Iterable[str] | None = None) -> Decoded | None:
    """The entry's splits (`splits`: only these; the others are not even opened), or None
    when it is missing, unfinished, of another version or unreadable."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION:
            return None
        wanted = [s for s in meta["splits"] if splits is None or s in set(splits)]
        out = {}
        for name in wanted:
            images = np.load(folder / f"{name}.images.npy", mmap_mode="r", allow_pickle=False)
            if list(images.shape) != meta["splits"][name]["shape"] or images.dtype != np.uint8:
                return None
            labels_file = folder / f"{name}.labels.npy"
            labels = np.load(labels_file, allow_pickle=False) if meta["splits"][name]["labels"] else None
            out[name] = Split(images, labels)
        return Decoded([str(c) for c in meta["classes"]], out, list(meta.get("skipped", [])))
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


class CacheWriteError(OSError):
    """The cache could not be written (full or read-only disk): costs speed, not the load."""


class CacheWriter:
    """Builds one entry in a temporary folder: `allocate` hands out writable memory maps that
    the decoder fills in place, `commit` writes the rest and renames the folder into place."""

    def __init__(self, final: Path):
        self.final = final
        with writing(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp"))
        self.maps: dict[str, np.ndarray] = {}

    def allocate(self, split: str, shape: tuple[int, ...]) -> np.ndarray:
        """A zeroed uint8 array of `shape` backed by the entry's `<split>.images.npy`."""
        with writing(self.final):
            self.maps[split] = reserved_map(self.tmp / f"{split}.images.npy", shape)
        return self.maps[split]

    def release(self, images: np.ndarray, start: int, stop: int) -> None:
        """Unmap the pages of rows [start, stop) from this process (MADV_DONTNEED): written
        pages of a shared file mapping otherwise count as the decoder's RSS until the end, so
        its peak would grow with N. The data stay in the page cache, dirty until written back,
        and fault in again from there if read."""
        handle = getattr(images, "_mmap", None)  # numpy keeps its mmap.mmap here
        if handle is None or not hasattr(mmap, "MADV_DONTNEED") or stop <= start:
            return
        row = images[0].nbytes
        base = images.offset % mmap.ALLOCATIONGRANULARITY  # numpy maps from an aligned offset
        begin = (base + start * row) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(handle), -(-(base + stop * row) // mmap.PAGESIZE) * mmap.PAGESIZE)
        handle.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def keep_rows(self, split: str, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Replace the split's file by one holding only `rows` (skip_bad left some out),
        copied a chunk at a time."""
        with writing(self.final):
            kept = reserved_map(self.tmp / f"{split}.kept.npy", (len(rows),) + images.shape[1:])
            for start in range(0, len(rows), KEEP_CHUNK):
                chunk = rows[start:start + KEEP_CHUNK]
                kept[start:start + len(chunk)] = images[chunk]
                self.release(kept, start, start + len(chunk))
                self.release(images, int(chunk[0]), int(chunk[-1]) + 1)  # rows ascend
            kept.flush()
            os.replace(self.tmp / f"{split}.kept.npy", self.tmp / f"{split}.images.npy")
        self.maps[split] = kept
        return kept

    def commit(self, entry: Decoded) -> None:
        """Write the splits not already in place and the metadata (last), then rename."""
        with writing(self.final):
            self._commit(entry)

    def _commit(self, entry: Decoded) -> None:
        meta = {"version": CACHE_VERSION, "classes": entry.classes, "skipped": entry.skipped, "splits": {}}
        for name, split in entry.splits.items():
            if self.maps.get(name) is not split.images:
                np.save(self.tmp / f"{name}.images.npy", np.ascontiguousarray(split.images))
            else:
                split.images.flush()
            if split.labels is not None:
                np.save(self.tmp / f"{name}.labels.npy", np.asarray(split.labels, np.int64))
            meta["splits"][name] = {"shape": list(split.images.shape), "labels": split.labels is not None}
        (self.tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        os.chmod(self.tmp, 0o755)  # mkdtemp makes 0700; a cache folder may be shared
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not (self.final / META).is_file():  # not a concurrent writer that finished first
                raise
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def writing(final: Path) -> Iterator[None]:
    """OSError while writing the entry -> CacheWriteError naming it."""
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as e:
        raise CacheWriteError(f"could not write the data cache {final}: {e}") from e


def reserved_map(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A new zeroed uint8 `.npy` memory map whose blocks are reserved up front, so a full disk
    fails here with OSError rather than as a SIGBUS when a page is written later."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate") and array.size:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    return array


@contextlib.contextmanager
def entry_lock(final: Path) -> Iterator[None]:
    """Hold `<entry>.lock` while checking for and building an entry, so trials that start
    together on one node decode once (the others wait, then map what it wrote). The holder
    removes the file when done: a process that then locks a fresh file finds the entry
    built; only after a failed build may two processes decode at once, which the atomic
    rename keeps safe."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent loads may decode twice; the rename keeps it safe
        yield
        return
    lock = final.parent / (final.name + ".lock")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    except OSError:  # a read-only cache folder: nothing will be written there to race over
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
