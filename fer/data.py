"""The one data layer: a `--data` path (or nothing) becomes an in-memory `Dataset`.

Three layouts are read (see `LAYOUTS`):
  * a FER2013 CSV (`emotion,pixels,Usage`),
  * a split folder (`train.csv`, `val.csv`, `test.csv`, optional `unlabeled.csv`),
  * a DR-grading folder (`train/ val/ test/` images + `train.txt val.txt test.txt`).
No path means the embedded demo data of `fer.synth` (seed 0), read through the FER CSV path.

Every source is decoded once and cached on disk as one uncompressed `.npz` (written
atomically), keyed by the sha256 of its files, `load_size` (DR only) and `CACHE_VERSION`; a
small digest memo spares re-hashing a settled 300 MB CSV on every reload. The arrays are
uint8 and C-contiguous, so a trial driver can `ray.put` a `Dataset` once and every trial
shares it zero-copy (this module never imports ray).

FER pixel strings are parsed with a vectorised byte-level parser (`parse_pixel_rows`)
instead of the usual per-row `np.array(row.split())`: 35,887 x 2,304 pixels at about 3.6
bytes of text each make that loop the slowest part of every FER script
(`benchmarks/data_decode.py` measures both).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import mmap
import os
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

FER_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
# The five grades of the International Clinical DR severity scale (EyePACS / APTOS labels).
DR_CLASSES = ["No DR", "Mild", "Moderate", "Severe", "Proliferative"]
FER_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test", "Unlabeled": "unlabeled"}
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")
CACHE_VERSION = 1  # bump when the decoded arrays change meaning; old cache files are then ignored
EMBEDDED_SEED = 0
CHUNK_ROWS = 256  # rows per parser chunk: ~2.3 MB of pixel text stays in the CPU cache


class DataError(ValueError):
    """Bad input data; the message names the file, the row or line, and what was expected."""


@dataclass(eq=False)  # arrays have no single truth value for ==
class Split:
    images: np.ndarray  # uint8 (N, H, W, C), C-contiguous; C = 1 (FER) or 3 (DR)
    labels: np.ndarray | None  # int64 (N,); for "unlabeled" the held-out true labels or None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(eq=False)
class Dataset:
    classes: list[str]
    splits: dict[str, Split]  # "train", "val", "test" and optionally "unlabeled"
    source: str  # the path, or "embedded demo data (seed S)"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.splits["train"].images.shape[3])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(s) for s in self.splits["train"].images.shape[1:])  # type: ignore[return-value]

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Images per class in `split`, int64 (num_classes,)."""
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; this data set has {', '.join(self.splits)}")
        labels = self.splits[split].labels
        if labels is None:
            raise ValueError(f"split {split!r} of {self.source} has no labels")
        return np.bincount(labels, minlength=self.num_classes).astype(np.int64)


# --------------------------------------------------------------------------------------
# FER pixel strings: vectorised parser
# --------------------------------------------------------------------------------------

_PAD = b"    "  # lets the parser look three bytes back from the first separator


class _Workspace(threading.local):
    """Per-thread scratch arrays reused from chunk to chunk: fresh multi-megabyte temporaries
    cost a page fault every 4 KB, which here is more than all the arithmetic on them."""

    size = 0

    def reserve(self, nbytes: int) -> "_Workspace":
        if nbytes > self.size:
            self.size = n = nbytes + nbytes // 4 + 64
            self.blob = bytearray(n)
            self.mask = np.empty(n, bool)
            self.digits = np.empty((3, n), np.uint8)  # at most one token per byte
            self.flags = np.empty((2, n), bool)
        return self


_WORKSPACE = _Workspace()


