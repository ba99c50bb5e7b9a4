"""Export the best run(s) of a finished or resumed experiment to ONNX.

    python -m search.export --experiment runs/imbalance [--top-k 3] [--out DIR]
        [--tflite [--tflite-quant fp16 dynamic-int8 int8] [--tflite-max-f1-drop 0.02]]

`search.run` calls `export_trial` for the winner at the end of a search; this CLI repeats
that, or exports the K best (into DIR/rank1-<trial id>, DIR/rank2-..., ...). After a
confirmation stage the ranking is the confirmed configurations' by mean validation score,
each exported as its best seed's run, as search.run picks the winner; without one it is
the search's trials by best validation score. The parity check and model card come from
`fer.export`; they use validation images, so the test split stays read by `search.run`
alone. `--tflite` adds the TFLite models of `fer.export.tflite` (full INT8 calibrated on training
images and kept only if validation macro-F1 holds).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fer.export import tflite
from search.confirm import collect_confirmation, rank_confirmed, read_confirm_spec
from search.report import TrialRecord, collect_trials, rank_trials, read_spec

def trial_checkpoint(record: TrialRecord, metric: str, mode: str) -> str:
    """The run's checkpoint file by trainables' one rule (`best_checkpoint_path`): its
    finished pipeline's best.pt (post-hoc offsets included) for the pipeline's own criterion,
    else its best reported epoch's."""
    from trainables import best_checkpoint_path

    return best_checkpoint_path(record.path, metric=metric, mode=mode)


def load_trial(record: TrialRecord, metric: str, mode: str) -> tuple[str, dict[str, Any]]:
    """The run's checkpoint path and the checkpoint loaded from it, for callers that read it
    more than once (the test read and the export share one load)."""
    from fer.train.checkpoint import load_checkpoint

    path = trial_checkpoint(record, metric, mode)
    return path, load_checkpoint(path)


def export_trial(record: TrialRecord, out_dir: str | os.PathLike, dataset: Any, metric: str, mode: str,
                 why: str, loaded: tuple[str, dict[str, Any]] | None = None,
                 tflite: Any = None) -> dict:
    """fer.export's ONNX export + parity check + model card for one trial, on val images; the
    card's "source" names the run and `why` it was the one exported. `loaded` is the run's
    (path, checkpoint) from `load_trial` when the caller has it already; `tflite`
    (fer.export.tflite.TFLiteOptions) adds the TFLite models."""
    from fer.export.export import calibration_images, export_checkpoint

    val = dataset.splits["val"]
    path, checkpoint = loaded or load_trial(record, metric, mode)
    return export_checkpoint(
        checkpoint,
        str(out_dir),
        images=val.images,
        labels=val.labels,
        data_source=f"{dataset.source} (val split)",
        provenance={"trial_id": record.trial_id, "checkpoint": path, "trial_dir": record.path, "why": why},
        calib_images=calibration_images(dataset) if tflite is not None else None,
        tflite=tflite,
    )


def load_records(experiment: str | os.PathLike) -> tuple[dict[str, Any], list[TrialRecord]]:
    spec = read_spec(experiment)
    records = collect_trials(experiment, spec["metric"], spec["time_attr"], spec["max_t"], spec["baseline"])
    return spec, records


def ranked_runs(experiment: str, spec: dict[str, Any]) -> list[tuple[TrialRecord, str]]:
    """(run, how it ranks) best first: the confirmed configurations when the experiment has
    a finished confirmation stage, else the search's trials."""
    metric, mode = spec["metric"], spec["mode"]
    saved = read_confirm_spec(Path(experiment))
    if saved is not None:
        candidates = collect_confirmation(experiment, saved[0], metric, spec["time_attr"], spec["max_t"])
        ranked = [(c, c.best_run(mode)) for c in rank_confirmed(candidates, mode)]
        return [(run, f"configuration {c.name}, mean {metric} {c.mean(mode):.4f} over {len(c.values(mode))} "
                      f"seeds; its best seed's run ({run.best(mode)[1]:.4f})") for c, run in ranked if run]
    _, records = load_records(experiment)
    return [(r, f"trial {r.trial_id}, best {metric} {r.best(mode)[1]:.4f}") for r in rank_trials(records, mode)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search.export", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, metavar="DIR",
                        help="the experiment folder search.run wrote (<storage>/<name>)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K",
                        help="export the K best trials by best validation metric (default: 1)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <experiment>/export)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="data for the parity check (default: the data the search used)")
    tflite.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fer.data import DataError, load_dataset

    try:
        options = tflite.options_from_args(args)  # first: a missing [tflite] extra fails in one line
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        # Ray's ExperimentAnalysis reads a plain relative path as a URI without a scheme and
        # fails; the README's `--experiment runs/imbalance` is relative to where search.run ran.
        if "://" not in args.experiment:
            args.experiment = str(Path(args.experiment).expanduser().resolve())
        spec = read_spec(args.experiment)
        ranked = ranked_runs(args.experiment, spec)
        if not ranked:
            raise ValueError(f"{args.experiment}: no run reported {spec['metric']}")
        if args.top_k > len(ranked):
            print(f"note: {len(ranked)} ranked run(s) to export, not {args.top_k}")
        dataset = load_dataset(args.data if args.data is not None else spec["data"])
        out = Path(args.out) if args.out else Path(args.experiment, "export")
        failed = False
        for rank, (record, how) in enumerate(ranked[: args.top_k], start=1):
            target = out if args.top_k == 1 else out / f"rank{rank}-{record.trial_id}"
            print(f"rank {rank}: {how} -> {target}")
            card = export_trial(record, target, dataset, spec["metric"], spec["mode"], why=f"rank {rank}: {how}",
                                tflite=options)
            failed = failed or ("tflite" in card and not tflite.passed(card["tflite"]))
    except (ValueError, DataError, OSError) as err:  # OSError: an unwritable or full --out
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
