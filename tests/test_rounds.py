"""Stage 2 in rounds (cfg.student_rounds, Noisy Student): each later round is labelled by the
previous round's student and starts again from the teacher; the rounds share stage 2's epochs;
exact resume from any epoch of any round; the numbers per round; bad input."""

import json

import numpy as np
import pytest
import torch

import fer.train.fitting
from fer.ssl.pipeline import run_pipeline
from fer.train.config import TrialConfig, apply_overrides
from fer.train.state import PipelineState
from support import saved_and_loaded, untimed
from test_pipeline import make_data, tiny_cfg, tiny_model


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    import fer.train.models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores
    monkeypatch.setattr(fer.train.fitting, "build_model", tiny_model)
    monkeypatch.setattr(fer.train.models, "build_model", tiny_model)  # labellers rebuilt from their checkpoints
    yield
    torch.set_num_threads(threads)


def rounds_cfg(**overrides):
    return tiny_cfg(**{"student_epochs": 4, "student_rounds": 2, "student_init": "teacher", **overrides})


def test_two_rounds_share_stage_two_and_the_second_is_labelled_by_the_first_student(capsys):
    seen = []
    result = run_pipeline(rounds_cfg(pseudo_threshold=0.3), make_data(), progress=False,
                          report=lambda metrics, ckpt, state: seen.append((metrics["epoch"], state.round)))
    printed = capsys.readouterr().out
    # 2 teacher epochs, then 2 rounds of 2 epochs: the global epochs run on, the budget is unchanged
    assert seen == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]
    assert "stage 2 round 1 of 2 (2 epochs): the teacher labels the pool" in printed
    assert "stage 2 round 2 of 2 (2 epochs): the round 1 student labels the pool" in printed
    assert "pseudo-label source (auto): val macro-F1 of its labels: round 1 student alone " in printed
    rounds = result.metrics["rounds"]
    assert [r["labeller"] for r in rounds] == ["teacher", "round 1 student"]
    assert rounds[0]["pseudo_kept"] == result.metrics["pseudo_kept"]  # the teacher's selection stays the headline
    chosen = result.metrics["student_round"]
    assert result.metrics["student_val_macro_f1"] == max(r["student_val_macro_f1"] for r in rounds)
    assert rounds[chosen - 1]["student_val_macro_f1"] == result.metrics["student_val_macro_f1"]
    assert [m["epoch"] for m in result.history] == [1, 2, 3, 4, 5, 6]
    assert len(result.control.history) == 4  # the control: stage 2's epochs in one go, as with one round


def test_a_later_round_labels_the_pool_with_the_previous_student_and_restarts_from_the_teacher(monkeypatch):
    import fer.ssl.pipeline

    labellers, inits = [], []
    real_selection, real_student = fer.ssl.pipeline._selection, fer.train.fitting.Stage.student.__func__

    def selection(cfg, data, labeller, resume, out_dir, device, who):
        labellers.append({k: v.clone() for k, v in labeller.model.state_dict().items()})
        return real_selection(cfg, data, labeller, resume, out_dir, device, who)

    def student(cls, cfg, images, labels, weights, counts, init, round=1):
        inits.append(init)
        return real_student(cls, cfg, images, labels, weights, counts, init, round)

    monkeypatch.setattr(fer.ssl.pipeline, "_selection", selection)
    monkeypatch.setattr(fer.train.fitting.Stage, "student", classmethod(student))
    result = run_pipeline(rounds_cfg(student_rounds=2), make_data(), progress=False)
    teacher = result.teacher.model.state_dict()
    assert all(torch.equal(labellers[0][k], teacher[k]) for k in teacher)  # round 1: the teacher
    assert not all(torch.equal(labellers[1][k], teacher[k]) for k in teacher)  # round 2: round 1's student
    for init in inits:  # every round starts again from the teacher's weights
        assert all(torch.equal(init[k], teacher[k]) for k in teacher)


