"""Trials sharing one GPU (fractional GPUs) x AMP on/off: images/s per trial and in total.

    python benchmarks/gpu_sharing.py --budget small     # a few minutes on one GPU
    python benchmarks/gpu_sharing.py --budget full

Without a CUDA GPU it prints one SKIP line and exits 0 (nothing is measured).

With one, for each GPU share g in --shares (1, 0.5, 0.25: one, two, four trials on the
same GPU) and AMP on and off, it runs the product's own front door,

    python -m search.run --space <generated space> --gpus-per-worker g
        --num-samples 1/g --max-concurrent 1/g --cpus-per-worker C

on the embedded demo data (CUDA_VISIBLE_DEVICES pinned to the first GPU, so every trial
shares that one), with a generated space that fixes `amp` and searches only lr (no trial
is stopped early: ASHA's grace period is the whole run). From each trial's reported
epochs it takes fit's own training throughput (`train_images_per_s`, validation
excluded, first epoch = warm-up skipped): the mean per trial, and the total, the sum of
the trials that ran side by side. The search.run subprocess runs under /tmp/ray.lock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, format_table, ray_lock, save_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Per budget: stage-1 epochs (no stage 2: throughput, not accuracy), image side, batch.
GPU_BUDGETS: dict[str, dict[str, int]] = {
    "small": {"epochs": 3, "image_size": 48, "batch_size": 256},
    "full": {"epochs": 6, "image_size": 96, "batch_size": 256},
}


def gpu_available() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, torch.cuda.get_device_name(0)


def space_yaml(amp: bool, trials: int, budget: dict[str, int], seed: int) -> dict[str, Any]:
    """A search space that fixes AMP and the budget, searches only lr, and stops nothing early."""
    return {
        "description": f"gpu_sharing benchmark: amp={amp}, {trials} trial(s) per GPU",
        "metric": {"name": "val_macro_f1", "mode": "max"},
        "fixed": {"model": "mobilenet_v3_small", "epochs": budget["epochs"], "student_epochs": 0,
                  "image_size": budget["image_size"], "batch_size": budget["batch_size"], "amp": amp},
        "parameters": {"lr": {"loguniform": [1.0e-3, 3.0e-3]}},
        "searcher": {"sampler": "random", "seed": seed, "n_startup_trials": 1, "baseline": {}},
        "scheduler": {"name": "asha", "time_attr": "epoch", "grace_period": budget["epochs"],
                      "reduction_factor": 2},
        "run": {"num_samples": trials, "max_concurrent": trials},
    }


def steady_rate(rows: list[dict[str, Any]]) -> float | None:
    """Images/s of a trial over its epochs after the first (time-weighted)."""
    rows = sorted((r for r in rows if r.get("train_images_per_s")), key=lambda r: r["epoch"])
    steady = rows[1:] or rows
    seconds = sum(r["train_seconds"] for r in steady)
    return sum(r["train_images_per_s"] * r["train_seconds"] for r in steady) / seconds if seconds else None


def read_trials(experiment: Path) -> list[float]:
    rates = []
    for results in sorted(experiment.glob("trial_*/result.json")):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        rate = steady_rate(rows)
        if rate is not None:
            rates.append(rate)
    return rates


def run_one(share: float, amp: bool, budget: dict[str, int], seed: int, storage: str) -> dict[str, Any]:
    trials = max(1, round(1 / share))
    cpus = max(1, (os.cpu_count() or 1) // trials)
    name = f"share{share:g}-amp{int(amp)}"
    space = Path(storage, f"{name}.yaml")
    space.write_text(yaml.safe_dump(space_yaml(amp, trials, budget, seed), sort_keys=False))
    cmd = [sys.executable, "-m", "search.run", "--space", str(space), "--gpus-per-worker", f"{share:g}",
           "--cpus-per-worker", str(cpus), "--num-samples", str(trials), "--max-concurrent", str(trials),
           "--storage", storage, "--name", name, "--export-dir", str(Path(storage, name, "export")),
           "--seed", str(seed)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    started = time.time()
    with ray_lock():
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rates = read_trials(Path(storage, name))
    return {"share": share, "amp": amp, "trials": trials, "cpus_per_worker": cpus, "wall_s": wall,
            "per_trial_images_per_s": rates, "total_images_per_s": sum(rates) if rates else None}


def build_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list]]:
    header = ["GPU share", "trials on 1 GPU", "AMP", "images/s per trial (mean)", "images/s total", "wall s"]
    rows = []
    for r in runs:
        rates = r["per_trial_images_per_s"]
        rows.append([r["share"], r["trials"], "on" if r["amp"] else "off",
                     sum(rates) / len(rates) if rates else None, r["total_images_per_s"], round(r["wall_s"], 1)])
    return header, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--shares", default="1,0.5,0.25", help="GPU fraction per trial, comma-separated")
    args = parser.parse_args(argv)
    shares = [float(s) for s in args.shares.split(",") if s.strip()]
    if any(not 0 < s <= 1 for s in shares):
        parser.error(f"--shares: each must be in (0, 1], got {args.shares}")

    ok, detail = gpu_available()
    if not ok:
        print(f"SKIP gpu_sharing: no CUDA GPU on this machine ({detail}); nothing measured")
        save_json("gpu_sharing", args.budget, {"skipped": True, "reason": detail}, args.json)
        return 0
    budget = GPU_BUDGETS[args.budget]
    print(f"GPU: {detail}; embedded demo data, {budget['epochs']} epochs at {budget['image_size']} px, "
          f"batch {budget['batch_size']}; shares {shares} x AMP on/off")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as storage:
        for share in shares:
            for amp in (True, False):
                run = run_one(share, amp, budget, args.seed, storage)
                print(f"  share {share:g}, amp {'on' if amp else 'off'}: total "
                      f"{run['total_images_per_s'] or 0:.0f} images/s", flush=True)
                runs.append(run)
    header, rows = build_rows(runs)
    print(format_table(header, rows))
    path = save_json("gpu_sharing", args.budget, {"skipped": False, "gpu": detail, "budget_detail": budget,
                                                  "table": {"header": header, "rows": rows}, "runs": runs},
                     args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
