"""Teachers shared between runs: stage 1 trained once per teacher configuration.

Stage 1 reads only the teacher's knobs (model, loss, weighting, sampling, optimisation,
seed, data). Two runs that differ only in stage-2 knobs (`STAGE2_FIELDS`: pseudo-label
threshold, selection, student epochs and augmentation, post-hoc rule, ...) train the same
teacher, weight for weight on CPU. A `TeacherStore` keeps each finished teacher under a
key of its configuration; a run whose key is there starts after stage 1 from the stored
state (`fer.ssl.pipeline.run_pipeline(resume=...)`, the path a retried trial takes) instead
of training it again. The stored state is the teacher's last epoch with its best weights
and no optimizer moments (stage 1 will not train further), beside that epoch's own
checkpoint: two copies of the weights at most (40 MB for resnet10t).

Plain files, no Ray: `trainables` gives every single-worker trial of a search the
experiment's store (`<experiment>/teachers/`), and `search.run`'s searcher forks
finished teachers into trials that search only the stage-2 knobs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from fer.train.checkpoint import load_weights_only, save_checkpoint
from fer.train.config import STAGE2_FIELDS, TrialConfig, config_field_names
from fer.train.state import FitState, PipelineState

TEACHER_FIELDS = tuple(name for name in config_field_names() if name not in STAGE2_FIELDS)


def teacher_key(cfg: TrialConfig) -> str:
    """A name for cfg's teacher: equal for configurations that train the same teacher."""
    knobs = {name: getattr(cfg, name) for name in TEACHER_FIELDS}
    return hashlib.sha256(json.dumps(knobs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def teacher_finished(cfg: TrialConfig, state: PipelineState) -> bool:
    """Whether `state` (a report's) is stage 1 after its last epoch, or ended by patience."""
    return state.stage == "teacher" and (state.fit.epoch == cfg.epochs or state.fit.stopped_early)


@dataclass
class SharedTeacher:
    """A stored teacher: the last teacher epoch's report (its metrics and model checkpoint,
    the latter carrying the run's own configuration once loaded) and the state after it."""

    metrics: dict[str, Any]
    checkpoint: dict[str, Any]
    state: PipelineState


@dataclass(frozen=True)
class TeacherStore:
    """Finished teachers in `folder`, one file per teacher key."""

    folder: str

    def path(self, cfg: TrialConfig) -> str:
        return os.path.join(self.folder, f"teacher-{teacher_key(cfg)}.pt")

    def save(self, cfg: TrialConfig, metrics: dict[str, Any], checkpoint: dict[str, Any],
             state: PipelineState) -> str:
        """Store the finished teacher of `cfg` (atomically: a reader never sees half a file)."""
        if not teacher_finished(cfg, state):
            raise ValueError(f"not a finished teacher: stage {state.stage!r} after epoch {state.fit.epoch} "
                             f"of {cfg.epochs}")
        finished = PipelineState("teacher", _finished(state.fit))
        return save_checkpoint({"metrics": metrics, "checkpoint": checkpoint, "state": finished.to_dict()},
                               self.path(cfg))

    def load(self, cfg: TrialConfig) -> SharedTeacher | None:
        """The stored teacher of `cfg`, or None. A file that cannot be read is no teacher:
        the run trains its own (and stores it again)."""
        path = self.path(cfg)
        if not os.path.isfile(path):
            return None
        try:
            saved = load_weights_only(path)
            state = PipelineState.from_dict(saved["state"])
            state.fit.check_fits(cfg.epochs)
        except (ValueError, KeyError, TypeError):
            return None
        if not teacher_finished(cfg, state):
            return None
        checkpoint = dict(saved["checkpoint"], config=asdict(cfg))  # this run's knobs, not the first run's
        return SharedTeacher(metrics=dict(saved["metrics"]), checkpoint=checkpoint, state=state)


def _finished(fit: FitState) -> FitState:
    """The stage's state without what only further training would need: the best weights as
    the model, no optimizer moments (an optimizer's state dict with no per-parameter state
    is a fresh optimizer's, which `fit` loads and never steps)."""
    optimizer = {"state": {}, "param_groups": fit.optimizer["param_groups"]}
    return replace(fit, model=fit.best["state"], optimizer=optimizer)
