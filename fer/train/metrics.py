"""Classification metrics from scikit-learn, computable from a confusion matrix alone.

Every metric here depends only on the multiset of (true, predicted) pairs, i.e. on the
confusion matrix. `metrics_from_confusion` expands a matrix back into those pairs and runs
the same scikit-learn code, so data-parallel ranks can all_reduce their confusion
matrices and every rank gets exactly the metrics of the whole split.

All K classes are always scored (labels=range(K), zero_division=0): a class absent from
the split and never predicted scores F1 = 0 and so lowers macro-F1, the same for every
trial, which keeps trials comparable.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

ECE_BINS = 15  # Guo et al. 2017, "On Calibration of Modern Neural Networks"


def _check_labels(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> None:
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {y_true.shape} and {y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1} ({num_classes} classes)")


def _empty(classes: Sequence[str]) -> dict[str, Any]:
    """No samples (sklearn refuses empty input): every score 0, supports 0."""
    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    k = len(classes)
    return {
        **dict.fromkeys(["accuracy", "macro_f1", "weighted_f1", "balanced_accuracy", "kappa"], 0.0),
        "per_class": {name: dict(zero) for name in classes},
        "confusion": [[0] * k for _ in range(k)],
    }


# Expected on small or one-sided splits (an early epoch predicting one class); the
# results are defined below, so the warnings would only flood the training log.
_QUIET = ("y_pred contains classes not in y_true", "A single label was found", ".*cohen_kappa_score. is undefined")


def _from_pairs(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    if len(y_true) == 0:
        return _empty(classes)
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        return _sklearn_metrics(y_true, y_pred, classes)


def _sklearn_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    labels = list(range(len(classes)))
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        # Quadratic weighted kappa, the DR-grading metric. Undefined (no spread in either
        # labels or predictions) is reported as 0.0: no agreement beyond chance.
        "kappa": float(
            skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic", replace_undefined_by=0.0)
        ),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(classes)
        },
        "confusion": cm.tolist(),
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins (lo, hi]: sum_b |B|/n * |acc(B) - conf(B)|.

    Confidence and correctness are those of argmax(probs), as in Guo et al. 2017.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def compute_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """accuracy, macro_f1, weighted_f1, balanced_accuracy, kappa, per_class, confusion,
    and ece when class probabilities (N, K) are given."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    _check_labels(y_true, y_pred, len(classes))
    out = _from_pairs(y_true, y_pred, classes)
    if probs is not None:
        probs = np.asarray(probs)
        if probs.shape != (len(y_true), len(classes)):
            raise ValueError(f"probs must have shape {(len(y_true), len(classes))}, got {probs.shape}")
        out["ece"] = expected_calibration_error(y_true, probs)
    return out


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The metrics of `compute_metrics` (no ece) from a confusion matrix (rows = truth)."""
    cm = np.asarray(cm)
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k}x{k} for {k} classes, got shape {cm.shape}")
    if (cm < 0).any() or not np.array_equal(cm, np.round(cm)):
        raise ValueError("confusion matrix must hold non-negative integer counts")
    counts = cm.astype(np.int64).ravel()
    pairs = np.repeat(np.arange(k * k), counts)
    return _from_pairs(pairs // k, pairs % k, classes)


def format_per_class_table(metrics: dict[str, Any]) -> str:
    """A fixed-width per-class table plus the headline numbers, for terminals."""
    per_class = metrics["per_class"]
    width = max([len("class")] + [len(name) for name in per_class])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name, row in per_class.items():
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}"
        )
    headline = ["accuracy", "macro_f1", "weighted_f1", "balanced_accuracy", "kappa", "ece"]
    lines.append("  ".join(f"{key} {metrics[key]:.4f}" for key in headline if key in metrics))
    return "\n".join(lines)


def confusion_figure(cm: np.ndarray, classes: Sequence[str], normalize: bool = True):
    """A matplotlib Figure of the confusion matrix (rows = truth; normalised per row =
    recall when `normalize`), cells annotated; for files and TensorBoard's add_figure."""
    # A bare Figure renders with the Agg canvas without touching pyplot's global backend.
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.float64)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    k = len(classes)
    fig = Figure(figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised)" if normalize else "confusion (counts)")
    threshold = shown.max() / 2 if shown.size else 0
    for i in range(k):
        for j in range(k):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if shown[i, j] > threshold else "black")
    return fig


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | Path, normalize: bool = True) -> Path:
    """Write the confusion matrix as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    confusion_figure(cm, classes, normalize).savefig(path, format="png")
    return path


def pool_verdict(metrics: dict[str, Any]) -> str:
    """One line: did the unlabeled pool beat supervised-only training at the same budget?
    Judged on val by the paired bootstrap interval of the difference (fer.ssl.pipeline's control),
    each model with its own post-hoc offsets."""
    gain, (low, high) = metrics["pool_gain_val"], metrics["pool_gain_val_ci95"]
    verdict = ("the pool helped (the interval excludes 0)" if low > 0 else
               "the pool hurt (the interval excludes 0)" if high < 0 else
               "no measurable gain from the pool (the interval includes 0)")
    fraction = ""
    if metrics.get("labelled_images") and metrics.get("pool_images"):  # runs since the pool's size was recorded
        labelled, pool = metrics["labelled_images"], metrics["pool_images"]
        fraction = f" ({labelled} labelled images, a pool of {pool}, {pool / labelled:.1f}x)"
    return (f"pool{fraction}: student val macro-F1 {metrics['student_val_macro_f1_posthoc']:.4f} vs supervised-only "
            f"at the same budget {metrics['control_val_macro_f1_posthoc']:.4f} (each with its post-hoc offsets): "
            f"{gain:+.4f}, paired 95% interval {low:+.4f} to {high:+.4f}: {verdict}")
