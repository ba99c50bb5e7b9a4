"""ASHA whose rungs survive `--resume`.

`Tuner.restore` brings the scheduler back from the pickle written when the experiment
started, so Ray's AsyncHyperBandScheduler resumes with empty rungs: the cutoffs of the
interrupted run are forgotten and trials it would have stopped run on. This subclass
writes its rungs (and which trials it stopped) to `asha_state.json` in the experiment's
driver staging folder after every decision. Ray syncs that folder into the experiment
folder with each experiment checkpoint and downloads its `*.json` back on restore,
before the restored trials are re-added, which is when the state is read.
ASHA itself: Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from fer.train.config import SHARED_TEACHER_KEY
from search import internals
from search.baseline import holds

STATE_FILE = "asha_state.json"


class PersistentASHA(AsyncHyperBandScheduler):
    """AsyncHyperBandScheduler that saves and reloads its rung history. A trial whose config
    holds every item of `keep` (the plain baseline, when the confirmation takes its search run
    as the baseline's run: search/confirm.py) runs to the end, and so does every trial that
    reports epoch `finish_from` or later (the teacher's last epoch, when the confirmation is
    on); their scores still enter the rungs.

    Why `finish_from`: a trial that reached the teacher's last epoch has passed every earlier
    rung, so it is likely among the configurations the confirmation races, and the race counts
    its search run as one of its values only when it ran the full budget. Stopping it there
    saves its student epoch (one of nine), and the race then spends a whole fresh run on the
    value it lacks: in Quickstart runs 17 and 20 (BENCHMARKS.md) ASHA stopped a trial at its
    rung at epoch 8, that configuration was confirmed, and its extra seed ran alone after the
    first wave, 2.5 minutes."""

    def __init__(self, *args: Any, keep: dict[str, Any] | None = None, finish_from: int | None = None,
                 **kwargs: Any) -> None:
        self._keep = dict(keep or {})
        self._finish_from = finish_from
        # Ray's default stops a trial the moment it reports epoch max_t, which kills the
        # pipeline before its post-hoc step writes the final checkpoint (best.pt); a
        # trial that reaches max_t is done anyway, so let it return on its own. The same
        # goes for a rung AT max_t (e.g. grace_period == max_t): see on_trial_result.
        kwargs.setdefault("stop_last_trials", False)
        super().__init__(*args, **kwargs)
        self._state_dir: str | None = None
        self._stopped: set[str] = set()

    # ------------------------------------------------------------------ hooks
    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if self._state_dir is None:
            self._state_dir = trial.storage.experiment_driver_staging_path
            self.load_state()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if trial.trial_id in self._stopped:
            # Stopped before the interruption; the restored trial re-reports an old epoch.
            return TrialScheduler.STOP
        if result.get(SHARED_TEACHER_KEY):
            # An epoch replayed from a shared teacher (fer.ssl.teachers): the trial that trained it
            # has its scores in the rungs already, and stopping the copy saves no training.
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)  # records the rung
        time_attr, max_t = internals.asha_horizon(self)
        # _keep is absent from a scheduler pickled before it existed (--resume of an older search)
        keep = getattr(self, "_keep", {})
        finish_from = getattr(self, "_finish_from", None)  # likewise
        if keep and holds(trial.config, keep):
            action = TrialScheduler.CONTINUE
        elif finish_from is not None and result.get(time_attr, -1) >= finish_from:
            action = TrialScheduler.CONTINUE
        elif result.get(time_attr, -1) >= max_t:
            # Its last epoch: stopping it now saves no training, only kills the pipeline's
            # final step (best.pt). This was a search's intermittently missing best.pt:
            # with grace_period 1 and max_t 1 the only rung is at max_t.
            action = TrialScheduler.CONTINUE
        elif action == TrialScheduler.STOP and time_attr in result:
            self._stopped.add(trial.trial_id)
        self.save_state()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if trial.trial_id in internals.asha_trial_info(self):
            super().on_trial_complete(tune_controller, trial, result)
        self.save_state()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        internals.asha_trial_info(self).pop(trial.trial_id, None)

    # ------------------------------------------------------------------ state
    @property
    def stopped_early(self) -> set[str]:
        """Trials this scheduler stopped before max_t."""
        return set(self._stopped)

    def state(self) -> dict:
        return {
            "max_t": internals.asha_horizon(self)[1],
            "num_stopped": internals.asha_num_stopped(self),
            "stopped": sorted(self._stopped),
            "brackets": [
                [[milestone, dict(recorded)] for milestone, recorded in internals.bracket_rungs(bracket)]
                for bracket in internals.asha_brackets(self)
            ],
        }

    def save_state(self) -> None:
        if self._state_dir is None:
            return
        os.makedirs(self._state_dir, exist_ok=True)
        path = Path(self._state_dir, STATE_FILE)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state()))
        os.replace(tmp, path)  # atomic: an interruption never leaves half a file

    def load_state(self) -> bool:
        """Read the saved rungs if this experiment has them; True if it did."""
        path = Path(self._state_dir or "", STATE_FILE)
        if not self._state_dir or not path.is_file():
            return False
        saved = json.loads(path.read_text())
        brackets = internals.asha_brackets(self)
        if len(saved["brackets"]) != len(brackets):
            raise ValueError(f"{path}: saved with {len(saved['brackets'])} brackets, now {len(brackets)}")
        for bracket, rungs in zip(brackets, saved["brackets"]):
            milestones = [m for m, _ in internals.bracket_rungs(bracket)]
            if milestones != [m for m, _ in rungs]:
                raise ValueError(f"{path}: rung milestones {[m for m, _ in rungs]} differ from {milestones}")
            internals.set_bracket_rungs(bracket, [(milestone, dict(recorded)) for milestone, recorded in rungs])
        internals.set_asha_num_stopped(self, saved["num_stopped"])
        self._stopped = set(saved["stopped"])
        return True
