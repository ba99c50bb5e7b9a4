"""search/progress.py: the live table's columns, its guards, and the driver's switches."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial

from search.progress import CONFIRM_COLUMNS, SHORT_NAMES, SearchReporter, progress_reporter, search_columns
from search.space import load_space
from search.tuner import run_config
from trainables.worker import BEST_KEY


@pytest.fixture
def driver_env(monkeypatch):
    """quiet_driver writes os.environ; registered here so each test leaves it as it was."""
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    monkeypatch.setenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "5")


def plan_of(space):
    return SimpleNamespace(space=space, max_failures=0)


@pytest.mark.parametrize("name", ["smoke", "imbalance"])
def test_the_search_table_shows_the_searched_parameters_stage_epoch_and_both_f1s(name, driver_env):
    space = load_space(name)
    config = run_config(plan_of(space), "x", "/tmp/unused")
    reporter = config.progress_reporter
    assert isinstance(reporter, SearchReporter)
    shown = ["val_macro_f1"] if space.metric == "val_macro_f1" else [space.metric, "val_macro_f1"]
    assert list(reporter._metric_columns) == ["stage", "epoch", *shown, BEST_KEY]
    assert space.metric == "val_macro_f1" or reporter._metric_columns[space.metric] == "f1 offsets"
    assert BEST_KEY == "best_val_macro_f1"
    assert list(reporter._parameter_columns) == [p.name for p in space.parameters]
    assert all(len(short) <= 8 for short in reporter._parameter_columns.values())
    assert reporter._sort_by_metric and reporter._print_intermediate_tables
    assert config.verbose == 1  # the table, not every result of every trial
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # else Ray 2.60 ignores the reporter
    assert os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "0"


def test_imbalance_parameters_get_their_short_names():
    columns = search_columns(load_space("imbalance"))
    assert {columns[k] for k in ("focal_gamma", "class_weights", "class_cap", "pseudo_threshold")} == {
        "gamma", "weights", "cap", "thr"}
    assert search_columns(SimpleNamespace(parameters=[SimpleNamespace(name="new_knob")])) == {"new_knob": "new_knob"}
    assert len(set(SHORT_NAMES.values())) == len(SHORT_NAMES)  # no two columns read the same


def test_the_confirmation_table_shows_candidate_and_seed(driver_env):
    reporter = run_config(plan_of(load_space("smoke")), "confirm", "/tmp/unused",
                          columns=CONFIRM_COLUMNS).progress_reporter
    assert reporter._parameter_columns == {"candidate": "candidate", "seed": "seed"}
    assert BEST_KEY in reporter._metric_columns


def test_a_benchmarks_verbosity_is_kept(driver_env):
    assert run_config(plan_of(load_space("smoke")), "x", "/tmp/unused", verbose=0).verbose == 0


class FakeTrial(Trial):
    """A Trial that needs no Ray session (the table reads these two from storage)."""

    local_experiment_path = "/tmp/fer-progress-test"
    error_file = None


def trial(i, status, config, result):
    made = FakeTrial("pipeline_trial", config=config, stub=True, trial_id=f"t{i}")
    made.status = status
    if result:
        made.run_metadata.last_result = dict(result, config=config)
    return made


def test_the_table_prints_when_a_finished_trial_lacks_the_metric_or_a_conditional_parameter(capsys):
    """Sorting compares None with a float, and Tune's best-trial line looks up every
    parameter without a default: both raised before the guards."""
    reporter = progress_reporter("val_macro_f1", {"loss": "loss", "focal_gamma": "gamma", "lr": "lr"})
    reporter.setup(start_time=0, total_samples=3, metric="val_macro_f1", mode="max")
    trials = [
        trial(0, "TERMINATED", {"loss": "ce", "lr": 0.01},
              {"val_macro_f1": 0.2, BEST_KEY: 0.3, "stage": "student", "epoch": 2}),
        trial(1, "TERMINATED", {"loss": "focal", "focal_gamma": 2.0, "lr": 0.001}, {}),
        trial(2, "RUNNING", {"loss": "focal", "focal_gamma": 1.0, "lr": 0.001},
              {"val_macro_f1": 0.5, BEST_KEY: 0.5, "stage": "teacher", "epoch": 1}),
    ]
    reporter.report(trials, done=False)
    out = capsys.readouterr().out
    assert "Current best trial" not in out and "Result logdir" not in out  # see SearchReporter
    header = next(line for line in out.splitlines() if "Trial name" in line)
    assert [cell.strip() for cell in header.split("|")[1:-1]] == [
        "Trial name", "status", "loc", "loss", "gamma", "lr", "stage", "epoch", "f1", "best f1"]
    trials[1].run_metadata.last_result = {"val_macro_f1": 0.4, BEST_KEY: 0.4, "stage": "student", "epoch": 2,
                                          "config": trials[1].config}
    reporter.report(trials, done=True)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|") and "TERMINATED" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["pipeline_trial_t1", "pipeline_trial_t0"]  # by f1
