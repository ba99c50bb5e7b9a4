"""Export the best trial(s) of a finished or resumed experiment to ONNX.

    python -m search.export --experiment runs/imbalance [--top-k 3] [--out DIR]

`search.run` calls `export_trial` for the winner at the end of a search; this CLI repeats
that, or exports the K best trials (into DIR/rank1-<trial id>, DIR/rank2-..., ...). The
parity check and model card come from `fer.export`; they use validation images, so the
test split stays read once, by `search.run`, for the winner.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from search.report import TrialRecord, collect_trials, rank_trials, read_spec

FINAL_CHECKPOINT = "best.pt"  # fer.pipeline's final checkpoint (post-hoc offsets included)


def trial_checkpoint(record: TrialRecord, metric: str, mode: str) -> str:
    """The trial's final checkpoint when it finished both stages, else its best reported epoch's."""
    from trainables import best_checkpoint_path

    final = Path(record.path, FINAL_CHECKPOINT)
    if final.is_file():
        return str(final)
    return best_checkpoint_path(record.path, metric=metric, mode=mode)


def export_trial(record: TrialRecord, out_dir: str | os.PathLike, dataset: Any, metric: str, mode: str) -> dict:
    """fer.export's ONNX export + parity check + model card for one trial, on val images."""
    from fer.export import export_checkpoint

    val = dataset.splits["val"]
    checkpoint = trial_checkpoint(record, metric, mode)
    card = export_checkpoint(
        checkpoint,
        str(out_dir),
        images=val.images,
        labels=val.labels,
        data_source=f"{dataset.source} (val split)",
    )
    card["search"] = {"trial_id": record.trial_id, "checkpoint": checkpoint, "trial_dir": record.path}
    return card


def load_records(experiment: str | os.PathLike) -> tuple[dict[str, Any], list[TrialRecord]]:
    spec = read_spec(experiment)
    records = collect_trials(experiment, spec["metric"], spec["time_attr"], spec["max_t"], spec["baseline"])
    return spec, records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search.export", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, metavar="DIR",
                        help="the experiment folder search.run wrote (<storage>/<name>)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K",
                        help="export the K best trials by best validation metric (default: 1)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <experiment>/export)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="data for the parity check (default: the data the search used)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fer.data import DataError, load_dataset

    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        # Ray's ExperimentAnalysis reads a plain relative path as a URI without a scheme and
        # fails; the README's `--experiment runs/imbalance` is relative to where search.run ran.
        if "://" not in args.experiment:
            args.experiment = str(Path(args.experiment).expanduser().resolve())
        spec, records = load_records(args.experiment)
        ranked = rank_trials(records, spec["mode"])
        if not ranked:
            raise ValueError(f"{args.experiment}: no trial reported {spec['metric']}")
        dataset = load_dataset(args.data if args.data is not None else spec["data"])
        out = Path(args.out) if args.out else Path(args.experiment, "export")
        for rank, record in enumerate(ranked[: args.top_k], start=1):
            target = out if args.top_k == 1 else out / f"rank{rank}-{record.trial_id}"
            _, value = record.best(spec["mode"])
            print(f"rank {rank}: trial {record.trial_id}, best {spec['metric']} {value:.4f} -> {target}")
            export_trial(record, target, dataset, spec["metric"], spec["mode"])
    except (ValueError, DataError, OSError) as err:  # OSError: an unwritable or full --out
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
