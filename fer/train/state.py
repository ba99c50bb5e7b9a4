"""Resume state: what a run needs to go on after an epoch, typed while it lives, plain on disk.

State crosses process boundaries (a checkpoint file, a Tune retry, `--resume`), so each
part is a dataclass whose `to_dict()` holds only tensors, numbers, strings, lists and
dicts (`torch.load(weights_only=True)` reads it back) and whose `from_dict()` is the one
place that checks a saved state's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FIT_KEYS = ("epoch", "step", "history", "model", "optimizer", "scheduler", "scaler", "best")
STAGES = ("teacher", "student")


@dataclass
class FitState:
    """One stage after `epoch` of its epochs: weights, optimizer, scheduler and grad-scaler
    states, the step count, the history and the best epoch so far. `best` holds the local
    epoch index ("epoch"), its macro-F1 ("f1"), weights ("state"), metrics and confusion."""

    epoch: int  # epochs of this stage done
    step: int  # optimizer steps done (the scheduler's position)
    history: list[dict[str, Any]]
    model: dict[str, Any]  # state dict
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    best: dict[str, Any]  # confusion as an int64 array here, a nested list on disk
    stopped_early: bool = False  # patience ended the stage: a resumed run trains no further
    ema: dict[str, Any] | None = None  # the weight average's state dict (a stage with student_ema), else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data referencing live tensors: save it before training goes on."""
        out = {"epoch": self.epoch, "step": self.step, "history": self.history,
               "stopped_early": self.stopped_early, "model": self.model, "optimizer": self.optimizer,
               "scheduler": self.scheduler, "scaler": self.scaler,
               "best": {**self.best, "confusion": np.asarray(self.best["confusion"]).tolist()}}
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "FitState":
        missing = [k for k in FIT_KEYS if k not in saved]
        if missing:
            raise ValueError(f"resume state is missing {', '.join(missing)}")
        best = dict(saved["best"], confusion=np.asarray(saved["best"]["confusion"], dtype=np.int64))
        return cls(epoch=int(saved["epoch"]), step=int(saved["step"]), history=[dict(m) for m in saved["history"]],
                   model=saved["model"], optimizer=saved["optimizer"], scheduler=saved["scheduler"],
                   scaler=saved["scaler"], best=best, stopped_early=bool(saved.get("stopped_early", False)),
                   ema=saved.get("ema"))

    def check_fits(self, epochs: int) -> None:
        """Refuse a state from a stage of a different length."""
        if not 1 <= self.epoch <= epochs:
            raise ValueError(f"resume state is after epoch {self.epoch} of a {epochs}-epoch stage")


@dataclass
class PipelineState:
    """The pipeline after one epoch: its stage and that stage's `FitState`; in stage 2 also
    the teacher's result, the finished rounds' students (cfg.student_rounds) and this round's
    pseudo-label selection, so a resumed trial neither retrains them nor re-selects."""

    stage: str  # "teacher" or "student"
    fit: FitState
    teacher: dict[str, Any] | None = None  # fer.ssl.pipeline's summary of stage 1 (checkpoint, history, ...)
    pseudo: dict[str, Any] | None = None  # kept pool indices, labels, confidences, summary
    rounds: list[dict[str, Any]] | None = None  # stage 2's finished rounds, each summarised as the teacher

    def global_epoch(self) -> int:
        """The epoch number reports carry (stage 2 continues after the teacher's epochs, each
        round after the previous one's): the last epoch's, from the fit's history."""
        return int(self.fit.history[-1]["epoch"])

    @property
    def round(self) -> int:
        """The stage-2 round this state is in (1 in stage 1 and in round 1)."""
        return len(self.rounds or []) + 1

    def best_score(self) -> float:
        """The best validation macro-F1 of the run so far, over both stages: the current
        stage's best epoch, and in stage 2 also the teacher's and the finished rounds'.
        Derived from the resume state, so a retried or resumed trial reports the same value
        it would have."""
        best = float(self.fit.best["f1"])
        if self.stage == "student":
            earlier = ([self.teacher] if self.teacher is not None else []) + list(self.rounds or [])
            best = max([best] + [float(done["best_metrics"]["val_macro_f1"]) for done in earlier])
        return best

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "fit": self.fit.to_dict()}
        if self.stage == "student":
            out.update(teacher=self.teacher, pseudo=self.pseudo, rounds=list(self.rounds or []))
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "PipelineState":
        stage = saved.get("stage") if isinstance(saved, dict) else None
        if stage not in STAGES or "fit" not in saved or (stage == "student" and not {"teacher", "pseudo"} <= set(saved)):
            keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"not a pipeline resume state (stage {stage!r}, keys {keys})")
        return cls(stage=stage, fit=FitState.from_dict(saved["fit"]), teacher=saved.get("teacher"),
                   pseudo=saved.get("pseudo"), rounds=saved.get("rounds"))
