"""search/confirm.py without Ray: which configurations are confirmed, with which seeds, who
wins, which run is handed on; and that trials never receive the test split."""

from __future__ import annotations

import pytest

from search.baseline import PLAIN, search_baseline_is_plain
from search.confirm import (BASELINE, Candidate, choose_candidates, confirm_seeds, describe, format_candidate,
                            pick_confirmed)
from search.report import TrialRecord
from search.space import load_space


def record(trial_id: str, best: float, status: str = "TERMINATED", **config) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, path="", status=status, config=config, curve=[(1, best / 2), (2, best)])


def test_candidates_are_the_best_distinct_configurations_then_the_plain_baseline():
    space = load_space("imbalance")
    records = [
        record("a", 0.40, loss="focal", lr=0.003, seed=0),
        record("b", 0.55, loss="ce", lr=0.004, seed=0),
        record("c", 0.55, loss="ce", lr=0.004, seed=0),  # TPE proposed b's point again: not twice
        record("d", 0.50, loss="logit_adjusted", lr=0.002, seed=0),
        record("e", 0.90, status="ERROR", loss="ce", lr=0.009),
    ]
    candidates, notes = choose_candidates(records, space, top=2)
    assert [(c.name, c.search_trial) for c in candidates] == [("rank1", "b"), ("rank2", "d"), (BASELINE, None)]
    assert len(notes) == 1 and "search trial c trains like a better-ranked configuration" in notes[0]
    assert candidates[0].config == {"loss": "ce", "lr": 0.004}  # the search's seed is not carried over
    baseline = candidates[-1].config
    assert {k: baseline[k] for k in PLAIN} == PLAIN  # plain CE, natural mix, no cap, argmax
    assert baseline["model"] == space.fixed["model"] and baseline["epochs"] == space.fixed["epochs"]
    assert space.trial_config(baseline).posthoc == "none"  # a valid TrialConfig


def test_the_plain_recipe_with_offsets_is_raced_where_the_metric_sees_them_and_the_baseline_scores_by_argmax():
    """The search's own baseline trial trains like the plain baseline and differs only in its
    post-hoc offsets. Scored with them (the Quickstart's metric) it is another model, and it
    was the search's best in Quickstart runs 17 and 18 (0.656 on val): it is raced, with its
    full-budget search run counted. The plain baseline is scored as it is tested, by argmax,
    from the same run. On an argmax metric the two are one model with one score: a tie that
    would spend a third of the confirmation (measured), so it is not raced."""
    from search.confirm import with_search_run

    space = load_space("imbalance")
    assert space.metric == "val_macro_f1_posthoc"
    search_baseline = {**space.fixed, **space.baseline_point()}
    base = record("base", 0.656, **search_baseline, seed=0)
    base.curves = {space.metric: base.curve, "val_macro_f1": [(1, 0.30), (2, 0.58)]}
    base.baseline = True
    again = record("again", 0.65, **search_baseline, seed=0)  # TPE proposed the baseline point again
    records = [base, again, record("x", 0.64, loss="focal", lr=0.004)]
    candidates, notes = choose_candidates(records, space, top=2)
    assert [(c.name, c.search_trial) for c in candidates] == [("rank1", "base"), ("rank2", "x"), (BASELINE, "base")]
    rank1, plain = candidates[0], candidates[-1]
    assert space.trial_config(rank1.config).posthoc != "none" and rank1.prior == 0.656
    assert space.trial_config(plain.config).posthoc == "none"
    assert len(notes) == 1 and "search trial again trains like a better-ranked configuration" in notes[0]
    assert "decides like it (posthoc)" in notes[0]
    with_search_run(candidates, records)
    assert plain.search_val == 0.58 and plain.mean("max") == 0.58  # argmax, as tested
    assert plain.runs[0].curve == [(1, 0.30), (2, 0.58)] and base.curve == [(1, 0.328), (2, 0.656)]
    assert describe(plain, "max")["metric"] == "val_macro_f1" and describe(rank1, "max")["metric"] is None
    assert format_candidate(describe(plain, "max"), space.metric).split()[1] == "val_macro_f1"

    space.metric = "val_macro_f1"  # argmax: the two configurations are one model
    candidates, notes = choose_candidates(records, space, top=2)
    assert [(c.name, c.search_trial) for c in candidates] == [("rank1", "x"), (BASELINE, "base")]
    assert "search trial base trains like the plain baseline" in notes[0] and "posthoc" in notes[0]
    assert "acts after training" in notes[0]


