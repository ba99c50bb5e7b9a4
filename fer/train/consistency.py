"""Online consistency training on the unlabeled pool (stage 2, `student_mode` fixmatch or flexmatch).

FixMatch (Sohn et al. 2020): every step, besides its labelled batch, the student sees a
batch of pool images twice, a weakly augmented view and a strongly augmented one, in one
forward pass. Its own prediction on the weak view, where confident enough, is the hard
label the strong view is trained towards:

    loss = loss_labelled + pseudo_weight * mean(mask * CE(strong logits, argmax weak probs))

No teacher labels the pool: the labeller improves as the student does, which is what an
offline teacher at 0.53 pool accuracy cannot (BENCHMARKS.md, the ceiling at 1/8 scale).

Imbalance (per epoch, from one pass of the student over the pool at the epoch's start, in
eval mode, so a resumed epoch draws exactly what the uninterrupted one drew):
- distribution alignment (ReMixMatch, Berthelot et al. 2020; `pool_align`): weak-view
  probabilities are multiplied by the labelled prior over the student's mean pool
  prediction and renormalised, so head classes do not take over the pseudo-labels;
- per-class thresholds (FlexMatch, Zhang et al. 2021; `student_mode="flexmatch"`):
  `flexmatch_thresholds` of that pass, lower for classes the student is still
  learning (with the paper's warm-up, all of them low while few views pass `pseudo_threshold`);
  `"fixmatch"` keeps one threshold for every class;
- a second labeller (`pool_labeller_weight`): the weak views' probabilities are mixed with the
  stage-2 labeller's fixed distribution over each pool image (the teacher's, with the
  label-spreading graph where one is chosen), two labellers that err differently;
- adaptive debiasing (`pool_debias`; DebiasPL, Wang et al. 2022): weak-view logits get the
  student's own post-hoc offsets of the moment (`fer.train.posthoc`, fitted on val at the epoch's
  start), the decision rule it would be handed out with, so the head classes' raw lean does
  not label the rare classes' pool images.

The pool's order is a function of (seed, epoch) and of the rank, as the labelled order is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer.names import ONLINE_MODES
from fer.train.infer import Ranks, predict_logits_sharded
from fer.train.posthoc import fit_offsets


@dataclass
class Debias:
    """What the student's post-hoc offsets are fitted on at each epoch's start (`pool_debias`)."""

    images: np.ndarray  # the val split, uint8 (N, H, W, C)
    labels: np.ndarray  # its labels
    counts: np.ndarray  # the stage's class counts (the prior of tau's offsets)
    posthoc: str  # fer.names.POSTHOC: how the offsets are fitted


@dataclass
class Consistency:
    """What the online stage trains on besides the labelled images, and how."""

    images: np.ndarray  # the pool, uint8 (N, H, W, C)
    prior: np.ndarray  # labelled class distribution (distribution alignment's target)
    threshold: float  # confidence a weak-view prediction needs (its class's, with flexmatch)
    weight: float  # of the pool's loss against the labelled one
    mode: str = "fixmatch"  # fer.names.ONLINE_MODES: one threshold, or FlexMatch's per-class ones
    align: bool = False  # distribution alignment of the weak-view probabilities
    ratio: int = 1  # pool images per labelled image in a step (FixMatch's mu)
    truth: np.ndarray | None = None  # the pool's held-out labels, when known: precision is reported
    # The oracle of a semi-supervised measurement (benchmarks/label_fraction.py): the pool's true
    # labels (`truth`) replace the weak views' pseudo-labels and every view counts, so the same
    # steps, views and weights say what the pool could buy at most. Never a trial's setting.
    oracle: bool = False
    debias: Debias | None = None  # label the weak views with the student's post-hoc offsets of the moment
    soft: bool = False  # train the strong view towards the sharpened weak distribution, not its argmax
    # (N, K): the stage-2 labeller's distribution over each pool image, mixed into the weak views'
    # probabilities with weight labeller_weight (None: the student's alone)
    labeller: np.ndarray | torch.Tensor | None = None
    labeller_weight: float = 0.0

    def __post_init__(self) -> None:
        # the one place that decides whether a labeller is mixed in: a float tensor, or None at weight 0
        if self.labeller is None or self.labeller_weight <= 0:
            self.labeller, self.labeller_weight = None, 0.0
        elif len(self.labeller) != len(self.images):
            raise ValueError("labeller_weight > 0 needs the labeller's distribution over every pool image "
                             "(Consistency.labeller, one row per pool image)")
        else:
            self.labeller = torch.as_tensor(self.labeller, dtype=torch.float32)
        if self.oracle and self.truth is None:
            raise ValueError("an oracle stage 2 needs the pool's true labels (Consistency.truth)")
        if self.mode not in ONLINE_MODES:
            raise ValueError(f"online student_mode {self.mode!r} is not one of: {', '.join(ONLINE_MODES)}")
        if len(self.images) == 0:
            raise ValueError(f"student_mode {self.mode} needs a non-empty unlabeled pool")


@dataclass
class EpochPlan:
    """One epoch's pool batches and the per-class thresholds and alignment factors."""

    order: np.ndarray  # this rank's pool indices, `ratio` per labelled image
    thresholds: torch.Tensor  # (K,)
    align: torch.Tensor  # (K,) multiplies the weak-view probabilities (ones without alignment)
    stats: dict[str, float] = field(default_factory=dict)  # the pass's numbers, for the epoch's metrics


