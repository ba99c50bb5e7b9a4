"""The three on-disk layouts a `--data` path can have (see `LAYOUTS`):
  * a FER2013 CSV (`emotion,pixels,Usage`),
  * a split folder (`train.csv`, `val.csv`, `test.csv`, optional `unlabeled.csv`),
  * a DR-grading folder (`train/ val/ test/` images + `train.txt val.txt test.txt`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from fer.data.fundus import load_fundus
from fer.data.parse import parse_labels, parse_pixel_rows, read_csv_columns, split_codes
from fer.data.progress import Progress
from fer.data.types import (
    DR_CLASSES,
    FER_CLASSES,
    FER_USAGE,
    IMAGE_EXTENSIONS,
    SPLITS,
    DataError,
    Decoded,
    LoadOptions,
    Split,
)

# --------------------------------------------------------------------------------------
# CSV files (FER2013 and split folders)
# --------------------------------------------------------------------------------------

def decode_fer_csv(path: Path, load_size: int = 0) -> tuple[list[str], dict[str, Split]]:
    """FER2013 CSV: Usage Training/PublicTest/PrivateTest -> train/val/test; rows with an empty
    emotion or Usage 'Unlabeled' form the unlabeled pool (their emotion, when given, is kept
    as held-out truth)."""
    columns, lines = read_csv_columns(path, ["emotion", "pixels", "Usage"])
    labels = parse_labels(columns["emotion"], path, lines, len(FER_CLASSES), allow_empty=True)
    codes = split_codes(columns["Usage"], path, lines)
    codes[labels < 0] = list(FER_USAGE.values()).index("unlabeled")
    # parse the rows grouped by split, so every split is a contiguous view of one array
    order = np.argsort(codes, kind="stable")
    pixels = columns["pixels"]
    images = parse_pixel_rows([pixels[i] for i in order], path, lines[order])
    bounds = np.searchsorted(codes[order], np.arange(len(FER_USAGE) + 1))
    splits = {}
    for k, (usage_name, split) in enumerate(FER_USAGE.items()):
        rows = order[bounds[k]:bounds[k + 1]]
        if len(rows) == 0 and split != "unlabeled":
            raise DataError(f"{path}: the {split} split is empty: no labelled rows with Usage "
                            f"{usage_name!r} (expected rows for each of Training, PublicTest, PrivateTest)")
        if len(rows):
            held = labels[rows]
            splits[split] = Split(images[bounds[k]:bounds[k + 1]], None if held.min() < 0 else held)
    return list(FER_CLASSES), splits


def read_classes(path: Path) -> list[str] | None:
    """Class names from an optional `classes.txt`, one a line."""
    if not path.is_file():
        return None
    classes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not classes:
        raise DataError(f"{path}: no class names (expected one name a line)")
    return classes


def split_files(root: Path, suffix: str, layout: str) -> dict[str, Path]:
    """{split: root/<split><suffix>} for train, val and test (required: DataError naming the
    missing file and the `layout`) and unlabeled (when present)."""
    files = {}
    for split in SPLITS + ("unlabeled",):
        path = root / f"{split}{suffix}"
        if path.is_file():
            files[split] = path
        elif split != "unlabeled":
            raise DataError(f"{root}: missing {path.name} ({layout})")
    return files


def decode_split_folder(root: Path, load_size: int = 0) -> tuple[list[str], dict[str, Split]]:
    """train.csv, val.csv, test.csv (emotion,pixels) and an optional unlabeled.csv (pixels,
    optionally emotion as held-out truth). Classes: classes.txt, else FER2013's seven."""
    classes = read_classes(root / "classes.txt") or list(FER_CLASSES)
    splits = {}
    for split, path in split_files(root, ".csv", "a split folder holds train.csv, val.csv, test.csv and "
                                                 "optionally unlabeled.csv").items():
        required = ["pixels"] if split == "unlabeled" else ["emotion", "pixels"]
        columns, lines = read_csv_columns(path, required, optional=["emotion"])
        if len(lines) == 0:
            raise DataError(f"{path}: no data rows (the {split} split is empty)")
        labels = None
        if "emotion" in columns:
            labels = parse_labels(columns["emotion"], path, lines, len(classes), allow_empty=split == "unlabeled")
            if labels.min() < 0:
                labels = None
        splits[split] = Split(parse_pixel_rows(columns["pixels"], path, lines), labels)
    shapes = {s.images.shape[1:] for s in splits.values()}
    if len(shapes) > 1:
        raise DataError(f"{root}: the splits have different image sizes {sorted(shapes)}")
    return classes, splits


# --------------------------------------------------------------------------------------
# DR-grading folders (image files + list files)
# --------------------------------------------------------------------------------------

