"""How a model labels the unlabeled pool: its logits on val and the pool, its calibration on
val (cfg.posthoc offsets and temperature scaling), the optional label-spreading graph
(fer.ssl.propagate) and the selection rule (fer.ssl.pseudo). The pipeline's labeller is the teacher,
and in later stage-2 rounds (cfg.student_rounds) the previous round's student.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fer.ssl.propagate import CANDIDATES, feature_space, graph_pseudo_probs, pixel_space
from fer.ssl.pseudo import fit_temperature, select_pseudo_labels, summarize_selection, write_pseudo_csv
from fer.train.config import TrialConfig
from fer.train.infer import is_main, predict_features_sharded, predict_logits_sharded
from fer.train.posthoc import fit_offsets


def say(message: str) -> None:
    """Print on rank 0 only (every rank runs the pipeline)."""
    if is_main():
        print(message, flush=True)


def _inference(cfg: TrialConfig, device: Any) -> dict[str, Any]:
    """How the pipeline runs inference (pool, val, graph features): cfg's image size, big batches."""
    return dict(image_size=cfg.image_size, batch_size=max(256, cfg.batch_size), device=device)


def predict(cfg: TrialConfig, model: nn.Module, images: np.ndarray, device: Any, tta: bool) -> np.ndarray:
    """Logits of `images`, each DDP rank on its shard, gathered in order on every rank."""
    return predict_logits_sharded(model, images, tta=tta, **_inference(cfg, device)).numpy()


def pseudo_label(cfg: TrialConfig, teacher: nn.Module, data: Any, *, device: Any = None, out_dir: str | None = None,
                 labeller: str = "teacher") -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray, np.ndarray]:
    """Teacher labels the pool; returns (kept pool indices, labels, summary, confidences, and its
    distribution over every pool image, (N, K), what the selection chose from).

    The teacher's logits get its post-hoc offsets (cfg.pseudo_debias) and temperature
    scaling (Guo et al. 2017), both fitted on val (`teacher_calibration`), so
    cfg.pseudo_threshold applies to calibrated confidences of the rebalanced decision rule
    rather than the teacher's usually over-confident, head-biased raw softmax.
    """
    pool, val = data.splits["unlabeled"], data.splits["val"]
    offsets, temperature = np.zeros(len(data.classes)), 1.0
    (val_logits, pool_logits), space = _teacher_outputs(cfg, teacher, data, device)
    if cfg.pseudo_temperature or cfg.pseudo_debias:
        offsets, temperature = teacher_calibration(cfg, val_logits, val.labels, data.class_counts("train"))
    probs, graph = graph_pseudo_probs(
        cfg.pseudo_graph, *(_calibrated(logits, offsets, temperature) for logits in (pool_logits, val_logits)),
        data.splits["train"].labels, val.labels, space)
    indices, labels, confidences = select_pseudo_labels(
        probs, selection=cfg.pseudo_selection, threshold=cfg.pseudo_threshold,
        class_counts=data.class_counts("train"), crest_alpha=cfg.crest_alpha)
    truth = pool.labels[indices] if pool.labels is not None else None
    summary, table = summarize_selection(labels, data.classes, truth, pool_size=len(pool.images))
    summary.update(temperature=temperature, selection=cfg.pseudo_selection, threshold=cfg.pseudo_threshold,
                   tta=cfg.pseudo_tta, debias_offsets=[float(v) for v in offsets], **graph)
    if pool.labels is not None:  # the pool's own labels are held-out truth: how good was each labeller?
        summary["pool_label_accuracy"] = float(np.mean(probs.argmax(axis=1) == pool.labels))
    debiased = f", {cfg.posthoc} offsets" if np.any(offsets) else ""
    say(f"pseudo-label source ({cfg.pseudo_graph}): {_graph_line(graph, labeller)}")
    say(f"pseudo-labels ({cfg.pseudo_selection}, threshold {cfg.pseudo_threshold}, "
         f"temperature {temperature:.3f}{debiased}):\n{table}")
    write_pseudo(out_dir, indices, labels, confidences, summary, data.classes)
    return indices, labels, summary, confidences, probs.astype(np.float32)


