"""Does the searched imbalance handling beat the plain baseline? Both trained in one run.

    python benchmarks/imbalance.py --budget small      # after search_efficiency.py --budget small
    python benchmarks/imbalance.py --budget full --winner-config runs/imbalance/best_config.yaml

The plain baseline is the space's reference point (cross-entropy, no class weights, no
per-class cap); the winner is the TPE + ASHA search's best trial, read from
search_efficiency's results (or any flat TrialConfig YAML, e.g. search.run's
best_config.yaml). Both are trained again here, one after the other in this process,
with the budget's epochs, data and seed and one torch thread (as in the search's trials:
the winner's model is then the one the search scored), so neither is cut short by ASHA, and both are
scored on val and test: macro-F1 and the F1 of the two classes rarest in train
(Disgust, then the next rarest). The baseline is shown twice: with the pipeline's
default post-hoc rule (tau * log prior, itself an imbalance remedy) and without it
(raw argmax: the truly plain model). No Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    add_common_args,
    format_table,
    get_budget,
    load_budget_space,
    load_data,
    rarest_classes,
    save_json,
)


def winner_overrides(path: Path) -> dict[str, Any]:
    """The winner's TrialConfig fields from search_efficiency's JSON or a flat config YAML."""
    from fer.train.config import config_field_names

    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no search winner; run benchmarks/search_efficiency.py with the same --budget first, "
            "or pass --winner-config FILE.yaml (e.g. a search.run experiment's best_config.yaml)")
    if path.suffix == ".json":
        runs = {r["variant"]: r for r in json.loads(path.read_text())["runs"]}
        run = runs.get("tpe_asha") or next(iter(runs.values()))
        if not run.get("winner"):
            raise ValueError(f"{path}: search {run['variant']!r} has no winner (every trial errored?)")
        config = run["winner"]["config"]
    else:
        config = yaml.safe_load(path.read_text()) or {}
    known = set(config_field_names())
    return {k: v for k, v in config.items() if k in known and k != "data"}


def score(model: Any, cfg: Any, data: Any, offsets: list[float] | None, rare: list[str]) -> dict[str, Any]:
    """Macro-F1 and the rare classes' F1 on val and test under one decision rule."""
    from fer.evaluate.evaluate import evaluate_model

    out: dict[str, Any] = {}
    for split in ("val", "test"):
        part = data.splits[split]
        metrics, _ = evaluate_model(model, part.images, part.labels, data.classes, image_size=cfg.image_size,
                                    device="cpu", offsets=offsets)
        out[f"{split}_macro_f1"] = float(metrics["macro_f1"])
        out[f"{split}_per_class_f1"] = {name: float(metrics["per_class"][name]["f1"]) for name in data.classes}
        for name in rare:
            out[f"{split}_f1_{name}"] = out[f"{split}_per_class_f1"][name]
    return out


def train(cfg: Any, data: Any) -> tuple[Any, list[float] | None, float, dict[str, Any]]:
    from fer.ssl.pipeline import run_pipeline

    started = time.time()
    result = run_pipeline(cfg, data, progress=False)
    return result.model, result.checkpoint.get("posthoc_offsets"), time.time() - started, result.metrics


def build_rows(results: dict[str, dict[str, Any]], rare: list[str]) -> tuple[list[str], list[list]]:
    header = ["model", "val macro-F1", "test macro-F1"] + [f"{name} F1 val / test" for name in rare]
    rows = []
    for label, r in results.items():
        rows.append([label, r["val_macro_f1"], r["test_macro_f1"]]
                    + [f"{r[f'val_f1_{n}']:.3f} / {r[f'test_f1_{n}']:.3f}" for n in rare])
    return header, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--winner-config", default=None, metavar="FILE",
                        help="search_efficiency JSON or a flat TrialConfig YAML "
                        "(default: benchmarks/results/search_efficiency_<budget>.json)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both trainings (default 1, as each search trial trains: "
                             "float sums depend on the thread count, and at this budget another count "
                             "trains a different model from the same seed)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected a whole number >= 1, got {args.threads}")

    import torch

    from fer.train.config import apply_overrides

    budget = get_budget(args.budget)
    space = load_budget_space(budget, seed=args.seed)
    data = load_data(budget)
    source = Path(args.winner_config or RESULTS_DIR / f"search_efficiency_{args.budget}.json")
    try:
        overrides = winner_overrides(source)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Same budget for both: the space's fixed values (epochs, image size, seed) win over the file's.
    fixed = {k: v for k, v in space.fixed.items() if k != "data"}
    baseline_cfg = space.trial_config(space.baseline_point())
    winner_cfg = apply_overrides(baseline_cfg, {**overrides, **fixed}, source=str(source))
    rare = rarest_classes(data)
    torch.set_num_threads(args.threads)
    print(f"budget {args.budget}: {data.source}; {args.threads} torch thread(s); rarest in train: {', '.join(rare)} "
          f"({', '.join(str(int(data.class_counts()[data.classes.index(n)])) for n in rare)} images); "
          f"{winner_cfg.epochs}+{winner_cfg.student_epochs} epochs each; winner from {source}")

    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, Any] = {}
    for label, cfg in (("baseline", baseline_cfg), ("winner", winner_cfg)):
        model, offsets, seconds, metrics = train(cfg, data)
        print(f"  trained {label} in {seconds:.0f} s", flush=True)
        runs[label] = {"config": dataclasses.asdict(cfg), "train_s": seconds, "pipeline": metrics}
        if label == "baseline":
            results["plain baseline (ce, no weights, no cap; raw argmax)"] = score(model, cfg, data, None, rare)
            results[f"plain baseline + post-hoc {cfg.posthoc} (pipeline default)"] = \
                score(model, cfg, data, offsets, rare)
        else:
            results["search winner (TPE + ASHA)"] = score(model, cfg, data, offsets, rare)
    header, rows = build_rows(results, rare)
    print(format_table(header, rows))
    searched = {k: v for k, v in overrides.items() if k in {p.name for p in space.parameters}}
    print("winner: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in searched.items()))
    path = save_json("imbalance", args.budget, {
        "data": data.source, "rarest": rare, "winner_source": str(source), "seed": args.seed, "threads": args.threads,
        "table": {"header": header, "rows": rows}, "results": results, "runs": runs}, args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
