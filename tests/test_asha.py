"""search.asha: a resumed search stops the same trials as an uninterrupted one."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler  # noqa: E402

from search.asha import STATE_FILE, PersistentASHA  # noqa: E402

MAX_T = 4

# Eight trials, two at a time, reporting val_macro_f1 per global epoch. The first ones
# are good, so the later, weaker ones fall under the rungs' cutoffs.
SCORES = {
    0: [0.50, 0.60, 0.65, 0.70],
    1: [0.45, 0.55, 0.60, 0.62],
    2: [0.40, 0.50, 0.55, 0.60],
    3: [0.20, 0.25, 0.30, 0.35],
    4: [0.55, 0.62, 0.66, 0.71],
    5: [0.10, 0.12, 0.15, 0.18],
    6: [0.30, 0.58, 0.61, 0.64],
    7: [0.15, 0.20, 0.22, 0.25],
}


def events():
    """(trial, epoch, score) in the order a 2-wide search would produce them."""
    order = []
    for first in range(0, len(SCORES), 2):
        for epoch in range(1, MAX_T + 1):
            for trial in (first, first + 1):
                order.append((trial, epoch, SCORES[trial][epoch - 1]))
    return order


def make_trial(trial_id, folder):
    return SimpleNamespace(trial_id=str(trial_id), storage=SimpleNamespace(experiment_driver_staging_path=str(folder)))


def play(scheduler, folder, stream, added, stopped):
    """Feed results like Tune does; a stopped trial reports nothing more."""
    for trial_id, epoch, score in stream:
        trial = make_trial(trial_id, folder)
        if trial_id not in added:
            scheduler.on_trial_add(None, trial)
            added.add(trial_id)
        if trial_id in stopped:
            continue
        result = {"epoch": epoch, "val_macro_f1": score}
        if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP:
            scheduler.on_trial_complete(None, trial, result)
            if epoch < MAX_T:
                stopped.add(trial_id)
    return stopped


def make(cls):
    return cls(time_attr="epoch", metric="val_macro_f1", mode="max", max_t=MAX_T, grace_period=1, reduction_factor=2)


def resumed_run(cls, folder, cut):
    at_start = make(cls)
    pickled = copy.deepcopy(at_start)  # what Tuner.restore brings back: the scheduler as it started
    stream = events()
    added, stopped = set(), set()
    play(at_start, folder, stream[:cut], added, stopped)
    # Resume: the restored trials are re-added, then the search goes on.
    for trial_id in sorted(added):
        pickled.on_trial_add(None, make_trial(trial_id, folder))
    return play(pickled, folder, stream[cut:], set(added), stopped)


def test_uninterrupted_search_stops_some_trials(tmp_path):
    stopped = play(make(PersistentASHA), tmp_path, events(), set(), set())
    assert stopped and len(stopped) < len(SCORES)
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert sorted(saved["stopped"]) == sorted(map(str, stopped))


@pytest.mark.parametrize("cut", [5, 9, 16, 21, 25])
def test_resumed_search_stops_the_same_trials(tmp_path, cut):
    expected = play(make(PersistentASHA), tmp_path / "a", events(), set(), set())
    assert resumed_run(PersistentASHA, tmp_path / "b", cut) == expected


def test_plain_asha_forgets_its_rungs_on_resume(tmp_path):
    """Why PersistentASHA exists: Ray's scheduler comes back with empty rungs."""
    expected = play(make(AsyncHyperBandScheduler), tmp_path / "a", events(), set(), set())
    assert resumed_run(AsyncHyperBandScheduler, tmp_path / "b", 9) != expected


def test_trial_stopped_before_the_interruption_stays_stopped(tmp_path):
    scheduler = make(PersistentASHA)
    stopped = play(scheduler, tmp_path, events(), set(), set())
    victim = sorted(stopped)[0]
    restored = make(PersistentASHA)
    restored.on_trial_add(None, make_trial(victim, tmp_path))
    # A restored trial replaying an epoch from its last checkpoint is stopped again.
    decision = restored.on_trial_result(None, make_trial(victim, tmp_path), {"epoch": 1, "val_macro_f1": 0.99})
    assert decision == TrialScheduler.STOP


