"""The one door to Ray's private API that trainables use, and the Ray versions it was tested on.

Ray has no public way to learn a Train worker group's placement group, to remove one by
id, to wait for Tune's stop of a function trial, or to reach the trial's StorageContext
(release.py and trial.py need all four). Each is reached here alone, so a Ray upgrade
breaks one small file, and the first use checks Ray's version: outside the tested range
the trial fails with one line naming it (pyproject.toml bounds Ray to the same range).
Import this module lazily: importing it imports nothing from Ray.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Any

# The range the private names below were read from and tested on (pyproject.toml: ray <2.61).
RAY_TESTED = ("2.60", "2.61")
_passed: set[tuple[str, str]] = set()


class VersionError(RuntimeError):
    """A library outside the range our use of its private API was tested on (one line)."""


def require(module: str, label: str, tested: tuple[str, str], user: str = "trainables") -> None:
    """Raise VersionError unless `module`'s version is in [tested[0], tested[1])."""
    found = str(importlib.import_module(module).__version__)
    if (module, found) in _passed:
        return
    low, high = tested
    if not _minor(low) <= _minor(found) < _minor(high):
        raise VersionError(f"{user} needs {label} >={low},<{high} (tested); found {found}")
    _passed.add((module, found))


def _minor(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string: the ranges are whole minor releases."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return tuple(int(part) for part in match.groups()) if match else (0, 0)


def require_ray(user: str = "trainables") -> None:
    require("ray", "Ray", RAY_TESTED, user)


@functools.cache
def worker_group_callback() -> type:
    """Ray Train v2's WorkerGroupCallback: the controller calls `after_worker_group_start`."""
    require_ray()
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    return WorkerGroupCallback


def placement_group_hex(worker_group: Any) -> str:
    """The id (hex) of a started Train worker group's placement group."""
    require_ray()
    return worker_group.get_worker_group_state().placement_group_handle.placement_group.id.hex()


def placement_group_from_hex(pg_id: str) -> Any:
    """A PlacementGroup handle for an id written by `placement_group_hex`."""
    require_ray()
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID.from_hex(pg_id))


def train_report_logger() -> Any:
    """The logger of Ray Train v2's "Reporting training result N: TrainingReport(...)" INFO
    line, which every rank logs at every report. It is named by its file's path, not
    `ray.train...`, so RunConfig's LoggingConfig (which filters `ray.train` records) misses it."""
    require_ray()
    import logging

    from ray.train.v2._internal.execution import context

    return logging.getLogger(context.__file__)


def trial_stop_event() -> Any:
    """The threading.Event Tune sets when it stops (or cleans up) this function trial."""
    require_ray()
    from ray.train._internal.session import get_session

    return get_session().stop_event


def trial_storage() -> Any:
    """The trial's StorageContext: storage path, file system, experiment and trial folders."""
    require_ray()
    from ray.train._internal.session import get_storage

    return get_storage()


class TrialNamedActor:
    """Mixin for Tune's function-trial actor, given through `__mixins__`, which
    `ray.tune.trainable.function_trainable.wrap_function` (a DeveloperAPI) puts before
    FunctionTrainable and `tune.with_parameters` carries over. Tune's actor repr is the
    function's name alone; Ray reads an actor's repr once its constructor has run, and the
    dashboard's Actors page and the driver's log prefixes show it. So `setup`, which the
    constructor calls once the trial is known, appends the trial's name: `pipeline_trial
    trial_1f640df6` (its Ray Train run, with several workers, is train-1f640df6)."""

    def setup(self, config: dict[str, Any]) -> None:
        require_ray()
        self._name = f"{self._name} {self.trial_name}"
        super().setup(config)


def name_trial_actors(trial_function: Any) -> Any:
    """Mark a Tune function trainable so that its actors carry the trial's name (above)."""
    trial_function.__mixins__ = (TrialNamedActor,)
    return trial_function
