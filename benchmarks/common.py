"""Shared pieces of the search benchmarks: budgets, data, one Tune search, tables, JSON.

Every benchmark takes `--budget small|full`. `full` is the product's default search
(spaces/imbalance.yaml on the embedded demo data); `small` keeps the same space and
searcher but shrinks the data (fer.data.synth scale), the image side, the epochs and the trial
count so a comparison finishes in minutes on a shared 2-core machine. Small-budget
numbers show the mechanics and the ratios, not the final macro-F1.

A search is built from the product's public pieces (search.space, search.optuna_bridge,
search.asha, trainables) by the product's own `search.tuner.build_tuner`, with the
searcher's sampler and the scheduler swappable, because the comparisons need random
search and FIFO next to TPE + ASHA in one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RAY_LOCK = os.environ.get("FER_RAY_LOCK", "/tmp/ray.lock")  # one local Ray cluster at a time per machine
LOCK_HELD_ENV = "FER_RAY_LOCK_HELD"  # set by run_all for its children while it holds RAY_LOCK


@dataclass(frozen=True)
class Budget:
    """How big a benchmark run is; None keeps the space's own value."""

    scale: float | None  # fer.data.synth scale of the demo data; None = the embedded data as search.run loads it
    image_size: int | None
    batch_size: int | None
    epochs: int | None  # stage 1
    student_epochs: int | None  # stage 2
    epoch_images: int | None  # images per epoch at least (a small split repeats); 0 = one pass
    grace_period: int | None  # ASHA
    num_samples: int | None
    max_concurrent: int | None


BUDGETS: dict[str, Budget] = {
    # ~750 training images at 32 px, 5 + 3 epochs, ASHA rungs at 3 and 6 (as the default's),
    # 6 trials: a few minutes per search on 2 busy cores.
    "small": Budget(scale=0.25, image_size=32, batch_size=64, epochs=5, student_epochs=3, epoch_images=0,
                    grace_period=3, num_samples=6, max_concurrent=2),
    # spaces/imbalance.yaml as `python -m search.run --space imbalance.yaml` runs it.
    "full": Budget(scale=None, image_size=None, batch_size=None, epochs=None, student_epochs=None,
                   epoch_images=None, grace_period=None, num_samples=None, max_concurrent=None),
}


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; valid budgets: {', '.join(BUDGETS)}")
    return BUDGETS[name]


# --------------------------------------------------------------------------- data and space


def load_data(budget: Budget) -> Any:
    """The embedded demo data (fer.data's cache) or, for a scale, the same generator smaller."""
    from fer.data import synth
    from fer.data import EMBEDDED_SEED, Dataset, Split, load_dataset

    if budget.scale is None:
        return load_dataset(None)
    arrays = synth.generate_arrays(EMBEDDED_SEED, budget.scale)
    splits = {name: Split(np.ascontiguousarray(images[..., None]), labels.astype(np.int64))
              for name, (labels, images) in arrays.items()}
    return Dataset(classes=list(synth.CLASSES), splits=splits,
                   source=f"embedded demo data (seed {EMBEDDED_SEED}, scale {budget.scale})")


def load_budget_space(budget: Budget, seed: int = 0, space_name: str = "imbalance") -> Any:
    """spaces/<space_name>.yaml with the budget applied and every trial seeded (as search.run --seed)."""
    from search.space import load_space

    space = load_space(space_name)
    space.check_models()  # model names need timm: resolved before any trial starts, as search.run does
    stage_epochs = {k: v for k, v in (("epochs", budget.epochs), ("student_epochs", budget.student_epochs),
                                      ("epoch_images", budget.epoch_images)) if v is not None}
    run = {k: v for k, v in (("num_samples", budget.num_samples), ("max_concurrent", budget.max_concurrent),
                             ("grace_period", budget.grace_period)) if v is not None}
    space = space.with_budget(**stage_epochs, **run)
    fixed = dict(space.fixed, seed=seed)
    for key in ("image_size", "batch_size"):
        if getattr(budget, key) is not None:
            fixed[key] = getattr(budget, key)
    return dataclasses.replace(space, seed=seed, fixed=fixed)


