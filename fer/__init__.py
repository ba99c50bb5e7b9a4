"""fer: plain-PyTorch imbalanced, semi-supervised image classification (no Ray here).

One concept per module; the public names are re-exported here. They are resolved
lazily (PEP 562) so that `fer.config` and `fer.data` stay importable without paying
for torch, torchvision and scikit-learn: `search.space` validates a space with them
before anything heavy starts.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that owns it
_EXPORTS: dict[str, str] = {
    # configuration
    "TrialConfig": "fer.config",
    "apply_overrides": "fer.config",
    "validate_config": "fer.config",
    # data
    "Dataset": "fer.data",
    "Split": "fer.data",
    "DataError": "fer.data",
    "load_dataset": "fer.data",
    "FER_CLASSES": "fer.data",
    "DR_CLASSES": "fer.data",
    "write_csv": "fer.synth",
    # building blocks
    "MODELS": "fer.models",
    "build_model": "fer.models",
    "resolve_model": "fer.models",
    "STEMS": "fer.models",
    "stage_budget": "fer.budget",
    "describe_budget": "fer.budget",
    "LOSSES": "fer.losses",
    "WEIGHT_SCHEMES": "fer.losses",
    "build_loss": "fer.losses",
    "class_weights": "fer.losses",
    "SAMPLERS": "fer.samplers",
    "epoch_indices": "fer.samplers",
    "shard": "fer.samplers",
    "AUGMENTS": "fer.transforms",
    "make_train_transform": "fer.transforms",
    "make_eval_transform": "fer.transforms",
    "tta_views": "fer.transforms",
    "compute_metrics": "fer.metrics",
    "metrics_from_confusion": "fer.metrics",
    "plot_confusion": "fer.metrics",
    # training, semi-supervised stage, decision rule
    "fit": "fer.fitting",
    "FitResult": "fer.fitting",
    "Stage": "fer.fitting",
    "FitState": "fer.state",
    "PipelineState": "fer.state",
    "predict_logits": "fer.infer",
    "run_pipeline": "fer.pipeline",
    "PipelineResult": "fer.pipeline",
    "SELECTIONS": "fer.pseudo",
    "select_pseudo_labels": "fer.pseudo",
    "predict_pool": "fer.pseudo",
    "fit_temperature": "fer.pseudo",
    "summarize_selection": "fer.pseudo",
    "POSTHOC": "fer.posthoc",
    "fit_offsets": "fer.posthoc",
    "apply_offsets": "fer.posthoc",
    # checkpoints, evaluation, export
    "save_checkpoint": "fer.checkpoint",
    "load_checkpoint": "fer.checkpoint",
    "model_from_checkpoint": "fer.checkpoint",
    "evaluate_model": "fer.evaluate",
    "evaluate_checkpoint": "fer.evaluate",
    "bootstrap_macro_f1": "fer.evaluate",
    "export_checkpoint": "fer.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
