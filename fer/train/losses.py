"""Imbalance-aware classification losses and per-class weights, chosen by name.

Reduction (the same for every loss here):

    loss = sum_i c[y_i] * s_i * l_i / sum_i c[y_i]

with l_i the per-sample loss, c the per-class weights (`class_weights`, all ones for
scheme "none") and s_i the optional `sample_weight`. With s = 1 this is exactly PyTorch's
`F.cross_entropy(weight=c)` mean. Sample weights are deliberately NOT renormalised: a
pseudo-label weight of 0.5 halves those samples' contribution even in a batch made only of
pseudo-labelled images, like the lambda of FixMatch (Sohn et al. 2020).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer import names
from fer.names import check_registry
from fer.train.posthoc import log_prior

if TYPE_CHECKING:
    from fer.train.config import TrialConfig


# ---------------------------------------------------------------------------------------
# Class weights. Each scheme maps the counts of the classes that have samples (all > 0)
# to raw weights; `class_weights` normalises and fills in the empty classes.


def _none(counts: np.ndarray, beta: float) -> np.ndarray:
    return np.ones_like(counts)


def _inverse(counts: np.ndarray, beta: float) -> np.ndarray:
    return 1.0 / counts


def _sqrt_inverse(counts: np.ndarray, beta: float) -> np.ndarray:
    return 1.0 / np.sqrt(counts)


def _effective(counts: np.ndarray, beta: float) -> np.ndarray:
    # Effective number of samples E_n = (1 - beta^n) / (1 - beta), weight 1 / E_n
    # (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples");
    # they use beta in {0.9, 0.99, 0.999, 0.9999}. beta -> 0 gives uniform weights,
    # beta -> 1 inverse frequency. -expm1(n log beta) = 1 - beta^n without cancellation.
    if beta <= 0.0:
        return np.ones_like(counts)
    return (1.0 - beta) / -np.expm1(counts * np.log(beta))


WEIGHT_SCHEMES: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "none": _none,
    "inverse": _inverse,
    "sqrt_inverse": _sqrt_inverse,
    "effective": _effective,
}
check_registry(WEIGHT_SCHEMES, names.WEIGHT_SCHEMES, "fer.train.losses.WEIGHT_SCHEMES")


def get_weight_scheme(name: str) -> Callable[[np.ndarray, float], np.ndarray]:
    if name not in WEIGHT_SCHEMES:
        raise ValueError(
            f"Unknown class weight scheme {name!r}. Valid schemes: {', '.join(WEIGHT_SCHEMES)}"
        )
    return WEIGHT_SCHEMES[name]


def _check_counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class counts must be a non-empty 1-D array, got shape {counts.shape}")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError(f"class counts must be finite and non-negative, got {counts.tolist()}")
    if counts.sum() == 0:
        raise ValueError("class counts are all zero: no training samples")
    return counts


def class_weights(scheme: str, counts: np.ndarray, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights, float32, mean 1 over the classes that have samples.

    A class with zero training samples (the DR seed's "Ungradable") gets the largest
    weight among the present classes: finite, and as favoured as the rarest class seen,
    should pseudo-labels or a later split bring it samples. It does not enter the mean.
    """
    scheme_fn = get_weight_scheme(scheme)
    counts = _check_counts(counts)
    present = counts > 0
    raw = scheme_fn(counts[present], beta)
    raw = raw / raw.mean()
    weights = np.full(counts.shape, raw.max())
    weights[present] = raw
    return torch.as_tensor(weights, dtype=torch.float32)


