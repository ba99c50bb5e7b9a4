"""ONNX export: parity with PyTorch on raw pixels, INT8 agreement, model card, CLI errors."""

import hashlib
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fer.train.models
from fer.data import Split
from fer.export.export import DeployModel, build_deploy_model, export_checkpoint, main
from fer.train.checkpoint import make_checkpoint, save_checkpoint
from fer.train.config import TrialConfig
from fer.train.transforms import make_eval_transform

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores
    yield
    torch.set_num_threads(threads)


def bar_images(n, size, seed, k=4):
    """Noise with a bright bar whose row band encodes the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    images = rng.integers(0, 80, (n, size, size, 1)).astype(np.uint8)
    band = size // k
    for i, label in enumerate(labels):
        images[i, label * band:(label + 1) * band, 2:size - 2] = 230
    return images, labels.astype(np.int64)


@pytest.fixture(scope="module")
def trained_ckpt():
    """mobilenet_v3_small at 24x24 trained for one epoch (so its predictions vary), with
    non-zero post-hoc offsets."""
    from fer.train.fitting import Stage, fit

    torch.set_num_threads(1)
    cfg = TrialConfig(model="mobilenet_v3_small", epoch_images=0, image_size=24, batch_size=32, epochs=2,
                      augment="none", warmup_epochs=0,
                      amp=False, lr=3e-3, dropout=0.0)
    x, y = bar_images(160, 24, 1)
    xv, yv = bar_images(48, 24, 2)
    result = fit(cfg, Stage.of(cfg, "teacher", x, y, np.bincount(y, minlength=4)), Split(xv, yv), CLASSES,
                 progress=False)
    ckpt = dict(result.checkpoint, posthoc_offsets=[0.3, -0.1, 0.0, -0.2])
    return ckpt


def test_parity_on_too_few_images_fails_saying_why(trained_ckpt, tmp_path, capsys):
    """Scores within tolerance on 13 images are no evidence: FAILED, and the line says why."""
    images, labels = bar_images(13, 24, 3)
    export_checkpoint(trained_ckpt, str(tmp_path), images=images, labels=labels, latency_runs=1)
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert not parity["passed"] and parity["max_abs_score_diff"] <= 1e-4 and parity["top1_identical"]
    assert "FAILED (only 13 images: the check needs at least 64, data set too small)" in capsys.readouterr().out


def test_export_parity_int8_and_card(trained_ckpt, tmp_path):
    images, labels = bar_images(80, 24, 3)
    card = export_checkpoint(trained_ckpt, str(tmp_path), images=images, labels=labels, int8=True,
                             latency_runs=5)
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert parity["passed"] and parity["images"] == 80
    assert parity["max_abs_score_diff"] <= 1e-4 and parity["top1_identical"]
    on_disk = json.loads((tmp_path / "model_card.json").read_text())
    assert on_disk["sha256"] == hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest()
    assert on_disk["classes"] == CLASSES
    assert on_disk["input"]["shape"] == ["batch", 24, 24, 1] and on_disk["input"]["dtype"] == "uint8"
    assert on_disk["latency"]["median_ms"] > 0
    assert on_disk["config"]["image_size"] == 24
    assert set(on_disk["metrics"]) >= {"checkpoint", "onnx_fp32", "onnx_fp32_without_offsets"}
    # INT8: loads, agrees with fp32 on most images, change in accuracy / macro-F1 reported
    int8 = card["int8"]
    session = ort.InferenceSession(str(tmp_path / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"pixels": images[:3]})[0].shape == (3, 4)
    assert int8["top1_agreement_with_fp32"] >= 0.8
    assert {"accuracy_change", "macro_f1_change"} <= set(int8)


def test_graph_has_dynamic_batch_and_adds_offsets(trained_ckpt, tmp_path):
    images, _ = bar_images(70, 24, 4)
    export_checkpoint(trained_ckpt, str(tmp_path), images=images, latency_runs=2)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    module = build_deploy_model(trained_ckpt, (24, 24))
    with torch.no_grad():
        raw = module.model(make_eval_transform(24)(torch.from_numpy(images).permute(0, 3, 1, 2))).numpy()
    for batch in (1, 5):
        scores = session.run(None, {"pixels": images[:batch]})[0]
        np.testing.assert_allclose(scores, raw[:batch] + np.array([0.3, -0.1, 0.0, -0.2]), atol=1e-4)


@pytest.mark.parametrize("stored, size", [(24, 24), (24, 40), (40, 24)])
def test_preprocessing_matches_the_eval_transform(trained_ckpt, stored, size):
    model = fer.train.models.build_model("mobilenet_v3_small", 4)
    module = DeployModel(model, image_size=size, input_hw=(stored, stored), offsets=None, num_classes=4)
    pixels = torch.from_numpy(bar_images(8, stored, 5)[0])
    ours = module.preprocess(pixels)
    reference = make_eval_transform(size)(pixels.permute(0, 3, 1, 2))
    # exact without a resize; torchvision resizes uint8 with a fixed-point kernel (+-1 gray level)
    tolerance = 1e-6 if stored == size else 2 / 255 + 1e-6
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= tolerance


@pytest.mark.slow
def test_antialiased_downscale_exports_with_dynamo(trained_ckpt, tmp_path):
    ckpt = dict(trained_ckpt, config=dict(trained_ckpt["config"], image_size=16))
    images, _ = bar_images(64, 24, 6)
    card = export_checkpoint(ckpt, str(tmp_path), images=images, latency_runs=2)
    assert card["exporter"] == "dynamo" and card["parity"]["passed"]


def test_cli_missing_and_corrupt_checkpoint_are_one_line_errors(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'nope.pt'}: checkpoint file not found"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and "Traceback" not in err


def test_cli_on_a_fer_csv(tmp_path, monkeypatch, capsys):
    """A random-weight 48x48 checkpoint exported with the data set's real images (test split
    topped up from val/train to 64)."""
    from fer.data.synth import write_csv

    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    csv_path = write_csv(str(tmp_path / "data"), seed=0, scale=0.03)
    classes = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
    cfg = TrialConfig(data=csv_path)
    torch.manual_seed(0)
    model = fer.train.models.build_model(cfg.model, 7, in_channels=1)
    ckpt = make_checkpoint(model.state_dict(), cfg, classes, np.ones(7), epoch=1, stage="teacher",
                           metrics={}, in_channels=1, posthoc_offsets=None)
    path = save_checkpoint(ckpt, str(tmp_path / "best.pt"))
    assert main(["--checkpoint", path, "--out", str(tmp_path / "deploy"), "--latency-runs", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out
    parity = json.loads((tmp_path / "deploy" / "parity.json").read_text())
    assert parity["images"] >= 64 and "test" in parity["data"]
    assert os.path.exists(tmp_path / "deploy" / "model_card.json")


def test_a_top1_that_differs_only_in_a_near_tie_passes_and_says_so(monkeypatch, capsys):
    """Every score within the tolerance: a flipped top-1 can only be two scores within twice
    the tolerance of each other, so it passes (counted); a score beyond the tolerance fails."""
    from fer.export import export as onnx_export

    reference = np.tile(np.array([[2.0, 0.0, -1.0]], np.float32), (64, 1))
    reference[0] = [1.0, 1.00002, 0.0]
    scores = reference.copy()
    scores[0] = [1.00002, 1.0, 0.0]  # 2e-5 apart: the argmax flips
    monkeypatch.setattr(onnx_export, "run_torch", lambda module, images: reference)
    monkeypatch.setattr(onnx_export, "run_onnx", lambda path, images: scores)
    parity = onnx_export.check_parity(None, "model.onnx", np.zeros((64, 4, 4, 1), np.uint8))
    assert parity["passed"] and not parity["top1_identical"] and parity["top1_agreement"] == 63 / 64
    assert onnx_export.top1_line(parity) == "top-1 identical but for 1 near tie(s)"
    scores[1, 0] += 1e-3  # one score beyond the tolerance
    assert not onnx_export.check_parity(None, "model.onnx", np.zeros((64, 4, 4, 1), np.uint8))["passed"]


def test_inference_batches_are_bounded_in_bytes_with_the_same_scores(monkeypatch):
    """Large images are scored in smaller batches (fer.train.infer.BATCH_BYTES of float32
    input), with the same logits as whole batches; small images keep the asked batch size."""
    from fer.train import infer

    assert infer.bounded_batch(np.zeros((1, 48, 48, 1), np.uint8), 256) == 256
    assert infer.bounded_batch(np.zeros((1, 512, 512, 3), np.uint8), 256) == 42
    model = fer.train.models.build_model("mobilenet_v3_small", num_classes=4, in_channels=3, image_size=32).eval()
    images = np.random.default_rng(0).integers(0, 256, (20, 40, 40, 3), dtype=np.uint8)
    whole = infer.predict_logits(model, images, image_size=32, device="cpu")
    monkeypatch.setattr(infer, "BATCH_BYTES", 3 * 40 * 40 * 3 * 4)  # three images a batch
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (seen.append(len(x)), forward(x))[1])
    parted = infer.predict_logits(model, images, image_size=32, device="cpu")
    assert seen == [3] * 6 + [2]
    torch.testing.assert_close(parted, whole, rtol=1e-4, atol=1e-5)
