"""Pseudo-labels: the teacher labels the unlabeled pool, and a selection rule keeps some.

A single confidence threshold under class imbalance floods the student with the
majority class (the teacher is most confident there), so besides `threshold` there are
two class-aware rules: CReST's per-class keep rates (Wei et al. 2021) and FlexMatch's
class-adaptive thresholds (Zhang et al. 2021). Confidences are made meaningful first by
temperature scaling on the validation split (Guo et al. 2017).

Under torch.distributed every rank labels its shard of the pool (`fer.train.samplers.shard`)
and `predict_pool_sharded` gathers the pieces back in the original order (`fer.train.infer`).
"""

from __future__ import annotations

import csv
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer import names
from fer.names import check_registry
from fer.train.consistency import flexmatch_thresholds
from fer.train.infer import predict_logits, predict_logits_sharded


# --- prediction -------------------------------------------------------------------


def predict_pool(
    model: nn.Module,
    images: np.ndarray,
    *,
    image_size: int,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    tta: bool = False,
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities (N, K) = softmax(logits / temperature) of the pool images."""
    logits = predict_logits(model, images, image_size=image_size, batch_size=batch_size,
                            device=device, tta=tta)
    return torch.softmax(logits / float(temperature), dim=1).numpy()


def predict_pool_sharded(model: nn.Module, images: np.ndarray, *, temperature: float = 1.0,
                         **kwargs) -> np.ndarray:
    """`predict_pool` split over DDP ranks and gathered back in pool order."""
    logits = predict_logits_sharded(model, images, **kwargs)
    return torch.softmax(logits / float(temperature), dim=1).numpy()


# --- temperature scaling ------------------------------------------------------------


def fit_temperature(logits_val: np.ndarray, labels_val: np.ndarray, max_iter: int = 100) -> float:
    """Temperature T minimising the validation NLL of softmax(logits / T).

    Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
    one scalar fitted with LBFGS, which leaves the argmax (accuracy) unchanged but makes
    confidences usable for a threshold. Optimised over log T so T stays positive.
    """
    logits = torch.as_tensor(np.asarray(logits_val), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels_val), dtype=torch.long)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"fit_temperature: logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)} do not match")
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.exp().item())
    # A degenerate split (e.g. everything already separable) can push T to 0 or infinity.
    return float(np.clip(temperature, 0.05, 20.0)) if np.isfinite(temperature) else 1.0


# --- selection rules ----------------------------------------------------------------


def _select_threshold(conf: np.ndarray, pred: np.ndarray, *, threshold: float,
                      class_counts: np.ndarray, crest_alpha: float) -> np.ndarray:
    """Keep every prediction with confidence >= threshold."""
    return conf >= threshold


def crest_keep_rates(class_counts: np.ndarray, alpha: float) -> np.ndarray:
    """Per-class keep rate mu_k = (N_{K+1-k} / N_1)^alpha of CReST (Wei et al. 2021).

    Classes are ranked by training frequency (N_1 the most frequent); the k-th most
    frequent class gets the rate of the k-th rarest's relative size, so the majority is
    kept least and the rarest class fully. Classes with no training samples (the DR
    seed's Ungradable) are left out of the ranking and kept fully: including a zero
    count would give the majority a rate of 0.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    rates = np.ones(len(counts))
    present = np.flatnonzero(counts > 0)
    if len(present) == 0:
        return rates
    order = present[np.argsort(-counts[present], kind="stable")]  # most frequent first
    sorted_counts = counts[order]
    rates[order] = (sorted_counts[::-1] / sorted_counts[0]) ** alpha
    return rates


def _select_crest(conf: np.ndarray, pred: np.ndarray, *, threshold: float,
                  class_counts: np.ndarray, crest_alpha: float) -> np.ndarray:
    """Confident candidates, then keep the top round(mu_k * n_k) of each predicted class.

    As in CReST the most confident candidates of a class are the ones kept; ties in
    confidence go to the lower pool index.
    """
    candidates = conf >= threshold
    rates = crest_keep_rates(class_counts, crest_alpha)
    keep = np.zeros(len(conf), dtype=bool)
    for k in range(len(rates)):
        idx = np.flatnonzero(candidates & (pred == k))
        if len(idx) == 0:
            continue
        _keep_most_confident(keep, idx, conf, int(np.floor(rates[k] * len(idx) + 0.5)))
    return keep


def _keep_most_confident(keep: np.ndarray, idx: np.ndarray, conf: np.ndarray, count: int) -> None:
    """Mark the `count` most confident of `idx` in `keep`; ties go to the lower pool index."""
    order = idx[np.lexsort((idx, -conf[idx]))]  # by confidence desc, then index asc
    keep[order[:count]] = True


def _select_flexmatch(conf: np.ndarray, pred: np.ndarray, *, threshold: float,
                      class_counts: np.ndarray, crest_alpha: float) -> np.ndarray:
    """Keep predictions whose confidence reaches their class's adaptive threshold."""
    thresholds = flexmatch_thresholds(conf, pred, len(class_counts), threshold)
    return conf >= thresholds[pred]


def aligned_quotas(total: int, class_counts: np.ndarray) -> np.ndarray:
    """Per-class quotas summing to about `total`, in proportion to the labelled prior."""
    counts = np.asarray(class_counts, dtype=np.float64)
    prior = counts / counts.sum() if counts.sum() > 0 else np.full(len(counts), 1.0 / len(counts))
    return np.floor(total * prior + 0.5).astype(np.int64)


def _select_aligned(conf: np.ndarray, pred: np.ndarray, *, threshold: float,
                    class_counts: np.ndarray, crest_alpha: float) -> np.ndarray:
    """As many pseudo-labels as `threshold` would keep, but shared out by the labelled prior.

    A confidence threshold keeps what the teacher already gets right: on the demo data 602
    picks at precision 0.995 and none of Disgust or Neutral. Distribution alignment
    (ReMixMatch, Berthelot et al. 2020; CReST+, Wei et al. 2021) makes the pseudo-labels
    follow the labelled class distribution instead; here as quotas, as Noisy Student's
    per-class top-K (Xie et al. 2020): class k keeps its round(total * prior_k) most
    confident pool images predicted as k, whatever their confidence (all of them when fewer).
    """
    total = int(np.count_nonzero(conf >= threshold))
    keep = np.zeros(len(conf), dtype=bool)
    for k, quota in enumerate(aligned_quotas(total, class_counts)):
        _keep_most_confident(keep, np.flatnonzero(pred == k), conf, int(quota))
    return keep


SelectionFn = Callable[..., np.ndarray]

SELECTIONS: dict[str, SelectionFn] = {
    "threshold": _select_threshold,
    "crest": _select_crest,
    "flexmatch": _select_flexmatch,
    "aligned": _select_aligned,
}
check_registry(SELECTIONS, names.SELECTIONS, "fer.ssl.pseudo.SELECTIONS")


def get_selection(name: str) -> SelectionFn:
    try:
        return SELECTIONS[name]
    except KeyError:
        raise ValueError(
            f"Unknown pseudo-label selection {name!r}. Choose one of: {', '.join(SELECTIONS)}"
        ) from None


def select_pseudo_labels(
    probs: np.ndarray,
    *,
    selection: str = "threshold",
    threshold: float = 0.9,
    class_counts: np.ndarray | None = None,
    crest_alpha: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool indices ascending, labels, confidences) of the kept pseudo-labels."""
    rule = get_selection(selection)
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"select_pseudo_labels: probs must be (N, K), got shape {probs.shape}")
    num_classes = probs.shape[1]
    counts = np.ones(num_classes) if class_counts is None else np.asarray(class_counts)
    if len(counts) != num_classes:
        raise ValueError(f"select_pseudo_labels: {len(counts)} class counts for {num_classes} classes")
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    keep = rule(conf, pred, threshold=threshold, class_counts=counts, crest_alpha=crest_alpha)
    indices = np.flatnonzero(keep).astype(np.int64)
    return indices, pred[indices].astype(np.int64), conf[indices].astype(np.float32)


# --- output ---------------------------------------------------------------------------


def write_pseudo_csv(path: str, indices: np.ndarray, labels: np.ndarray, confidences: np.ndarray,
                     classes: list[str] | None = None) -> str:
    """pseudo_labeled.csv: pool_index,label,confidence (+ class name when `classes` given)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pool_index", "label", "confidence"] + (["class"] if classes else []))
        for index, label, confidence in zip(indices, labels, confidences):
            row = [int(index), int(label), f"{float(confidence):.6f}"]
            writer.writerow(row + ([classes[int(label)]] if classes else []))
    return path


def summarize_selection(labels: np.ndarray, classes: list[str],
                        true_labels: np.ndarray | None = None,
                        pool_size: int | None = None) -> tuple[dict, str]:
    """Per-class kept counts and, when the pool's true labels are known, precision.

    `true_labels` are aligned with `labels` (the true classes of the kept images).
    Precision of class k = kept images labelled k whose true class is k / kept labelled k.
    """
    labels = np.asarray(labels, dtype=np.int64)
    kept = np.bincount(labels, minlength=len(classes))
    correct = None
    if true_labels is not None:
        true_labels = np.asarray(true_labels, dtype=np.int64)
        correct = np.bincount(labels[labels == true_labels], minlength=len(classes))
    per_class = {}
    for k, name in enumerate(classes):
        entry: dict = {"kept": int(kept[k])}
        if correct is not None:
            entry["precision"] = float(correct[k] / kept[k]) if kept[k] else None
        per_class[name] = entry
    summary: dict = {"kept": int(len(labels)), "per_class": per_class}
    if pool_size is not None:
        summary["pool_size"] = int(pool_size)
    if correct is not None:
        summary["precision"] = float(correct.sum() / len(labels)) if len(labels) else None

    width = max(8, max(len(name) for name in classes) + 1)
    header = f"{'class':<{width}}{'kept':>8}" + (f"{'precision':>11}" if correct is not None else "")
    lines = [header]
    for name, entry in per_class.items():
        line = f"{name:<{width}}{entry['kept']:>8}"
        if correct is not None:
            line += f"{'-':>11}" if entry["precision"] is None else f"{entry['precision']:>11.3f}"
        lines.append(line)
    total = f"{'all':<{width}}{summary['kept']:>8}"
    if correct is not None:
        total += f"{'-':>11}" if summary["precision"] is None else f"{summary['precision']:>11.3f}"
    if pool_size is not None:
        total += f"   (of {pool_size} pool images)"
    lines.append(total)
    return summary, "\n".join(lines)
