"""run_pipeline: stage 2 skipped without a pool, both stages with one, DDP-sharded pseudo-labels."""

import csv
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fer.ssl.pipeline
import fer.train.cli
import fer.train.fitting
from fer.data import Dataset, Split
from fer.ssl.pipeline import run_pipeline
from fer.ssl.pseudo import SELECTIONS
from fer.train.checkpoint import load_checkpoint
from fer.train.config import TrialConfig, apply_overrides
from fer.train.state import PipelineState
from support import saved_and_loaded, untimed

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores
    yield
    torch.set_num_threads(threads)


def tiny_model(name, num_classes, in_channels=1, dropout=0.0, pretrained=None, **_):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


@pytest.fixture(autouse=True)
def _tiny_net(monkeypatch):
    monkeypatch.setattr(fer.train.fitting, "build_model", tiny_model)


def make_split(n, seed, size=16, k=4, labelled=True):
    """Noise images with a bright bar whose row band encodes the class; imbalanced 8:4:2:1."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(k, size=n, p=np.array([8, 4, 2, 1]) / 15)
    images = rng.integers(0, 80, (n, size, size, 1)).astype(np.uint8)
    band = size // k
    for i, label in enumerate(labels):
        images[i, label * band:(label + 1) * band, 2:size - 2] = 230
    return Split(images, labels.astype(np.int64) if labelled else None)


def make_data(pool=True, pool_labels=True):
    splits = {"train": make_split(80, 1), "val": make_split(40, 2), "test": make_split(40, 3)}
    if pool:
        splits["unlabeled"] = make_split(60, 4, labelled=pool_labels)
    return Dataset(CLASSES, splits, "test data")


def tiny_cfg(**overrides):
    base = dict(model="mobilenet_v3_small", epoch_images=0, image_size=16, batch_size=32, epochs=2,
                student_epochs=2, augment="none", student_mode="offline",  # the teacher's pseudo-labels
                student_augment="weak", dropout=0.0, warmup_epochs=0, amp=False, lr=3e-3,
                pseudo_threshold=0.0)  # the tiny teacher is near chance: keep the whole pool, so stage 2 runs
    base.update(overrides)
    return TrialConfig(**base)


def test_no_pool_skips_stage_two_with_one_line(capsys, tmp_path):
    epochs = []
    result = run_pipeline(tiny_cfg(), make_data(pool=False), out_dir=str(tmp_path), progress=False,
                          report=lambda metrics, ckpt, state: epochs.append(metrics["epoch"]))
    lines = [line for line in capsys.readouterr().out.splitlines() if "stage 2" in line]
    assert lines == ["no unlabeled pool: stage 2 skipped"]
    assert result.student is None and result.metrics["final_stage"] == "teacher"
    assert epochs == [1, 2]
    assert result.checkpoint["posthoc_offsets"] is not None
    assert not os.path.exists(tmp_path / "pseudo_labeled.csv")
    assert load_checkpoint(str(tmp_path / "best.pt"))["posthoc_offsets"] == result.checkpoint["posthoc_offsets"]


def test_student_epochs_zero_skips_stage_two(capsys):
    result = run_pipeline(tiny_cfg(student_epochs=0), make_data(), progress=False)
    assert "student_epochs=0: stage 2 skipped" in capsys.readouterr().out
    assert result.student is None


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_pool_runs_stage_two_with_global_epochs(tmp_path, selection):
    reports = []
    cfg = tiny_cfg(pseudo_selection=selection, student_init="teacher", pseudo_weight=0.5)
    result = run_pipeline(cfg, make_data(), out_dir=str(tmp_path), progress=False,
                          report=lambda metrics, ckpt, state: reports.append((metrics["epoch"], metrics["stage"])))
    assert reports == [(1, "teacher"), (2, "teacher"), (3, "student"), (4, "student")]
    assert [m["epoch"] for m in result.history] == [1, 2, 3, 4]
    assert result.student is not None
    assert result.metrics["student_val_macro_f1"] == result.student.best_metrics["val_macro_f1"]
    assert result.metrics["final_stage"] in ("teacher", "student", "control")
    with open(tmp_path / "pseudo_labeled.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result.pseudo["kept"] > 0
    assert all(0 <= int(row["pool_index"]) < 60 for row in rows)
    assert 0.0 <= result.pseudo["precision"] <= 1.0  # the pool's true labels are known here
    assert os.path.exists(tmp_path / "pseudo_summary.json")
    ckpt = load_checkpoint(str(tmp_path / "best.pt"))
    assert ckpt["stage"] == result.metrics["final_stage"]
    assert len(ckpt["posthoc_offsets"]) == 4
    assert ckpt["metrics"]["pipeline"]["teacher_val_macro_f1"] == result.metrics["teacher_val_macro_f1"]


def test_teacher_calibration_passes_the_rebalanced_rule_to_the_pool():
    """A teacher that under-predicts the rare class: with pseudo_debias its val-fitted tau
    offsets move rare-class pool images to the rare class, as the final model's would."""
    from fer.ssl.labelling import teacher_calibration
    from fer.train.posthoc import fit_offsets

    rng = np.random.default_rng(0)
    counts = np.array([90, 10])  # training prior: class 1 rare
    labels = np.repeat([0, 1], 50)  # balanced val
    # class-1 images score a little lower on logit 1 than the head's log prior lead
    logits = np.stack([np.full(100, 1.0), np.where(labels == 1, 0.6, -1.0)], axis=1) + rng.normal(0, 0.1, (100, 2))
    plain, plain_t = teacher_calibration(TrialConfig(pseudo_debias=False), logits, labels, counts)
    assert not plain.any() and plain_t > 0
    offsets, temperature = teacher_calibration(TrialConfig(), logits, labels, counts)
    np.testing.assert_allclose(offsets, fit_offsets(logits, labels, counts, "tau"))
    assert (logits.argmax(1) == 0).all()  # the teacher's own argmax never says 1
    assert ((logits + offsets).argmax(1) == labels).mean() > 0.9  # the offset rule does
    none, _ = teacher_calibration(TrialConfig(posthoc="none"), logits, labels, counts)
    assert not none.any()
    assert teacher_calibration(TrialConfig(pseudo_temperature=False), logits, labels, counts)[1] == 1.0