@dataclass
class Tally:
    """What the pool's loss kept this epoch (device tensors: no host sync per step)."""

    kept: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "Tally":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))


def flexmatch_thresholds(conf: np.ndarray, pred: np.ndarray, num_classes: int, threshold: float,
                         *, warmup: bool = True, mapping: str = "convex") -> np.ndarray:
    """Class-adaptive thresholds T_k = M(beta_k) * threshold of FlexMatch (Zhang et al. 2021).

    sigma_k counts pool images predicted as k with confidence above `threshold` (the
    paper's learning effect). beta_k = sigma_k / max(max_k sigma, unused) with warmup,
    where unused = pool size - sum sigma, so that early on (few confident predictions)
    thresholds stay low; without warmup beta_k = sigma_k / max_k sigma. M is the convex
    mapping x / (2 - x) (the paper's best) or the identity ("linear").
    """
    if mapping not in ("convex", "linear"):
        raise ValueError(f"flexmatch mapping {mapping!r} is not allowed. Choose one of: convex, linear")
    sigma = np.bincount(pred[conf > threshold], minlength=num_classes).astype(np.float64)
    denom = sigma.max() if len(sigma) else 0.0
    if warmup:
        denom = max(denom, float(len(conf) - sigma.sum()))
    beta = sigma / denom if denom > 0 else np.zeros(num_classes)
    if mapping == "convex":
        beta = beta / (2.0 - beta)
    return beta * threshold