def rarest_classes(data: Any, k: int = 2) -> list[str]:
    """The k classes with the fewest training images (Disgust first on FER-like data)."""
    counts = data.class_counts("train")
    return [data.classes[i] for i in np.argsort(counts, kind="stable")[:k]]


# --------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def ray_lock() -> Iterator[None]:
    """Hold the machine-wide Ray lock file: several people start local clusters on this
    machine and two at once make `ray.init` find "multiple active Ray instances".
    flock(2) is what `flock(1)` takes, so this waits for `flock /tmp/ray.lock CMD` runs."""
    if os.environ.get(LOCK_HELD_ENV) == RAY_LOCK:  # a parent (run_all) holds it for us
        yield
        return
    with open(RAY_LOCK, "a+") as handle:
        waited = time.time()
        fcntl.flock(handle, fcntl.LOCK_EX)
        if time.time() - waited > 1:
            print(f"(waited {time.time() - waited:.0f} s for {RAY_LOCK})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """A private local Ray cluster, under the lock for its lifetime only."""
    import ray

    with ray_lock():
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


SEARCH_VARIANTS: dict[str, dict[str, str]] = {
    "tpe_asha": {"sampler": "tpe", "scheduler": "asha", "label": "Optuna TPE + ASHA (default)"},
    "random_fifo": {"sampler": "random", "scheduler": "fifo", "label": "random, no early stopping"},
    "tpe_fifo": {"sampler": "tpe", "scheduler": "fifo", "label": "Optuna TPE, no early stopping"},
}


def get_variant(name: str) -> dict[str, str]:
    if name not in SEARCH_VARIANTS:
        raise ValueError(f"unknown search variant {name!r}; valid: {', '.join(SEARCH_VARIANTS)}")
    return SEARCH_VARIANTS[name]


def make_epoch_log(metric: str) -> Any:
    """A Tune callback recording (wall time, trial, epoch, the search's `metric`) of every
    trained epoch (one replayed from a shared teacher, fer.ssl.teachers, is not spent again)."""
    from ray.tune import Callback

    class EpochLog(Callback):
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if "epoch" in result and metric in result and not result.get("teacher_shared"):
                self.events.append({"t": time.time(), "trial_id": trial.trial_id, "epoch": int(result["epoch"]),
                                    "value": float(result[metric]),
                                    "images_per_s": result.get("train_images_per_s")})

    return EpochLog()


def teacher_store(storage: str, name: str) -> str:
    """The experiment's shared-teacher folder, where search.run keeps it (search.plan.TEACHERS_DIR)."""
    from search.plan import TEACHERS_DIR

    return str(Path(storage, name, TEACHERS_DIR))


def tail_file(storage: str, name: str, resources: Any) -> str | None:
    """The experiment's tail file, where search.run keeps it (search.plan.TAIL_FILE), for CPU
    trials; None for GPU ones (search.plan.Plan.tail)."""
    from search.plan import TAIL_FILE

    return str(Path(storage, name, TAIL_FILE)) if resources.cpu_threads_only else None


def build_search_tuner(space: Any, variant: str, trainable: Any, storage: str, name: str,
                       callbacks: list, resources: Any) -> Any:
    """The product's tuner (search.tuner.build_tuner) with the sampler and scheduler of
    `variant`; the study goes to <storage>/<name>/optuna.db, and a failed trial is not retried."""
    from types import SimpleNamespace

    from search.tuner import build_tuner

    spec = get_variant(variant)
    space = dataclasses.replace(space, sampler=spec["sampler"])
    # no confirmation here (so ASHA keeps no baseline); teachers shared as search.run shares them
    plan = SimpleNamespace(space=space, name=name, storage=storage, study_path=Path(storage, name, "optuna.db"),
                           num_samples=space.num_samples, max_failures=0, resources=resources,
                           confirm_top=0, confirm_seeds=0, teachers=teacher_store(storage, name),
                           tail=tail_file(storage, name, resources))
    return build_tuner(plan, trainable, space.max_concurrent, asha=spec["scheduler"] == "asha",
                       verbose=0, callbacks=callbacks)


def run_search(space: Any, variant: str, data_ref: Any, data: Any, storage: str,
               evaluate_test: bool = True, cpus_per_trial: float = 1.0,
               gpus_per_trial: float = 0.0) -> dict[str, Any]:
    """One search; returns per-trial curves, the epoch timeline, wall time and the winner.
    Each trial is one worker with `cpus_per_trial` CPUs (its torch threads) and
    `gpus_per_trial` of a GPU (0.25: four trials share one)."""
    from search.finish import evaluate_on_test
    from search.report import collect_trials, pick_winner
    from trainables import TrialResources, make_trainable

    log = make_epoch_log(space.metric)
    resources = TrialResources(workers=1, cpus_per_worker=cpus_per_trial, gpus_per_worker=gpus_per_trial)
    trainable = make_trainable(data_ref, resources, space.metric, space.mode, teachers=teacher_store(storage, variant),
                               tail=tail_file(storage, variant, resources))
    tuner = build_search_tuner(space, variant, trainable, storage, variant, [log], resources)
    started = time.time()
    tuner.fit()
    wall = time.time() - started
    experiment = os.path.join(storage, variant)
    records = collect_trials(experiment, space.metric, space.time_attr, space.max_t, space.baseline_point())
    winner = pick_winner(records, space.mode)
    if get_variant(variant)["scheduler"] == "fifo":
        # collect_trials counts a trial that ended before max_t as stopped (e.g. stage 2
        # skipped when no pool image passed the threshold); without a scheduler none was.
        for record in records:
            record.stopped_early = False
    out: dict[str, Any] = {
        "variant": variant, "label": get_variant(variant)["label"], "wall_s": wall,
        "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
        "trials": [{"trial_id": r.trial_id, "baseline": r.baseline, "status": r.status,
                    "stopped_early": r.stopped_early, "epochs_run": r.epochs_run,
                    "best_val": r.best(space.mode)[1], "curve": r.curve, "error": r.error,
                    "params": {p.name: r.config.get(p.name) for p in space.parameters if p.name in r.config}}
                   for r in records],
        "events": [dict(e, t=e["t"] - started) for e in log.events],
        "total_epochs": sum(r.epochs_trained for r in records),  # epochs replayed from a shared teacher not counted
        "teacher_shared_runs": sum(bool(r.shared_epochs) for r in records),
        "stopped_early": sum(r.stopped_early for r in records),
        "ended_before_max_t": sum(r.epochs_run < space.max_t for r in records),
        "errored": sum(r.status == "ERROR" for r in records),
    }
    if winner is not None:
        out["winner"] = {"trial_id": winner.trial_id, "best_val": winner.best(space.mode)[1],
                         "config": {k: v for k, v in winner.config.items()}}
        if evaluate_test:
            with tempfile.TemporaryDirectory(prefix="bench-test-") as tmp:
                test = evaluate_on_test(winner, None, data, space.metric, space.mode, Path(tmp))
            out["winner"]["test_macro_f1"] = float(test["winner"]["macro_f1"])
    return out


def epochs_to_reach(events: list[dict[str, Any]], target: float) -> int | None:
    """Epochs the search had spent (all trials, in wall-clock order) when one first reported >= target."""
    seen: set[tuple[str, int]] = set()
    for event in sorted(events, key=lambda e: e["t"]):
        key = (event["trial_id"], event["epoch"])
        if key in seen:
            continue
        seen.add(key)
        if event["value"] >= target:
            return len(seen)
    return None


# --------------------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "load_avg_1_5_15": [round(v, 2) for v in load]}


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table, columns padded to their widest cell; floats to 4 significant places."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(header)]
    line = lambda values: "  ".join(str(v).ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def save_json(name: str, budget: str, payload: dict[str, Any], path: str | None = None) -> Path:
    """benchmarks/results/<name>_<budget>.json unless a path is given; returns the path."""
    target = Path(path) if path else RESULTS_DIR / f"{name}_{budget}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, benchmark=name, budget=budget, machine=machine(),
                   finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    target.write_text(json.dumps(payload, indent=2, default=_plain))
    return target


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def add_common_args(parser: Any) -> None:
    parser.add_argument("--budget", choices=list(BUDGETS), default="small",
                        help="small: tiny data, few epochs and trials (minutes); full: the default search")
    parser.add_argument("--seed", type=int, default=0, help="searcher and training seed")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where the raw results go (default: benchmarks/results/<name>_<budget>.json)")