def test_pseudo_labels_use_the_offsets_and_record_them(capsys):
    cfg = tiny_cfg(epochs=1, student_epochs=1, pool_control=False)
    result = run_pipeline(cfg, make_data(), progress=False)
    offsets = result.pseudo["debias_offsets"]
    assert len(offsets) == 4
    plain = run_pipeline(replace(cfg, pseudo_debias=False), make_data(), progress=False)
    assert not any(plain.pseudo["debias_offsets"])
    assert any(offsets) == ("tau offsets" in capsys.readouterr().out)


def test_pool_control_trains_the_student_recipe_on_labels_alone(monkeypatch):
    """The supervised-only control: same start and epochs, the labelled split only, at least
    as many images per epoch as the student; its val score and the pool's gain in metrics."""
    stages = []
    fit = fer.ssl.pipeline.fit

    def recording_fit(cfg, stage, *args, **kwargs):
        result = fit(cfg, stage, *args, **kwargs)
        stages.append((stage.name, len(stage.images), stage.epochs, stage.epoch_offset, stage.init_state is None,
                       stage.sample_weight is None, [m["train_images"] for m in result.history],
                       result.best_metrics["val_macro_f1"]))
        return result

    monkeypatch.setattr(fer.ssl.pipeline, "fit", recording_fit)
    result = run_pipeline(tiny_cfg(pseudo_threshold=0.0), make_data(), progress=False)
    (_, teacher_n, *_), student, control = stages
    assert student[:6] == ("student", 80 + 60, 2, 2, False, False)
    assert control[:6] == ("control", teacher_n, 2, 2, False, True)  # from the teacher, no pseudo weights
    assert all(seen >= max(student[6]) for seen in control[6])  # the control is not given fewer steps
    metrics = result.metrics
    assert metrics["control_val_macro_f1"] == control[7]
    assert (metrics["labelled_images"], metrics["pool_images"]) == (80, 60)  # the label fraction it was bought at
    # the gain is read with each model's own post-hoc offsets, fitted on val like the final model's
    assert metrics["pool_gain_val"] == pytest.approx(
        metrics["student_val_macro_f1_posthoc"] - metrics["control_val_macro_f1_posthoc"])
    val = make_data().splits["val"]
    for name, fitted in (("student", result.student), ("control", result.control)):
        logits = fer.ssl.labelling.predict(tiny_cfg(), fitted.model, val.images, None, tta=False)
        offsets = fer.ssl.pipeline.fit_offsets(logits, val.labels, np.asarray(fitted.checkpoint["class_counts"]),
                                               "tau")
        assert metrics["pool_offsets"][name] == pytest.approx(list(offsets))
        assert metrics[f"{name}_val_macro_f1_posthoc"] == pytest.approx(
            fer.ssl.pipeline.macro_f1(val.labels, logits, offsets))
    low, high = metrics["pool_gain_val_ci95"]
    assert low <= high and metrics["pool_helped"] == (low > 0)  # helped: the paired val interval excludes 0
    assert [m["stage"] for m in result.history] == ["teacher"] * 2 + ["student"] * 2  # the control is no stage


