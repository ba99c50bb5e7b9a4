"""Post-hoc decision rule: per-class logit offsets tuned on validation macro-F1.

A model trained on imbalanced data predicts the majority too often; adding an offset
per class to its logits at decision time moves the boundaries without retraining.
`tau` is post-hoc logit adjustment (Menon et al. 2021, "Long-tail learning via logit
adjustment"): offsets = -tau * log prior, one scalar tau picked on a grid. `bias`
fits one offset per class by coordinate ascent, which can also fix classes the prior
does not explain. Offsets are stored in the checkpoint ("posthoc_offsets"), applied
at evaluation and inside the exported ONNX graph.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import f1_score

from fer import names
from fer.names import check_registry

TAU_GRID = np.round(np.arange(0.0, 2.01, 0.1), 2)  # includes 0, so val macro-F1 never drops
BIAS_STEPS = 21  # grid points per class and pass
BIAS_PASSES = 3  # passes over the classes; the step halves after each


def apply_offsets(logits: np.ndarray, offsets: np.ndarray | list[float] | None) -> np.ndarray:
    """Logits plus the per-class offsets (unchanged when offsets is None)."""
    logits = np.asarray(logits, dtype=np.float32)
    if offsets is None:
        return logits
    return logits + np.asarray(offsets, dtype=np.float32)[None, :]


def macro_f1(labels: np.ndarray, logits: np.ndarray, offsets: np.ndarray | None = None) -> float:
    """Macro-F1 over all K classes of argmax(logits + offsets) (sklearn)."""
    pred = apply_offsets(logits, offsets).argmax(axis=1)
    num_classes = np.asarray(logits).shape[1]
    return float(f1_score(labels, pred, labels=list(range(num_classes)), average="macro",
                          zero_division=0))


def log_prior(class_counts: np.ndarray) -> np.ndarray:
    """log of the training class frequencies (float64); the one prior of logit adjustment,
    in the loss (`fer.train.losses`) and post hoc. A class with zero samples counts as half a
    sample, so its log prior is finite (about -log 2N, e.g. -10.6 for N = 20k) instead of -inf."""
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 0.5)
    return np.log(counts / counts.sum())


def _fit_none(logits: np.ndarray, labels: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
    return np.zeros(logits.shape[1])


def _fit_tau(logits: np.ndarray, labels: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
    """offsets = -tau * log prior with tau in TAU_GRID maximising val macro-F1
    (the smallest such tau on ties)."""
    prior = log_prior(class_counts)
    scores = [macro_f1(labels, logits, -tau * prior) for tau in TAU_GRID]
    best = TAU_GRID[int(np.argmax(scores))]
    return -best * prior


def _fit_bias(logits: np.ndarray, labels: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
    """Per-class offsets by coordinate ascent on val macro-F1.

    Each pass tries, for each class in turn, BIAS_STEPS values around its current
    offset within +-step and keeps a strictly better one; step starts at the logits'
    standard deviation and halves every pass. Offsets are centred (softmax ignores a
    common shift).
    """
    num_classes = logits.shape[1]
    offsets = np.zeros(num_classes)
    best = macro_f1(labels, logits, offsets)
    step = float(np.std(logits)) or 1.0
    for _ in range(BIAS_PASSES):
        for k in range(num_classes):
            for delta in np.linspace(-step, step, BIAS_STEPS):
                trial = offsets.copy()
                trial[k] += delta
                score = macro_f1(labels, logits, trial)
                if score > best + 1e-12:
                    best, offsets = score, trial
        step /= 2
    return offsets - offsets.mean()


POSTHOC: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "none": _fit_none,
    "tau": _fit_tau,
    "bias": _fit_bias,
}
check_registry(POSTHOC, names.POSTHOC, "fer.train.posthoc.POSTHOC")


def get_posthoc(name: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    try:
        return POSTHOC[name]
    except KeyError:
        raise ValueError(
            f"Unknown post-hoc rule {name!r}. Choose one of: {', '.join(POSTHOC)}"
        ) from None


def fit_offsets(logits_val: np.ndarray, labels_val: np.ndarray, class_counts: np.ndarray,
                method: str = "tau") -> np.ndarray:
    """Per-class logit offsets (K,) float64 fitted on validation logits; zeros for none."""
    fit = get_posthoc(method)
    logits = np.asarray(logits_val, dtype=np.float64)
    labels = np.asarray(labels_val, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"fit_offsets: logits {logits.shape} and labels {labels.shape} do not match")
    if len(np.asarray(class_counts)) != logits.shape[1]:
        raise ValueError(f"fit_offsets: {len(class_counts)} class counts for {logits.shape[1]} classes")
    if len(labels) == 0:
        return np.zeros(logits.shape[1])
    return np.asarray(fit(logits, labels, np.asarray(class_counts)), dtype=np.float64)
