"""fer: plain-PyTorch imbalanced, semi-supervised image classification (no Ray here).

One concept per module; the public names are re-exported here. They are resolved
lazily (PEP 562) so that `fer.train.config` and `fer.data` stay importable without paying
for torch, torchvision and scikit-learn: `search.space` validates a space with them
before anything heavy starts.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that owns it
_EXPORTS: dict[str, str] = {
    # configuration
    "TrialConfig": "fer.train.config",
    "apply_overrides": "fer.train.config",
    "validate_config": "fer.train.config",
    # data
    "Dataset": "fer.data",
    "Split": "fer.data",
    "DataError": "fer.data",
    "load_dataset": "fer.data",
    "FER_CLASSES": "fer.data",
    "DR_CLASSES": "fer.data",
    "write_csv": "fer.data.synth",
    # building blocks
    "MODELS": "fer.train.models",
    "build_model": "fer.train.models",
    "resolve_model": "fer.train.models",
    "STEMS": "fer.train.models",
    "stage_budget": "fer.train.budget",
    "describe_budget": "fer.train.budget",
    "LOSSES": "fer.train.losses",
    "WEIGHT_SCHEMES": "fer.train.losses",
    "build_loss": "fer.train.losses",
    "class_weights": "fer.train.losses",
    "SAMPLERS": "fer.train.samplers",
    "epoch_indices": "fer.train.samplers",
    "shard": "fer.train.samplers",
    "AUGMENTS": "fer.train.transforms",
    "make_train_transform": "fer.train.transforms",
    "make_eval_transform": "fer.train.transforms",
    "tta_views": "fer.train.transforms",
    "compute_metrics": "fer.train.metrics",
    "metrics_from_confusion": "fer.train.metrics",
    "plot_confusion": "fer.train.metrics",
    # training, semi-supervised stage, decision rule
    "fit": "fer.train.fitting",
    "FitResult": "fer.train.fitting",
    "Stage": "fer.train.fitting",
    "FitState": "fer.train.state",
    "PipelineState": "fer.train.state",
    "predict_logits": "fer.train.infer",
    "run_pipeline": "fer.ssl.pipeline",
    "PipelineResult": "fer.ssl.pipeline",
    "SELECTIONS": "fer.ssl.pseudo",
    "select_pseudo_labels": "fer.ssl.pseudo",
    "predict_pool": "fer.ssl.pseudo",
    "fit_temperature": "fer.ssl.pseudo",
    "summarize_selection": "fer.ssl.pseudo",
    "POSTHOC": "fer.train.posthoc",
    "fit_offsets": "fer.train.posthoc",
    "apply_offsets": "fer.train.posthoc",
    # checkpoints, evaluation, export
    "save_checkpoint": "fer.train.checkpoint",
    "load_checkpoint": "fer.train.checkpoint",
    "model_from_checkpoint": "fer.train.checkpoint",
    "evaluate_model": "fer.evaluate.evaluate",
    "evaluate_checkpoint": "fer.evaluate.evaluate",
    "bootstrap_macro_f1": "fer.evaluate.evaluate",
    "export_checkpoint": "fer.export.export",
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
