"""The one data layer: a `--data` path (or nothing) becomes an in-memory `Dataset`.

Three layouts are read (see `LAYOUTS`):
  * a FER2013 CSV (`emotion,pixels,Usage`),
  * a split folder (`train.csv`, `val.csv`, `test.csv`, optional `unlabeled.csv`),
  * a DR-grading folder (`train/ val/ test/` images + `train.txt val.txt test.txt`).
No path means the embedded demo data of `fer.synth` (seed 0), read through the FER CSV path.

Every source is decoded once and cached on disk as one uncompressed `.npz`, keyed by the
content hash of its files, `load_size` and `CACHE_VERSION`; the arrays are uint8 and
C-contiguous, so a trial driver can `ray.put` a `Dataset` once and every trial shares it
zero-copy (this module never imports ray).

FER pixel strings are parsed with a vectorised byte-level parser (`parse_pixel_rows`)
instead of the usual per-row `np.array(row.split())`: about 2.3 bytes of text per pixel
and 35,887 x 2,304 pixels make that loop the slowest part of every FER script.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
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


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W, C), C-contiguous; C = 1 (FER) or 3 (DR)
    labels: np.ndarray | None  # int64 (N,); for "unlabeled" the held-out true labels or None

    def __len__(self) -> int:
        return len(self.images)


@dataclass
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

_PAD = b"\n\n\n\n"  # lets the parser look three bytes back from the first separator


def _parse_chunk(rows: list) -> tuple[np.ndarray, np.ndarray] | None:
    """Parse pixel strings (bytes-like, digits separated by spaces) into uint8 values.

    Returns (values, per-row counts), or None when anything is unusual (a byte other than
    a digit or a space, an empty or over-long token, a value above 255): the caller then
    re-parses the chunk slowly to name the offending row. The fast path looks only at the
    separators: the three bytes before each separator are the token's digits.
    """
    blob = _PAD + b"\n".join(rows) + b"\n"
    a = np.frombuffer(blob, np.uint8, offset=3)  # a[0] is the separator before row 0
    sep = np.flatnonzero(a < 48)  # spaces and row newlines ('0' is 48)
    # rows hold no newline, so every separator must be a space or one of our len(rows)+1 newlines
    if a.max() > 57 or len(sep) != np.count_nonzero(a == 32) + len(rows) + 1:
        return None  # a byte that is neither a digit nor a space
    ends = sep[1:]  # each separator closes the token before it
    d1 = np.frombuffer(blob, np.uint8, offset=2).take(ends)  # last digit
    d2 = np.frombuffer(blob, np.uint8, offset=1).take(ends)  # tens, if a digit
    d3 = np.frombuffer(blob, np.uint8, offset=0).take(ends)  # hundreds, if a digit
    if d1.min() < 48:
        return None  # an empty token: two separators in a row, or a leading/trailing space
    has2 = d2 >= 48
    has3 = d3 >= 48
    has3 &= has2
    n_digits = len(a) - len(sep)
    if len(ends) + int(np.count_nonzero(has2)) + int(np.count_nonzero(has3)) != n_digits:
        return None  # a token with four or more digits
    d1 -= 48
    d2 -= 48
    d2 *= has2
    d2 *= 10
    d1 += d2  # 0..99
    d3 -= 48
    d3 *= has3  # 0..9 hundreds
    if d3.max() > 2 or np.any((d3 == 2) & (d1 > 55)):
        return None  # a value above 255
    d3 *= 100  # at most 200, fits uint8
    d1 += d3
    lengths = np.fromiter((len(r) + 1 for r in rows), np.int64, len(rows))
    row_ends = np.cumsum(lengths)  # position in `a` of each row's newline
    counts = np.diff(np.searchsorted(ends, row_ends), prepend=0)
    counts[0] += 1  # searchsorted(ends, end of row 0) counts row 0's tokens minus one
    return d1, counts


def _parse_row_slow(row: str, where: str) -> np.ndarray:
    """Parse one pixel string with full checks; raise DataError naming `where`."""
    values = []
    for token in row.split():
        if not token.isdigit() or not token.isascii():
            raise DataError(f"{where}: non-numeric pixel value {token[:20]!r} "
                            f"(expected integers 0..255 separated by spaces)")
        value = int(token)
        if value > 255:
            raise DataError(f"{where}: pixel value {value} outside 0..255")
        values.append(value)
    return np.array(values, np.uint8)


def parse_pixel_rows(rows: list, path: str | os.PathLike, lines: np.ndarray,
                     workers: int | None = None) -> np.ndarray:
    """Parse FER pixel strings into a uint8 array (N, S, S, 1).

    rows: bytes-like pixel strings; lines: the 1-based file line of each row (for errors).
    Every row must hold the same square number of values (2304 = 48x48 for FER2013).
    """
    chunks = [rows[i:i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]
    workers = workers or min(4, os.cpu_count() or 1)
    # numpy releases the GIL in the heavy calls, so threads overlap chunks on several cores
    if workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(workers) as pool:
            parsed = list(pool.map(_parse_chunk, chunks))
    else:
        parsed = [_parse_chunk(c) for c in chunks]
    values, counts = [], []
    for i, result in enumerate(parsed):
        if result is None:  # something unusual: parse row by row to find and name it
            first = i * CHUNK_ROWS
            per_row = [_parse_row_slow(bytes(r).decode("latin-1"), f"{path}: line {lines[first + j]}")
                       for j, r in enumerate(chunks[i])]
            result = (np.concatenate(per_row), np.array([len(v) for v in per_row]))
        values.append(result[0])
        counts.append(result[1])
    count = np.concatenate(counts)
    # the expected count is the square number most rows agree on
    seen, freq = np.unique(count, return_counts=True)
    square = (seen > 0) & (np.round(np.sqrt(seen)) ** 2 == seen)
    if not square.any():
        raise DataError(f"{path}: line {lines[0]}: found {count[0]} pixel values; expected a square "
                        f"image's worth (e.g. 2304 = 48x48), the same in every row")
    expected = int(seen[square][freq[square].argmax()])
    side = int(round(expected ** 0.5))
    bad = np.flatnonzero(count != expected)
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{path}: line {lines[row]}: expected {expected} pixel values "
                        f"({side}x{side}, like the other rows), found {count[row]}")
    return np.concatenate(values).reshape(len(rows), side, side, 1)


# --------------------------------------------------------------------------------------
# CSV files (FER2013 and split folders)
# --------------------------------------------------------------------------------------

def _read_text_bytes(path: Path) -> bytes:
    """File bytes with a UTF-8 BOM, CRs and field quotes removed (FER fields hold no commas)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\r" in data:
        data = data.replace(b"\r", b"")
    if b'"' in data:
        data = data.replace(b'"', b"")
    return data


