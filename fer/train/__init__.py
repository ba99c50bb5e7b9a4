"""Training: one trial's configuration and the plain-PyTorch loop that trains one stage.

Everything a stage needs to go from uint8 arrays to a best-epoch checkpoint lives here;
stage 2's pseudo-labels and the pipeline that chains the stages are `fer.ssl`. Names are
re-exported lazily (`fer.lazy`), so `fer.train.config` stays importable without torch.

    config.py       TrialConfig: every knob of a trial, checked against fer.names
    state.py        FitState, PipelineState: resume state, plain data on disk
    models.py       the model zoo (timm, torchvision) and our adaptations (stem, head)
    transforms.py   augmentations, eval transform, TTA views
    samplers.py     epoch orders (uniform, sqrt, balanced) and rank shards
    losses.py       the losses and class weights
    budget.py       what a budget means on a data set: passes, images, optimizer steps
    infer.py        batched, sharded inference; devices, ranks, autocast
    metrics.py      scikit-learn metrics from a confusion matrix
    posthoc.py      post-hoc logit offsets: the decision rule
    checkpoint.py   the checkpoint dict: build, save, load, rebuild its model
    consistency.py  stage 2's online loss (FixMatch, FlexMatch) that the loop runs per step
    loop.py         one epoch's pieces: batches, optimizer, schedule, validation
    fitting.py      fit(): one stage, DDP-aware, best epoch by val macro-F1
    cli.py          python -m fer.train: the whole pipeline of one trial (an entry point)
"""

from __future__ import annotations

from fer.lazy import lazy_exports

# public name -> the module that owns it
_EXPORTS: dict[str, str] = {
    "TrialConfig": "fer.train.config",
    "apply_overrides": "fer.train.config",
    "validate_config": "fer.train.config",
    "load_config_file": "fer.train.config",
    "parse_set_args": "fer.train.config",
    "FitState": "fer.train.state",
    "PipelineState": "fer.train.state",
    "MODELS": "fer.train.models",
    "STEMS": "fer.train.models",
    "build_model": "fer.train.models",
    "resolve_model": "fer.train.models",
    "AUGMENTS": "fer.train.transforms",
    "make_train_transform": "fer.train.transforms",
    "make_eval_transform": "fer.train.transforms",
    "tta_views": "fer.train.transforms",
    "SAMPLERS": "fer.train.samplers",
    "epoch_indices": "fer.train.samplers",
    "shard": "fer.train.samplers",
    "LOSSES": "fer.train.losses",
    "WEIGHT_SCHEMES": "fer.train.losses",
    "build_loss": "fer.train.losses",
    "class_weights": "fer.train.losses",
    "stage_budget": "fer.train.budget",
    "describe_budget": "fer.train.budget",
    "Ranks": "fer.train.infer",
    "predict_logits": "fer.train.infer",
    "compute_metrics": "fer.train.metrics",
    "metrics_from_confusion": "fer.train.metrics",
    "plot_confusion": "fer.train.metrics",
    "POSTHOC": "fer.train.posthoc",
    "fit_offsets": "fer.train.posthoc",
    "apply_offsets": "fer.train.posthoc",
    "make_checkpoint": "fer.train.checkpoint",
    "save_checkpoint": "fer.train.checkpoint",
    "load_checkpoint": "fer.train.checkpoint",
    "model_from_checkpoint": "fer.train.checkpoint",
    "Consistency": "fer.train.consistency",
    "Debias": "fer.train.consistency",
    "fit": "fer.train.fitting",
    "FitResult": "fer.train.fitting",
    "Stage": "fer.train.fitting",
    "main": "fer.train.cli",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