def test_the_search_baseline_that_ran_the_full_budget_is_the_plain_baselines_run():
    """It trains like the plain baseline (it differs in posthoc, which acts after training)
    and was picked by no score: the race counts it and starts no baseline run; stopped by
    ASHA, or a baseline that trains otherwise, and the baseline gets its fresh seed."""
    from search.confirm import race_of, with_search_run
    from search.racing import next_run

    space = load_space("imbalance")
    assert search_baseline_is_plain(space)
    base = record("base", 0.55, **{**space.fixed, **space.baseline_point()}, seed=0)
    base.baseline = True
    records = [base, record("x", 0.60, loss="focal", lr=0.004)]
    candidates, _ = choose_candidates(records, space, top=1)
    plain = candidates[-1]
    assert (plain.search_trial, plain.search_seed, plain.prior) == ("base", 0, None)
    with_search_run(candidates, records)
    with_search_run(candidates, records)  # a resumed confirmation adds it once
    assert plain.runs == [base] and plain.seeds == {"base": 0} and plain.best_run("max") is base
    assert describe(plain, "max")["runs"][0]["search_run"] is True
    state = race_of(candidates, [1, 2], "max")
    assert next_run(state) == ("rank1", 1)
    state.running["rank1"] = {1}
    assert next_run(state) == "wait"  # no baseline run to start

    base.stopped_early = True
    assert choose_candidates(records, space, top=1)[0][-1].search_seed is None
    base.stopped_early = False
    space.baseline = {**space.baseline, "class_weights": "inverse"}  # trains otherwise than plain CE
    assert not search_baseline_is_plain(space)
    assert choose_candidates(records, space, top=1)[0][-1].search_seed is None


def test_confirmation_seeds_are_ones_the_search_never_used():
    space = load_space("imbalance")
    assert confirm_seeds(space, 3) == [1, 2, 3]  # the search's trials all ran with seed 0
    space.fixed = {**space.fixed, "seed": 7}
    assert confirm_seeds(space, 2) == [8, 9]


def candidate(name: str, runs: dict[int, float | None]) -> Candidate:
    c = Candidate(name, {})
    for seed, value in runs.items():
        run = record(f"{name}-{seed}", value) if value is not None else record(f"{name}-{seed}", 0.0, status="ERROR")
        c.runs.append(run)
        c.seeds[run.trial_id] = seed
    return c


def test_winner_is_the_best_mean_not_the_best_single_run():
    lucky = candidate("rank1", {1: 0.70, 2: 0.30, 3: 0.32})  # best single run, mean 0.44
    steady = candidate("rank2", {1: 0.50, 2: 0.52, 3: None})  # an errored run does not count
    plain = candidate(BASELINE, {1: 0.60, 2: 0.60})  # the reference never wins, even when higher
    assert pick_confirmed([lucky, steady, plain], "max") is steady
    assert steady.mean("max") == pytest.approx(0.51) and steady.sd("max") == pytest.approx(0.0141421, abs=1e-6)
    assert steady.best_run("max").trial_id == "rank2-2"
    assert plain.best_run("max").trial_id == "baseline-1"  # a tie goes to the lower seed
    assert candidate("one", {4: 0.5}).sd("max") is None  # one run has no spread
    steady.runs[1].shared_epochs = 8  # its seed-2 run started from a teacher another run had trained
    summary = describe(steady, "max")
    assert [run["seed"] for run in summary["runs"]] == [1, 2, 3] and summary["runs"][2]["status"] == "ERROR"
    assert [run["teacher_shared"] for run in summary["runs"]] == [False, True, False]
    assert "[seed 1: 0.5000, 2: 0.5200 (teacher shared), 3: ERROR]" in format_candidate(summary, "val_macro_f1")
    assert pick_confirmed([plain], "max") is None