def test_pool_control_off_or_without_stage_two_adds_nothing():
    off = run_pipeline(tiny_cfg(pool_control=False, student_epochs=1), make_data(), progress=False)
    skipped = run_pipeline(tiny_cfg(), make_data(pool=False), progress=False)
    for result in (off, skipped):
        assert not {"control_val_macro_f1", "pool_gain_val", "pool_gain_val_ci95", "pool_helped"} & set(result.metrics)
        assert result.control is None


def test_pool_without_true_labels_reports_no_precision():
    result = run_pipeline(tiny_cfg(student_epochs=1, student_init="scratch"),
                          make_data(pool_labels=False), progress=False)
    assert "precision" not in result.pseudo
    assert result.metrics["pseudo_precision"] is None


def test_nothing_kept_skips_stage_two(capsys):
    result = run_pipeline(tiny_cfg(pseudo_threshold=1.0, pseudo_temperature=False, epochs=1),
                          make_data(), progress=False)
    assert "no pool image reached the pseudo-label threshold 1.0: stage 2 skipped" in capsys.readouterr().out
    assert result.student is None and result.metrics["pseudo_kept"] == 0


def _ddp_worker(rank, world, store, out, cfg_kwargs):
    fer.train.fitting.build_model = tiny_model  # spawned processes do not inherit the monkeypatch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = run_pipeline(TrialConfig(**cfg_kwargs), make_data(), progress=False,
                              out_dir=os.path.join(out, f"rank{rank}"))
        torch.save({"kept": result.pseudo["kept"], "offsets": result.checkpoint["posthoc_offsets"],
                    "epochs": [m["epoch"] for m in result.history]}, os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_pseudo_labels_and_offsets(tmp_path):
    cfg = tiny_cfg(epochs=1, student_epochs=1, pseudo_threshold=0.0)  # keep the whole pool
    kwargs = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), kwargs), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in (0, 1))
    assert r0 == r1 and r0["epochs"] == [1, 2]
    assert r0["kept"] == 60  # every pool row came back from the two shards
    assert os.path.exists(tmp_path / "rank0" / "pseudo_labeled.csv")
    assert not os.path.exists(tmp_path / "rank1" / "pseudo_labeled.csv")  # rank 0 writes