def read_csv_columns(path: Path, required: list[str], optional: Iterable[str] = ()
                     ) -> tuple[dict[str, list], np.ndarray]:
    """Read a comma-separated file into {column: list of raw field bytes} + 1-based line numbers.

    The `pixels` column comes back as zero-copy memoryviews. A hand loop over `bytes.find`
    (memchr speed) is faster here than pandas, whose C tokenizer copies 300 MB of pixel text.
    """
    data = _read_text_bytes(path)
    n = len(data)
    head_end = data.find(b"\n")
    head_end = n if head_end < 0 else head_end
    names = [c.strip() for c in data[:head_end].decode("utf-8", "replace").split(",")]
    wanted = list(required) + [c for c in optional if c in names]
    for column in required:
        if column not in names:
            raise DataError(f"{path}: line 1: missing required column {column!r}; found columns "
                            f"{','.join(names)}, expected {','.join(list(required) + list(optional))}")
    index = [names.index(c) for c in wanted]
    ncols = len(names)
    fields: list[list] = [[] for _ in wanted]
    lines: list[int] = []
    view = memoryview(data)
    find = data.find
    pos, lineno = head_end + 1, 1
    while pos < n:
        lineno += 1
        end = find(b"\n", pos)
        end = n if end < 0 else end
        if end - pos < 8 and not data[pos:end].strip():  # blank line
            pos = end + 1
            continue
        bounds = [pos]
        for _ in range(ncols - 1):
            comma = find(b",", bounds[-1], end)
            if comma < 0:
                raise DataError(f"{path}: line {lineno}: expected {ncols} comma-separated fields "
                                f"({','.join(names)}), found {len(bounds)}")
            bounds.append(comma + 1)
        if find(b",", bounds[-1], end) >= 0:
            raise DataError(f"{path}: line {lineno}: expected {ncols} comma-separated fields "
                            f"({','.join(names)}), found more")
        bounds.append(end + 1)
        for out, k in zip(fields, index):
            out.append(view[bounds[k]:bounds[k + 1] - 1])
        lines.append(lineno)
        pos = end + 1
    columns = {}
    for name, values in zip(wanted, fields):
        columns[name] = values if name == "pixels" else [bytes(v).strip() for v in values]
    return columns, np.array(lines, np.int64)


def parse_labels(values: list[bytes], path: Path, lines: np.ndarray, num_classes: int,
                 allow_empty: bool = False) -> np.ndarray:
    """Integer labels in 0..num_classes-1; empty fields become -1 when `allow_empty`."""
    labels = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
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