def _parse_chunk(rows: list) -> tuple[np.ndarray, np.ndarray] | None:
    """Parse pixel strings (bytes-like, digits separated by spaces) into uint8 values.

    Returns (per-row counts, values) -- values live in this thread's workspace until its next
    call -- or None when anything is unusual (a byte other than a digit or a space, an
    over-long token, a value above 255): the caller then re-parses the chunk slowly to name
    the offending row. Only the separators are located; the three bytes before each
    separator are the token's ones, tens and hundreds digits.
    """
    ws = _WORKSPACE.reserve(sum(len(r) for r in rows) + len(rows) + len(_PAD))
    buf, view = ws.blob, memoryview(ws.blob)
    view[:4] = _PAD
    p = 4
    for row in rows:  # one copy into a reused buffer (b" ".join would allocate fresh pages)
        n = len(row)
        view[p:p + n] = row
        p += n
        buf[p] = 32  # rows end with a space too; their ends are known by position
        p += 1
    blob = np.frombuffer(buf, np.uint8, count=p)
    a = blob[3:]  # a[0] is the space before row 0
    if a.max() > 57:
        return None  # a letter or other byte above '9'
    mask = ws.mask[:len(a)]
    np.equal(a, 32, out=mask)
    sep = mask.nonzero()[0]
    ends = sep[1:]  # each space closes the token before it
    m = len(ends)
    d1, d2, d3 = ws.digits[0, :m], ws.digits[1, :m], ws.digits[2, :m]
    blob[2:].take(ends, out=d1, mode="clip")  # last digit ("clip": no bounds-check buffering)
    blob[1:].take(ends, out=d2, mode="clip")  # tens, if a digit
    blob.take(ends, out=d3, mode="clip")  # hundreds, if a digit
    row_ends = np.cumsum(np.fromiter((len(r) + 1 for r in rows), np.int64, len(rows)))
    last = np.searchsorted(ends, row_ends)  # index in `ends` of each row's final space
    if d1.min() >= 48:
        counts = np.diff(last, prepend=-1)
    else:  # empty tokens: runs of spaces, or leading/trailing spaces -- drop them
        keep = d1 >= 48
        d1, d2, d3 = d1[keep], d2[keep], d3[keep]
        counts = np.diff(np.cumsum(keep)[last], prepend=0)
        m = len(d1)
    has2, has3 = ws.flags[0, :m], ws.flags[1, :m]
    np.greater_equal(d2, 48, out=has2)
    np.greater_equal(d3, 48, out=has3)
    has3 &= has2
    if m + np.count_nonzero(has2) + np.count_nonzero(has3) != len(a) - len(sep):
        return None  # a token of four or more bytes, or a byte below '0' other than a space (sign)
    d1 -= 48
    d2 -= 48
    d2 *= has2
    d2 *= 10
    d1 += d2  # ones and tens, 0..99
    d3 -= 48
    d3 *= has3  # hundreds digit
    top = d3.max()
    if top > 2:
        return None  # a value above 299
    if top == 2:
        np.equal(d3, 2, out=has2)
        np.greater(d1, 55, out=has3)
        has2 &= has3
        if has2.any():
            return None  # a value in 256..299
    d3 *= 100
    d1 += d3
    return counts, d1


def _parse_row_slow(row: str, where: str) -> np.ndarray:
    """Parse one pixel string with full checks; raise DataError naming `where`."""
    values = []
    for token in row.replace('"', " ").split():  # a quoted field in an unquoted file
        if "," in token:
            raise DataError(f"{where}: too many comma-separated fields (a comma inside the pixels "
                            f"field: {token[:24]!r})")
        if not token.isdigit() or not token.isascii():
            raise DataError(f"{where}: non-numeric pixel value {token[:20]!r} "
                            f"(expected integers 0..255 separated by spaces)")
        value = int(token)
        if value > 255:
            raise DataError(f"{where}: pixel value {value} outside 0..255")
        values.append(value)
    return np.array(values, np.uint8)