@pytest.mark.slow
def test_trials_receive_the_data_without_its_test_split(ray_cluster, tmp_path):
    from search import run as search_run
    from search.tuner import trial_data

    plan = search_run.make_plan(search_run.build_parser().parse_args(["--space", "smoke", "--storage", str(tmp_path)]))
    shared = trial_data(plan).get()
    assert set(shared.splits) == set(plan.dataset.splits) - {"test"}
    assert trial_data(plan) is trial_data(plan)  # put into the object store once per search


def test_terminal_line_of_a_candidate_shows_every_seed_and_its_search_score():
    from search.confirm import format_candidate

    steady = candidate("rank2", {1: 0.50, 2: 0.52, 3: None})
    steady.search_trial, steady.search_val = "abc", 0.45
    line = format_candidate(describe(steady, "max"), "val_macro_f1")
    assert line == "  rank2     val_macro_f1 0.5100 ± 0.0141  [seed 1: 0.5000, 2: 0.5200, 3: ERROR] (search trial abc, 0.4500)"
    lone = format_candidate(describe(candidate(BASELINE, {1: 0.6}), "max"), "val_macro_f1")
    assert lone == "  baseline  val_macro_f1 0.6000  [seed 1: 0.6000]"  # one run: no spread to show


def test_confirmation_runs_take_the_cpus_their_first_wave_cannot_fill():
    """On the Quickstart's 2 cores rank1 and rank2 share a teacher (rank2 is a student fork)
    and the baseline's run is its search trial: the first wave trains one teacher, so one run
    at a time on 2 threads instead of rank2 holding a core while it waits for that teacher."""
    from search.confirm import first_wave_teachers, widened
    from trainables import TrialResources

    fork = [Candidate("rank1", {}), Candidate("rank2", {}), Candidate(BASELINE, {}, search_seed=0)]
    shared = {"rank1": "t1", "rank2": "t1", BASELINE: "t0"}
    assert first_wave_teachers(fork, shared) == 1
    assert first_wave_teachers(fork, {}) == 2  # no teacher store: each trains its own
    fresh_baseline = [*fork[:2], Candidate(BASELINE, {})]
    assert first_wave_teachers(fresh_baseline, shared) == 2
    one_cpu = TrialResources()
    assert widened(one_cpu, 2, 1) == (TrialResources(cpus_per_worker=2.0), 1)
    assert widened(one_cpu, 4, 2) == (TrialResources(cpus_per_worker=2.0), 2)
    assert widened(one_cpu, 2, 2) == (one_cpu, 2)  # every trial slot has a teacher to train
    assert widened(one_cpu, 3, 2) == (one_cpu, 3)  # no whole multiple to give
    for kept in (TrialResources(gpus_per_worker=0.5), TrialResources(workers=2)):
        assert widened(kept, 2, 1) == (kept, 2)


def test_the_summary_says_when_the_plain_baseline_scored_higher_than_the_winner():
    from types import SimpleNamespace

    from search.finish import baseline_scored_higher

    def scoring(value):
        return SimpleNamespace(mean=lambda mode: value)

    assert baseline_scored_higher(scoring(0.64), scoring(0.66), "max")  # Quickstart run 18 on val
    assert not baseline_scored_higher(scoring(0.67), scoring(0.66), "max")
    assert baseline_scored_higher(scoring(0.30), scoring(0.20), "min")
    assert not baseline_scored_higher(scoring(0.64), scoring(None), "max")  # the baseline's run errored
