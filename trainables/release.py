"""Give a stopped multi-worker trial's CPUs/GPUs back at once.

When ASHA stops a trial, Tune ends the trial's actor; the Train controller and workers it
owns die with it, but the worker group's placement group lives on (placement groups
belong to the job). Ray Train's detached PlacementGroupCleaner would remove it, but it
asks the State API whether the controller is alive, which fails without the dashboard
(`include_dashboard=False`) or when two local clusters share a machine ("Found multiple
active Ray instances"). Measured on Ray 2.60: the next trial's worker group then waits
for resources forever. So the controller records the placement group's id in a file
(`record_placement_group`, a Train callback, runs in the controller, which Ray pins to the
trial's node), and the trial process removes that placement group as soon as Tune asks
the trial to stop (`release_on_stop`), or at exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
from typing import Any

from trainables import internals


def record_placement_group(path: str) -> Any:
    """A Train controller callback that writes the worker group's placement group id to
    `path`. Its class derives from a private Ray class, so it is built on first use
    (trainables/internals.py), and `import trainables` needs no Ray internals."""
    return _record_placement_group_class()(path)


@functools.cache
def _record_placement_group_class() -> type:
    class RecordPlacementGroup(internals.worker_group_callback()):
        """Train controller callback: write the worker group's placement group id to `path`."""

        def __init__(self, path: str) -> None:
            self.path = path

        def after_worker_group_start(self, worker_group: Any) -> None:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w", encoding="utf-8") as out:
                out.write(internals.placement_group_hex(worker_group))
            os.replace(tmp, self.path)

    return RecordPlacementGroup


def remove_recorded(path: str) -> bool:
    """Remove the placement group recorded in `path` (and the file); True if there was one."""
    from ray.util.placement_group import remove_placement_group

    try:
        with open(path, encoding="utf-8") as handle:
            pg_id = handle.read().strip()
        os.unlink(path)
    except FileNotFoundError:
        return False
    try:
        remove_placement_group(internals.placement_group_from_hex(pg_id))
    except Exception:  # already removed by Train's own shutdown, or Ray is going down
        return False
    return True


def release_on_stop(path: str) -> None:
    """In the trial process: remove the recorded placement group once Tune stops the trial.

    Tune sets the trial session's stop event both when it stops a trial early and when a
    finished trial is cleaned up; a run that ended normally has already deleted `path`, so
    only a stopped one releases anything. `atexit` covers an actor that exits first.
    """
    stop_event = internals.trial_stop_event()

    def watch() -> None:
        stop_event.wait()
        remove_recorded(path)

    threading.Thread(target=watch, name="release-train-placement-group", daemon=True).start()
    atexit.register(remove_recorded, path)
