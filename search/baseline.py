"""The plain baseline: what it is, and whether the search's own baseline trial trains like it.

The confirmation (search/confirm.py) compares the winner on test with the plain baseline,
and the search's scheduler (search/tuner.py) lets the search's baseline trial run the full
budget when that trial can serve as the plain baseline's run; both read it here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The baseline as a user without this tool would train it: plain cross-entropy on the
# natural class mix, no class weights, no cap, argmax (no post-hoc offsets). Everything
# else (model, budget, augmentation, stage 2) is the search's own baseline point.
PLAIN = {"loss": "ce", "label_smoothing": 0.0, "class_weights": "none", "sampler": "uniform", "class_cap": 0,
         "posthoc": "none"}


# The metric a user without this tool keeps the best epoch by: argmax val macro-F1. The
# plain baseline's tested checkpoint is picked by it, whatever the search's metric.
PLAIN_METRIC = "val_macro_f1"

# TrialConfig fields that act only after training: two configurations that differ in these
# alone train the same model, so confirming both would spend runs on one model (on an argmax
# metric, a tie).
AFTER_TRAINING = ("posthoc",)

# Metrics that score each epoch's model as it decides when handed out, with its post-hoc
# offsets (fer.train.loop.epoch_metrics): on these, two configurations that differ only in
# AFTER_TRAINING are different models, e.g. the plain recipe with offsets against the plain
# baseline, which decides by argmax.
SEES_AFTER_TRAINING = ("val_macro_f1_posthoc",)


def holds(config: dict[str, Any], point: dict[str, Any]) -> bool:
    """Whether `config` holds every item of `point` (a trial of the space's baseline point: the
    reports' baseline, the trial ASHA keeps, the teacher the searcher does not fork)."""
    return bool(point) and all(config.get(k) == v for k, v in point.items())


def plain_config(space: Any) -> dict[str, Any]:
    """The plain baseline's TrialConfig overrides (no seed): the space's baseline point as a
    user without this tool would train it (PLAIN)."""
    return {k: v for k, v in {**space.fixed, **space.baseline_point(), **PLAIN}.items() if k != "seed"}


def search_baseline_is_plain(space: Any) -> bool:
    """Whether the search's baseline trial trains as the plain baseline does (it differs at
    most in the seed and AFTER_TRAINING). Then, with the confirmation on, ASHA lets it run the
    full budget and its run is the plain baseline's: one full-budget run less to start."""
    return training_of(space, {**space.fixed, **space.baseline_point()}) == training_of(space, plain_config(space))


def ranked_as(space: Any, config: dict[str, Any]) -> dict[str, Any]:
    """What decides a configuration's score on the space's metric: its training
    (training_of), and the fields that act after training where the metric sees them."""
    return _config_less(space, config, () if space.metric in SEES_AFTER_TRAINING else AFTER_TRAINING)


def training_of(space: Any, config: dict[str, Any]) -> dict[str, Any]:
    """What decides the trained weights: the full TrialConfig less the seed (the confirmation
    sets its own) and the fields that act after training."""
    return _config_less(space, config, AFTER_TRAINING)


def _config_less(space: Any, config: dict[str, Any], dropped: tuple[str, ...]) -> dict[str, Any]:
    """The full TrialConfig of `config` less the seed and `dropped`."""
    full = dataclasses.asdict(space.trial_config(config))
    return {k: v for k, v in full.items() if k not in ("seed", *dropped)}
