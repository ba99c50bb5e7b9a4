"""search/racing.py: which confirmation run starts next, when a contender is dropped, and the
race as a Ray Tune searcher (suggest, results, errors, its saved state) without a cluster."""

from __future__ import annotations

import pytest

from search.confirm import BASELINE, Candidate, race_of
from search.racing import DONE, WAIT, RaceState, RacingSearcher, next_run, pooled_sd, standing
from search.report import TrialRecord


def race(**kwargs) -> RaceState:
    return RaceState(contenders=["rank1", "rank2"], baseline=BASELINE, seeds=[1, 2, 3], **kwargs)


def finish(state: RaceState, name: str, seed: int, value: float | None) -> None:
    state.done.setdefault(name, {})[seed] = value


def test_every_configuration_gets_one_fresh_seed_first_the_baseline_no_more():
    state = race()
    started = []
    while (choice := next_run(state)) not in (WAIT, DONE):
        started.append(choice)
        state.running.setdefault(choice[0], set()).add(choice[1])
    assert started == [("rank1", 1), ("rank2", 1), (BASELINE, 1)]
    assert next_run(state) == WAIT  # nothing to compare before the contenders' first scores
    for name, value in (("rank1", 0.60), (BASELINE, 0.40)):
        state.running[name].discard(1)
        finish(state, name, 1, value)
    assert next_run(state) == WAIT  # rank2's first score is still coming


def test_a_contender_below_the_leader_with_no_noise_measured_is_dropped_as_smac_does():
    state = race()
    for name, value in (("rank1", 0.60), ("rank2", 0.55), (BASELINE, 0.40)):
        finish(state, name, 1, value)
    alive, dropped = standing(state)
    assert alive == ["rank1"] and "no second run" in dropped["rank2"]
    assert next_run(state) == DONE  # 3 runs where 3 configurations x 3 seeds would take 9


def test_contenders_that_cannot_be_told_apart_get_more_seeds_up_to_the_limit():
    state = race(prior={"rank1": 0.62})  # rank1's search trial ran the full budget: one value
    for name, value in (("rank1", 0.58), ("rank2", 0.59), (BASELINE, 0.40)):
        finish(state, name, 1, value)
    assert state.values("rank1") == [0.62, 0.58]
    assert pooled_sd(state) == pytest.approx(0.0283, abs=1e-4)
    assert standing(state)[0] == ["rank1", "rank2"]  # 0.01 apart, margin 1.96 * 0.028 * sqrt(1.5)
    assert next_run(state) == ("rank2", 2)  # the fewest values first: rank1's search run counts
    state.running["rank2"] = {2}
    assert next_run(state) == ("rank1", 2)  # level at 2 values each
    state.running["rank1"] = {2}
    assert next_run(state) == WAIT
    state.running = {}
    finish(state, "rank1", 2, 0.60)
    finish(state, "rank2", 2, 0.60)
    assert next_run(state) == ("rank2", 3)  # rank1 has its 3 values (len(seeds)), seed 3 stays unused
    finish(state, "rank2", 3, 0.59)
    assert standing(state)[0] == ["rank1", "rank2"] and next_run(state) == DONE


def test_the_search_run_counts_as_one_seed_but_a_fresh_seed_is_always_run():
    state = RaceState(contenders=["rank1"], baseline=BASELINE, seeds=[1], prior={"rank1": 0.7})
    assert next_run(state) == ("rank1", 1)  # one value already, and seeds=[1]: still one fresh run
    finish(state, "rank1", 1, 0.6)
    assert next_run(state) == (BASELINE, 1)
    finish(state, BASELINE, 1, 0.5)
    assert next_run(state) == DONE


def test_a_contender_clearly_below_once_the_noise_is_measured_is_dropped():
    state = race()
    for seed, (a, b) in enumerate(((0.60, 0.50), (0.61, 0.49)), start=1):
        finish(state, "rank1", seed, a)
        finish(state, "rank2", seed, b)
    finish(state, BASELINE, 1, 0.40)
    alive, dropped = standing(state)
    assert alive == ["rank1"] and "more than the 95% margin" in dropped["rank2"]
    assert next_run(state) == DONE


def test_an_errored_run_is_replaced_by_the_next_seed_and_minimisation_ranks_low_first():
    state = RaceState(contenders=["rank1", "rank2"], baseline=BASELINE, seeds=[1, 2], mode="min")
    finish(state, "rank1", 1, 0.30)
    finish(state, "rank2", 1, 0.20)
    finish(state, BASELINE, 1, None)  # errored
    assert next_run(state) == (BASELINE, 2)
    finish(state, BASELINE, 2, 0.5)
    assert standing(state)[0] == ["rank2"] and next_run(state) == DONE


def test_the_race_rebuilt_from_collected_runs_matches_the_candidates():
    def run(trial_id: str, value: float, status: str = "TERMINATED") -> TrialRecord:
        return TrialRecord(trial_id=trial_id, path="", status=status, config={}, curve=[(1, value / 2), (2, value)])

    rank1, plain = Candidate("rank1", {}, "t1", 0.7, prior=0.7), Candidate(BASELINE, {})
    for candidate, trial_id, seed, status in ((rank1, "a", 1, "TERMINATED"), (rank1, "b", 2, "RUNNING"),
                                              (plain, "c", 1, "ERROR")):
        candidate.runs.append(run(trial_id, 0.6, status))
        candidate.seeds[trial_id] = seed
    state = race_of([rank1, plain], [1, 2], "max")
    assert state.contenders == ["rank1"] and state.prior == {"rank1": 0.7}
    assert state.done == {"rank1": {1: 0.6}, BASELINE: {1: None}} and state.running == {"rank1": {2}}
    assert rank1.values("max") == [0.7, 0.6] and rank1.fresh("max") == [0.6]
    assert rank1.best_run("max").trial_id == "a"  # a fresh seed, never the search's run


