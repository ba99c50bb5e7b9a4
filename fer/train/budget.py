"""What a trial's budget means on a given data set: passes, images and optimizer steps per stage.

The budget unit is the epoch everywhere (ASHA's rungs and max_t, the global epoch across
both stages, the curves, resume). `TrialConfig.epoch_images` sizes an epoch to the data:
a split smaller than that is repeated within the epoch (`fer.train.samplers.epoch_indices`), so
`epochs: 12` trains a 377-image split for as many optimizer steps as a 3,000-image one,
while a split larger than `epoch_images` (FER2013's 28,709) keeps one pass per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fer.train.config import TrialConfig
from fer.train.samplers import pass_size, passes_per_epoch


@dataclass(frozen=True)
class StageBudget:
    """One stage's budget on one training split."""

    stage: str
    epochs: int
    passes: int  # sampler passes over the split an epoch draws from (the last one cut short)
    images_per_epoch: int
    steps_per_epoch: int  # optimizer steps per epoch, all data-parallel ranks together

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def describe(self, split_size: int) -> str:
        repeat = f", the {split_size}-image split {self.images_per_epoch / split_size:.1f}x" if self.passes > 1 else ""
        return (f"{self.stage}: {self.epochs} epochs x {self.images_per_epoch} images{repeat} "
                f"= {self.steps} optimizer steps")


def stage_budget(cfg: TrialConfig, labels: np.ndarray, stage: str = "teacher", world: int = 1) -> StageBudget:
    """The budget of `stage` when it trains on images with these `labels`."""
    epochs = cfg.student_epochs if stage == "student" else cfg.epochs
    labels = np.asarray(labels, dtype=np.int64)
    passes = passes_per_epoch(labels, cfg.class_cap, cfg.epoch_images)
    images = max(pass_size(labels, cfg.class_cap), cfg.epoch_images)
    steps = -(-images // (cfg.batch_size * world))
    return StageBudget(stage=stage, epochs=epochs, passes=passes, images_per_epoch=images, steps_per_epoch=steps)


def describe_budget(cfg: TrialConfig, data: Any) -> str:
    """Lines for the start of a run: what each stage's epochs amount to on `data` (a
    fer.data.Dataset); the student and control lines only when there is a pool for stage 2."""
    train_labels = data.splits["train"].labels
    pool = data.splits.get("unlabeled")
    teacher = stage_budget(cfg, train_labels, "teacher")
    lines = [f"budget: {teacher.describe(len(train_labels))} (batch {cfg.batch_size}, "
             f"epoch_images {cfg.epoch_images})"]
    if pool is not None and len(pool.images) > 0 and cfg.student_epochs > 0:
        least = max(cfg.epoch_images, len(train_labels))
        online = cfg.student_mode != "offline"
        stream = ("labelled + the teacher's picks" if cfg.pool_picks else "the labelled split") if online \
            else "labelled + kept pseudo-labels"
        pool = (f", each step with {cfg.pool_ratio} pool image(s) per labelled one in two views ({cfg.student_mode})"
                if online else "")
        rounds = (f" in {cfg.student_rounds} rounds of {cfg.round_epochs}, each labelled by the round before's "
                  "student" if cfg.student_rounds > 1 else "")
        rate = f", peak learning rate {cfg.student_lr_scale:g} x lr" if cfg.student_lr_scale != 1.0 else ""
        rate += ", constant after the warmup" if cfg.student_schedule == "constant" else ""
        rate += ", weak views labelled with the student's post-hoc offsets" if online and cfg.pool_debias else ""
        lines.append(f"        student: {cfg.student_epochs} epochs of at least {least} images "
                     f"({stream}, repeated up to epoch_images){pool}{rounds}{rate}")
        if cfg.pool_control:
            lines.append(f"        control: {cfg.student_epochs} more epochs of the student's recipe on the labelled "
                         f"split alone, to measure what the pool bought (pool_control=false skips it)")
    return "\n".join(lines)
