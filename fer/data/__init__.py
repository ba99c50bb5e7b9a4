"""The one data layer: a `--data` path (or nothing) becomes an in-memory `Dataset`.

Three layouts are read (`fer.data.layouts`, see `LAYOUTS`): a FER2013 CSV, a split folder
and a DR-grading folder. No path means the embedded demo data of `fer.synth` (seed 0),
read through the FER CSV path. Every source is decoded once and cached on disk
(`fer.data.cache`). The arrays are uint8 and C-contiguous, so a trial driver can `ray.put`
a `Dataset` once and every trial shares it zero-copy (this package never imports ray).

    types.py    Split, Dataset, DataError, the class names
    parse.py    the vectorised FER pixel parser and the CSV column reader
    layouts.py  FER CSV, split folders, DR image folders with `name label` lists
    cache.py    the decode cache (keys, .npz read/write)
    load.py     load_dataset: path -> layout -> cache or decode
    cli.py      python -m fer.data [PATH]
"""

from __future__ import annotations

from fer.data.cache import CACHE_VERSION, cache_key, default_cache_dir, read_cache, save_cache
from fer.data.cli import format_table, main
from fer.data.layouts import (
    LAYOUTS,
    decode_dr_folder,
    decode_fer_csv,
    decode_split_folder,
    detect_layout,
    source_files,
)
from fer.data.load import EMBEDDED_SEED, load_dataset
from fer.data.parse import parse_pixel_rows, read_csv_columns
from fer.data.types import DR_CLASSES, FER_CLASSES, FER_USAGE, SPLITS, DataError, Dataset, Split
from fer.io import DIGEST_MEMO

__all__ = [
    "CACHE_VERSION", "DIGEST_MEMO", "DR_CLASSES", "EMBEDDED_SEED", "FER_CLASSES", "FER_USAGE",
    "LAYOUTS", "SPLITS", "DataError", "Dataset", "Split", "cache_key", "decode_dr_folder", "decode_fer_csv",
    "decode_split_folder", "default_cache_dir", "detect_layout", "format_table", "load_dataset", "main",
    "parse_pixel_rows", "read_cache", "read_csv_columns", "save_cache", "source_files",
]