def _parse_chunk_slow(rows: list, path: str | os.PathLike, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    per_row = [_parse_row_slow(bytes(r).decode("latin-1"), f"{path}: line {line}")
               for r, line in zip(rows, lines)]
    return np.array([len(v) for v in per_row]), np.concatenate(per_row)


def _expected_count(counts: np.ndarray, path: str | os.PathLike, lines: np.ndarray) -> int:
    """The square pixel count most rows agree on (2304 = 48x48 for FER2013)."""
    seen, freq = np.unique(counts, return_counts=True)
    square = (seen > 0) & (np.round(np.sqrt(seen)) ** 2 == seen)
    if not square.any():
        raise DataError(f"{path}: line {lines[0]}: found {counts[0]} pixel values; expected a square "
                        f"image's worth (e.g. 2304 = 48x48), the same in every row")
    return int(seen[square][freq[square].argmax()])


def parse_pixel_rows(rows: list, path: str | os.PathLike, lines: np.ndarray,
                     workers: int | None = None) -> np.ndarray:
    """Parse FER pixel strings into a uint8 array (N, S, S, 1).

    rows: bytes-like pixel strings; lines: the 1-based file line of each row (for errors).
    Every row must hold the same square number of values, the one most of the first rows hold.
    """
    if not rows:
        return np.zeros((0, 0, 0, 1), np.uint8)
    size = CHUNK_ROWS
    starts = range(0, len(rows), size)
    first = _parse_chunk(rows[:size]) or _parse_chunk_slow(rows[:size], path, lines[:size])
    expected = _expected_count(first[0], path, lines[:size])
    out = np.empty(len(rows) * expected, np.uint8)

    def fill(start: int) -> bool:
        chunk = rows[start:start + size]
        parsed = _parse_chunk(chunk)
        if parsed is None or not (parsed[0] == expected).all():
            return False
        out[start * expected:(start + len(chunk)) * expected] = parsed[1]
        return True

    workers = workers or min(4, os.cpu_count() or 1)
    # numpy releases the GIL in the heavy calls, so threads overlap chunks on several cores
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(fill, starts))
    else:
        done = [fill(start) for start in starts]
    for start, ok in zip(starts, done):  # in file order, so the first bad row is named
        if ok:
            continue
        # something unusual in this chunk: parse it row by row, raising for the offending row
        where = lines[start:start + size]
        counts, values = _parse_chunk_slow(rows[start:start + size], path, where)
        bad = np.flatnonzero(counts != expected)
        if len(bad):
            side = int(round(expected ** 0.5))
            raise DataError(f"{path}: line {where[bad[0]]}: expected {expected} pixel values "
                            f"({side}x{side}, like the other rows), found {counts[bad[0]]}")
        out[start * expected:start * expected + len(values)] = values
    side = int(round(expected ** 0.5))
    return out.reshape(len(rows), side, side, 1)


# --------------------------------------------------------------------------------------
# CSV files (FER2013 and split folders)
# --------------------------------------------------------------------------------------