def test_resuming_after_any_epoch_of_any_round_ends_with_the_same_model():
    cfg = rounds_cfg(student_mode="flexmatch", pseudo_threshold=0.5, dropout=0.1)
    data, states = make_data(), []
    whole = run_pipeline(cfg, data, progress=False,
                         report=lambda metrics, ckpt, state: states.append(saved_and_loaded(state.to_dict())))
    assert [(s["stage"], len(s.get("rounds", [])) + 1, s["fit"]["epoch"]) for s in states] == [
        ("teacher", 1, 1), ("teacher", 1, 2), ("student", 1, 1), ("student", 1, 2),
        ("student", 2, 1), ("student", 2, 2)]
    for state in states:
        resumed = run_pipeline(cfg, data, progress=False, resume=PipelineState.from_dict(state))
        assert untimed(resumed.history) == untimed(whole.history)
        assert resumed.metrics["rounds"] == whole.metrics["rounds"]
        a, b = whole.checkpoint["model"], resumed.checkpoint["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    last = PipelineState.from_dict(states[-1])
    assert last.global_epoch() == 6 and last.round == 2
    assert last.best_score() == pytest.approx(max(whole.metrics["teacher_val_macro_f1"],
                                                  whole.metrics["student_val_macro_f1"]))


def test_rounds_that_do_not_divide_stage_two_or_a_state_from_more_rounds_are_refused():
    with pytest.raises(ValueError, match=r"--set: student_epochs=4 is not a multiple of student_rounds=3 "
                                         r"\(the rounds share stage 2's epochs equally\)"):
        apply_overrides(TrialConfig(student_epochs=4), {"student_rounds": 3}, source="--set", models=False)
    with pytest.raises(ValueError, match=r"--set: student_rounds=0 is outside the allowed range \[1, 16\]"):
        apply_overrides(TrialConfig(), {"student_rounds": 0}, source="--set", models=False)
    states = []
    run_pipeline(rounds_cfg(student_epochs=2), make_data(), progress=False,
                 report=lambda metrics, ckpt, state: states.append(saved_and_loaded(state.to_dict())))
    with pytest.raises(ValueError, match="resume state is in stage 2's round 2 but student_rounds is 1"):
        run_pipeline(rounds_cfg(student_epochs=2, student_rounds=1), make_data(), progress=False,
                     resume=PipelineState.from_dict(states[-1]))


def test_fer_train_prints_and_writes_each_round(tmp_path, capsys):
    import fer.train.cli
    from fer.data.synth import write_csv

    path = write_csv(str(tmp_path / "data"), seed=1, scale=0.03, eval_scale=0.05)
    out = tmp_path / "out"
    code = fer.train.cli.main(["--data", path, "--out", str(out), "--no-progress", "--set", "model=resnet10t",
                           "--set", "epochs=1", "--set", "student_epochs=2", "--set", "student_rounds=2",
                           "--set", "epoch_images=0", "--set", "image_size=16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "in 2 rounds of 1, each labelled by the round before's student" in printed
    assert "round 1: teacher kept " in printed and "round 2: round 1 student kept " in printed
    assert printed.count("<- chosen") == 1
    pipeline = json.loads((out / "metrics.json").read_text())["pipeline"]
    assert [r["round"] for r in pipeline["rounds"]] == [1, 2] and pipeline["student_round"] in (1, 2)
    assert all(np.isfinite(r["student_val_macro_f1"]) for r in pipeline["rounds"])


def test_a_space_searches_rounds_that_split_its_student_epochs_and_refuses_one_that_does_not(tmp_path):
    from search.space import SpaceError, load_space

    space = tmp_path / "rounds.yaml"
    space.write_text("fixed:\n  student_epochs: 6\n  student_rounds: 3\n"
                     "parameters:\n  lr:\n    loguniform: [1.0e-3, 1.0e-2]\n")
    assert load_space(str(space)).trial_config({"lr": 0.002}).round_epochs == 2  # 3 alone would not split the default 8
    space.write_text("fixed:\n  student_epochs: 4\nparameters:\n  student_rounds:\n    choice: [1, 2, 3]\n")
    with pytest.raises(SpaceError, match=r"rounds.yaml:4: parameters.student_rounds: student_epochs=4 is not "
                                         r"a multiple of student_rounds=3"):
        load_space(str(space))
    space.write_text("fixed:\n  student_epochs: 4\nparameters:\n  student_rounds:\n    choice: [1, 2, 4]\n")
    assert load_space(str(space)).trial_config({"student_rounds": 4}).round_epochs == 1
