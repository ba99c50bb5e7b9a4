"""Evaluate a trained model on a split: metrics JSON, per-class table, confusion PNG.

`evaluate_model` adds metrics to `fer.train.infer.predict_logits` (the one batched inference
loop); `predict_checkpoint` is one read of a split by a checkpoint (this CLI and the
search's read of test share it); `main` is the CLI:

    python -m fer.evaluate --checkpoint runs/x/best.pt [--data PATH] [--split val|test] [--tta]
                           [--csv evaluations.csv] [--bootstrap 1000]

Besides the metrics JSON and confusion PNG it reports a bootstrap 95% confidence interval
for macro-F1, the metrics with and without the checkpoint's post-hoc offsets, and appends
one row per run to a CSV so several checkpoints can be compared side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

# fer.train.infer's loop, looked up here at call time (a test spies on the reads of test through it)
from fer.io import to_plain
from fer.train.infer import predict_logits


def evaluate_model(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    image_size: int,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    tta: bool = False,
    offsets: list[float] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics (fer.train.metrics.compute_metrics) and softmax probabilities (N, K).

    `offsets` (a checkpoint's post-hoc logit offsets) shift the logits before argmax;
    the returned probabilities are the unshifted ones, so ECE measures the model itself.
    """
    if device is not None:
        model.to(device)
    logits = predict_logits(model, images, image_size=image_size, batch_size=batch_size,
                            device=device, tta=tta)
    metrics, probs, _ = metrics_from_logits(logits, labels, classes, offsets)
    return metrics, probs