def read_text_bytes(path: Path):
    """The file's bytes: a read-only memory map, or a cleaned copy when it has a UTF-8 BOM, CRLF
    line ends or quoted fields (quotes removed: FER fields never hold commas, so they carry
    nothing). This is judged on the first two lines, as writers keep it uniform; a stray CR
    or quoted field further on still parses, on the slower path."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise DataError(f"{path}: empty file (expected a header line, then one row a line)")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    second_end = data.find(b"\n", data.find(b"\n") + 1)
    head = data[:second_end if second_end > 0 else len(data)]
    if head.startswith(b"\xef\xbb\xbf") or b"\r" in head or b'"' in head:
        text = data[:]
        data.close()
        return text.removeprefix(b"\xef\xbb\xbf").replace(b"\r", b"").replace(b'"', b"")
    return data


def read_csv_columns(path: Path, required: list[str], optional: Iterable[str] = ()
                     ) -> tuple[dict[str, list], np.ndarray]:
    """Read a comma-separated file into {column: list of raw field bytes} + 1-based line numbers.

    The `pixels` column comes back as zero-copy memoryviews. A hand loop over `find`/`rfind`
    (memchr speed; the long pixels field is scanned once, for the newline) is faster here than
    pandas, whose C tokenizer copies 300 MB of pixel text into Python strings.
    """
    data = read_text_bytes(path)
    n = len(data)
    head_end = data.find(b"\n")
    head_end = n if head_end < 0 else head_end
    names = [c.strip() for c in data[:head_end].decode("utf-8", "replace").split(",")]
    wanted = list(required) + [c for c in optional if c in names]
    for column in required:
        if column not in names:
            raise DataError(f"{path}: line 1: missing required column {column!r}; found columns "
                            f"{','.join(names)}, expected {','.join(list(required) + list(optional))}")
    ncols = len(names)
    # The pixels field is found by commas counted from the line start (fields left of it) and
    # from the line end (fields right of it); memchr then checks it holds no further comma.
    left = names.index("pixels") if "pixels" in names else ncols - 1
    right = ncols - 1 - left
    firsts, starts, stops, lasts, lines = [], [], [], [], []
    find, rfind = data.find, data.rfind
    pos, lineno = head_end + 1, 1
    while pos < n:
        lineno += 1
        end = find(b"\n", pos)
        if end < 0:
            end = n
        if end - pos < 8 and not data[pos:end].strip():  # blank line
            pos = end + 1
            continue
        start = pos
        for _ in range(left):
            start = find(b",", start, end) + 1
            if start == 0:
                break
        stop = end
        for _ in range(right):
            stop = rfind(b",", start, stop)
            if stop < 0:
                break
        if start == 0 or stop < 0 or find(b",", start, stop) >= 0:
            found = data[pos:end].count(b",") + 1
            raise DataError(f"{path}: line {lineno}: expected {ncols} comma-separated fields "
                            f"({','.join(names)}), found {found}")
        firsts.append(pos)
        starts.append(start)
        stops.append(stop)
        lasts.append(end)
        lines.append(lineno)
        pos = end + 1
    view = memoryview(data)
    columns: dict[str, list] = {}
    for name in wanted:  # raw field bytes, unstripped: the label and Usage parsers strip
        k = names.index(name)
        if name == "pixels":
            columns[name] = [view[a:b] for a, b in zip(starts, stops)]
        elif k < left:  # "3," -> b"3"
            heads = [data[a:b - 1] for a, b in zip(firsts, starts)]
            columns[name] = heads if left == 1 else [h.split(b",")[k] for h in heads]
        else:  # ",Training" -> b"Training"
            tails = [data[a + 1:b] for a, b in zip(stops, lasts)]
            columns[name] = tails if right == 1 else [t.split(b",")[k - left - 1] for t in tails]
    return columns, np.array(lines, np.int64)


def parse_labels(values: list[bytes], path: Path, lines: np.ndarray, num_classes: int,
                 allow_empty: bool = False) -> np.ndarray:
    """Integer labels in 0..num_classes-1; empty fields become -1 when `allow_empty`."""
    text = np.char.strip(np.array(values, dtype=bytes), b' \t"') if values else np.zeros(0, "S1")
    empty = text == b""
    try:  # numpy parses the byte strings in C; any oddity falls through to the named checks
        labels = np.where(empty, b"-1", text).astype(np.int64)
        if (labels[~empty] >= 0).all() and (labels < num_classes).all() and (allow_empty or not empty.any()):
            return labels
    except (ValueError, OverflowError):
        pass
    labels = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        v = v.strip(b' \t"')
        if not v:
            if not allow_empty:
                raise DataError(f"{path}: line {lines[i]}: empty label (expected an integer "
                                f"0..{num_classes - 1})")
            labels[i] = -1
            continue
        try:
            labels[i] = int(v)
        except ValueError:
            raise DataError(f"{path}: line {lines[i]}: label {v.decode('utf-8', 'replace')!r} is not "
                            f"an integer (expected 0..{num_classes - 1})") from None
        if not 0 <= labels[i] < num_classes:
            raise DataError(f"{path}: line {lines[i]}: label {labels[i]} outside the class range "
                            f"0..{num_classes - 1}")
    return labels


def split_codes(usage: list[bytes], path: Path, lines: np.ndarray) -> np.ndarray:
    """Usage strings -> index into FER_USAGE's splits (train, val, test, unlabeled)."""
    text = np.array(usage, dtype=bytes) if usage else np.zeros(0, "S1")
    seen, inverse = np.unique(text, return_inverse=True)
    codes = np.empty(len(seen), np.int64)
    for j, value in enumerate(seen):
        name = value.decode("utf-8", "replace").strip(' \t"')
        if name not in FER_USAGE:
            line = lines[np.flatnonzero(inverse == j)[0]]
            raise DataError(f"{path}: line {line}: unknown Usage {name!r} "
                            f"(expected one of {', '.join(FER_USAGE)})")
        codes[j] = list(FER_USAGE).index(name)
    return codes[inverse.ravel()]


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


