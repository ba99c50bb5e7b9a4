import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fer.train.cli
import fer.train.fitting
from fer.data import Split
from fer.train.checkpoint import CHECKPOINT_KEYS, load_checkpoint, model_from_checkpoint, save_checkpoint
from fer.train.cli import main
from fer.train.config import TrialConfig
from fer.train.fitting import Stage, fit
from fer.train.infer import Ranks, predict_logits
from fer.train.loop import batch_bounds, rank_indices
from fer.train.metrics import compute_metrics
from fer.train.state import FitState
from support import saved_and_loaded, untimed

CLASSES = ["Angry", "Happy", "Sad", "No DR"]  # a space on purpose: metric keys get sanitised


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: keep each test to one
    yield
    torch.set_num_threads(threads)


def make_images(n: int, size: int = 16, seed: int = 0, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Noise images with a bright horizontal bar whose row band encodes the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    images = rng.integers(0, 80, (n, size, size, 1)).astype(np.uint8)
    band = size // k
    for i, label in enumerate(labels):
        images[i, label * band:(label + 1) * band, 2:size - 2] = 230
    return images, labels.astype(np.int64)


def tiny_cfg(**overrides) -> TrialConfig:
    base = dict(model="mobilenet_v3_small", epoch_images=0, image_size=16, batch_size=32, epochs=1, augment="none",
                dropout=0.0, warmup_epochs=0,
                amp=False, lr=3e-3)
    base.update(overrides)
    return TrialConfig(**base)


def run_fit(cfg: TrialConfig, n_train: int = 96, n_val: int = 40, *, stage: str = "teacher",
            epoch_offset: int | None = None, resume: dict | None = None, report=None):
    """fit on bar images; `resume` is a saved state dict, `report` gets (metrics, checkpoint, state dict)."""
    x, y = make_images(n_train, cfg.image_size, seed=1)
    xv, yv = make_images(n_val, cfg.image_size, seed=2)
    spec = Stage.of(cfg, stage, x, y, np.bincount(y, minlength=4), epoch_offset=epoch_offset)
    plain = None if report is None else (lambda m, c, s: report(m, c, s.to_dict()))
    return fit(cfg, spec, Split(xv, yv), CLASSES, progress=False, device="cpu", report=plain,
               resume=None if resume is None else FitState.from_dict(resume))


def tiny_model(name, num_classes, in_channels=1, dropout=0.0, pretrained=None, **_):
    """A BatchNorm-free net: DDP's averaged gradients then equal the global batch's exactly
    (BatchNorm would normalise each rank's half batch with its own statistics)."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


def test_reports_every_epoch_with_global_epoch_and_best_checkpoint():
    calls = []
    result = run_fit(tiny_cfg(student_epochs=2), report=lambda m, c, s: calls.append((m, c)), epoch_offset=3,
                     stage="student")
    assert [m["epoch"] for m, _ in calls] == [4, 5]
    first, ckpt = calls[0]
    assert ckpt is not None and set(ckpt) == set(CHECKPOINT_KEYS)
    assert ckpt["stage"] == "student" and ckpt["epoch"] == 4 and ckpt["classes"] == CLASSES
    for key in ("stage", "train_loss", "lr", "val_macro_f1", "val_balanced_accuracy", "val_accuracy",
                "val_kappa", "val_f1_Angry", "val_f1_No_DR"):
        assert key in first, key
    assert result.best_epoch in (4, 5) and len(result.history) == 2
    assert not result.model.training
    # every epoch's checkpoint holds that epoch's weights; the best one is the result's
    assert calls[1][1]["epoch"] == 5 and calls[1][1]["metrics"]["val_macro_f1"] == calls[1][0]["val_macro_f1"]
    assert result.checkpoint is calls[result.best_epoch - 4][1]


def test_every_epoch_reports_its_post_hoc_score_and_its_checkpoint_decides_with_those_offsets():
    """val_macro_f1_posthoc is what the epoch's checkpoint scores on val as it would be handed
    out: with the offsets fitted on val for that epoch, which the checkpoint carries."""
    from fer.evaluate.evaluate import predict_checkpoint
    from fer.train.posthoc import fit_offsets, macro_f1

    xv, yv = make_images(40, 16, seed=2)
    for rule in ("tau", "none"):
        calls = []
        run_fit(tiny_cfg(epochs=2, posthoc=rule), report=lambda m, c, s: calls.append((m, saved_and_loaded(c))))
        assert [m["epoch"] for m, _ in calls] == [1, 2]
        for metrics, ckpt in calls:
            model = model_from_checkpoint(ckpt, torch.device("cpu"))
            logits = predict_logits(model, xv, image_size=16).numpy()
            offsets = fit_offsets(logits, yv, np.asarray(ckpt["class_counts"]), rule)
            assert ckpt["posthoc_offsets"] == pytest.approx(offsets.tolist(), abs=1e-6)
            assert metrics["val_macro_f1_posthoc"] == pytest.approx(macro_f1(yv, logits, offsets))
            assert metrics["val_macro_f1_posthoc"] >= metrics["val_macro_f1"] - 1e-12  # the grid holds tau 0
            scored, _, _ = predict_checkpoint(ckpt, xv, yv, device="cpu")
            assert scored["macro_f1"] == pytest.approx(metrics["val_macro_f1_posthoc"])
            if rule == "none":
                assert metrics["val_macro_f1_posthoc"] == metrics["val_macro_f1"]


def test_three_channel_images_and_sample_weights():
    x, y = make_images(64, 16, seed=1)
    x3 = np.ascontiguousarray(np.repeat(x, 3, axis=-1))
    xv, yv = make_images(24, 16, seed=2)
    cfg = tiny_cfg()
    stage = Stage.of(cfg, "teacher", x3, y, np.bincount(y, minlength=4),
                     sample_weight=np.full(len(y), 0.5, dtype=np.float32))
    result = fit(cfg, stage, Split(np.repeat(xv, 3, axis=-1), yv), CLASSES, progress=False, device="cpu")
    assert result.checkpoint["in_channels"] == 3 and math.isfinite(result.history[0]["train_loss"])


def test_cpu_trains_and_predicts_channels_last_where_it_pays(monkeypatch):
    """fer.train.infer.memory_format: depthwise convolutions or 128 px and up take channels_last on
    CPU (benchmarks/cpu_step.py --formats), a ResNet on small images NCHW, channels_last=False never;
    fit trains in the chosen format (seen in the first convolution's output), and its checkpoint
    predicts the same in a fresh NCHW model."""
    from fer.train.infer import memory_format
    from fer.train.models import build_model

    cpu = torch.device("cpu")
    mobile, resnet = build_model("mobilenet_v3_small", 4, 1), build_model("resnet10t", 4, 1)
    assert memory_format(mobile, cpu, 48) == torch.channels_last
    assert memory_format(resnet, cpu, 48) == torch.contiguous_format
    assert memory_format(resnet, cpu, 128) == torch.channels_last
    assert memory_format(mobile, cpu, 224, enabled=False) == torch.contiguous_format

    seen = []  # (training, layout of the first convolution's output) per forward

    def watched(*args, **kwargs):
        model = build_model(*args, **kwargs)
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first.register_forward_hook(lambda m, i, out: seen.append(
            (m.training, "NCHW" if out.is_contiguous() else "channels_last")))
        return model

    monkeypatch.setattr(fer.train.fitting, "build_model", watched)
    x, y = make_images(64, 16, seed=1)
    xv, yv = make_images(24, 16, seed=2)
    trained = {}
    for cfg, layout in ((tiny_cfg(), "channels_last"), (tiny_cfg(channels_last=False), "NCHW"),
                        (tiny_cfg(model="resnet10t"), "NCHW")):
        seen.clear()
        result = fit(cfg, Stage.of(cfg, "teacher", x, y, np.bincount(y, minlength=4)), Split(xv, yv), CLASSES,
                     progress=False, device="cpu")
        assert {out for training, out in seen if training} == {layout}, cfg
        trained.setdefault(layout, result)
    loaded = model_from_checkpoint(saved_and_loaded(trained["channels_last"].checkpoint))
    torch.testing.assert_close(predict_logits(loaded, xv, image_size=16, device="cpu"),
                               predict_logits(trained["channels_last"].model, xv, image_size=16, device="cpu"),
                               atol=1e-4, rtol=1e-4)


def test_same_seed_same_weights_on_cpu():
    cfg = tiny_cfg(augment="weak", dropout=0.2, batch_size=48)
    a = run_fit(cfg).model.state_dict()
    b = run_fit(cfg).model.state_dict()
    c = run_fit(tiny_cfg(augment="weak", dropout=0.2, batch_size=48, seed=1)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nan_loss_raises_naming_the_epoch(monkeypatch):
    class NanLoss(nn.Module):
        def forward(self, logits, targets, sample_weight=None):
            return logits.sum() * float("nan")

    monkeypatch.setattr(fer.train.fitting, "build_loss", lambda cfg, counts: NanLoss())
    with pytest.raises(FloatingPointError, match="loss became NaN at epoch 3"):
        run_fit(tiny_cfg(), epoch_offset=2)


def test_patience_stops_after_epochs_without_improvement(monkeypatch):
    fixed = np.diag([10, 10, 10, 10])
    monkeypatch.setattr(fer.train.fitting, "validate",
                        lambda model, val, *args, **kwargs: (fixed, 1.0, np.eye(4, dtype=np.float32)[val.labels]))
    states = []
    result = run_fit(tiny_cfg(epochs=6, patience=2), report=lambda m, c, s: states.append(dict(s)))
    assert len(result.history) == 3 and result.stopped_early and result.best_epoch == 1
    assert [s["stopped_early"] for s in states] == [False, False, True]
    # resumed from the epoch patience ended, the stage stays ended: no epoch trained
    reports = []
    resumed = run_fit(tiny_cfg(epochs=6, patience=2), resume=states[-1], report=lambda m, c, s: reports.append(m))
    assert reports == [] and resumed.stopped_early and len(resumed.history) == 3 and resumed.best_epoch == 1


def test_short_training_beats_chance():
    cfg = tiny_cfg(epochs=2, batch_size=16, augment="weak", lr=5e-3)
    result = run_fit(cfg, n_train=128, n_val=48)
    assert result.best_metrics["val_macro_f1"] > 0.5  # chance is about 0.25 for 4 classes


def test_checkpoint_round_trip(tmp_path):
    result = run_fit(tiny_cfg())
    path = save_checkpoint(result.checkpoint, tmp_path / "best.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["classes"] == CLASSES and ckpt["config"]["image_size"] == 16
    model = model_from_checkpoint(ckpt)
    x, _ = make_images(8, 16, seed=5)
    torch.testing.assert_close(predict_logits(model, x, image_size=16), predict_logits(result.model, x, image_size=16))


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt: not a readable checkpoint"):
        load_checkpoint(bad)


@pytest.mark.parametrize("n", [7, 8, 9])
def test_rank_shards_equal_length_and_covering(n):
    order = np.arange(n)[::-1].copy()
    parts = [rank_indices(order, Ranks(rank=r, world=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == math.ceil(n / 2)
    assert set(np.concatenate(parts)) == set(order)


def test_trailing_single_image_batch_dropped():
    assert batch_bounds(33, 16) == [(0, 16), (16, 32)]
    assert batch_bounds(34, 16) == [(0, 16), (16, 32), (32, 34)]


def test_cli_unknown_key_is_one_line_error(tmp_path, capsys):
    assert main(["--set", "bogus_key=1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'bogus_key'" in err and "Valid keys:" in err and "batch_size" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _ddp_worker(rank, world, store, out, cfg_kwargs, data):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fer.train.fitting.build_model = tiny_model
        x, y, xv, yv = data
        reports = []
        cfg = TrialConfig(**cfg_kwargs)
        result = fit(cfg, Stage.of(cfg, "teacher", x, y, np.bincount(y, minlength=4)), Split(xv, yv), CLASSES,
                     report=lambda m, c, s: reports.append(m), progress=False, device="cpu")
        preds = predict_logits(result.model, xv, image_size=cfg_kwargs["image_size"]).argmax(1).numpy()
        torch.save({"state": result.model.state_dict(), "reports": reports, "cm": result.best_confusion,
                    "best": result.best_metrics, "full": compute_metrics(yv, preds, CLASSES)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process_on_the_global_batch(tmp_path, monkeypatch):
    x, y = make_images(64, 16, seed=1)
    xv, yv = make_images(21, 16, seed=2)  # odd: the ranks' validation blocks differ in size
    base = dict(image_size=16, epochs=2, augment="none", dropout=0.0, warmup_epochs=0, optimizer="sgd",
                momentum=0.0, weight_decay=0.0, grad_clip=0.0, lr=0.5, amp=False, epoch_images=0)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), {**base, "batch_size": 8},
                                (x, y, xv, yv)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    monkeypatch.setattr(fer.train.fitting, "build_model", tiny_model)
    cfg = TrialConfig(**base, batch_size=16)
    single = fit(cfg, Stage.of(cfg, "teacher", x, y, np.bincount(y, minlength=4)), Split(xv, yv), CLASSES,
                 progress=False, device="cpu")
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ranks[1]["state"][key], ranks[0]["state"][key])
    for rank in ranks:  # every rank reports metrics of the WHOLE validation split
        assert np.array_equal(rank["cm"], np.asarray(rank["full"]["confusion"]))
        assert rank["best"]["val_macro_f1"] == pytest.approx(rank["full"]["macro_f1"])
        assert rank["cm"].sum() == len(yv)
    assert [m["epoch"] for m in ranks[0]["reports"]] == [1, 2]
    timing = ("train_seconds", "train_images_per_s")
    same = [{k: v for k, v in m.items() if k not in timing} for m in ranks[0]["reports"]]
    assert same == [{k: v for k, v in m.items() if k not in timing} for m in ranks[1]["reports"]]


def test_cli_trains_and_writes_checkpoint_metrics_tensorboard_png(tmp_path, monkeypatch, capsys):
    from fer.data.synth import write_csv

    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    csv = write_csv(str(tmp_path / "data"), seed=0, scale=0.02)
    out = tmp_path / "run"
    argv = ["--data", csv, "--epochs", "1", "--set", "image_size=24", "--set", "batch_size=32",
            "--set", "model=mobilenet_v3_small", "--set", "epoch_images=0", "--set", "student_epochs=0",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert load_checkpoint(out / "best.pt")["config"]["image_size"] == 24
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["best_epoch"] == 1 and "val_macro_f1" in summary["val"] and "macro_f1" in summary["test"]
    assert (out / "val_confusion.png").stat().st_size > 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))
    assert "best epoch 1: val macro-F1" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resuming_after_any_epoch_ends_exactly_as_the_uninterrupted_run(optimizer):
    """Augmentation, dropout, warmup + cosine, the optimizer's moments and the best-so-far
    epoch all carry over: the resumed run's weights and history are identical on CPU."""
    cfg = tiny_cfg(epochs=3, augment="weak", dropout=0.2, warmup_epochs=1, optimizer=optimizer, batch_size=40)
    states = []
    whole = run_fit(cfg, report=lambda m, c, s: states.append(saved_and_loaded(s)))
    assert [s["epoch"] for s in states] == [1, 2, 3]
    for state in states:
        reports = []
        resumed = run_fit(cfg, resume=state, report=lambda m, c, s: reports.append(m["epoch"]))
        assert reports == list(range(state["epoch"] + 1, 4))  # only the epochs not yet run
        assert untimed(resumed.history) == untimed(whole.history)
        assert resumed.best_epoch == whole.best_epoch
        assert untimed([resumed.best_metrics]) == untimed([whole.best_metrics])
        a, b = whole.model.state_dict(), resumed.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert resumed.checkpoint["epoch"] == whole.checkpoint["epoch"]


def test_a_resume_state_that_does_not_fit_the_stage_is_refused():
    states = []
    run_fit(tiny_cfg(epochs=2), report=lambda m, c, s: states.append(saved_and_loaded(s)))
    with pytest.raises(ValueError, match="after epoch 2 of a 1-epoch stage"):
        run_fit(tiny_cfg(epochs=1), resume=states[1])
    with pytest.raises(ValueError, match="missing optimizer"):
        run_fit(tiny_cfg(epochs=2), resume={k: v for k, v in states[0].items() if k != "optimizer"})


@pytest.mark.parametrize("text, expected", [
    ("lr: [1\nepochs: 2\n", "not valid YAML: line 2, column 7: expected ',' or ']'"),
    ("!!python/object/apply:os.system [echo pwned]\n", "Python tags are refused"),
])
def test_train_cli_names_a_broken_config_file_in_one_line(text, expected, tmp_path, capsys):
    config = tmp_path / "trial.yaml"
    config.write_text(text)
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: ") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_progress_off_a_terminal_is_one_line_per_epoch(capsys):
    """A log file (nohup, ray job submit, CI) gets one line per epoch, no tqdm frames."""
    x, y = make_images(96, 16, seed=1)
    xv, yv = make_images(40, 16, seed=2)
    cfg = tiny_cfg(epochs=2)
    fit(cfg, Stage.of(cfg, "teacher", x, y, np.bincount(y, minlength=4)), Split(xv, yv), CLASSES,
        progress=True, device="cpu")
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("teacher epoch ")]
    assert [line.split(":")[0] for line in lines] == ["teacher epoch 1", "teacher epoch 2"]
    assert "val macro-F1" in lines[0] and "\r" not in out + err


@pytest.mark.parametrize("epochs", [1, 2, 8])
def test_the_schedule_warms_up_then_decays_to_near_zero_in_every_stage_length(epochs):
    """A 1-epoch stage with warmup_epochs=1 (the search's student) once spent its whole epoch
    ramping up and ended at the peak rate; the warmup now takes at most half a stage, and
    longer stages keep their one-epoch warmup."""
    from fer.train.loop import build_optimizer, build_scheduler

    cfg = TrialConfig(lr=0.01, warmup_epochs=1, optimizer="adamw")
    optimizer = build_optimizer(cfg, nn.Linear(4, 3))
    steps = 24
    scheduler = build_scheduler(optimizer, cfg, steps, epochs)
    rates = []
    for step in range(epochs * steps):  # as fer.train.loop.Loop: the lr each step trains with
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if step < epochs * steps - 1:
            scheduler.step()
    peak = int(np.argmax(rates))
    assert peak == min(steps, epochs * steps // 2)
    assert rates[peak] == pytest.approx(0.01)
    assert rates[0] == pytest.approx(1e-4)
    assert rates[-1] < 0.01 * 0.05


def test_a_stage_with_a_weight_average_validates_keeps_and_resumes_the_average():
    """student_ema: every epoch validates the average of the weights (its checkpoint holds it,
    and scores on val what the epoch reported); the live weights and the average both resume."""
    from fer.train.posthoc import macro_f1

    cfg = tiny_cfg(student_epochs=3, student_ema=0.9)
    calls = []
    whole = run_fit(cfg, stage="student", report=lambda m, c, s: calls.append((m, saved_and_loaded(c),
                                                                                saved_and_loaded(s))))
    xv, yv = make_images(40, 16, seed=2)
    for metrics, ckpt, state in calls:
        average = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
        assert all(torch.equal(ckpt["model"][k], average[k]) for k in ckpt["model"])
        assert not all(torch.equal(state["model"][k], average[k]) for k in state["model"])  # the live ones differ
        logits = predict_logits(model_from_checkpoint(ckpt, torch.device("cpu")), xv, image_size=16).numpy()
        assert macro_f1(yv, logits) == pytest.approx(metrics["val_macro_f1"])
    for _, _, state in calls[:-1]:
        resumed = run_fit(cfg, stage="student", resume=state)
        assert untimed(resumed.history) == untimed(whole.history)
        a, b = whole.checkpoint["model"], resumed.checkpoint["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="student: the resume state has no weight average, but the stage keeps one"):
        run_fit(cfg, stage="student", resume={k: v for k, v in calls[0][2].items() if k != "ema"})
    # stage 1 never averages: the teacher's state has none
    states = []
    run_fit(tiny_cfg(epochs=1, student_ema=0.9), report=lambda m, c, s: states.append(s))
    assert "ema" not in states[0]
