"""search.optuna_bridge: ASHA-stopped trials reach the stored Optuna study as PRUNED."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

pytest.importorskip("ray.tune")

from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from search.optuna_bridge import PruningOptunaSearch, open_study_storage  # noqa: E402
from search.space import load_space  # noqa: E402

MAX_T = 4


def make_searcher(db_path, cls=PruningOptunaSearch):
    space = load_space("smoke")
    extra = {"max_t": MAX_T} if cls is PruningOptunaSearch else {}
    return cls(
        space=space,
        metric="val_macro_f1",
        mode="max",
        points_to_evaluate=[space.baseline_point()],
        sampler=space.build_sampler(),
        storage=open_study_storage(str(db_path)),
        study_name="search",
        **extra,
    )


def play(searcher):
    """Three trials: one runs to max_t, one ASHA stops at epoch 2, one raises."""
    for trial_id in ("full", "stopped", "crashed"):
        assert searcher.suggest(trial_id)
    for epoch, value in [(1, 0.30), (2, 0.40), (3, 0.50), (4, 0.45)]:
        searcher.on_trial_result("full", {"epoch": epoch, "val_macro_f1": value, "training_iteration": epoch})
    searcher.on_trial_complete("full", {"epoch": 4, "val_macro_f1": 0.45, "training_iteration": 4})
    searcher.on_trial_result("stopped", {"epoch": 1, "val_macro_f1": 0.20, "training_iteration": 1})
    # Ray never passes the result that triggered the stop to on_trial_result.
    searcher.on_trial_complete("stopped", {"epoch": 2, "val_macro_f1": 0.25, "training_iteration": 2})
    searcher.on_trial_result("crashed", {"epoch": 1, "val_macro_f1": 0.1, "training_iteration": 1})
    searcher.on_trial_complete("crashed", error=True)


def stored_trials(db_path):
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{db_path}")
    return study.get_trials(deepcopy=False)


def test_stopped_trial_is_pruned_with_per_epoch_values(tmp_path):
    db = tmp_path / "optuna.db"
    play(make_searcher(db))
    full, stopped, crashed = stored_trials(db)
    assert full.state == TrialState.COMPLETE
    assert full.value == pytest.approx(0.50)  # the best epoch: the checkpoint that is kept
    assert full.intermediate_values == {1: 0.30, 2: 0.40, 3: 0.50, 4: 0.45}
    assert stopped.state == TrialState.PRUNED
    assert stopped.intermediate_values == {1: 0.20, 2: 0.25}
    assert stopped.value == pytest.approx(0.25)
    assert crashed.state == TrialState.FAIL


def test_ray_alone_would_call_the_stopped_trial_complete(tmp_path):
    """The behaviour this module fixes (measured with Ray 2.60); fails once Ray fixes it."""
    db = tmp_path / "optuna.db"
    play(make_searcher(db, cls=OptunaSearch))
    assert stored_trials(db)[1].state == TrialState.COMPLETE


def test_baseline_is_the_first_trial(tmp_path):
    db = tmp_path / "optuna.db"
    searcher = make_searcher(db)
    config = searcher.suggest("first")
    assert config["loss"] == "ce" and config["lr"] == pytest.approx(2e-3)
    assert config["epochs"] == 1  # fixed values ride along in the trial config


def test_restored_searcher_keeps_writing_the_same_study(tmp_path):
    db = tmp_path / "optuna.db"
    searcher = make_searcher(db)
    searcher.suggest("a")
    searcher.on_trial_result("a", {"epoch": 1, "val_macro_f1": 0.3})
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = make_searcher(tmp_path / "other.db")
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", {"epoch": 1, "val_macro_f1": 0.9})  # a retry repeats epoch 1
    restored.on_trial_result("a", {"epoch": 2, "val_macro_f1": 0.4})
    restored.on_trial_complete("a", {"epoch": 2, "val_macro_f1": 0.4})
    (trial,) = stored_trials(db)
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {1: 0.3, 2: 0.4}


def test_nan_result_fails_the_trial(tmp_path):
    db = tmp_path / "optuna.db"
    searcher = make_searcher(db)
    searcher.suggest("nan")
    searcher.on_trial_complete("nan", {"epoch": 4, "val_macro_f1": float("nan")})
    assert stored_trials(db)[0].state == TrialState.FAIL


def test_trial_ending_early_on_its_own_is_complete_when_asha_did_not_stop_it(tmp_path):
    """E.g. stage 2 skipped because no pool image reached the pseudo-label threshold."""
    db = tmp_path / "optuna.db"
    scheduler = type("Sched", (), {"stopped_early": {"stopped"}})()
    searcher = make_searcher(db)
    searcher._scheduler = scheduler
    for trial_id in ("short", "stopped"):
        searcher.suggest(trial_id)
        searcher.on_trial_result(trial_id, {"epoch": 1, "val_macro_f1": 0.3})
        searcher.on_trial_complete(trial_id, {"epoch": 2, "val_macro_f1": 0.35})
    short, stopped = stored_trials(db)
    assert short.state == TrialState.COMPLETE and short.value == pytest.approx(0.35)
    assert stopped.state == TrialState.PRUNED
