"""`python -m fer.data [PATH]`: load a data set and print its splits and class counts."""

from __future__ import annotations

import argparse
import sys

from fer.data.load import load_dataset
from fer.data.types import Dataset
from fer.names import LOAD_CROPS, LOAD_FILTERS

SHOWN_BAD = 20  # skipped files listed by name in the table


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
    if data.skipped:
        shown_bad = data.skipped[:SHOWN_BAD]
        out += ["", f"skipped {len(data.skipped)} bad images (--skip-bad):"] + [f"  {m}" for m in shown_bad]
        if len(data.skipped) > SHOWN_BAD:
            out.append(f"  ... and {len(data.skipped) - SHOWN_BAD} more")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer.data", description="Load a data set and "
                                     "print its splits and class counts (no PATH: embedded demo data).")
    parser.add_argument("path", nargs="?", default=None,
                        help="FER2013 CSV, split folder or DR folder")
    parser.add_argument("--load-size", type=int, default=128, help="DR folders: image side after loading")
    parser.add_argument("--load-crop", default="retina", choices=LOAD_CROPS,
                        help="DR folders: retina = crop the black border and pad to a square (round retina); "
                             "squash = resize the whole photograph")
    parser.add_argument("--load-filter", default="none", choices=LOAD_FILTERS,
                        help="DR folders: graham = subtract the local average colour (Ben Graham, Kaggle DR 2015)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out unreadable, missing or unlisted images (counted) instead of stopping")
    parser.add_argument("--cache-dir", default=None, help="default: $FER_CACHE_DIR or ~/.cache/fer-search")
    args = parser.parse_args(argv)
    try:
        data = load_dataset(args.path, load_size=args.load_size, load_crop=args.load_crop,
                            load_filter=args.load_filter, skip_bad=args.skip_bad, cache_dir=args.cache_dir)
    except ValueError as e:  # a DataError, or a load option out of range
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(data))
    return 0