def decode_fer_csv(path: Path, load_size: int = 0) -> tuple[list[str], dict[str, Split]]:
    """FER2013 CSV: Usage Training/PublicTest/PrivateTest -> train/val/test; rows with an empty
    emotion or Usage 'Unlabeled' form the unlabeled pool (their emotion, when given, is kept
    as held-out truth)."""
    columns, lines = read_csv_columns(path, ["emotion", "pixels", "Usage"])
    labels = parse_labels(columns["emotion"], path, lines, len(FER_CLASSES), allow_empty=True)
    usage = columns["Usage"]
    names = np.empty(len(usage), object)
    for i, u in enumerate(usage):
        split = FER_USAGE.get(u.decode("utf-8", "replace"))
        if split is None:
            raise DataError(f"{path}: line {lines[i]}: unknown Usage {u.decode('utf-8', 'replace')!r} "
                            f"(expected one of {', '.join(FER_USAGE)})")
        names[i] = split
    names[labels < 0] = "unlabeled"
    images = parse_pixel_rows(columns["pixels"], path, lines)
    splits = {}
    for split, usage_name in zip(SPLITS, FER_USAGE):
        rows = np.flatnonzero(names == split)
        if len(rows) == 0:
            raise DataError(f"{path}: the {split} split is empty: no labelled rows with Usage "
                            f"{usage_name!r} (expected rows for each of Training, PublicTest, PrivateTest)")
        splits[split] = Split(np.ascontiguousarray(images[rows]), labels[rows])
    rows = np.flatnonzero(names == "unlabeled")
    if len(rows):
        held_out = labels[rows]
        splits["unlabeled"] = Split(np.ascontiguousarray(images[rows]),
                                    held_out if held_out.min() >= 0 else None)
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


def decode_dr_folder(root: Path, load_size: int = 128) -> tuple[list[str], dict[str, Split]]:
    """train/ val/ test/ image folders with train.txt val.txt test.txt lists, optional
    unlabeled/ folder (and unlabeled.txt for held-out labels), optional classes.txt."""
    classes = read_classes(root / "classes.txt")
    listed: dict[str, tuple[Path, list[tuple[int, str, str]]]] = {}
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
    labels: dict[str, np.ndarray] = {}
    for split, (path, entries) in listed.items():
        values = []
        for lineno, _, text in entries:
            try:
                values.append(int(text))
            except ValueError:
                raise DataError(f"{path}: line {lineno}: label {text!r} is not an integer") from None
        labels[split] = np.array(values, np.int64)
    if classes is None:
        top = max(int(v.max()) for v in labels.values())
        classes = list(DR_CLASSES) if top < len(DR_CLASSES) else [str(k) for k in range(top + 1)]
    for split, (path, entries) in listed.items():
        bad = np.flatnonzero((labels[split] < 0) | (labels[split] >= len(classes)))
        if len(bad):
            lineno = entries[bad[0]][0]
            raise DataError(f"{path}: line {lineno}: label {labels[split][bad[0]]} outside the class "
                            f"range 0..{len(classes) - 1} ({len(classes)} classes)")
    splits = {}
    for split, (path, entries) in listed.items():
        files, where = [], []
        for lineno, name, _ in entries:
            file = next((d / name for d in (root / split, root) if (d / name).is_file()), None)
            if file is None:
                raise DataError(f"{path}: line {lineno}: image file {name!r} not found in "
                                f"{root / split} or {root}")
            files.append(file)
            where.append(f"{path}: line {lineno}")
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


def cache_key(parts: Iterable[bytes], files: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over the parts and every file's relative name and content."""
    key = hashlib.sha256(b"fer-search data cache v%d\0" % CACHE_VERSION)
    for part in parts:
        key.update(part + b"\0")
    for file in files:
        if root is not None:  # in a folder the names matter too; a single file is just content
            key.update(file.relative_to(root).as_posix().encode() + b"\0")
        key.update(file_digest(file))
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


def default_cache_dir() -> Path:
    return Path(os.environ.get("FER_CACHE_DIR") or Path.home() / ".cache" / "fer-search")


def save_cache(path: Path, classes: list[str], splits: dict[str, Split]) -> None:
    """Write atomically: a temp file in the same folder, then os.replace."""
    arrays = {"classes": np.array(classes, dtype=str)}
    for name, split in splits.items():
        arrays[f"{name}_images"] = split.images
        if split.labels is not None:
            arrays[f"{name}_labels"] = split.labels
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load_dataset(path: str | os.PathLike | None = None, *, load_size: int = 128,
                 cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a FER2013 CSV, a split folder, a DR folder, or (None) the embedded demo data.

    Decoded once, then read from the cache in `cache_dir` ($FER_CACHE_DIR or
    ~/.cache/fer-search); a change to any source file gives a new key.
    """
    if load_size < 1:
        raise ValueError(f"load_size must be a positive integer, got {load_size}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if path is None:
        source = f"embedded demo data (seed {EMBEDDED_SEED})"
        layout = "embedded"
        parts, files = embedded_key()
        key = cache_key(parts, files)
        decode: Callable[[], tuple[list[str], dict[str, Split]]] = decode_embedded
    else:
        root = Path(path)
        source = os.fspath(path)
        layout = detect_layout(root)
        files = source_files(root, layout)
        # load_size only changes DR images; FER keys ignore it so one cache serves every size
        size = b"size %d" % load_size if layout == "dr_folder" else b""
        key = cache_key([layout.encode(), size], files, root if root.is_dir() else None)

        def decode() -> tuple[list[str], dict[str, Split]]:
            return LAYOUTS[layout](root, load_size)

    file = cache / f"{layout}-{key[:32]}.npz"
    cached = read_cache(file) if file.is_file() else None
    if cached is None:
        cached = decode()  # raises DataError before anything is written
        save_cache(file, *cached)
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
    width = max(12, max(len(c) for c in data.classes) + 1)
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
