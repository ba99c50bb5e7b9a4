"""The one door to the private parts of Ray Tune (ASHA, OptunaSearch) and Ray's token
setup that the search uses, and the versions they were tested on.

PersistentASHA saves and restores ASHA's rungs, PruningOptunaSearch tells Optuna how a
trial ended, and `--address` sends this machine's auth token; Ray has public API for none
of it. Each private name is reached here alone, so an upgrade breaks one small file, and
the first use checks the versions: outside the tested range the search fails with one
line naming it (pyproject.toml bounds Ray and Optuna to the same ranges). Importing this
module imports neither Ray nor Optuna.
"""

from __future__ import annotations

import functools
import os
from typing import Any

# OptunaSearch's private trial bookkeeping was read on Ray 2.60 with these Optuna versions.
OPTUNA_TESTED = ("4.0", "5.1")

__all__ = [
    "asha_brackets", "asha_horizon", "asha_num_stopped", "asha_trial_info", "bracket_rungs",
    "check_versions", "completed_trials", "enable_token_auth", "guarded_cli_reporter", "optuna_study",
    "optuna_trials",
    "set_asha_num_stopped", "set_bracket_rungs",
]


def require_ray(user: str = "search") -> None:
    """trainables.internals' Ray check (one tested range for both packages), imported here
    so that importing this module imports no trainables (torch)."""
    from trainables.internals import require_ray as check_ray

    check_ray(user)


def check_versions() -> None:
    """Raise trainables.internals.VersionError (one line) unless Ray and Optuna are the
    versions this door was tested on."""
    from trainables.internals import require

    require_ray()
    require("optuna", "Optuna", OPTUNA_TESTED, "search")


# --------------------------------------------------------------------------- ASHA


def asha_brackets(scheduler: Any) -> list:
    """AsyncHyperBandScheduler's brackets (each holds its rungs)."""
    require_ray()
    return scheduler._brackets


def bracket_rungs(bracket: Any) -> list[tuple[float, dict]]:
    """A bracket's rungs: (milestone, {trial id: recorded value}) pairs, lowest milestone last."""
    require_ray()
    return bracket._rungs


def set_bracket_rungs(bracket: Any, rungs: list[tuple[float, dict]]) -> None:
    require_ray()
    bracket._rungs = rungs


def asha_trial_info(scheduler: Any) -> dict:
    """Trial id -> bracket, for the trials ASHA is tracking."""
    require_ray()
    return scheduler._trial_info


def asha_horizon(scheduler: Any) -> tuple[str, float]:
    """(time_attr, max_t) as the scheduler was built with them."""
    require_ray()
    return scheduler._time_attr, scheduler._max_t


def asha_num_stopped(scheduler: Any) -> int:
    require_ray()
    return scheduler._num_stopped


def set_asha_num_stopped(scheduler: Any, count: int) -> None:
    require_ray()
    scheduler._num_stopped = count


# --------------------------------------------------------------------------- OptunaSearch


def optuna_trials(searcher: Any) -> dict:
    """Ray trial id -> the optuna.Trial OptunaSearch asked for it."""
    check_versions()
    return searcher._ot_trials


def optuna_study(searcher: Any) -> Any:
    """The optuna.Study behind an OptunaSearch."""
    check_versions()
    return searcher._ot_study


def completed_trials(searcher: Any) -> set:
    """Ray trial ids OptunaSearch has already told the study about."""
    check_versions()
    return searcher._completed_trials


# --------------------------------------------------------------------------- CLIReporter


@functools.cache
def guarded_cli_reporter() -> type:
    """search.progress's live table: a CLIReporter subclass that overrides its private
    `_sort_by_metric`, `_current_best_trial` and `_print` (built on first use)."""
    require_ray()
    from ray import tune

    class SearchReporter(tune.CLIReporter):
        """Tune's CLIReporter with two guards, both for trials that lack a value:
        sorting by the metric compares None with a float when a finished trial never reported
        it, so such a table is left unsorted; and the "Current best trial" line looks every
        parameter column up in the best trial's config without a default, which raises for a
        conditional parameter the trial did not use (focal_gamma without focal loss), so that
        line is left out (the sorted table and its best f1 column show the same). Its "Result
        logdir" line is left out too: it names the driver's staging folder inside Ray's
        session directory (/tmp/ray/session_*), not the experiment the banner names."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._sort_wanted = self._sort_by_metric

        def report(self, trials: list[Any], done: bool, *sys_info: str) -> None:
            self._sort_by_metric = self._sort_wanted and all(
                isinstance(t.last_result.get(self._metric), (int, float)) for t in trials if t.status == "TERMINATED")
            super().report(trials, done, *sys_info)

        def _current_best_trial(self, trials: list[Any]) -> tuple[None, str | None]:
            return None, self._metric

        def _print(self, msg: str) -> None:
            super()._print("\n".join(line for line in msg.split("\n") if not line.startswith("Result logdir:")))

    return SearchReporter


# --------------------------------------------------------------------------- token auth


def enable_token_auth() -> bool:
    """Send this machine's Ray auth token, when it has one, to whatever cluster we join.

    Ray does this itself for 'auto' but not for an explicit HOST:PORT, and the switch must
    also refresh Ray's already-loaded config, so an environment variable set here is not
    enough: Ray's own helper does both (private API; the fallback leaves it to the user's
    RAY_AUTH_MODE=token)."""
    require_ray()
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
