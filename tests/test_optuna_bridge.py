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


FORK_SPACE = """\
fixed: {model: mobilenet_v3_small, epochs: 2, student_epochs: 1}
parameters:
  loss: {choice: [ce, focal]}
  focal_gamma: {uniform: [1.0, 2.0], when: {loss: focal}}
  lr: {loguniform: [1.0e-3, 5.0e-3]}
  pseudo_threshold: {uniform: [0.3, 0.9]}
searcher: {seed: 0, n_startup_trials: 1, student_forks: 1, baseline: {loss: ce}}
"""


def fork_searcher(tmp_path, forks: int = 1, unforked=None):
    path = tmp_path / "forks.yaml"
    path.write_text(FORK_SPACE.replace("student_forks: 1", f"student_forks: {forks}"))
    space = load_space(str(path))
    return PruningOptunaSearch(space=space, metric="val_macro_f1", mode="max",
                               points_to_evaluate=[space.baseline_point()], sampler=space.build_sampler(),
                               storage=open_study_storage(str(tmp_path / "optuna.db")), study_name="forks",
                               max_t=space.max_t, teacher_epochs=space.teacher_epochs,
                               student_forks=space.student_forks, unforked=unforked)


def report(searcher, trial_id, values):
    for epoch, value in enumerate(values, start=1):
        searcher.on_trial_result(trial_id, {"epoch": epoch, "val_macro_f1": value, "training_iteration": epoch})


TEACHER_KNOBS = ("loss", "focal_gamma", "lr")


def test_a_finished_teacher_is_forked_into_trials_that_search_only_stage_two(tmp_path):
    """Once a trial reports the teacher's last epoch, the next trials take the best finished
    teacher's knobs (the stage-2 knob sampled anew), each teacher at most student_forks
    times; a teacher still training or stopped before its last epoch is not forked."""
    searcher = fork_searcher(tmp_path, forks=2)
    first = searcher.suggest("first")
    second = searcher.suggest("second")
    report(searcher, "second", [0.2])  # stopped after epoch 1 of 2: no finished teacher
    assert searcher.teacher_to_fork() is None
    report(searcher, "first", [0.3, 0.5])  # the teacher's last epoch
    forks = [searcher.suggest(f"fork{i}") for i in range(2)]
    for fork in forks:
        assert {k: fork.get(k) for k in TEACHER_KNOBS} == {k: first.get(k) for k in TEACHER_KNOBS}
    assert len({first["pseudo_threshold"], *(f["pseudo_threshold"] for f in forks)}) == 3
    report(searcher, "fork0", [0.3, 0.5, 0.6])  # a fork's teacher is its parent's: no third fork
    fresh = searcher.suggest("fresh")
    assert {k: fresh.get(k) for k in TEACHER_KNOBS} != {k: first.get(k) for k in TEACHER_KNOBS}
    assert second != first
    study = optuna.load_study(study_name="forks", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    parents = [t.user_attrs.get("teacher_of_trial") for t in study.get_trials(deepcopy=False)]
    assert parents == [None, None, 0, 0, None]


def test_the_best_finished_teacher_is_forked_first_and_forks_survive_a_restore(tmp_path):
    searcher = fork_searcher(tmp_path)
    configs = {name: searcher.suggest(name) for name in ("a", "b")}
    report(searcher, "a", [0.3, 0.4])
    report(searcher, "b", [0.3, 0.6])
    fork = searcher.suggest("fork")
    assert fork["lr"] == configs["b"]["lr"]
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = fork_searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.teacher_to_fork()[0]["lr"] == configs["a"]["lr"]  # b was forked once: a is next


def test_the_plain_baseline_kept_by_asha_is_not_forked(tmp_path):
    """It finished stage 1 by exemption (search/baseline.py), not on its merit."""
    path = tmp_path / "forks.yaml"
    path.write_text(FORK_SPACE)
    searcher = fork_searcher(tmp_path, unforked=load_space(str(path)).baseline_point())
    baseline = searcher.suggest("baseline")
    report(searcher, "baseline", [0.1, 0.2])
    assert searcher.teacher_to_fork() is None
    other = searcher.suggest("other")
    report(searcher, "other", [0.3, 0.4])
    assert searcher.teacher_to_fork()[0]["lr"] == other["lr"] != baseline["lr"]


def test_a_searcher_saved_before_forks_existed_resumes_without_them(tmp_path):
    searcher = make_searcher(tmp_path / "optuna.db")
    for name in ("_teacher_epochs", "_student_forks", "_forks", "_unforked"):
        delattr(searcher, name)  # what unpickling an older searcher's state gives
    assert searcher.suggest("a") and searcher.suggest("b")
