"""The three on-disk layouts a `--data` path can have (see `LAYOUTS`):
  * a FER2013 CSV (`emotion,pixels,Usage`),
  * a split folder (`train.csv`, `val.csv`, `test.csv`, optional `unlabeled.csv`),
  * a DR-grading folder (`train/ val/ test/` images + `train.txt val.txt test.txt`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from fer.data.parse import parse_labels, parse_pixel_rows, read_csv_columns, split_codes
from fer.data.types import DR_CLASSES, FER_CLASSES, FER_USAGE, IMAGE_EXTENSIONS, SPLITS, DataError, Split

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
# Which layout a path is
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
