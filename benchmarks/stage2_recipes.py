"""Stage-2 recipes through the whole pipeline, from one shared teacher per data set. Val only.

The teacher (`fer.train`'s defaults) is trained once; each recipe then resumes the pipeline
from the teacher's last epoch (as a search's student forks do, fer.ssl.teachers), so every recipe
runs stage 2 as `fer.train` would, with its own supervised-only control at the same budget
(cfg.pool_control), and is scored on val: the student and the control each with their own
post-hoc offsets, student - control and its paired bootstrap interval (metrics
"pool_gain_val", "pool_gain_val_ci95"). Test is never read here: this is where defaults are
chosen.

    default     today's stage 2: 4 online epochs (flexmatch) on the labelled split + the
                teacher's picks, the whole pool every step
    rounds 2    the same 4 epochs in 2 rounds of 2 (student_rounds): round 2 is labelled by
                round 1's student and starts again from the teacher (Noisy Student)
    rounds 4    4 rounds of 1 epoch
    8 epochs / 8 epochs, rounds 2   twice the budget (the control gets it too)
    offline     the teacher's pseudo-labels alone (student_mode offline), 4 epochs
    offline rounds 2   the same in 2 rounds of 2, round 2 on round 1's student's pseudo-labels

    python benchmarks/stage2_recipes.py --sets demo/8 digits
    python benchmarks/stage2_recipes.py --sets digits --recipes default "rounds 2" --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import format_table, save_json  # noqa: E402
from quality import SETS, each_set  # noqa: E402

RECIPES = {"default": {}, "rounds 2": {"student_rounds": 2}, "rounds 4": {"student_rounds": 4},
           "8 epochs": {"student_epochs": 8}, "8 epochs, rounds 2": {"student_epochs": 8, "student_rounds": 2},
           "offline": {"student_mode": "offline"},
           "offline rounds 2": {"student_mode": "offline", "student_rounds": 2}}
KEPT = ("teacher_val_macro_f1", "student_val_macro_f1", "control_val_macro_f1", "student_val_macro_f1_posthoc",
        "control_val_macro_f1_posthoc", "pool_gain_val", "pool_gain_val_ci95", "pseudo_kept", "pseudo_precision",
        "pool_kept_share", "pool_kept_precision", "student_round", "rounds", "final_stage")


def measure(name: str, data_path: str | None, recipes: list[str], seed: int) -> dict[str, Any]:
    """The teacher once (its last epoch's resume state kept), then each recipe from it."""
    from fer.data import load_dataset
    from fer.ssl.pipeline import run_pipeline
    from fer.train.config import TrialConfig

    data = load_dataset(data_path)
    cfg, states = TrialConfig(data=data_path, seed=seed), []
    start = time.time()
    run_pipeline(replace(cfg, student_epochs=0), data, progress=False,
                 report=lambda metrics, checkpoint, state: states.append(state))
    result: dict[str, Any] = {"teacher_s": time.time() - start, "recipes": {}}
    for recipe in recipes:
        start = time.time()
        metrics = run_pipeline(replace(cfg, **RECIPES[recipe]), data, progress=False, resume=states[-1]).metrics
        result["recipes"][recipe] = {**{k: metrics.get(k) for k in KEPT}, "seconds": time.time() - start}
        print(f"{name} {recipe}: {result['recipes'][recipe]}", flush=True)
    return result


def rows_of(name: str, result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for recipe, entry in result["recipes"].items():
        low, high = entry["pool_gain_val_ci95"]
        rounds = " / ".join(f"{r['student_val_macro_f1']:.3f}" for r in entry["rounds"] or [])
        rows.append([name, recipe, entry["student_val_macro_f1_posthoc"], entry["control_val_macro_f1_posthoc"],
                     f"{entry['pool_gain_val']:+.3f} ({low:+.3f} to {high:+.3f})", rounds or "-",
                     round(entry["seconds"])])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["default", "rounds 2", "rounds 4"])
    parser.add_argument("--seed", type=int, default=0, help="the teacher's and every recipe's seed")
    parser.add_argument("--json", default=None, help="where the raw results go")
    args = parser.parse_args(argv)
    rows, results = [], {}
    for name, _, data_path in each_set(args.sets, "fer-recipes-"):
        results[name] = measure(name, data_path, args.recipes, args.seed)
        rows += rows_of(name, results[name])
    print(f"\n=== val macro-F1 of stage-2 recipes from one teacher per set (seed {args.seed}), each with post-hoc "
          "offsets, against its own supervised-only control ===")
    print(format_table(["set", "recipe", "student", "control", "student - control (95% CI)", "rounds' best val raw",
                        "s"], rows))
    path = save_json("stage2_recipes", f"seed{args.seed}", {"results": results, "seed": args.seed}, args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
