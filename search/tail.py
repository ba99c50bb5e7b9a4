"""Idle CPUs go to the trials still running: the tail of a search or of the confirmation's race.

A search of N trials, k at a time, ends with fewer than k trials running, and the
confirmation's race may start a second seed alone: on the Quickstart's 2 cores one trial then
trained on one thread for minutes while the other core idled (BENCHMARKS.md, "Idle cores go to
the trials still running"). Ray's own answer, `ResourceChangingScheduler`, pauses a trial and
restarts it in a new placement group, and refuses `reuse_actors=True`, which saves ~5 s of
actor start per trial here (search/tuner.py). A torch thread count can change between two
epochs of a running process instead: the driver publishes each running trial's thread count
to a file (`TailThreads`, a Tune callback) and a single-worker CPU trial reads it after each
epoch (trainables.worker.following_tail).

A trial gets more threads than its request only while no trial waits to start (none pending,
paused or being retried) and the state has held for a few seconds (the searcher is asked for
the next trial one step after a trial ends), and only by a whole multiple of its CPUs that fits
both the Tuner's concurrency and the trial's own node. Ray's accounting still holds each trial
at its request; when another trial starts after all (a retry, or the race adding a seed when a
teacher finishes), the widened trials go back to their request at their next epoch.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

RUNNING = "RUNNING"
WAITING = ("PENDING", "PAUSED")  # trials Tune may still start or resume
# Seconds a wider thread count must hold before trials are told: Tune asks the searcher for the
# next trial one step (~0.1 s) after a trial ends, and Optuna's TPE takes well under a second.
HOLD_S = 2.0
SLOTS_REFRESH_S = 30.0  # how often the cluster's nodes are read again (ray.nodes(), a GCS call)


@dataclass(frozen=True)
class TrialSeat:
    """What the tail needs of one trial: its id, Tune status and node (None before its first report)."""

    trial_id: str
    status: str
    node: str | None


def tail_threads(seats: list[TrialSeat], concurrency: int, cpus: float, node_slots: dict[str, int]) -> dict[str, int]:
    """Each running trial's torch threads where that is more than its `cpus`; {} while a trial
    waits to start. A trial on node n gets `cpus` x min(concurrency // running trials,
    node_slots[n] // running trials on n), whole multiples only; one whose node is unknown
    keeps its request."""
    if any(seat.status in WAITING for seat in seats):
        return {}
    running = [seat for seat in seats if seat.status == RUNNING]
    on_node = Counter(seat.node for seat in running)
    threads = {}
    for seat in running:
        if seat.node is None or seat.node not in node_slots:
            continue
        factor = min(concurrency // len(running), node_slots[seat.node] // on_node[seat.node])
        if factor > 1:
            threads[seat.trial_id] = int(cpus * factor)
    return threads


def node_slots(cpus: float) -> dict[str, int]:
    """Trials of `cpus` CPUs each that every alive node of the cluster holds, by node IP."""
    import ray

    slots: Counter = Counter()
    for node in ray.nodes():
        if node.get("Alive"):
            slots[node["NodeManagerAddress"]] += int(node.get("Resources", {}).get("CPU", 0) // cpus)
    return dict(slots)


def write_tail(path: str, threads: dict[str, int]) -> None:
    """Replace the file whole (write, then rename), so a trial never reads half of it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump({"threads": threads}, handle)
    os.replace(partial, path)


class TailThreads(Callback):
    """Publishes `tail_threads` to `path` after each step of Tune's loop: at once when it takes
    threads back, and only after it has held for `hold_s` when it gives more, so the moment
    between a trial's end and the searcher's next trial (asked at the next step) gives nothing."""

    def __init__(self, path: str, concurrency: int, cpus: float, hold_s: float = HOLD_S) -> None:
        self.path, self.concurrency, self.cpus, self.hold_s = path, concurrency, cpus, hold_s
        self.published: dict[str, int] = {}
        self.offer: tuple[dict[str, int], float] | None = None  # (threads, since when) not yet published
        self.slots: tuple[dict[str, int], float] | None = None  # node_slots and when they were read

    def setup(self, **info: Any) -> None:
        write_tail(self.path, {})  # a resumed search starts from its requests again
        self.published, self.offer = {}, None

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.update([TrialSeat(t.trial_id, t.status, (t.last_result or {}).get("node_ip")) for t in trials],
                    time.monotonic())

    def update(self, seats: list[TrialSeat], now: float) -> None:
        threads = tail_threads(seats, self.concurrency, self.cpus, self._node_slots(now))
        if threads == self.published:
            self.offer = None
        elif any(threads.get(trial, 0) < n for trial, n in self.published.items()):
            self._publish(threads)  # taking back: at once
        elif self.offer is None or self.offer[0] != threads:
            self.offer = (threads, now)
        elif now - self.offer[1] >= self.hold_s:
            self._publish(threads)

    def _publish(self, threads: dict[str, int]) -> None:
        write_tail(self.path, threads)
        self.published, self.offer = threads, None

    def _node_slots(self, now: float) -> dict[str, int]:
        if self.slots is None or now - self.slots[1] > SLOTS_REFRESH_S:
            self.slots = (node_slots(self.cpus), now)
        return self.slots[0]
