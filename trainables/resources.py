"""What one trial asks the cluster for: workers x CPUs x GPUs, as Tune and Ray Train want it.

A single-worker trial trains inside Tune's own trial actor, so the trial's resource
request IS the worker's. A multi-worker trial starts a Ray Train `TorchTrainer`, whose
controller takes no CPU (`num_cpus=0`, ray/train/v2/api/data_parallel_trainer.py) and
whose workers reserve their own placement group; the trial actor then only waits, so it
asks for a sliver of memory instead of a CPU. Asking for a CPU there would hold back one
worker's core, and with every core of a small machine spoken for the worker group would
wait forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


# Memory (bytes) the waiting trial actor of a multi-worker trial reserves. Tune refuses an
# empty request, and "memory" is a resource every node has, unlike a custom one.
DRIVER_MEMORY = 64 * 2**20


@dataclass(frozen=True)
class TrialResources:
    workers: int = 1  # data-parallel ranks; 1 = train in the trial's own process (no worker group)
    cpus_per_worker: float = 1.0  # also the torch thread count of each rank
    gpus_per_worker: float = 0.0  # fractional allowed: 0.25 lets four trials share one GPU

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers per trial must be an integer >= 1, got {self.workers!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus per worker must be > 0, got {self.cpus_per_worker!r}")
        gpus = self.gpus_per_worker
        if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
            raise ValueError(
                f"gpus per worker must be 0, a fraction in (0, 1] or a whole number, got {gpus!r}")

    @property
    def cpu_threads_only(self) -> bool:
        """One worker and no GPU: the trial trains in its own process on torch CPU threads, which
        can take CPUs other trials leave idle (search/confirm.py `widened`, search/tail.py)."""
        return self.workers == 1 and not self.gpus_per_worker

    @property
    def total(self) -> dict[str, float]:
        """Everything the trial's ranks hold together (what decides how many trials fit)."""
        out = {"CPU": self.workers * self.cpus_per_worker}
        if self.gpus_per_worker:
            out["GPU"] = self.workers * self.gpus_per_worker
        return out


def worker_bundle(res: TrialResources) -> dict[str, float]:
    bundle = {"CPU": float(res.cpus_per_worker)}
    if res.gpus_per_worker:
        bundle["GPU"] = float(res.gpus_per_worker)
    return bundle


def trial_resources(res: TrialResources) -> Any:
    """The request to give `tune.with_resources` for one trial (a PlacementGroupFactory)."""
    # Ray imported here, not at the top: `import trainables` stays free of ray.tune / ray.train
    from ray.tune import PlacementGroupFactory

    if res.workers == 1:
        return PlacementGroupFactory([worker_bundle(res)])
    return PlacementGroupFactory([{"memory": DRIVER_MEMORY}])


def scaling_config(res: TrialResources) -> Any:
    """Ray Train's worker group for a multi-worker trial (gloo on CPU, NCCL when use_gpu)."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
                         resources_per_worker=worker_bundle(res))


def process_group_backend(res: TrialResources) -> str:
    """NCCL when every rank has whole GPUs of its own, else gloo. Ranks holding fractions of
    a GPU can land on the same device, which NCCL refuses ("Duplicate GPU detected",
    ray-project/ray#48012); gloo all-reduces CUDA tensors too, only slower."""
    return "nccl" if res.gpus_per_worker >= 1 else "gloo"


def check_fits(res: TrialResources, cluster: dict[str, float]) -> None:
    """Raise before any trial starts if one trial can never be placed on `cluster`
    (e.g. `ray.cluster_resources()`); otherwise it would wait forever."""
    for name, need in res.total.items():
        have = float(cluster.get(name, 0.0))
        if need > have + 1e-9:
            raise ValueError(
                f"one trial needs {need:g} {name} ({res.workers} workers x "
                f"{worker_bundle(res).get(name, 0):g}) but the Ray cluster has {have:g}; "
                f"lower --workers-per-trial / --cpus-per-worker / --gpus-per-worker")


def max_concurrent_trials(res: TrialResources, cluster: dict[str, float]) -> int:
    """How many trials fit side by side. Multi-worker trials reserve only a sliver at the
    Tune level, so Tune cannot count their workers itself: pass this as
    `TuneConfig(max_concurrent_trials=...)`, as Ray's train_tune_interop example advises."""
    check_fits(res, cluster)
    return max(1, min(math.floor(float(cluster.get(name, 0.0)) / need + 1e-9)
                      for name, need in res.total.items()))