def teacher_calibration(cfg: TrialConfig, val_logits: np.ndarray, val_labels: np.ndarray,
                        train_counts: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-class offsets, temperature) the teacher's pool logits get before selection.

    The offsets are cfg.posthoc's, fitted on val as the final model's are (zeros unless
    cfg.pseudo_debias): a teacher trained on imbalanced labels under-predicts the rare
    classes, and its argmax on the pool would pass that bias on to the student. The
    temperature (when cfg.pseudo_temperature) is the teacher's own, fitted on the raw val
    logits, and divides the offset logits: the offsets choose the class, the teacher's
    calibration how sure it is. (Fitted on the offset logits instead, where the offsets are
    large, it can run to its bound and flatten every confidence below any threshold.)
    """
    offsets = np.zeros(val_logits.shape[1])
    if cfg.pseudo_debias:
        offsets = fit_offsets(val_logits, val_labels, train_counts, cfg.posthoc)
    temperature = fit_temperature(val_logits, val_labels) if cfg.pseudo_temperature else 1.0
    return offsets, temperature


def _calibrated(logits: np.ndarray, offsets: np.ndarray, temperature: float) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits + offsets) / temperature, dim=1).numpy()


def _teacher_outputs(cfg: TrialConfig, teacher: nn.Module, data: Any,
                     device: Any) -> tuple[tuple[np.ndarray, np.ndarray], Callable[[str], np.ndarray]]:
    """The teacher's (val, pool) logits, and the embedding of train, pool and val for the
    label-spreading graph `name` (fer.ssl.propagate), computed when asked for. Where a feature
    graph may be built (and without TTA, whose logits average several views) one pass over val
    and the pool gives logits and features together, so the features cost one more pass, over
    train."""
    splits = [data.splits[name].images for name in ("train", "unlabeled", "val")]
    kwargs = _inference(cfg, device)
    if "features" not in CANDIDATES[cfg.pseudo_graph] or cfg.pseudo_tta:
        logits = tuple(predict(cfg, teacher, images, device, cfg.pseudo_tta) for images in splits[1:])
        features = None
    else:
        (pool_logits, pool_features), (val_logits, val_features) = (
            predict_features_sharded(teacher, images, **kwargs) for images in splits[1:])
        logits, features = (pool_logits, val_logits), (pool_features, val_features)

    def space(name: str) -> np.ndarray:
        if name == "pixels":
            return pixel_space(np.concatenate(splits), seed=cfg.seed)
        rest = features if features is not None else tuple(
            predict_features_sharded(teacher, images, **kwargs)[1] for images in splits[1:])
        return feature_space(np.concatenate([predict_features_sharded(teacher, splits[0], **kwargs)[1], *rest]))

    return (logits[1], logits[0]), space


def _graph_line(graph: dict[str, Any], labeller: str) -> str:
    def source(name: str) -> str:
        return f"{labeller} alone" if name == "none" else f"{labeller} + {name} graph"

    scores = ", ".join(f"{source(name)} {value:.3f}" for name, value in graph["graph_val_macro_f1"].items())
    return f"val macro-F1 of its labels: {scores}; using {source(graph['graph'])}"


def write_pseudo(out_dir: str | None, indices: np.ndarray, labels: np.ndarray, confidences: np.ndarray,
                  summary: dict[str, Any], classes: list[str]) -> None:
    if out_dir is None or not is_main():
        return
    os.makedirs(out_dir, exist_ok=True)
    write_pseudo_csv(os.path.join(out_dir, "pseudo_labeled.csv"), indices, labels, confidences, classes)
    with open(os.path.join(out_dir, "pseudo_summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