def test_the_searcher_proposes_records_and_resumes_the_race(tmp_path):
    from ray.tune.search import Searcher

    searcher = RacingSearcher(race(), "val_macro_f1")
    assert [searcher.suggest(t) for t in ("a", "b", "c")] == [
        {"candidate": "rank1", "seed": 1}, {"candidate": "rank2", "seed": 1}, {"candidate": BASELINE, "seed": 1}]
    assert searcher.suggest("d") is None  # Tune asks again later
    searcher.on_trial_result("a", {"val_macro_f1": 0.7})
    searcher.on_trial_complete("a", {"val_macro_f1": 0.5})  # the run's best epoch counts, not its last
    searcher.on_trial_complete("c", error=True)
    searcher.save(str(tmp_path / "race.json"))

    resumed = RacingSearcher(race(), "val_macro_f1")
    resumed.restore(str(tmp_path / "race.json"))
    assert resumed.state == searcher.state and resumed.trials == searcher.trials
    assert resumed.state.done == {"rank1": {1: 0.7}, BASELINE: {1: None}} and {k: v for k, v in resumed.state.running.items() if v} == {"rank2": {1}}
    assert resumed.suggest("e") == {"candidate": BASELINE, "seed": 2}  # the errored baseline's next seed
    resumed.on_trial_complete("b", {"val_macro_f1": 0.4})
    resumed.on_trial_complete("e", {"val_macro_f1": 0.3})
    assert resumed.suggest("f") == Searcher.FINISHED  # rank2 is below rank1: dropped


@pytest.mark.parametrize("run, prior, runs, winner", [
    # run 1: rank1 was the search's one full-budget trial (best epoch 5, past the last rung)
    (1, True, 4, "rank1"),
    # run 2: the search's baseline trial was the one that ran the full budget (BENCHMARKS.md)
    (2, False, 3, "rank1"),
])
def test_the_race_on_the_two_recorded_quickstart_confirmations(run, prior, runs, winner):
    """Replayed on the val scores the two measured Quickstart confirmations recorded
    (benchmarks/results/confirm_quickstart_N.json: every configuration x seeds 1 and 2, 6
    runs each), the race needs 4 and 3 of those runs and picks the same winners."""
    import json
    from pathlib import Path

    summary = json.loads((Path(__file__).parents[1] / "benchmarks" / "results"
                          / f"confirm_quickstart_{run}.json").read_text())
    recorded = {c["name"]: {r["seed"]: r["val"] for r in c["runs"]} for c in summary["confirmation"]["candidates"]}
    rank1 = next(c for c in summary["confirmation"]["candidates"] if c["name"] == "rank1")
    state = RaceState(contenders=["rank1", "rank2"], baseline=BASELINE, seeds=[1, 2],
                      prior={"rank1": rank1["search_val"]} if prior else {})
    started = 0
    while (choice := next_run(state)) != DONE:
        assert choice != WAIT  # nothing is left running here
        name, seed = choice
        finish(state, name, seed, recorded[name][seed])
        started += 1
    assert started == runs and standing(state)[0][0] == winner == summary["confirmation"]["winner"]


def test_the_longest_course_counts_the_search_run_as_a_seed():
    assert race().longest() == 7  # 3 + 3 fresh seeds, the baseline once
    assert race(prior={"rank1": 0.6}).longest() == 6
    assert RaceState(contenders=["rank1"], baseline=BASELINE, seeds=[1], prior={"rank1": 0.6}).longest() == 2


def test_a_run_whose_teacher_a_running_run_is_training_waits_for_it(tmp_path):
    """rank1 and rank2 share a teacher (they differ in stage-2 knobs only): rank2's seed-1
    run waits while rank1's seed-1 run is in stage 1, the baseline starts first; once rank1
    has reported the teacher's last epoch (the teacher is in the store) rank2 starts and
    trains stage 2 alone. A resumed searcher keeps what it knew."""
    teachers = {"rank1": "t-a", "rank2": "t-a", BASELINE: "t-b"}
    searcher = RacingSearcher(race(), "val_macro_f1", teachers=teachers, teacher_epochs=8)
    assert searcher.suggest("a") == {"candidate": "rank1", "seed": 1}
    assert searcher.suggest("b") == {"candidate": BASELINE, "seed": 1}  # rank2 waits for its teacher
    assert searcher.blocked() == {("rank2", 1)}
    assert searcher.suggest("c") is None
    searcher.on_trial_result("a", {"epoch": 7, "val_macro_f1": 0.5})
    assert searcher.suggest("c") is None
    searcher.on_trial_result("a", {"epoch": 8, "val_macro_f1": 0.6})
    searcher.save(str(tmp_path / "race.json"))
    resumed = RacingSearcher(race(), "val_macro_f1")
    resumed.restore(str(tmp_path / "race.json"))
    assert resumed.blocked() == frozenset() and resumed.teachers == teachers
    assert resumed.suggest("c") == {"candidate": "rank2", "seed": 1}
    assert next_run(race(), frozenset({("rank1", 1), ("rank2", 1), (BASELINE, 1)})) == WAIT  # not DONE


def test_a_baseline_with_its_search_run_is_not_in_the_longest_course():
    state = race()
    assert state.longest() == 1 + 3 + 3
    finish(state, BASELINE, 0, 0.5)  # the search's baseline trial is its run (search/baseline.py)
    assert state.longest() == 3 + 3
    state.prior["rank1"] = 0.6
    assert state.longest() == 2 + 3