def prior_tensor(counts: np.ndarray) -> torch.Tensor:
    """`fer.train.posthoc.log_prior` of the checked counts as float32: the one rule for a class
    with no samples, so training-time and post-hoc adjustments agree."""
    return torch.as_tensor(log_prior(_check_counts(counts)), dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Losses


class WeightedLoss(nn.Module, abc.ABC):
    """Shared reduction: per-class weights times optional sample weights (module docstring)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float())

    @abc.abstractmethod
    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Unreduced loss of each sample; each loss below defines it."""

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        losses = self.per_sample(logits.float(), targets)
        class_w = self.weight[targets]
        weighted = class_w if sample_weight is None else class_w * sample_weight.to(class_w.dtype)
        return (weighted * losses).sum() / class_w.sum().clamp_min(1e-12)


class CrossEntropyLoss(WeightedLoss):
    """Cross-entropy with label smoothing (Szegedy et al. 2016)."""

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__(weight)
        self.label_smoothing = label_smoothing

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)


class FocalLoss(WeightedLoss):
    """Multi-class focal loss -(1 - p_t)^gamma log p_t (Lin et al. 2017).

    The per-class alpha of the paper is the class weight. gamma = 0 is cross-entropy.
    """

    def __init__(self, weight: torch.Tensor, gamma: float = 2.0) -> None:
        super().__init__(weight)
        self.gamma = gamma

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
        if self.gamma == 0:
            return -log_p
        # 1 - p_t via expm1 keeps precision near p_t = 1; the floor keeps the gradient of
        # x^gamma finite (gamma < 1) when p_t rounds to exactly 1.
        return -((-torch.expm1(log_p)).clamp_min(1e-12) ** self.gamma) * log_p


class LogitAdjustedLoss(CrossEntropyLoss):
    """Cross-entropy on logits + tau * log prior (Menon et al. 2021, "Long-tail learning
    via logit adjustment"); tau = 1 is the balanced softmax of Ren et al. 2020.

    The shift is applied in training only: the model's raw logits then estimate the
    class-balanced posterior, which is what macro-F1 rewards.
    """

    def __init__(
        self, weight: torch.Tensor, log_prior: torch.Tensor, tau: float = 1.0, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(weight, label_smoothing)
        self.register_buffer("log_prior", log_prior.float())
        self.tau = tau

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().per_sample(logits + self.tau * self.log_prior, targets)


def _ce(cfg: TrialConfig, weight: torch.Tensor, counts: np.ndarray) -> nn.Module:
    return CrossEntropyLoss(weight, cfg.label_smoothing)


def _focal(cfg: TrialConfig, weight: torch.Tensor, counts: np.ndarray) -> nn.Module:
    return FocalLoss(weight, cfg.focal_gamma)


def _logit_adjusted(cfg: TrialConfig, weight: torch.Tensor, counts: np.ndarray) -> nn.Module:
    return LogitAdjustedLoss(weight, prior_tensor(counts), cfg.la_tau, cfg.label_smoothing)


def _balanced_softmax(cfg: TrialConfig, weight: torch.Tensor, counts: np.ndarray) -> nn.Module:
    return LogitAdjustedLoss(weight, prior_tensor(counts), 1.0, cfg.label_smoothing)


LOSSES: dict[str, Callable[[TrialConfig, torch.Tensor, np.ndarray], nn.Module]] = {
    "ce": _ce,
    "focal": _focal,
    "logit_adjusted": _logit_adjusted,
    "balanced_softmax": _balanced_softmax,
}
check_registry(LOSSES, names.LOSSES, "fer.train.losses.LOSSES")


def get_loss_builder(name: str) -> Callable[[TrialConfig, torch.Tensor, np.ndarray], nn.Module]:
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}. Valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]


def build_loss(cfg: TrialConfig, counts: np.ndarray) -> nn.Module:
    """The training loss of `cfg` (loss, class_weights, cb_beta, focal_gamma,
    label_smoothing, la_tau) for a training split with these per-class counts.

    label_smoothing applies to ce, logit_adjusted and balanced_softmax, not to focal.
    """
    builder = get_loss_builder(cfg.loss)
    weight = class_weights(cfg.class_weights, counts, cfg.cb_beta)
    return builder(cfg, weight, np.asarray(counts))