def plan_epoch(spec: Consistency, model: nn.Module, *, steps: int, batch_size: int, seed: int, epoch: int,
               ddp: Ranks, image_size: int, device: torch.device) -> EpochPlan:
    """The pool batches of `steps` steps and the thresholds/alignment of this epoch, from the
    student's eval-mode predictions on the whole pool now (each rank its shard, gathered)."""
    was_training = model.training
    probs = torch.softmax(predict_logits_sharded(model, spec.images, image_size=image_size,
                                                 batch_size=max(256, batch_size), device=device).float(), dim=1)
    model.train(was_training)
    k = probs.shape[1]
    align = torch.ones(k)
    if spec.align:
        align = torch.as_tensor(spec.prior, dtype=torch.float32) / probs.mean(dim=0).clamp_min(1e-6)
    stats = {}
    if spec.debias is not None:  # softmax(logits + offsets) = softmax(logits) * exp(offsets), renormalised
        offsets = _offsets_now(spec.debias, model, image_size=image_size, batch_size=batch_size, device=device)
        align = align * torch.exp(torch.as_tensor(offsets, dtype=torch.float32))
        stats["pool_debias_spread"] = float(offsets.max() - offsets.min())
    aligned = mix(_normalise(probs * align), spec.labeller, spec.labeller_weight)
    conf, pred = aligned.max(dim=1)
    thresholds = torch.full((k,), float(spec.threshold))
    if spec.mode == "flexmatch":
        thresholds = torch.as_tensor(flexmatch_thresholds(conf.numpy(), pred.numpy(), k, spec.threshold),
                                     dtype=torch.float32)
    keep = conf >= thresholds[pred]
    stats["pool_pass_kept"] = float(keep.float().mean())
    if spec.truth is not None:
        right = pred.numpy() == spec.truth
        stats["pool_pass_accuracy"] = float(right.mean())
        if bool(keep.any()):  # (undefined when nothing is kept: left out, as NaN would never equal itself)
            stats["pool_pass_precision"] = float(right[keep.numpy()].mean())
    need = steps * batch_size * spec.ratio * ddp.world
    rng = np.random.default_rng((seed, 104729, epoch))
    passes = -(-need // len(spec.images))
    order = np.concatenate([rng.permutation(len(spec.images)) for _ in range(passes)])[:need]
    mine = order[ddp.rank::ddp.world]
    return EpochPlan(order=mine, thresholds=thresholds.to(device), align=align.to(device), stats=stats)


def _offsets_now(debias: Debias, model: nn.Module, *, image_size: int, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """The model's post-hoc offsets now: `debias.posthoc` fitted on its val logits (eval mode)."""
    was_training = model.training
    logits = predict_logits_sharded(model, debias.images, image_size=image_size, batch_size=max(256, batch_size),
                                    device=device).float().numpy()
    model.train(was_training)
    return fit_offsets(logits, debias.labels, debias.counts, debias.posthoc)


def _normalise(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)


def mix(probs: torch.Tensor, labeller: torch.Tensor | None, weight: float) -> torch.Tensor:
    """The weak views' probabilities with the labeller's of the same pool images mixed in at
    `weight`; unchanged without a labeller or at weight 0."""
    if labeller is None or weight <= 0:
        return probs
    return (1.0 - weight) * probs + weight * labeller.to(probs.device)


SHARPEN = 0.5  # temperature of soft targets (MixMatch's T; UDA uses 0.4)


def pool_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, plan: EpochPlan,
              truth: torch.Tensor | None, tally: Tally, oracle: bool = False, soft: bool = False,
              labeller: torch.Tensor | None = None, labeller_weight: float = 0.0) -> torch.Tensor:
    """FixMatch's unlabeled loss over one pool batch; adds what it kept to `tally`. With
    `oracle`, the true labels instead of the weak views' and every view kept; with `soft`,
    the kept views' target is the weak distribution sharpened (temperature SHARPEN), so an
    uncertain wrong label pulls less than a hard one (UDA, Xie et al. 2020). `labeller`: the
    second labeller's distribution over the batch's pool images, mixed in at `labeller_weight`."""
    with torch.no_grad():
        probs = mix(_normalise(torch.softmax(logits_weak.detach().float(), dim=1) * plan.align), labeller,
                    labeller_weight)
        conf, label = probs.max(dim=1)
        mask = (conf >= plan.thresholds[label]).float()
        if oracle:
            label, mask = truth, torch.ones_like(mask)
        tally.kept += mask.sum()
        if truth is not None:
            tally.correct += (mask * (label == truth).float()).sum()
        tally.seen += len(label)
        target = _normalise(probs ** (1.0 / SHARPEN)) if soft and not oracle else label
    return (F.cross_entropy(logits_strong.float(), target, reduction="none") * mask).mean()


def epoch_stats(plan: EpochPlan, tally: Tally, has_truth: bool) -> dict[str, Any]:
    """The pool's numbers an epoch reports: share of pool views trained on, their precision."""
    kept = float(tally.kept)
    out: dict[str, Any] = {"pool_kept_share": kept / max(tally.seen, 1), **plan.stats}
    if has_truth and kept > 0:
        out["pool_kept_precision"] = float(tally.correct) / kept
    return out
