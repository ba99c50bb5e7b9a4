"""Fixed cost of a Tune trial, and training speed inside one vs outside Ray, in one run.

Runs the whole fer pipeline (stage 1, pseudo-labels, stage 2, post-hoc) on small
generated data: once bare in this process, then as Tune trials with 1 and with 2
workers (one CPU and one torch thread per rank). Each trial writes wall-clock marks
(trainables.worker.TIMING_FILE) when it enters and leaves `run_pipeline`; around them:

- start: Tuner.fit() called (first trial) or previous trial's pipeline done (second
  trial: the previous teardown included) -> this trial's pipeline starts. The first
  optimizer step follows within the pipeline's model build (well under 0.1 s here).
- teardown: last pipeline done -> Tuner.fit() returns.
- in-pipeline extra: pipeline wall inside the trial minus bare (per-epoch reports and
  checkpoint uploads; for 2 workers also DDP, so only printed for 1 worker).

Two trials run one after the other (max_concurrent_trials=1, reuse_actors=True, as a
search on a small machine would), so the second start is the steady-state per-trial
cost. Throughput is fit's own `train_images_per_s` (training only, epochs after the
first) inside the trial over a bare PyTorch loop of the same work
(benchmarks/train_throughput.py `bare_loop`, same model, batch, augmentation, one thread).
Also timed: Ray Train's local mode (an empty `TorchTrainer(num_workers=0).fit()` in a
trial), the alternative to running a single worker in the trial's own process.

    flock /tmp/ray.lock python benchmarks/trial_overhead.py        # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from fer.data import Dataset, Split
from fer.train.config import TrialConfig
from trainables import TrialResources, make_trainable, put_dataset
from trainables.worker import TIMING_FILE

CLASSES = ["Angry", "Happy", "Sad", "Surprise"]


def make_split(n: int, size: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n).astype(np.int64)
    images = rng.integers(0, 80, (n, size, size, 1)).astype(np.uint8)
    band = size // len(CLASSES)
    for i, label in enumerate(labels):
        images[i, label * band:(label + 1) * band] = 230
    return Split(images, labels)


def make_dataset(n: int, size: int) -> Dataset:
    splits = {"train": make_split(n, size, 1), "val": make_split(n // 4, size, 2),
              "unlabeled": make_split(n // 2, size, 3)}
    return Dataset(classes=list(CLASSES), splits=splits, source="benchmarks/trial_overhead.py")


def load_bare_loop():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_throughput.py")
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bare_loop


def train_speed(rows: list[dict]) -> float:
    """fit's training images/s, time-weighted, skipping each stage's first (warm-up) epoch."""
    steady = [r for prev, r in zip([None] + rows, rows) if prev is not None and prev["stage"] == r["stage"]]
    steady = steady or rows
    return sum(r["train_images_per_s"] * r["train_seconds"] for r in steady) / sum(r["train_seconds"] for r in steady)


def run_bare(cfg: TrialConfig, data: Dataset) -> tuple[float, list[dict]]:
    from fer.ssl.pipeline import run_pipeline

    rows: list[dict] = []
    start = time.time()
    run_pipeline(cfg, data, report=lambda m, c, s: rows.append(dict(m)), progress=False)
    return time.time() - start, rows


def run_trials(cfg: TrialConfig, ref, workers: int, storage: str) -> dict:
    from ray import tune

    space = {k: v for k, v in cfg.__dict__.items() if k != "data"}
    space["seed"] = tune.grid_search([0, 1])
    tuner = tune.Tuner(
        make_trainable(ref, TrialResources(workers=workers, cpus_per_worker=1)),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=storage, name=f"workers{workers}", verbose=0),
    )
    start = time.time()
    grid = tuner.fit()
    end = time.time()
    results = sorted(grid, key=lambda r: r.config["seed"])
    for r in results:
        if r.error:
            raise RuntimeError(f"trial {r.path} failed: {r.error}")
    marks = [json.load(open(os.path.join(r.path, TIMING_FILE), encoding="utf-8")) for r in results]
    rows = [row for r in results for row in r.metrics_dataframe.to_dict("records")]
    return {
        "marks": [{k: round(v - start, 2) for k, v in m.items()} for m in marks],
        "start_first": marks[0]["pipeline_start"] - start,
        "start_next": marks[1]["pipeline_start"] - marks[0]["pipeline_end"],
        "teardown": end - marks[1]["pipeline_end"],
        "pipeline": float(np.mean([m["pipeline_end"] - m["pipeline_start"] for m in marks])),
        "rows": rows,
    }


def time_local_mode(storage: str) -> float:
    """Seconds an empty Ray Train local-mode run takes inside a Tune trial."""
    from ray import train, tune

    def trial(config):
        start = time.time()
        from ray.train.torch import TorchTrainer  # timed too: a fresh trial process imports it

        TorchTrainer(lambda: None, scaling_config=train.ScalingConfig(num_workers=0),
                     run_config=train.RunConfig(name=f"local-{tune.get_context().get_trial_id()}",
                                                storage_path=storage)).fit()
        tune.report({"seconds": time.time() - start})

    grid = tune.Tuner(trial, run_config=tune.RunConfig(storage_path=storage, name="local", verbose=0)).fit()
    if grid[0].error:
        raise RuntimeError(f"local-mode trial failed: {grid[0].error}")
    return grid[0].metrics["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="training images (val n/4, pool n/2)")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="per stage")
    parser.add_argument("--verbose", action="store_true", help="also print each trial's wall-clock marks")
    args = parser.parse_args(argv)

    import ray

    cfg = TrialConfig(model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                      epochs=args.epochs, student_epochs=args.epochs, amp=False, warmup_epochs=0,
                      pseudo_threshold=0.0)
    data = make_dataset(args.n, args.image_size)
    torch.set_num_threads(1)  # what each trial rank gets (cpus_per_worker=1)
    train = data.splits["train"]
    bare_loop = load_bare_loop()
    # Best of two: on a shared machine a neighbour's burst should not make Ray look good.
    bare_speed = max(bare_loop(replace(cfg, epochs=args.epochs + 1), train.images, train.labels,
                               len(CLASSES), torch.device("cpu")) for _ in range(2))
    bare_seconds, bare_rows = run_bare(cfg, data)

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        ref = put_dataset(data)
        with tempfile.TemporaryDirectory(prefix="trial-overhead-") as storage:
            local_mode = time_local_mode(storage)
            runs = {workers: run_trials(cfg, ref, workers, storage) for workers in (1, 2)}
    finally:
        ray.shutdown()

    fit_speed = train_speed(bare_rows)
    print(f"{args.model} {args.image_size}px, batch {args.batch_size}, {args.n} train images, "
          f"{args.epochs}+{args.epochs} epochs, 1 CPU and 1 thread per rank, {os.cpu_count()} cores")
    print(f"bare, no Ray: PyTorch loop {bare_speed:.1f} images/s; fer pipeline {bare_seconds:.2f} s "
          f"(fit {fit_speed:.1f} images/s)")
    for workers, run in runs.items():
        speed = train_speed(run["rows"])
        extra = f", in-pipeline extra {run['pipeline'] - bare_seconds:+.2f} s" if workers == 1 else ""
        print(f"{workers} worker{'s' if workers > 1 else ''}: fixed overhead per trial {run['start_next']:.2f} s "
              f"(first trial start {run['start_first']:.2f} s, last teardown {run['teardown']:.2f} s{extra})")
        print(f"    training throughput in trial {speed:.1f} images/s = {speed / bare_speed:.2f} x bare loop, "
              f"{speed / fit_speed:.2f} x bare fit ({workers} rank{'s' if workers > 1 else ''} x 1 thread)")
        if args.verbose:
            print(f"    marks (s after Tuner.fit): {run['marks']}")
    print(f"Ray Train local mode (num_workers=0): an empty fit inside a trial takes {local_mode:.2f} s "
          f"(import included); single-worker trials run the pipeline in the trial's own process instead")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