def read_list(path: Path) -> list[tuple[int, str, str]]:
    """Lines `<file name> <integer label>` -> [(line number, name, label text)]."""
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{path}: line {lineno}: expected two fields '<file name> <integer label>', "
                            f"found {line.strip()!r}")
        entries.append((lineno, parts[0], parts[1]))
    return entries


def read_dr_lists(root: Path) -> dict[str, tuple[Path, list[tuple[int, str, str]]]]:
    """{split: (list file, entries)} for train/val/test (required) and unlabeled (optional)."""
    listed = {}
    for split, path in split_files(root, ".txt", "a DR folder holds train.txt, val.txt and test.txt with "
                                                 "lines '<file name> <integer label>'").items():
        entries = read_list(path)
        if not entries:
            raise DataError(f"{path}: no images listed (the {split} split is empty)")
        listed[split] = (path, entries)
    return listed


def parse_list_labels(path: Path, entries: list[tuple[int, str, str]]) -> np.ndarray:
    values = []
    for lineno, _, text in entries:
        try:
            values.append(int(text))
        except ValueError:
            raise DataError(f"{path}: line {lineno}: label {text!r} is not an integer") from None
    return np.array(values, np.int64)


def check_label_range(path: Path, entries: list[tuple[int, str, str]], labels: np.ndarray,
                      classes: list[str]) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        raise DataError(f"{path}: line {entries[bad[0]][0]}: label {labels[bad[0]]} outside the class "
                        f"range 0..{len(classes) - 1} ({len(classes)} classes)")


# Rows decoded between two releases of the written pages (fer.data.cache.CacheWriter.release):
# 256 images of 512 px are 200 MB, the most a decoding process keeps mapped at once.
RELEASE_ROWS = 256


class BadInputs:
    """Bad image inputs: raised as a DataError at once, or with skip_bad counted and left out."""

    def __init__(self, skip: bool):
        self.skip, self.messages = skip, []

    def report(self, message: str) -> None:
        if not self.skip:
            raise DataError(message + " (pass --skip-bad / skip_bad=True to leave bad images out)")
        self.messages.append(message)


def locate_images(root: Path, split: str, path: Path, entries: list[tuple[int, str, str]], bad: BadInputs
                  ) -> tuple[list[Path], list[str], np.ndarray]:
    """Listed names are looked up in the split's folder, then in the root: (files, where each
    was listed, the entries found)."""
    files, where, found = [], [], []
    for k, (lineno, name, _) in enumerate(entries):
        file = next((d / name for d in (root / split, root) if (d / name).is_file()), None)
        if file is None:
            bad.report(f"{path}: line {lineno}: image file {name!r} not found in {root / split} or {root}")
            continue
        files.append(file)
        where.append(f"{path}: line {lineno}")
        found.append(k)
    return files, where, np.array(found, np.int64)


def check_unlisted(root: Path, listed: set[Path], bad: BadInputs) -> None:
    """An image in train/ val/ test/ that no list names is probably a list gone wrong."""
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS and file.resolve() not in listed:
                bad.report(f"{file}: image file is listed in none of {', '.join(s + '.txt' for s in SPLITS)} "
                           f"(list it with its label, or move it to {root / 'unlabeled'} for the pool)")


def decode_images(files: list[Path], where: list[str], options: LoadOptions, out: np.ndarray, sink: Sink,
                  bad: BadInputs, progress: Progress) -> np.ndarray:
    """Decode every file into its row of `out` (a memory map or an array), on every core
    (Pillow releases the GIL while decoding and resizing), `RELEASE_ROWS` at a time, each
    block handed back to `sink.release` once written. Returns the rows decoded."""
    ok = np.zeros(len(files), bool)

    def one(i: int) -> None:
        try:
            out[i] = load_fundus(files[i], options.size, options.crop, options.filter)
            ok[i] = True
        except Exception as e:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
            bad.report(f"{where[i]}: cannot read image {files[i]}: {type(e).__name__}: {e}")
        finally:
            progress.update()

    pool = ThreadPoolExecutor(decode_threads())
    try:
        for start in range(0, len(files), RELEASE_ROWS):
            stop = min(len(files), start + RELEASE_ROWS)
            for _ in pool.map(one, range(start, stop)):
                pass
            sink.release(out, start, stop)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the first error stops the rest
    return np.flatnonzero(ok)