def test_train_cli_runs_both_stages_and_reports_each(tmp_path, monkeypatch, capsys):
    from fer.data.synth import write_csv

    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    csv_path = write_csv(str(tmp_path / "data"), seed=0, scale=0.03)  # has an Unlabeled pool
    out = tmp_path / "run"
    args = ["--data", csv_path, "--out", str(out), "--no-progress", "--set", "image_size=16",
            "--set", "epochs=1", "--set", "student_epochs=1", "--set", "pseudo_threshold=0.0",
            "--set", "batch_size=32", "--set", "amp=false", "--set", "epoch_images=0", "--set", "student_mode=offline"]
    assert fer.train.cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "teacher: best val macro-F1" in printed and "student: best val macro-F1" in printed
    assert "test macro-F1" in printed and "labelled images, a pool of" in printed and "student val macro-F1" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert {"control_val_macro_f1", "pool_gain_val", "pool_helped"} <= set(summary["pipeline"])
    pool = summary["pool_test"]  # student - control on test, each with its offsets, paired interval
    assert pool["difference"] == pytest.approx(pool["student_macro_f1"] - pool["control_macro_f1"])
    assert pool["ci95"][0] <= pool["difference"] <= pool["ci95"][1]
    assert "pool on test (each with its post-hoc offsets)" in printed
    assert {"teacher_test_macro_f1", "student_test_macro_f1", "test"} <= set(summary)
    assert summary["pipeline"]["student_best_epoch"] == 2
    assert load_checkpoint(str(out / "best.pt"))["posthoc_offsets"] is not None
    assert (out / "pseudo_labeled.csv").exists()