def metrics_from_logits(logits: torch.Tensor, labels: np.ndarray, classes: list[str],
                        offsets: list[float] | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(metrics, softmax probabilities, predictions) of logits shifted by `offsets`."""
    from fer.train.metrics import compute_metrics

    probs = logits.softmax(dim=1).numpy()
    decision = logits if offsets is None else logits + torch.tensor(offsets, dtype=logits.dtype)
    preds = decision.argmax(dim=1).numpy()
    metrics = compute_metrics(np.asarray(labels), preds, classes, probs=probs)
    return metrics, probs, preds


def bootstrap_macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int, *,
                       samples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of macro-F1 (Efron & Tibshirani 1993).

    The split's images are resampled with replacement `samples` times and macro-F1
    (sklearn, all classes) recomputed on each; the interval is the central `level` mass.
    It shows how much of a difference between two checkpoints the test set can resolve.
    """
    scores = _bootstrap_scores(labels, [preds], num_classes, samples, seed)
    if scores is None:
        return float("nan"), float("nan")
    return _percentiles(scores[:, 0], level)


def paired_bootstrap_macro_f1(labels: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, num_classes: int, *,
                              samples: int = 1000, level: float = 0.95,
                              seed: int = 0) -> tuple[float, float, float]:
    """(macro-F1 of a minus b, low, high): the difference on these images and its paired
    percentile bootstrap interval. Each resample draws the same images for both models, so
    the luck of which images the split holds cancels out of the difference; two separate
    intervals would overlap far more often than the difference is really uncertain
    (Efron & Tibshirani 1993, ch. 16; Koehn 2004 for the paired form)."""
    from sklearn.metrics import f1_score

    labels = np.asarray(labels)
    classes = list(range(num_classes))
    point = (f1_score(labels, np.asarray(preds_a), labels=classes, average="macro", zero_division=0)
             - f1_score(labels, np.asarray(preds_b), labels=classes, average="macro", zero_division=0))
    scores = _bootstrap_scores(labels, [preds_a, preds_b], num_classes, samples, seed)
    if scores is None:
        return float(point), float("nan"), float("nan")
    return (float(point), *_percentiles(scores[:, 0] - scores[:, 1], level))


def _bootstrap_scores(labels: np.ndarray, pred_sets: list[np.ndarray], num_classes: int, samples: int,
                      seed: int) -> np.ndarray | None:
    """(samples, len(pred_sets)) macro-F1 of each prediction set on the same resamples.

    Each resample's per-class counts come from one bincount over all resamples at once, and
    macro-F1 is the mean of 2 TP / (predicted + actual) over all `num_classes` classes, 0 where
    a class is neither predicted nor present: sklearn's f1_score(average="macro",
    labels=range(K), zero_division=0), which tests/test_evaluate.py checks resample by
    resample. Calling f1_score 1000 times spent ~20 s in its input validation alone, half of
    a smoke run of fer.train."""
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0 or samples < 1:
        return None
    pred_sets = [np.asarray(p) for p in pred_sets]
    rng = np.random.default_rng(seed)
    scores = np.empty((samples, len(pred_sets)))
    rows = max(1, 2**22 // n)  # resamples drawn per chunk: about 4M indices at a time
    for start in range(0, samples, rows):
        pick = rng.integers(0, n, (min(rows, samples - start), n))
        base = np.arange(len(pick))[:, None] * num_classes  # resample r's classes are r*K .. r*K+K-1
        true = labels[pick]
        actual = _counts(base + true, len(pick), num_classes)
        for j, preds in enumerate(pred_sets):
            guess = preds[pick]
            predicted = _counts(base + guess, len(pick), num_classes)
            hits = _counts((base + guess)[guess == true], len(pick), num_classes)
            both = predicted + actual
            f1 = np.divide(2 * hits, both, out=np.zeros(both.shape), where=both > 0)
            scores[start:start + len(pick), j] = f1.mean(axis=1)
    return scores


def _counts(keys: np.ndarray, resamples: int, num_classes: int) -> np.ndarray:
    """(resamples, num_classes) occurrences of each resample*K + class key."""
    return np.bincount(keys.ravel(), minlength=resamples * num_classes).reshape(resamples, num_classes)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


CSV_COLUMNS = ["checkpoint", "data", "split", "tta", "images", "model", "stage", "epoch", "posthoc",
               "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "macro_f1_without_offsets",
               "accuracy", "balanced_accuracy", "weighted_f1", "kappa", "ece"]


def append_results_csv(path: str, row: dict[str, Any]) -> str:
    """Append one evaluation as a row of `path` (created with a header when missing).

    A file written with other columns is rewritten with the union of both, so rows from
    older runs stay readable next to new ones.
    """
    import pandas as pd

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    new = pd.DataFrame([{key: row.get(key) for key in CSV_COLUMNS}])
    if os.path.exists(path) and os.path.getsize(path) > 0:
        try:
            old = pd.read_csv(path)
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: exists but is not a readable results CSV ({err})") from None
        if list(old.columns) == CSV_COLUMNS:
            new.to_csv(path, mode="a", header=False, index=False)
            return path
        new = pd.concat([old, new], ignore_index=True)
    new.to_csv(path, index=False)
    return path


def write_report(metrics: dict[str, Any], classes: list[str], out_dir: str, name: str) -> tuple[str, str]:
    """Write `<name>_metrics.json` and `<name>_confusion.png` into out_dir; return both paths."""
    from fer.train.metrics import plot_confusion

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}_metrics.json")
    png_path = os.path.join(out_dir, f"{name}_confusion.png")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(to_plain(metrics), handle, indent=2)
    plot_confusion(np.asarray(metrics["confusion"]), classes, png_path)
    return json_path, png_path


def predict_checkpoint(ckpt: dict[str, Any], images: np.ndarray, labels: np.ndarray, *, tta: bool = False,
                       batch_size: int = 256, device: str | torch.device | None = "cpu",
                       offsets: bool = True) -> tuple[dict[str, Any], np.ndarray, torch.Tensor]:
    """One read of a split by a loaded checkpoint dict: (metrics, predictions, logits), the
    decision shifted by the checkpoint's own post-hoc offsets (none when `offsets` is False
    or it has none)."""
    from fer.train.checkpoint import model_from_checkpoint

    device = torch.device(device) if device is not None else None
    model = model_from_checkpoint(ckpt, device)
    logits = predict_logits(model, images, image_size=int(ckpt["config"]["image_size"]),
                            batch_size=batch_size, device=device, tta=tta)
    shift = ckpt.get("posthoc_offsets") if offsets else None
    metrics, _, preds = metrics_from_logits(logits, labels, list(ckpt["classes"]), shift)
    return metrics, preds, logits


def evaluate_checkpoint(path: str, *, data: str | None = None, split: str = "test",
                        out_dir: str | None = None, tta: bool = False,
                        batch_size: int = 256, device: str | None = None,
                        csv_path: str | None = None, bootstrap: int = 1000) -> dict[str, Any]:
    """Load a checkpoint and its data set, evaluate one split, write the report files.

    Metrics use the checkpoint's post-hoc offsets when it has them ("without_offsets"
    holds the plain argmax ones); `bootstrap` resamples give macro_f1_ci95; with
    `csv_path` one row is appended there.
    """
    from fer.data import load_configured
    from fer.train.checkpoint import load_checkpoint
    from fer.train.metrics import format_per_class_table

    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    dataset = load_configured(data if data is not None else cfg.get("data"), cfg, crop_default="squash")
    if split not in dataset.splits:
        raise ValueError(f"{dataset.source}: no {split!r} split; available: {', '.join(dataset.splits)}")
    if list(dataset.classes) != list(ckpt["classes"]):
        raise ValueError(f"{path}: checkpoint classes {ckpt['classes']} differ from the data set's "
                         f"{dataset.classes} ({dataset.source})")
    part = dataset.splits[split]
    if part.labels is None:
        raise ValueError(f"{dataset.source}: split {split!r} has no labels to evaluate against")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    classes, offsets = list(ckpt["classes"]), ckpt.get("posthoc_offsets")
    metrics, preds, logits = predict_checkpoint(ckpt, part.images, part.labels, tta=tta, batch_size=batch_size,
                                                device=device)
    plain, _, _ = metrics_from_logits(logits, part.labels, classes, None)
    low, high = bootstrap_macro_f1(part.labels, preds, len(classes), samples=bootstrap)
    metrics.update(split=split, checkpoint=os.path.abspath(path), data=dataset.source, tta=tta,
                   posthoc_offsets=offsets, macro_f1_ci95=[low, high], bootstrap_samples=bootstrap,
                   without_offsets={k: plain[k] for k in ("macro_f1", "accuracy", "balanced_accuracy", "kappa")})
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    json_path, png_path = write_report(metrics, list(ckpt["classes"]), out_dir, split)
    print(format_per_class_table(metrics))
    print(f"{split} macro-F1 {metrics['macro_f1']:.4f} (95% CI {low:.4f}-{high:.4f}, {bootstrap} bootstrap "
          f"resamples); without post-hoc offsets {plain['macro_f1']:.4f}" + ("; TTA" if tta else ""))
    print(f"wrote {json_path} and {png_path}")
    if csv_path:
        row = {**metrics, "images": len(part.labels), "model": ckpt["model_name"], "stage": ckpt["stage"],
               "epoch": ckpt["epoch"], "posthoc": cfg.get("posthoc") if offsets is not None else "none",
               "macro_f1_ci_low": low, "macro_f1_ci_high": high,
               "macro_f1_without_offsets": plain["macro_f1"]}
        print(f"appended a row to {append_results_csv(csv_path, row)}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by fer.train")
    parser.add_argument("--data", default=None, help="data path (default: the checkpoint config's)")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's)")
    parser.add_argument("--tta", action="store_true", help="average over fer.train.transforms.tta_views")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--csv", default=None,
                        help="append a row of results to this CSV; point several runs at one file to "
                             "compare checkpoints (default: evaluations.csv in the output folder)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the macro-F1 95%% CI (0 = none)")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    try:
        evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, out_dir=out_dir,
                            tta=args.tta, batch_size=args.batch_size, device=args.device,
                            csv_path=args.csv or os.path.join(out_dir, "evaluations.csv"),
                            bootstrap=args.bootstrap)
    except (ValueError, OSError) as err:  # user errors (bad path/data, class mismatch, unwritable --out): one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