def decode_split_folder(root: Path, load_size: int = 0) -> tuple[list[str], dict[str, Split]]:
    """train.csv, val.csv, test.csv (emotion,pixels) and an optional unlabeled.csv (pixels,
    optionally emotion as held-out truth). Classes: classes.txt, else FER2013's seven."""
    classes = read_classes(root / "classes.txt") or list(FER_CLASSES)
    splits = {}
    for split in SPLITS + ("unlabeled",):
        path = root / f"{split}.csv"
        if split == "unlabeled" and not path.is_file():
            continue
        if not path.is_file():
            raise DataError(f"{root}: missing {path.name} (a split folder holds train.csv, val.csv, "
                            f"test.csv and optionally unlabeled.csv)")
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


def load_image(path: Path, size: int) -> np.ndarray:
    """Any image file -> uint8 RGB (size, size, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
        rgb = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def load_images(paths: list[Path], size: int, where: list[str]) -> np.ndarray:
    """Decode and resize all images (threads: Pillow releases the GIL while decoding)."""
    def one(i: int) -> np.ndarray:
        try:
            return load_image(paths[i], size)
        except Exception as e:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
            raise DataError(f"{where[i]}: cannot read image {paths[i]}: {e}") from e

    out = np.empty((len(paths), size, size, 3), np.uint8)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for i, image in enumerate(pool.map(one, range(len(paths)))):
            out[i] = image
    return out


def read_dr_lists(root: Path) -> dict[str, tuple[Path, list[tuple[int, str, str]]]]:
    """{split: (list file, entries)} for train/val/test (required) and unlabeled (optional)."""
    listed = {}
    for split in SPLITS + ("unlabeled",):
        path = root / f"{split}.txt"
        if split == "unlabeled" and not path.is_file():
            continue
        if not path.is_file():
            raise DataError(f"{root}: missing {path.name} (a DR folder holds train.txt, val.txt and "
                            f"test.txt with lines '<file name> <integer label>')")
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


def locate_images(root: Path, split: str, path: Path, entries: list[tuple[int, str, str]]
                  ) -> tuple[list[Path], list[str]]:
    """Listed names are looked up in the split's folder, then in the root."""
    files, where = [], []
    for lineno, name, _ in entries:
        file = next((d / name for d in (root / split, root) if (d / name).is_file()), None)
        if file is None:
            raise DataError(f"{path}: line {lineno}: image file {name!r} not found in "
                            f"{root / split} or {root}")
        files.append(file)
        where.append(f"{path}: line {lineno}")
    return files, where