def test_trial_reaching_max_t_is_left_to_finish_its_pipeline(tmp_path):
    """Stopping at max_t would kill the trial before fer.ssl.pipeline writes best.pt."""
    scheduler = make(PersistentASHA)
    trial = make_trial("solo", tmp_path)
    scheduler.on_trial_add(None, trial)
    for epoch in range(1, MAX_T + 1):
        decision = scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_macro_f1": 0.5})
    assert decision == TrialScheduler.CONTINUE


def test_a_trial_under_the_cutoff_of_a_rung_at_max_t_still_finishes(tmp_path):
    """grace_period == max_t puts a rung at the last epoch; a weaker trial reaching it has
    nothing left to train, and stopping it would only lose its final checkpoint (best.pt)."""
    scheduler = PersistentASHA(time_attr="epoch", metric="val_macro_f1", mode="max", max_t=1, grace_period=1,
                               reduction_factor=2)
    decisions = []
    for trial_id, score in (("strong", 0.9), ("weak", 0.1)):
        trial = make_trial(trial_id, tmp_path)
        scheduler.on_trial_add(None, trial)
        decisions.append(scheduler.on_trial_result(None, trial, {"epoch": 1, "val_macro_f1": score}))
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE]
    assert scheduler.stopped_early == set()
    # Ray's own ASHA stops the weak one at that rung: what made best.pt go missing.
    plain = AsyncHyperBandScheduler(time_attr="epoch", metric="val_macro_f1", mode="max", max_t=1, grace_period=1,
                                    reduction_factor=2, stop_last_trials=False)
    for trial_id, score in (("strong", 0.9), ("weak", 0.1)):
        trial = make_trial(trial_id, tmp_path)
        plain.on_trial_add(None, trial)
        last = plain.on_trial_result(None, trial, {"epoch": 1, "val_macro_f1": score})
    assert last == TrialScheduler.STOP


def test_the_kept_plain_baseline_runs_to_the_end_and_still_sets_the_cutoffs(tmp_path):
    """With the confirmation on, the search's baseline trial is the plain baseline's
    full-budget run (search/confirm.py): ASHA never stops it, whatever it scores, and its
    scores still enter the rungs (a weaker trial after it is stopped)."""
    scheduler = PersistentASHA(time_attr="epoch", metric="val_macro_f1", mode="max", max_t=MAX_T, grace_period=1,
                               reduction_factor=2, keep={"loss": "ce", "lr": 0.002})
    decisions = {}
    for trial_id, config, score in (("strong", {"loss": "focal", "lr": 0.002}, 0.9),
                                    ("baseline", {"loss": "ce", "lr": 0.002}, 0.1),
                                    ("weak", {"loss": "ce", "lr": 0.004}, 0.05)):
        trial = SimpleNamespace(trial_id=trial_id, config=config,
                                storage=SimpleNamespace(experiment_driver_staging_path=str(tmp_path)))
        scheduler.on_trial_add(None, trial)
        decisions[trial_id] = [scheduler.on_trial_result(None, trial, {"epoch": e, "val_macro_f1": score})
                               for e in range(1, MAX_T + 1)]
    assert set(decisions["baseline"]) == {TrialScheduler.CONTINUE}
    assert decisions["weak"][0] == TrialScheduler.STOP and scheduler.stopped_early == {"weak"}


