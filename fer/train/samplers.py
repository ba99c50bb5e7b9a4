"""Which training images an epoch visits, and in what order; chosen by name.

`epoch_indices` is a pure function of (labels, epoch, sampler, class_cap, seed): every
data-parallel rank computes the same global order and takes its `shard`, so no sampler
state has to be communicated or checkpointed.

- uniform: every image once, shuffled. With `class_cap > 0` this is "dynamic sampling":
  each epoch takes at most `cap` images of each class. A class larger than the cap walks
  through its own permutation `cap` images per epoch, so every majority image is seen once
  every ceil(n_k / cap) epochs: subsampled per epoch, never discarded.
- sqrt: classes drawn with probability proportional to n_k^0.5 (square-root sampling,
  Mahajan et al. 2018; Kang et al. 2020 "Decoupling representation and classifier").
- balanced: every class equally often (class-balanced sampling); small classes repeat.

The epoch size of sqrt and balanced is len(labels), or sum_k min(n_k, cap) with a cap.
Inside a class they draw without replacement and only repeat an image after every image
of the class has been used, which keeps the variance lower than i.i.d. draws.

`min_size` makes an epoch of a small data set several passes: pass p of epoch e is the
sampler's own pass number e * passes + p, with passes = ceil(min_size / pass size), and
the epoch is the first max(pass size, min_size) images of those passes (the last pass is
cut short). So a few hundred images still get enough optimizer steps per epoch (and per
validation), every epoch of a split has the same size, a large data set's epoch stays one
pass, and with passes == 1 nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fer import names
from fer.names import check_registry


# Stream tags: every random stream below has its own tag, so no two can coincide.
_SHUFFLE, _CAP, _CAP_FILL, _SHARE = range(4)


def _rng(tag: int, seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([tag] + [int(k) % 2**64 for k in (seed, *keys)])


def _class_members(labels: np.ndarray) -> list[np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {labels.min()}")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[k] : bounds[k + 1]] for k in range(num_classes)]


def _capped_class(members: np.ndarray, cap: int, seed: int, epoch: int, k: int) -> np.ndarray:
    """`cap` images of one class for this epoch, cycling through a per-class permutation."""
    n = len(members)
    if n <= cap:
        return members
    epochs_per_cycle = -(-n // cap)
    cycle, step = divmod(epoch, epochs_per_cycle)
    perm = _rng(_CAP, seed, k, cycle).permutation(n)
    chosen = perm[step * cap : (step + 1) * cap]
    if len(chosen) < cap:  # last epoch of a cycle: top up from this cycle's earlier images
        fill = _rng(_CAP_FILL, seed, k, cycle).choice(perm[: step * cap], cap - len(chosen), replace=False)
        chosen = np.concatenate([chosen, fill])
    return members[chosen]


def _draw(members: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m images of a class: whole shuffled passes, then a partial pass without replacement."""
    n = len(members)
    passes, rest = divmod(m, n)
    parts = [rng.permutation(members) for _ in range(passes)]
    parts.append(rng.choice(members, rest, replace=False))
    return np.concatenate(parts)


def _allocate(total: int, share: np.ndarray) -> np.ndarray:
    """Split `total` draws by `share` with largest remainders (sums exactly to total)."""
    exact = total * share / share.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _epoch_size(sizes: np.ndarray, class_cap: int) -> int:
    return int(np.minimum(sizes, class_cap).sum()) if class_cap > 0 else int(sizes.sum())


def _uniform(members: list[np.ndarray], epoch: int, class_cap: int, seed: int) -> np.ndarray:
    if class_cap <= 0:
        return np.concatenate(members) if members else np.zeros(0, dtype=np.int64)
    picked = [_capped_class(m, class_cap, seed, epoch, k) for k, m in enumerate(members)]
    return np.concatenate(picked)


def _by_share(members: list[np.ndarray], epoch: int, class_cap: int, seed: int, power: float) -> np.ndarray:
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    share = np.where(sizes > 0, sizes**power, 0.0)
    draws = _allocate(_epoch_size(sizes, class_cap), share)
    rng = _rng(_SHARE, seed, epoch)
    return np.concatenate([_draw(m, d, rng) for m, d in zip(members, draws) if d > 0])


def _sqrt(members: list[np.ndarray], epoch: int, class_cap: int, seed: int) -> np.ndarray:
    return _by_share(members, epoch, class_cap, seed, power=0.5)


def _balanced(members: list[np.ndarray], epoch: int, class_cap: int, seed: int) -> np.ndarray:
    return _by_share(members, epoch, class_cap, seed, power=0.0)


# name -> fn(members per class, epoch, class_cap, seed) -> indices (unshuffled).
SAMPLERS: dict[str, Callable[[list[np.ndarray], int, int, int], np.ndarray]] = {
    "uniform": _uniform,
    "sqrt": _sqrt,
    "balanced": _balanced,
}
check_registry(SAMPLERS, names.SAMPLERS, "fer.train.samplers.SAMPLERS")


def get_sampler(name: str) -> Callable[[list[np.ndarray], int, int, int], np.ndarray]:
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}. Valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def pass_size(labels: np.ndarray, class_cap: int = 0) -> int:
    """Images in one sampler pass: len(labels), or sum_k min(n_k, cap) with a cap."""
    sizes = np.bincount(np.asarray(labels, dtype=np.int64)) if len(labels) else np.zeros(0, dtype=np.int64)
    return _epoch_size(sizes, class_cap)


def passes_per_epoch(labels: np.ndarray, class_cap: int = 0, min_size: int = 0) -> int:
    """How many sampler passes one epoch draws from so that it holds at least `min_size` images."""
    size = pass_size(labels, class_cap)
    return max(1, -(-int(min_size) // size)) if size > 0 else 1


def epoch_indices(
    labels: np.ndarray, epoch: int, *, sampler: str = "uniform", class_cap: int = 0, seed: int = 0,
    min_size: int = 0,
) -> np.ndarray:
    """The shuffled global index order (int64) of one epoch; deterministic in (seed, epoch).

    With `min_size`, the epoch is max(pass size, min_size) images from consecutive passes,
    each pass shuffled on its own (see the module docstring)."""
    fn = get_sampler(sampler)
    if class_cap < 0:
        raise ValueError(f"class_cap must be >= 0 (0 = no cap), got {class_cap}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0 (0 = one pass per epoch), got {min_size}")
    members = _class_members(labels)
    passes = passes_per_epoch(labels, class_cap, min_size)
    parts = []
    for p in range(epoch * passes, (epoch + 1) * passes):
        indices = fn(members, p, class_cap, seed)
        parts.append(_rng(_SHUFFLE, seed, p).permutation(indices.astype(np.int64)))
    return parts[0] if passes == 1 else np.concatenate(parts)[:max(len(parts[0]), min_size)]


def shard(indices: np.ndarray, rank: int, world_size: int, *, pad: bool = False) -> np.ndarray:
    """This rank's part of an epoch: indices[rank::world_size], disjoint and covering.

    Shard lengths differ by at most one. pad=True repeats the first few indices so all
    ranks get ceil(len / world_size) (what DDP needs for equal step counts; then the
    shards overlap by those few images, like torch's DistributedSampler).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    indices = np.asarray(indices)
    if pad and len(indices) % world_size:
        extra = world_size - len(indices) % world_size
        indices = np.concatenate([indices, np.resize(indices, extra)])
    return indices[rank::world_size]
