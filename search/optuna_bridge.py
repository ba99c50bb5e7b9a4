"""OptunaSearch that tells Optuna the truth about trials ASHA stopped early.

Ray's `OptunaSearch` (Ray 2.60) reports each result at step `training_iteration` and,
when a trial ends, tells the study COMPLETE with the last reported value -- also when
ASHA stopped the trial after one epoch. TPE then ranks a one-epoch score as if it were
a finished run. Here every epoch is reported at its global `epoch` as an intermediate
value, a trial that ended before `max_t` is told PRUNED (Optuna then takes its last
intermediate value, and TPE ranks pruned trials below complete ones of more steps),
and a complete trial is told its best epoch's value: the checkpoint that is kept.

With `student_forks` F > 0 the search is stage-aware: a trial whose teacher finished stage 1
(it reported the teacher's last epoch; the plain baseline that ASHA keeps is not forked) has
its teacher knobs enqueued in the study for up to F more trials, best teachers first, and
Optuna samples only their stage-2 knobs (fer.train.config.STAGE2_FIELDS). Such a trial finds the
teacher in the experiment's store (fer.ssl.teachers) and starts at stage 2: F + 1 student
configurations for one teacher's epochs.

"Stopped early" is asked of the scheduler when one is bound (`PersistentASHA.stopped_early`),
because a trial can also end before `max_t` on its own (stage 2 skipped when no pool image
reaches the pseudo-label threshold, or `patience`); without one, ending before `max_t` counts.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from fer.train.config import STAGE2_FIELDS
from search import internals
from search.baseline import holds

logger = logging.getLogger(__name__)


def open_study_storage(db_path: str) -> optuna.storages.RDBStorage:
    """SQLite storage for the study, inside the experiment folder (optuna-dashboard can open it)."""
    return optuna.storages.RDBStorage(f"sqlite:///{db_path}")


def _knobs_key(knobs: dict[str, Any]) -> str:
    return json.dumps(knobs, sort_keys=True, default=str)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch reporting per-epoch intermediate values and PRUNED for early stops."""

    def __init__(
        self, *args: Any, max_t: int, time_attr: str = "epoch", scheduler: Any = None,
        teacher_epochs: int = 0, student_forks: int = 0, unforked: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self._max_t = int(max_t)
        self._time_attr = time_attr
        self._scheduler = scheduler  # anything with a `stopped_early` set of trial ids
        self._reported: dict[str, dict[int, float]] = {}
        self._teacher_epochs = int(teacher_epochs)  # the global epoch at which stage 1 ends
        self._student_forks = int(student_forks) if self._max_t > self._teacher_epochs else 0
        self._forks: dict[str, int] = {}  # a teacher's knobs (JSON) -> trials forked from it
        # A trial whose params hold all of these is not forked: the plain baseline, which ASHA
        # lets finish by exemption (search/baseline.py), not because its teacher is good.
        self._unforked = dict(unforked or {})
        super().__init__(*args, **kwargs)

    def suggest(self, trial_id: str) -> dict | None:
        # a searcher saved before forks existed (--resume of an older search) has none of their state
        if getattr(self, "_student_forks", 0) and trial_id not in internals.optuna_trials(self):
            fork = self.teacher_to_fork()
            if fork is not None:
                knobs, parent = fork
                self._forks[_knobs_key(knobs)] = self._forks.get(_knobs_key(knobs), 0) + 1
                internals.optuna_study(self).enqueue_trial(knobs, user_attrs={"teacher_of_trial": parent},
                                                           skip_if_exists=False)
        return super().suggest(trial_id)

    def teacher_to_fork(self) -> tuple[dict[str, Any], int] | None:
        """(teacher knobs, Optuna number of the trial that trained it) of the best finished
        teacher forked fewer than `student_forks` times, or None."""
        sign = 1.0 if self.mode == "max" else -1.0
        best: tuple[float, dict[str, Any], int] | None = None
        for trial_id, reported in self._reported.items():
            trial = internals.optuna_trials(self).get(trial_id)
            if trial is None or self._teacher_epochs not in reported:
                continue
            if holds(trial.params, self._unforked):
                continue
            knobs = {k: v for k, v in trial.params.items() if k not in STAGE2_FIELDS}
            if self._forks.get(_knobs_key(knobs), 0) >= self._student_forks:
                continue
            score = sign * max(sign * v for step, v in reported.items() if step <= self._teacher_epochs)
            if best is None or sign * score > sign * best[0]:
                best = (score, knobs, trial.number)
        return None if best is None else (best[1], best[2])

    def save(self, checkpoint_path: str) -> None:
        # The scheduler is saved by Tune with the tuner (one pickle, so the link survives
        # Tuner.restore); a copy here would cut it on restore.
        state = {k: v for k, v in self.__dict__.items() if k != "_scheduler"}
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(state, handle)

    def restore(self, checkpoint_path: str) -> None:
        scheduler = self._scheduler
        super().restore(checkpoint_path)
        self._scheduler = scheduler

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict | None) -> None:
        if not result or trial_id in internals.completed_trials(self) or trial_id not in internals.optuna_trials(self):
            return
        value, step = result.get(self.metric), result.get(self._time_attr)
        if not _finite(value) or not _finite(step):
            return
        seen = self._reported.setdefault(trial_id, {})
        if int(step) in seen:  # a retried trial repeats epochs after its checkpoint
            return
        seen[int(step)] = float(value)
        internals.optuna_trials(self)[trial_id].report(float(value), int(step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trials, completed = internals.optuna_trials(self), internals.completed_trials(self)
        if trial_id in completed or trial_id not in trials:
            return
        # The result that made ASHA stop a trial never reaches on_trial_result.
        self._report(trial_id, result)
        state, value = self.final_state(trial_id, result, error)
        try:
            internals.optuna_study(self).tell(trials[trial_id], value, state=state)
        except Exception as exc:  # noqa: BLE001 - the search must go on; Ray's own class does the same
            logger.warning("Optuna could not record trial %s: %s", trial_id, exc)
        completed.add(trial_id)

    def final_state(
        self, trial_id: str, result: dict | None, error: bool
    ) -> tuple[TrialState, float | None]:
        """FAIL for errors and NaN, PRUNED when stopped early, else COMPLETE with the best epoch's value."""
        reported = self._reported.get(trial_id, {})
        last = result.get(self.metric) if result else None
        if error or (last is not None and not _finite(last)):
            return TrialState.FAIL, None
        if not reported:
            return TrialState.PRUNED, None
        if self._scheduler is not None:
            stopped = trial_id in self._scheduler.stopped_early
        else:
            stopped = max(reported) < self._max_t
        if stopped:
            return TrialState.PRUNED, None
        best = max(reported.values()) if self.mode == "max" else min(reported.values())
        return TrialState.COMPLETE, best
