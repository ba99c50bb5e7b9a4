import json

import numpy as np
import pytest
import torch

from fer.checkpoint import make_checkpoint, save_checkpoint
from fer.config import TrialConfig
from fer.data import FER_CLASSES
from fer.evaluate import evaluate_model, main, predict_logits
from fer.metrics import compute_metrics
from fer.models import build_model
from fer.synth import write_csv


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def checkpoint(tmp_path):
    """An untrained model's checkpoint whose config points at a tiny generated FER CSV."""
    csv = write_csv(str(tmp_path / "data"), seed=0, scale=0.02)
    cfg = TrialConfig(data=str(csv), image_size=24)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(FER_CLASSES), in_channels=1)
    ckpt = make_checkpoint(model.state_dict(), cfg, FER_CLASSES, np.ones(7, dtype=np.int64), epoch=1,
                           stage="teacher", metrics={}, in_channels=1)
    return save_checkpoint(ckpt, tmp_path / "run" / "best.pt")


def _images(n=12, size=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), rng.integers(0, 7, n)


def test_evaluate_model_matches_compute_metrics_on_argmax():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 7, in_channels=1).eval()
    x, y = _images()
    metrics, probs = evaluate_model(model, x, y, FER_CLASSES, image_size=24, batch_size=5)
    logits = predict_logits(model, x, image_size=24, batch_size=5)
    assert probs.shape == (12, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    expected = compute_metrics(y, logits.argmax(1).numpy(), FER_CLASSES, probs=probs)
    assert metrics["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert metrics["confusion"] == expected["confusion"]


def test_offsets_shift_the_decision_not_the_probabilities():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 7, in_channels=1).eval()
    x, y = _images()
    plain, probs = evaluate_model(model, x, y, FER_CLASSES, image_size=24)
    offsets = [0.0, 0.0, 1e4, 0.0, 0.0, 0.0, 0.0]
    shifted, probs2 = evaluate_model(model, x, y, FER_CLASSES, image_size=24, offsets=offsets)
    assert np.asarray(shifted["confusion"])[:, 2].sum() == len(y)
    np.testing.assert_allclose(probs, probs2)


def test_tta_averages_views():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 7, in_channels=1).eval()
    x, _ = _images(4)
    assert predict_logits(model, x, image_size=24, tta=True).shape == (4, 7)


def test_cli_writes_json_png_and_prints_table(checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["--checkpoint", str(checkpoint), "--split", "test", "--out", str(out)]) == 0
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and metrics["split"] == "test"
    assert sum(row["support"] for row in metrics["per_class"].values()) == np.asarray(metrics["confusion"]).sum()
    assert (out / "test_confusion.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Disgust" in printed and "test_metrics.json" in printed


def test_cli_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(["--checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: checkpoint file not found" in err and "Traceback" not in err
