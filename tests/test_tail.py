"""search/tail.py: the search's last trials take the CPUs finished trials left idle; and the
trial's side, trainables.worker.following_tail."""

import json
from types import SimpleNamespace

import pytest
import torch

from search.tail import TailThreads, TrialSeat, tail_threads, write_tail
from trainables.worker import Tail, following_tail, tail_threads_of

NODE = {"10.0.0.1": 2}


def seats(*statuses: str, node: str | None = "10.0.0.1") -> list[TrialSeat]:
    return [TrialSeat(f"t{i}", status, node) for i, status in enumerate(statuses)]


CASES = {
    # the Quickstart on 2 cores: 8 trials 2 at a time, the last one alone
    "last trial alone": (seats(*["TERMINATED"] * 7, "RUNNING"), 2, 1.0, NODE, {"t7": 2}),
    "one is pending": (seats("TERMINATED", "RUNNING", "PENDING"), 2, 1.0, NODE, {}),
    "one is paused": (seats("PAUSED", "RUNNING"), 2, 1.0, NODE, {}),
    "both still running": (seats("RUNNING", "RUNNING"), 2, 1.0, NODE, {}),
    "no whole multiple": (seats("TERMINATED", "RUNNING", "RUNNING", "RUNNING"), 4, 1.0, {"10.0.0.1": 4}, {}),
    "two of four slots": (seats("ERROR", "RUNNING", "TERMINATED", "RUNNING"), 4, 2.0, {"10.0.0.1": 4},
                          {"t1": 4, "t3": 4}),
    "node not reported yet": (seats("TERMINATED", "RUNNING", node=None), 2, 1.0, NODE, {}),
    "the Tuner's concurrency caps it": (seats("TERMINATED", "RUNNING"), 2, 1.0, {"10.0.0.1": 16}, {"t1": 2}),
    "nothing to widen into": (seats("TERMINATED", "RUNNING"), 1, 2.0, NODE, {}),  # the confirmation on 2 cores
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_only_idle_slots_widen_and_only_by_whole_multiples(case):
    trials, concurrency, cpus, slots, expected = CASES[case]
    assert tail_threads(trials, concurrency, cpus, slots) == expected


def test_a_trial_widens_only_by_what_its_own_node_holds():
    """Two nodes of 2 slots, concurrency 4: a node whose two trials still run gets nothing from
    the other node's idle CPUs."""
    slots = {"a": 2, "b": 2}
    trials = [TrialSeat("a1", "RUNNING", "a"), TrialSeat("a2", "RUNNING", "a"),
              TrialSeat("b1", "TERMINATED", "b"), TrialSeat("b2", "TERMINATED", "b")]
    assert tail_threads(trials, 4, 1.0, slots) == {}
    trials[3] = TrialSeat("b2", "RUNNING", "b")
    assert tail_threads(trials, 4, 1.0, slots) == {}  # b2 is alone on b, but 4 // 3 running is 1
    trials[0] = TrialSeat("a1", "TERMINATED", "a")
    assert tail_threads(trials, 4, 1.0, slots) == {"a2": 2, "b2": 2}


def test_the_callback_gives_after_a_hold_and_takes_back_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr("search.tail.node_slots", lambda cpus: dict(NODE))
    path = tmp_path / "exp" / "tail_threads.json"
    callback = TailThreads(str(path), concurrency=2, cpus=1.0, hold_s=5.0)
    callback.setup()

    def published() -> dict:
        return json.loads(path.read_text())["threads"]

    assert published() == {}
    both = seats("RUNNING", "RUNNING")
    alone = seats("TERMINATED", "RUNNING")
    callback.update(both, now=0.0)
    callback.update(alone, now=1.0)  # a trial ended; the searcher is asked at the next step
    callback.update(seats("TERMINATED", "RUNNING", "PENDING"), now=1.2)  # and it gave one
    callback.update(alone, now=1.4)  # (as if that one failed at once)
    callback.update(alone, now=6.3)
    assert published() == {}  # alone since 1.4: not 5 s yet
    callback.update(alone, now=6.5)
    assert published() == {"t1": 2}
    callback.update(seats("TERMINATED", "RUNNING", "PENDING"), now=7.0)  # a retry: taken back at once
    assert published() == {}
    callback.update(alone, now=7.5)
    callback.update(seats("TERMINATED", "TERMINATED"), now=20.0)  # the last trial ended
    assert published() == {}


def test_a_trial_follows_the_tail_file_and_never_drops_below_its_request(tmp_path):
    path = tmp_path / "tail_threads.json"
    tail, reported, marks = Tail(str(path), "b"), [], {}
    state = SimpleNamespace(global_epoch=lambda: 3)
    report = following_tail(tail, 1, lambda *args: reported.append(args), marks)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert tail_threads_of(tail) == 0  # no file yet
        report({"epoch": 3}, {}, state)
        assert torch.get_num_threads() == 1 and "thread_changes" not in marks
        write_tail(str(path), {"a": 4, "b": 2})
        report({"epoch": 3}, {}, state)
        assert torch.get_num_threads() == 2 and marks["thread_changes"] == [[3, 2]]
        write_tail(str(path), {})
        report({"epoch": 3}, {}, state)
        assert torch.get_num_threads() == 1 and marks["thread_changes"] == [[3, 2], [3, 1]]
        path.write_text("[not the format")
        assert tail_threads_of(tail) == 0
        assert len(reported) == 3  # every epoch still reported, before the threads change
    finally:
        torch.set_num_threads(threads)


PLACES = {  # (storage, workers, gpus per worker) -> does the plan offer idle CPUs?
    "local CPU trials": ("/runs", 1, 0.0, True),
    "DDP trials": ("/runs", 2, 0.0, False),
    "GPU trials": ("/runs", 1, 0.25, False),
    "remote storage": ("s3://bucket/runs", 1, 0.0, False),
}


@pytest.mark.parametrize("place", PLACES, ids=list(PLACES))
def test_idle_cpus_are_offered_only_to_single_worker_cpu_trials_with_local_storage(place):
    from search.plan import TAIL_FILE, Plan
    from trainables import TrialResources

    storage, workers, gpus, offered = PLACES[place]
    plan = Plan(space=None, data_path=None, dataset=None, name="x", storage=storage, experiment=f"{storage}/x",
                local_dir=None, export_dir=None, resources=TrialResources(workers, 1.0, gpus), num_samples=8,
                max_concurrent=2, max_failures=0, address=None, dashboard_host="", resume=False, smoke=False)
    assert plan.tail == (f"{storage}/x/{TAIL_FILE}" if offered else None)
