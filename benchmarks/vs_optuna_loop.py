"""What Ray costs on one machine: the default search vs a plain single-process Optuna loop, one run.

    python benchmarks/vs_optuna_loop.py --budget small     # ~6 min on 2 busy cores
    python benchmarks/vs_optuna_loop.py --budget full

Both search the same space with the same TPE sampler (same seed, the baseline enqueued
first) and the same trial count on the same data and cores:

  ray    search.run's Tuner: PruningOptunaSearch + PersistentASHA, trials as Tune
         actors, `max_concurrent` trials at once with one torch thread each
  optuna one Python process: `study.optimize` calling fer.ssl.pipeline.run_pipeline, whose
         report callback does `trial.report(<the space's metric>, epoch)` and raises
         `optuna.TrialPruned` when Optuna's SuccessiveHalvingPruner (asynchronous
         successive halving, the same rule as ASHA: same grace period and reduction
         factor) says so; one trial at a time with every core as torch threads

Reported: wall time of each (Ray's cluster start and stop included), their ratio, epochs
trained and seconds per epoch (the two pruners stop different trials, so per-epoch time
is the fair cost), and best val macro-F1. The Ray cluster, and /tmp/ray.lock, are held
only while the Ray search runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_args,
    format_table,
    get_budget,
    load_budget_space,
    load_data,
    ray_session,
    run_search,
    save_json,
)


def run_optuna_loop(space: Any, data: Any, threads: int) -> dict[str, Any]:
    """The same search as a plain Optuna script would write it."""
    import optuna
    import torch

    from fer.ssl.pipeline import run_pipeline

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize" if space.mode == "max" else "minimize",
        sampler=space.build_sampler(),
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=space.grace_period, reduction_factor=space.reduction_factor),
    )
    study.enqueue_trial(space.baseline_point())
    trials: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        constants = space(trial)  # define-by-run: suggests the active parameters
        cfg = space.trial_config({**trial.params, **constants})
        curve: list[tuple[int, float]] = []
        record = {"number": trial.number, "params": dict(trial.params), "curve": curve, "pruned": False}
        trials.append(record)

        def report(metrics: dict[str, Any], checkpoint: Any, state: Any) -> None:
            curve.append((int(metrics["epoch"]), float(metrics[space.metric])))
            trial.report(float(metrics[space.metric]), int(metrics["epoch"]))
            if trial.should_prune():
                record["pruned"] = True
                raise optuna.TrialPruned()

        run_pipeline(cfg, data, report=report, progress=False)
        return max(v for _, v in curve)

    started = time.time()
    study.optimize(objective, n_trials=space.num_samples, catch=(RuntimeError, ValueError))
    wall = time.time() - started
    best = max((max(v for _, v in t["curve"]) for t in trials if t["curve"]), default=None)
    return {"wall_s": wall, "trials": trials, "total_epochs": sum(len(t["curve"]) for t in trials),
            "stopped_early": sum(t["pruned"] for t in trials), "best_val": best, "threads": threads}


def compare(ray_run: dict[str, Any], loop: dict[str, Any]) -> tuple[list[str], list[list], dict[str, float]]:
    """The side-by-side table and the ratios (Ray over the plain loop)."""
    header = ["search", "wall s", "trials", "stopped early", "epochs", "s / epoch", "best val F1"]
    ray_wall = ray_run["wall_s"] + ray_run["cluster_s"]
    rows = [
        ["Ray Tune (search.run pieces)", round(ray_wall, 1), len(ray_run["trials"]), ray_run["stopped_early"],
         ray_run["total_epochs"], round(ray_wall / max(ray_run["total_epochs"], 1), 2),
         (ray_run.get("winner") or {}).get("best_val")],
        ["plain Optuna loop, 1 process", round(loop["wall_s"], 1), len(loop["trials"]), loop["stopped_early"],
         loop["total_epochs"], round(loop["wall_s"] / max(loop["total_epochs"], 1), 2), loop["best_val"]],
    ]
    ratios = {"wall_ratio_ray_over_loop": ray_wall / loop["wall_s"],
              "per_epoch_ratio_ray_over_loop": (ray_wall / max(ray_run["total_epochs"], 1))
              / (loop["wall_s"] / max(loop["total_epochs"], 1)),
              "ray_cluster_start_stop_s": ray_run["cluster_s"]}
    return header, rows, ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)

    from trainables import put_dataset

    budget = get_budget(args.budget)
    space = load_budget_space(budget, seed=args.seed)
    data = load_data(budget)
    cores = os.cpu_count() or 1
    print(f"budget {args.budget}: {data.source}, {space.num_samples} trials x up to {space.max_t} epochs, "
          f"{cores} cores; Ray: {space.max_concurrent} trials x 1 thread, loop: 1 trial x {cores} threads")

    # Ray first, then the loop: the lock and the cluster are given back before the loop runs.
    t0 = time.time()
    with ray_session(num_cpus=cores), tempfile.TemporaryDirectory(prefix="bench-vs-optuna-") as storage:
        t1 = time.time()
        ref = put_dataset(data)
        ray_run = run_search(space, "tpe_asha", ref, data, storage, evaluate_test=False)
        t2 = time.time()
    t3 = time.time()
    # Cluster start + object-store put + shutdown: what a plain script never pays.
    ray_run["cluster_s"] = (t1 - t0) + (t2 - t1 - ray_run["wall_s"]) + (t3 - t2)
    print(f"  ray: {ray_run['wall_s']:.0f} s in Tuner.fit + {ray_run['cluster_s']:.0f} s cluster", flush=True)
    loop = run_optuna_loop(space, data, threads=cores)
    print(f"  optuna loop: {loop['wall_s']:.0f} s", flush=True)

    header, rows, ratios = compare(ray_run, loop)
    print(format_table(header, rows))
    print(f"wall time Ray / plain loop: {ratios['wall_ratio_ray_over_loop']:.2f}x; per epoch "
          f"{ratios['per_epoch_ratio_ray_over_loop']:.2f}x; Ray cluster start+stop {ratios['ray_cluster_start_stop_s']:.1f} s")
    path = save_json("vs_optuna_loop", args.budget, {
        "space": str(space.path), "num_samples": space.num_samples, "max_t": space.max_t, "seed": args.seed,
        "data": data.source, "table": {"header": header, "rows": rows}, "ratios": ratios,
        "ray": ray_run, "optuna_loop": loop}, args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