def decode_dr_folder(root: Path, load_size: int = 128) -> tuple[list[str], dict[str, Split]]:
    """train/ val/ test/ image folders with train.txt val.txt test.txt lists, optional
    unlabeled/ folder (and unlabeled.txt for held-out labels), optional classes.txt.
    Without classes.txt the classes are the five DR grades, or "0".."K-1" past label 4."""
    listed = read_dr_lists(root)
    labels = {split: parse_list_labels(path, entries) for split, (path, entries) in listed.items()}
    classes = read_classes(root / "classes.txt")
    if classes is None:
        top = max(int(v.max()) for v in labels.values())
        classes = list(DR_CLASSES) if top < len(DR_CLASSES) else [str(k) for k in range(top + 1)]
    for split, (path, entries) in listed.items():
        check_label_range(path, entries, labels[split], classes)
    splits = {}
    for split, (path, entries) in listed.items():  # all lists are valid before any image is read
        files, where = locate_images(root, split, path, entries)
        splits[split] = Split(load_images(files, load_size, where), labels[split])
    pool_dir = root / "unlabeled"
    if "unlabeled" not in splits and pool_dir.is_dir():
        files = sorted(p for p in pool_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            splits["unlabeled"] = Split(load_images(files, load_size, [str(pool_dir)] * len(files)), None)
    return classes, splits


# --------------------------------------------------------------------------------------
# Layouts, cache, entry point
# --------------------------------------------------------------------------------------

LAYOUTS: dict[str, Callable[[Path, int], tuple[list[str], dict[str, Split]]]] = {
    "fer_csv": decode_fer_csv,
    "split_folder": decode_split_folder,
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


# A digest is reused from the memo only while the file's identity and ctime are unchanged and
# the file had been quiet this long when it was hashed: the "racy git" rule, so a write in the
# same timestamp tick as the hashing can never keep a stale digest (the kernel sets ctime on
# every write and no user can set it).
DIGEST_SETTLE_S = 2.0
DIGEST_MEMO = "digests.json"


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


def file_digest(path: Path) -> bytes:
    """sha256 of a file's content, read in blocks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.digest()


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


# --------------------------------------------------------------------------------------
# CLI: python -m fer.data [PATH]
# --------------------------------------------------------------------------------------

def format_table(data: Dataset) -> str:
    """Splits, sizes, image shape and per-class counts with percentages."""
    h, w, c = data.image_shape
    out = [f"source: {data.source}", f"image shape: {h}x{w}x{c} (HxWxC), {data.num_classes} classes", ""]
    out.append(f"{'split':<10} {'images':>8}  labels")
    for name, split in data.splits.items():
        kind = "held-out truth" if name == "unlabeled" and split.labels is not None else (
            "none" if split.labels is None else "yes")
        out.append(f"{name:<10} {len(split):>8}  {kind}")
    shown = [n for n, s in data.splits.items() if s.labels is not None]
    width = max(12, max(len(name) for name in data.classes) + 1)
    out += ["", f"{'class':<{width}}" + "".join(f"{n:>16}" for n in shown)]
    counts = {n: data.class_counts(n) for n in shown}
    for k, name in enumerate(data.classes):
        cells = [f"{counts[n][k]:>8} {100 * counts[n][k] / max(1, counts[n].sum()):>6.1f}%" for n in shown]
        out.append(f"{name:<{width}}" + "".join(cells))
    out.append(f"{'total':<{width}}" + "".join(f"{int(counts[n].sum()):>8} {100.0:>6.1f}%" for n in shown))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer.data", description="Load a data set and "
                                     "print its splits and class counts (no PATH: embedded demo data).")
    parser.add_argument("path", nargs="?", default=None,
                        help="FER2013 CSV, split folder or DR folder")
    parser.add_argument("--load-size", type=int, default=128, help="DR folders: image side after loading")
    parser.add_argument("--cache-dir", default=None, help="default: $FER_CACHE_DIR or ~/.cache/fer-search")
    args = parser.parse_args(argv)
    try:
        data = load_dataset(args.path, load_size=args.load_size, cache_dir=args.cache_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
