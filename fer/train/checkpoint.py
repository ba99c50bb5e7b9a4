"""Checkpoints are plain dicts: weights plus everything needed to rebuild and explain them.

Like torchvision's `references/classification/train.py` (which stores `"args"` in every
checkpoint), a checkpoint carries the trial config and the class names, so evaluation and
export need no flags. Only tensors, numbers, strings, lists and dicts go in, so
`torch.load(..., weights_only=True)` can read it back without unpickling code.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fer.io import atomic_write, to_plain
from fer.train.config import TrialConfig
from fer.train.state import PipelineState

RESUME_KEY = "resume"  # a resumable checkpoint's PipelineState.to_dict(), beside the epoch's model
CHECKPOINT_KEYS = (
    "model", "config", "classes", "class_counts", "epoch", "stage", "metrics",
    "model_name", "in_channels", "posthoc_offsets",
)


def make_checkpoint(
    state: dict[str, torch.Tensor],
    cfg: TrialConfig,
    classes: list[str],
    counts: np.ndarray | list[int],
    *,
    epoch: int,
    stage: str,
    metrics: dict[str, Any],
    in_channels: int,
    posthoc_offsets: list[float] | None = None,
) -> dict[str, Any]:
    """Build the checkpoint dict of the module contract (weights are not copied)."""
    return {
        "model": state,
        "config": asdict(cfg),
        "classes": list(classes),
        "class_counts": [int(c) for c in np.asarray(counts).tolist()],
        "epoch": int(epoch),
        "stage": str(stage),
        "metrics": to_plain(metrics),
        "model_name": cfg.model,
        "in_channels": int(in_channels),
        "posthoc_offsets": None if posthoc_offsets is None else [float(v) for v in posthoc_offsets],
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> str:
    """Write atomically (temp file in the same folder, then os.replace): a reader never
    sees a half-written checkpoint, even when a trial is killed mid-save."""
    path = os.fspath(path)
    atomic_write(Path(path), lambda handle: torch.save(ckpt, handle))
    return path


def save_resumable(path: str | os.PathLike, checkpoint: dict[str, Any], state: PipelineState) -> str:
    """Write the epoch's model checkpoint with the state to resume after it under
    RESUME_KEY: the one resume format of `fer.train --resume` and a retried Tune trial. One
    file, because the state's weights are the checkpoint's own tensors and `torch.save`
    stores a shared tensor once."""
    return save_checkpoint({**checkpoint, RESUME_KEY: state.to_dict()}, path)


def resume_from(saved: dict[str, Any]) -> PipelineState | None:
    """The state in a checkpoint `save_resumable` wrote (None when it holds none)."""
    if RESUME_KEY not in saved:
        return None
    return PipelineState.from_dict(saved[RESUME_KEY])


def load_weights_only(path: str | os.PathLike, missing: str = "checkpoint file not found") -> Any:
    """torch.load on CPU with weights_only=True (tensors, numbers, strings, lists, dicts);
    a missing or unreadable file raises ValueError naming it, in one line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle errors differ by torch version; all mean "unreadable"
        raise ValueError(f"{path}: {load_problem(err)}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on CPU with weights_only=True; a bad file raises ValueError naming it."""
    path = os.fspath(path)
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a fer checkpoint (expected a dict, got {type(ckpt).__name__})")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a fer checkpoint, missing keys: {', '.join(missing)}")
    return ckpt


def load_problem(err: Exception) -> str:
    """torch.load's error in one line. torch's own text for a refused pickle is a page that
    suggests weights_only=False; that advice is exactly what must not be followed here."""
    text = str(err)
    hostile = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if hostile:
        return (f"refused: the file pickles Python objects ({hostile.group(1)}), which could run code "
                f"when loaded; a fer checkpoint holds only tensors, numbers, strings, lists and dicts "
                f"(read with torch.load(weights_only=True))")
    detail = re.search(r"Unsupported operand \S+", text)
    first = detail.group(0) if detail else (text.strip().splitlines() or [type(err).__name__])[0]
    if first.startswith("Weights only load failed"):
        first = "not a torch checkpoint"
    return f"not a readable checkpoint ({type(err).__name__}: {first})"


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the network named in the checkpoint, load its weights, put it in eval mode."""
    from fer.train.models import build_model

    model = build_model(
        ckpt["model_name"],
        num_classes=len(ckpt["classes"]),
        in_channels=int(ckpt["in_channels"]),
        dropout=float(ckpt["config"].get("dropout", 0.0)),
        pretrained=None,  # the weights come from the checkpoint itself
        image_size=int(ckpt["config"].get("image_size", 224)),
        stem=ckpt["config"].get("stem", "standard"),  # checkpoints from before stems existed
    )
    model.load_state_dict(ckpt["model"])
    if device is not None:
        model.to(device)
    return model.eval()
