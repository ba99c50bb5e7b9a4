"""The one data layer: a `--data` path (or nothing) becomes a `Dataset` of uint8 arrays.

Three layouts are read (`fer.data.layouts`, see `LAYOUTS`): a FER2013 CSV, a split folder
and a DR-grading folder. No path means the embedded demo data of `fer.data.synth` (seed 0),
read through the FER CSV path. Every source is decoded once per node into the cache
(`fer.data.cache`: one `.npy` per split) and memory-mapped read-only from there, so memory
does not grow with the data set: processes on a node share the page cache. A trial driver
hands trials `Dataset.origin` (a few paths) and each trial maps the files itself
(`open_mapped`); this package never imports ray.

    types.py     Split, Dataset, LoadOptions, DataError, the class names
    parse.py     the vectorised FER pixel parser and the CSV column reader
    fundus.py    one image file -> a square RGB array (retina crop, Graham filter, any mode)
    progress.py  the decode progress line
    layouts.py   FER CSV, split folders, DR image folders with `name label` lists
    cache.py     the decode cache (keys, memory-mapped .npy folders, atomic build)
    load.py      load_dataset: path -> layout -> cache or decode; open_mapped
    cli.py       python -m fer.data [PATH]
    synth.py     the embedded demo data: synthetic faces as a FER2013 CSV (python -m fer.data.synth)
    fundus_synth.py  seeded fundus-like DR folders, for tests and benchmarks
"""

from __future__ import annotations

from fer.data.cache import CACHE_VERSION, CacheWriteError, CacheWriter, cache_key, default_cache_dir, read_cache
from fer.data.cli import format_table, main
from fer.data.fundus import LOAD_CROPS, LOAD_FILTERS, load_fundus
from fer.data.layouts import (
    LAYOUTS,
    decode_dr_folder,
    decode_fer_csv,
    decode_split_folder,
    detect_layout,
    source_files,
)
from fer.data.load import EMBEDDED_SEED, load_configured, load_dataset, open_mapped
from fer.data.parse import parse_pixel_rows, read_csv_columns
from fer.data.types import (
    DR_CLASSES,
    FER_CLASSES,
    FER_USAGE,
    SPLITS,
    DataError,
    Dataset,
    Decoded,
    LoadOptions,
    MappedOrigin,
    Split,
)
from fer.io import DIGEST_MEMO
from fer.lazy import lazy_exports

# the generators, re-exported lazily (`fer.lazy`): pandas and PIL drawing only when used
_EXPORTS: dict[str, str] = {"write_csv": "fer.data.synth", "write_fundus_folder": "fer.data.fundus_synth"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "CACHE_VERSION", "DIGEST_MEMO", "DR_CLASSES", "EMBEDDED_SEED", "FER_CLASSES", "FER_USAGE",
    "LAYOUTS", "LOAD_CROPS", "LOAD_FILTERS", "SPLITS", "CacheWriteError", "CacheWriter", "DataError",
    "Dataset", "Decoded", "LoadOptions", "MappedOrigin", "Split", "cache_key", "decode_dr_folder",
    "decode_fer_csv", "decode_split_folder", "default_cache_dir", "detect_layout", "format_table",
    "load_configured", "load_dataset", "load_fundus", "main", "open_mapped", "parse_pixel_rows", "read_cache",
    "read_csv_columns", "source_files", "write_csv", "write_fundus_folder",
]