def test_epochs_replayed_from_a_shared_teacher_are_neither_judged_nor_recorded(tmp_path):
    """A trial forked from a finished teacher replays that teacher's epochs (fer.ssl.teachers): the
    teacher's own trial is in the rungs already, and stopping the copy saves no training."""
    scheduler = make(PersistentASHA)
    strong, fork = make_trial("strong", tmp_path), make_trial("fork", tmp_path)
    for trial in (strong, fork):
        scheduler.on_trial_add(None, trial)
    for epoch in (1, 2):
        scheduler.on_trial_result(None, strong, {"epoch": epoch, "val_macro_f1": 0.9})
    replayed = {"epoch": 1, "val_macro_f1": 0.1, "teacher_shared": True}
    assert scheduler.on_trial_result(None, fork, replayed) == TrialScheduler.CONTINUE
    rungs = json.loads((tmp_path / STATE_FILE).read_text())["brackets"][0]
    assert all("fork" not in recorded for _, recorded in rungs)
    # its own epochs are judged as any trial's
    assert scheduler.on_trial_result(None, fork, {"epoch": 2, "val_macro_f1": 0.1}) == TrialScheduler.STOP


def test_a_trial_that_reaches_finish_from_runs_to_the_end_and_still_sets_the_cutoff(tmp_path):
    """With the confirmation on, a trial at its teacher's last epoch (here epoch 2 of 4) has
    passed the rung before and finishes: the race counts only full-budget search runs
    (Quickstart runs 17 and 20 lost a counted value to ASHA's rung at epoch 8 of 9). Its score
    still enters the rung, and the rung before it stops trials as before."""
    decisions = {}
    for finish_from in (None, 2):
        folder = tmp_path / str(finish_from)
        scheduler = PersistentASHA(time_attr="epoch", metric="val_macro_f1", mode="max", max_t=MAX_T,
                                   grace_period=1, reduction_factor=2, finish_from=finish_from)
        for trial_id, scores in (("a", (0.5, 0.9)), ("b", (0.6, 0.3)), ("c", (0.1,))):
            trial = make_trial(trial_id, folder)
            scheduler.on_trial_add(None, trial)
            decisions[finish_from, trial_id] = [
                scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_macro_f1": score})
                for epoch, score in enumerate(scores, start=1)]
        rungs = dict((milestone, recorded) for milestone, recorded in
                     json.loads((folder / STATE_FILE).read_text())["brackets"][0])
        assert rungs[2] == {"a": 0.9, "b": 0.3}  # b's score sets the cutoff either way
        assert decisions[finish_from, "c"] == [TrialScheduler.STOP]  # rung 1 still stops
    assert decisions[None, "b"] == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert decisions[2, "b"] == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE]


def test_a_scheduler_pickled_before_keep_existed_still_decides(tmp_path):
    scheduler = make(PersistentASHA)
    del scheduler._keep  # what Tuner.restore brings back from an older experiment's tuner.pkl
    del scheduler._finish_from
    assert play(scheduler, tmp_path, events(), set(), set())


def test_the_search_lets_trials_past_a_rung_finish_their_student_only_when_it_confirms():
    """search.run's scheduler for the default space: with the confirmation on, the baseline is
    kept and trials finish from the teacher's last epoch (8 of 9); without it, or where the
    teacher's last epoch is ASHA's first rung (the --smoke budget: 1 + 1), neither."""
    from search.space import load_space
    from search.tuner import build_scheduler

    space = load_space("imbalance")
    assert (space.teacher_epochs, space.max_t, space.grace_period) == (8, 9, 1)
    confirming = build_scheduler(space, confirming=True)
    assert confirming._finish_from == 8 and confirming._keep == space.baseline_point()
    alone = build_scheduler(space, confirming=False)
    assert alone._finish_from is None and alone._keep == {}
    space.fixed = {**space.fixed, "epochs": 1, "student_epochs": 1}
    assert build_scheduler(space, confirming=True)._finish_from is None
    space.fixed = {**space.fixed, "epochs": 4, "student_epochs": 0}  # no stage 2: the teacher's end is max_t
    assert build_scheduler(space, confirming=True)._finish_from is None
