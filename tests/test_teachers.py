"""fer.ssl.teachers: runs that differ only in stage-2 knobs train the same teacher, and a run
started from a stored teacher ends as the run that trained its own."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest
import torch

import fer.train.fitting
from fer.ssl.pipeline import run_pipeline
from fer.ssl.teachers import TEACHER_FIELDS, TeacherStore, teacher_finished, teacher_key
from fer.train.checkpoint import load_weights_only
from fer.train.config import STAGE2_FIELDS, TrialConfig
from fer.train.fitting import Stage, fit
from test_pipeline import make_data, tiny_cfg, tiny_model

# a value of every stage-2 field other than tiny_cfg's
OTHER_STAGE2 = {"student_epochs": 3, "pseudo_threshold": 0.5, "pseudo_selection": "flexmatch", "crest_alpha": 1.0,
                "pseudo_tta": True, "pseudo_temperature": False, "pseudo_debias": False, "pseudo_graph": "none",
                "pseudo_weight": 0.5, "student_init": "scratch", "student_lr_scale": 0.1, "student_augment": "strong",
                "student_schedule": "cosine",
                "pool_control": False, "posthoc": "bias", "student_mode": "fixmatch", "pool_ratio": 2,
                "pool_align": True, "student_rounds": 3, "pool_debias": True, "pool_picks": True,
                "pool_targets": "soft", "student_ema": 0.9, "pool_labeller_weight": 0.3}


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(fer.train.fitting, "build_model", tiny_model)
    yield
    torch.set_num_threads(threads)


def storing(store: TeacherStore, cfg: TrialConfig):
    def report(metrics, checkpoint, state):
        if teacher_finished(cfg, state):
            store.save(cfg, metrics, checkpoint, state)
    return report


def test_stage_two_knobs_leave_the_teacher_alone():
    """The key's premise: a teacher trained under every stage-2 knob changed is the same
    teacher, weight for weight; a teacher knob changes the key."""
    assert sorted(OTHER_STAGE2) == sorted(STAGE2_FIELDS)
    assert sorted(TEACHER_FIELDS + STAGE2_FIELDS) == sorted(f.name for f in fields(TrialConfig))
    data = make_data()
    one, other = tiny_cfg(), tiny_cfg(**OTHER_STAGE2)
    assert all(getattr(one, name) != value for name, value in OTHER_STAGE2.items())
    teachers = [fit(cfg, Stage.teacher(cfg, data), data.splits["val"], data.classes, progress=False)
                for cfg in (one, other)]
    for name, tensor in teachers[0].model.state_dict().items():
        assert torch.equal(tensor, teachers[1].model.state_dict()[name]), name
    assert [m["val_macro_f1"] for m in teachers[0].history] == [m["val_macro_f1"] for m in teachers[1].history]
    assert teacher_key(one) == teacher_key(other)
    assert teacher_key(one) != teacher_key(replace(one, lr=1e-3)) != teacher_key(replace(one, seed=1))


def test_a_run_from_a_stored_teacher_ends_as_a_run_that_trains_its_own(tmp_path):
    """One run stores its teacher; a run with other stage-2 knobs starts from it at stage 2
    and ends with the same model and numbers as when it trains the teacher itself."""
    data = make_data()
    store = TeacherStore(str(tmp_path / "teachers"))
    first, second = tiny_cfg(), tiny_cfg(pseudo_weight=0.5, student_augment="none", pseudo_graph="none")
    run_pipeline(first, data, progress=False, report=storing(store, first))
    saved = load_weights_only(store.path(first))
    assert saved["state"]["fit"]["optimizer"]["state"] == {}  # no optimizer moments kept
    shared = store.load(second)
    assert shared is not None and shared.checkpoint["config"]["pseudo_weight"] == 0.5  # the run's own knobs
    assert [m["epoch"] for m in shared.state.fit.history] == [1, 2]

    epochs: list[int] = []
    forked = run_pipeline(second, data, progress=False, resume=shared.state,
                          report=lambda metrics, ckpt, state: epochs.append(metrics["epoch"]))
    assert epochs == [3, 4]  # stage 2 only
    alone = run_pipeline(second, data, progress=False)
    for name, tensor in alone.checkpoint["model"].items():
        assert torch.equal(tensor, forked.checkpoint["model"][name]), name
    for key in ("teacher_val_macro_f1", "student_val_macro_f1", "control_val_macro_f1", "final_stage",
                "pseudo_kept", "val_macro_f1_posthoc"):
        assert forked.metrics[key] == alone.metrics[key], key
    assert forked.checkpoint["config"]["pseudo_weight"] == 0.5
    np.testing.assert_array_equal(forked.checkpoint["posthoc_offsets"], alone.checkpoint["posthoc_offsets"])


def test_the_store_keeps_finished_teachers_only_and_passes_over_unreadable_files(tmp_path):
    data = make_data()
    cfg = tiny_cfg()
    store = TeacherStore(str(tmp_path))
    states = []
    run_pipeline(replace(cfg, student_epochs=0), data, progress=False,
                 report=lambda metrics, ckpt, state: states.append((metrics, ckpt, state)))
    metrics, checkpoint, state = states[0]  # after epoch 1 of 2
    with pytest.raises(ValueError, match="not a finished teacher: stage 'teacher' after epoch 1 of 2"):
        store.save(cfg, metrics, checkpoint, state)
    assert store.load(cfg) is None
    store.save(cfg, *states[-1])
    assert store.load(cfg) is not None
    assert store.load(replace(cfg, epochs=3)) is None  # another teacher (and another key)
    with open(store.path(cfg), "wb") as handle:
        handle.write(b"not a checkpoint")
    assert store.load(cfg) is None  # the run trains its own