def test_resuming_after_any_epoch_of_either_stage_ends_with_the_same_model(tmp_path, monkeypatch):
    import fer.ssl.pipeline
    import fer.train.models

    monkeypatch.setattr(fer.train.models, "build_model", tiny_model)  # the teacher rebuilt from its checkpoint
    cfg = tiny_cfg(student_init="teacher", augment="weak", dropout=0.1)
    data = make_data()
    states = []
    whole = run_pipeline(cfg, data, progress=False,
                         report=lambda metrics, ckpt, state: states.append(saved_and_loaded(state.to_dict())))
    assert [(s["stage"], s["fit"]["epoch"]) for s in states] == [("teacher", 1), ("teacher", 2),
                                                                ("student", 1), ("student", 2)]
    real_pseudo_label = fer.ssl.pipeline.pseudo_label
    for global_epoch, state in enumerate(states, 1):
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            return real_pseudo_label(*args, **kwargs)

        monkeypatch.setattr(fer.ssl.pipeline, "pseudo_label", counted)
        reports = []
        out = tmp_path / f"resumed-{global_epoch}"
        resumed = run_pipeline(cfg, data, progress=False, resume=PipelineState.from_dict(state), out_dir=str(out),
                               report=lambda metrics, ckpt, s: reports.append(metrics["epoch"]))
        assert reports == list(range(global_epoch + 1, 5))
        # in stage 2 the selection comes from the state: the teacher labels nothing again
        assert len(calls) == (1 if state["stage"] == "teacher" else 0)
        assert untimed(resumed.history) == untimed(whole.history)
        assert resumed.metrics["final_stage"] == whole.metrics["final_stage"]
        assert resumed.checkpoint["epoch"] == whole.checkpoint["epoch"]
        assert resumed.checkpoint["posthoc_offsets"] == whole.checkpoint["posthoc_offsets"]
        a, b = whole.checkpoint["model"], resumed.checkpoint["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert resumed.pseudo["kept"] == whole.pseudo["kept"] > 0
        with open(out / "pseudo_labeled.csv") as handle:
            assert len(list(csv.DictReader(handle))) == whole.pseudo["kept"]
        assert load_checkpoint(str(out / "best.pt"))["epoch"] == whole.checkpoint["epoch"]


def test_a_stage_two_resume_state_needs_stage_two():
    states = []
    run_pipeline(tiny_cfg(), make_data(), progress=False,
                 report=lambda metrics, ckpt, state: states.append(saved_and_loaded(state.to_dict())))
    with pytest.raises(ValueError, match="stage 2 but student_epochs is 0"):
        run_pipeline(tiny_cfg(student_epochs=0), make_data(), progress=False,
                     resume=PipelineState.from_dict(states[-1]))
    with pytest.raises(ValueError, match="not a pipeline resume state"):
        run_pipeline(tiny_cfg(), make_data(), progress=False, resume=PipelineState.from_dict(states[-1]["fit"]))


def test_best_score_is_the_best_val_macro_f1_so_far_over_both_stages():
    """What trials report as best_val_macro_f1 (the live table's best f1): read from the
    resume state each epoch, so a resumed trial reports the same."""
    seen = []
    run_pipeline(tiny_cfg(), make_data(), progress=False,
                 report=lambda metrics, ckpt, state: seen.append(
                     (metrics["val_macro_f1"], PipelineState.from_dict(saved_and_loaded(state.to_dict())))))
    assert [state.stage for _, state in seen] == ["teacher", "teacher", "student", "student"]
    for i, (_, state) in enumerate(seen):
        assert state.best_score() == pytest.approx(max(value for value, _ in seen[:i + 1]))


def test_best_score_keeps_a_better_teacher_in_stage_two():
    student = PipelineState.from_dict({"stage": "teacher", "fit": {
        "epoch": 1, "step": 3, "history": [], "model": {}, "optimizer": {}, "scheduler": {}, "scaler": {},
        "best": {"f1": 0.25, "epoch": 0, "confusion": [[1]]}}})
    assert student.best_score() == 0.25  # stage 1: the fit's own best
    student.stage, student.teacher, student.pseudo = "student", {"best_metrics": {"val_macro_f1": 0.5}}, {}
    assert student.best_score() == 0.5
    student.teacher["best_metrics"]["val_macro_f1"] = 0.1
    assert student.best_score() == 0.25


def test_train_cli_resumes_an_interrupted_run_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    import fer.train.models
    from fer.data.synth import write_csv

    monkeypatch.setattr(fer.train.models, "build_model", tiny_model)  # the teacher rebuilt from the resume state
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    csv_path = write_csv(str(tmp_path / "data"), seed=0, scale=0.03)
    settings = ["--data", csv_path, "--no-progress", "--set", "image_size=16", "--set", "epochs=2",
                "--set", "student_epochs=2", "--set", "pseudo_threshold=0.0", "--set", "batch_size=32",
                "--set", "amp=false", "--set", "augment=weak",
                # each epoch is several passes over the ~90 training images (the budget unit)
                "--set", "epoch_images=200"]
    assert fer.train.cli.main([*settings, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / fer.train.cli.RESUME_FILE).exists()  # removed once the run ends

    out = tmp_path / "cut"
    real_validate, calls = fer.train.fitting.validate, []

    def interrupted_after_three_epochs(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) during the student's second epoch
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(fer.train.fitting, "validate", interrupted_after_three_epochs)
    with pytest.raises(KeyboardInterrupt):
        fer.train.cli.main([*settings, "--out", str(out)])
    monkeypatch.setattr(fer.train.fitting, "validate", real_validate)
    assert torch.load(out / fer.train.cli.RESUME_FILE, weights_only=True)["epoch"] == 3
    capsys.readouterr()

    # the wrong config is refused, naming the file and the fields that differ
    assert fer.train.cli.main([*settings, "--set", "lr=0.01", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{out / fer.train.cli.RESUME_FILE}: saved by a run with a different config (lr)" in err

    assert fer.train.cli.main([*settings, "--out", str(out), "--resume"]) == 0
    whole, resumed = load_checkpoint(str(tmp_path / "whole" / "best.pt")), load_checkpoint(str(out / "best.pt"))
    assert (whole["epoch"], whole["stage"]) == (resumed["epoch"], resumed["stage"])
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    history = [json.loads((p / "metrics.json").read_text())["history"] for p in (tmp_path / "whole", out)]
    assert [untimed(h) for h in history] == [untimed(history[0])] * 2
    assert not (out / fer.train.cli.RESUME_FILE).exists()

    assert fer.train.cli.main([*settings, "--out", str(out), "--resume"]) == 2  # nothing left to resume
    assert "nothing to resume" in capsys.readouterr().err


def test_stage_two_and_its_control_train_at_student_lr_scale_of_the_peak_rate():
    """student_lr_scale is stage 2's peak learning rate as a fraction of lr: the student and
    its supervised-only control follow the same schedule at a quarter of the rate; the
    teacher is untouched."""
    runs = {scale: run_pipeline(tiny_cfg(student_lr_scale=scale), make_data(), progress=False)
            for scale in (1.0, 0.25)}

    def rates(result, stage):
        return np.array([m["lr"] for m in result.history if m["stage"] == stage])

    full, quarter = runs[1.0], runs[0.25]
    assert np.array_equal(rates(full, "teacher"), rates(quarter, "teacher"))
    assert rates(quarter, "student") == pytest.approx(0.25 * rates(full, "student"))
    assert rates(quarter, "student").max() > 0
    control = [np.array([m["lr"] for m in r.control.history]) for r in (full, quarter)]
    assert control[1] == pytest.approx(0.25 * control[0])
    with pytest.raises(ValueError, match="student_lr_scale"):
        apply_overrides(tiny_cfg(), {"student_lr_scale": 0.0}, source="test")


def test_the_final_model_is_the_best_on_val_of_teacher_student_and_control():
    """A student that the pool made worse is not handed out when its own control scored better;
    ties go to the student, then the control."""
    from fer.train.fitting import FitResult

    def stage(f1, raw=0.0):
        return FitResult(model=None, best_metrics={"val_macro_f1": raw, "val_macro_f1_posthoc": f1}, best_epoch=1,
                         history=[])

    pick = fer.ssl.pipeline.final_stage
    assert pick({"teacher": stage(0.5), "student": stage(0.4), "control": stage(0.6)}) == "control"
    assert pick({"teacher": stage(0.5), "student": stage(0.6), "control": stage(0.6)}) == "student"
    assert pick({"teacher": stage(0.6), "student": stage(0.4), "control": stage(0.6)}) == "control"
    assert pick({"teacher": stage(0.6), "student": stage(0.4), "control": None}) == "teacher"
    assert pick({"teacher": stage(0.4), "student": None, "control": None}) == "teacher"
    # scored as handed out, with offsets: a control better by argmax loses to a student better with them
    assert pick({"teacher": stage(0.5, 0.5), "student": stage(0.63, 0.55), "control": stage(0.62, 0.60)}) == "student"


def test_a_run_hands_out_its_control_when_that_scores_best_on_val(monkeypatch, tmp_path):
    """End to end: the control's weights, offsets and stage go to best.pt and metrics say so."""
    fit = fer.ssl.pipeline.fit

    def control_best(cfg, stage, *args, **kwargs):
        result = fit(cfg, stage, *args, **kwargs)
        if stage.name == "control":  # make the control win on val
            result.best_metrics = dict(result.best_metrics, val_macro_f1_posthoc=2.0)
        return result

    monkeypatch.setattr(fer.ssl.pipeline, "fit", control_best)
    result = run_pipeline(tiny_cfg(), make_data(), progress=False, out_dir=str(tmp_path))
    assert result.metrics["final_stage"] == "control"
    assert result.model is result.control.model
    saved = load_checkpoint(str(tmp_path / "best.pt"))
    assert saved["stage"] == "control" and len(saved["posthoc_offsets"]) == 4


def test_a_constant_student_schedule_keeps_stage_two_and_its_control_at_the_peak_rate():
    """student_schedule=constant: after the warmup stage 2 and its control stay at lr x
    student_lr_scale (USB's imbalanced runs); the teacher keeps its cosine; a bad name is refused."""
    cfg = tiny_cfg(student_schedule="constant", student_lr_scale=0.5, student_epochs=3)
    result = run_pipeline(cfg, make_data(), progress=False)
    cosine = run_pipeline(replace(cfg, student_schedule="cosine"), make_data(), progress=False)
    student = [m["lr"] for m in result.history if m["stage"] == "student"]
    assert student == pytest.approx([0.5 * cfg.lr] * 3)
    assert [m["lr"] for m in result.control.history] == pytest.approx([0.5 * cfg.lr] * 3)
    assert [m["lr"] for m in cosine.history if m["stage"] == "student"][-1] < 0.5 * cfg.lr
    assert [m["lr"] for m in result.history if m["stage"] == "teacher"] == \
        [m["lr"] for m in cosine.history if m["stage"] == "teacher"]
    with pytest.raises(ValueError, match="--set: student_schedule='step' is not allowed. Choose one of: "
                                         "cosine, constant"):
        apply_overrides(TrialConfig(), {"student_schedule": "step"}, source="--set", models=False)