def decode_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def decode_split(name: str, files: list[Path], where: list[str], options: LoadOptions, sink: Sink,
                 bad: BadInputs, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    """(images, indices of the files kept) of one split, written through `sink`."""
    out = sink.allocate(name, (len(files), options.size, options.size, 3))
    kept = decode_images(files, where, options, out, sink, bad, progress)
    if len(kept) < len(files):
        out = sink.keep_rows(name, out, kept)
    return out, kept


def decode_dr_folder(root: Path, options: LoadOptions = LoadOptions(), sink: Sink | None = None) -> Decoded:
    """train/ val/ test/ image folders with train.txt val.txt test.txt lists, optional
    unlabeled/ folder (and unlabeled.txt for held-out labels), optional classes.txt.
    Without classes.txt the classes are the five DR grades, or "0".."K-1" past label 4.
    Images go straight into `sink`'s arrays (the cache's memory maps; default in memory)."""
    sink = sink or MemorySink()
    listed = read_dr_lists(root)
    labels = {split: parse_list_labels(path, entries) for split, (path, entries) in listed.items()}
    classes = read_classes(root / "classes.txt")
    if classes is None:
        top = max(int(v.max()) for v in labels.values())
        classes = list(DR_CLASSES) if top < len(DR_CLASSES) else [str(k) for k in range(top + 1)]
    for split, (path, entries) in listed.items():
        check_label_range(path, entries, labels[split], classes)
    bad = BadInputs(options.skip_bad)
    located = {split: locate_images(root, split, path, entries, bad) for split, (path, entries) in listed.items()}
    check_unlisted(root, {f.resolve() for files, _, _ in located.values() for f in files}, bad)
    pool_dir = root / "unlabeled"
    if "unlabeled" not in located and pool_dir.is_dir():
        pool = sorted(p for p in pool_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if pool:
            located["unlabeled"] = (pool, [str(pool_dir)] * len(pool), np.arange(len(pool)))
    progress = Progress(sum(len(files) for files, _, _ in located.values()), f"decoding {root.name}")
    splits = {}
    for split, (files, where, found) in located.items():  # all lists are valid before any image is read
        images, kept = decode_split(split, files, where, options, sink, bad, progress)
        if len(kept) == 0 and split != "unlabeled":
            raise DataError(f"{listed[split][0]}: no readable image is left in the {split} split")
        split_labels = labels[split][found[kept]] if split in labels else None
        splits[split] = Split(images, split_labels)
    progress.close()
    return Decoded(classes, splits, bad.messages)


class MemorySink:
    """Decode into ordinary arrays (no cache, or the cache could not be written)."""

    def allocate(self, split: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, np.uint8)

    def keep_rows(self, split: str, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return images[rows]

    def release(self, images: np.ndarray, start: int, stop: int) -> None:
        pass  # the rows stay where they are: in this process's memory


class Sink(Protocol):
    """Where a decoder's image arrays live: `fer.data.cache.CacheWriter` or `MemorySink`."""

    def allocate(self, split: str, shape: tuple[int, ...]) -> np.ndarray: ...

    def keep_rows(self, split: str, images: np.ndarray, rows: np.ndarray) -> np.ndarray: ...

    def release(self, images: np.ndarray, start: int, stop: int) -> None: ...


# --------------------------------------------------------------------------------------
# Which layout a path is
# --------------------------------------------------------------------------------------

def fer_csv_layout(path: Path, options: LoadOptions, sink: Sink | None = None) -> Decoded:
    return Decoded(*decode_fer_csv(path))  # small: parsed in memory, then saved as they are


def split_folder_layout(path: Path, options: LoadOptions, sink: Sink | None = None) -> Decoded:
    return Decoded(*decode_split_folder(path))


LAYOUTS: dict[str, Callable[[Path, LoadOptions, Sink | None], Decoded]] = {
    "fer_csv": fer_csv_layout,
    "split_folder": split_folder_layout,
    "dr_folder": decode_dr_folder,
}


def detect_layout(path: Path) -> str:
    """Which of `LAYOUTS` a path is."""
    if path.is_file():
        return "fer_csv"
    if path.is_dir():
        if (path / "train.csv").is_file():
            return "split_folder"
        if (path / "train.txt").is_file():
            return "dr_folder"
        raise DataError(f"{path}: not a known data folder; expected train.csv/val.csv/test.csv "
                        f"(split folder) or train.txt/val.txt/test.txt with train/ val/ test/ image "
                        f"folders (DR folder)")
    raise DataError(f"{path}: no such file or folder (expected a FER2013 CSV, a split folder or a DR folder)")


def source_files(path: Path, layout: str) -> list[Path]:
    """Every file whose content the decoded arrays depend on, in a fixed order."""
    if layout == "fer_csv":
        return [path]
    files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".csv", ".txt")]
    if layout == "dr_folder":
        for sub in SPLITS + ("unlabeled",):
            if (path / sub).is_dir():
                files += sorted(p for p in (path / sub).rglob("*") if p.is_file())
    return files
