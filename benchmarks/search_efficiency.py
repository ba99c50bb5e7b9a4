"""Does TPE + ASHA find a better model for less compute? Three searches, one run, same seed.

    python benchmarks/search_efficiency.py --budget small     # ~10 min on 2 busy cores
    python benchmarks/search_efficiency.py --budget full      # spaces/imbalance.yaml as is (~3 x 10 min idle)
    python benchmarks/search_efficiency.py --budget full --gpus-per-trial 0.25 --cpus-per-trial 4 \
        --max-concurrent 4                                    # on one GPU: four trials share it

On the embedded demo data, with the same space, trial count, concurrency and seed (the
space's baseline evaluated first in each), it runs one after the other:

  tpe_asha     Optuna TPE + ASHA: the tool's default (search.run)
  random_fifo  random search, every trial to the end
  tpe_fifo     Optuna TPE, every trial to the end

and reports total epochs spent, wall time, best val macro-F1, the winner's test macro-F1
(the winner's checkpoint read once on test, as search.run does), and how many epochs
each search had spent (all trials, wall-clock order) when a trial first reached 98% of
the best val macro-F1 any of the three found. The script takes /tmp/ray.lock itself
while its Ray cluster runs. The JSON is rewritten after each search, so a run cut off
part-way keeps the searches that finished.

--cpus-per-trial / --gpus-per-trial / --max-concurrent apply to all three searches alike
(defaults: 1 CPU, no GPU, the space's max_concurrent).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SEARCH_VARIANTS,
    add_common_args,
    epochs_to_reach,
    format_table,
    get_budget,
    load_budget_space,
    load_data,
    ray_session,
    run_search,
    save_json,
)

TARGET_FRACTION = 0.98


def summarize(runs: list[dict], fraction: float = TARGET_FRACTION) -> tuple[list[str], list[list]]:
    """The comparison table: one row per search, the 98% target from the best of all of them."""
    best = max((r["winner"]["best_val"] for r in runs if r.get("winner")), default=None)
    target = None if best is None else fraction * best
    header = ["search", "trials", "stopped early", "ended < max_t", "epochs", "wall s", "best val F1", "winner test F1",
              f"epochs to {fraction:.0%} of best"]
    rows = []
    for run in runs:
        winner = run.get("winner") or {}
        reach = epochs_to_reach(run["events"], target) if target is not None else None
        run["epochs_to_target"] = reach
        rows.append([run["label"], len(run["trials"]), run["stopped_early"], run.get("ended_before_max_t"),
                     run["total_epochs"],
                     round(run["wall_s"], 1), winner.get("best_val"), winner.get("test_macro_f1"),
                     reach if reach is not None else "not reached"])
    return header, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--variants", default=",".join(SEARCH_VARIANTS),
                        help=f"comma-separated, from {', '.join(SEARCH_VARIANTS)}")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C",
                        help="CPUs (= torch threads) per trial, every search alike (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G",
                        help="GPU fraction per trial, every search alike (0.25: four share one GPU; default 0)")
    parser.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                        help="trials at once, every search alike (default: the space's)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in variants:
        if name not in SEARCH_VARIANTS:
            parser.error(f"unknown variant {name!r}; valid: {', '.join(SEARCH_VARIANTS)}")
    if not args.cpus_per_trial > 0:
        parser.error(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if not 0 <= args.gpus_per_trial <= 1:
        parser.error(f"--gpus-per-trial must be in [0, 1], got {args.gpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        parser.error(f"--max-concurrent must be >= 1, got {args.max_concurrent}")

    from trainables import put_dataset

    budget = get_budget(args.budget)
    space = load_budget_space(budget, seed=args.seed)
    if args.max_concurrent is not None:
        space = dataclasses.replace(space, max_concurrent=args.max_concurrent)
    data = load_data(budget)
    print(f"budget {args.budget}: {data.source}, train {len(data.splits['train'].images)} images, "
          f"{space.num_samples} trials x up to {space.max_t} epochs, {space.max_concurrent} at once, "
          f"image {space.fixed['image_size']} px, ASHA grace {space.grace_period}, seed {args.seed}, "
          f"{args.cpus_per_trial:g} CPU + {args.gpus_per_trial:g} GPU per trial")
    started = time.time()
    runs: list[dict] = []
    path = None
    with ray_session(), tempfile.TemporaryDirectory(prefix="bench-search-") as storage:
        ref = put_dataset(data)
        for name in variants:
            run = run_search(space, name, ref, data, storage, cpus_per_trial=args.cpus_per_trial,
                             gpus_per_trial=args.gpus_per_trial)
            print(f"  {run['label']}: {run['wall_s']:.0f} s, {run['total_epochs']} epochs", flush=True)
            runs.append(run)
            path = write_results(args, space, data, runs, started)
    header, rows = summarize(runs)
    print(format_table(header, rows))
    print(f"raw results: {path}")
    return 0


def write_results(args: argparse.Namespace, space: Any, data: Any, runs: list[dict], started: float) -> Path:
    """The JSON of the searches done so far (rewritten after each one)."""
    header, rows = summarize(runs)
    return save_json("search_efficiency", args.budget, {
        "space": str(space.path), "num_samples": space.num_samples, "max_t": space.max_t,
        "max_concurrent": space.max_concurrent, "cpus_per_trial": args.cpus_per_trial,
        "gpus_per_trial": args.gpus_per_trial, "seed": args.seed, "data": data.source,
        "total_wall_s": time.time() - started, "target_fraction": TARGET_FRACTION,
        "variants_done": [r["variant"] for r in runs],
        "table": {"header": header, "rows": rows}, "runs": runs}, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
