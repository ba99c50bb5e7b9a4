import json

import numpy as np
import pytest
import torch

from fer.data import FER_CLASSES
from fer.data.synth import write_csv
from fer.evaluate.evaluate import evaluate_model, main
from fer.train.checkpoint import make_checkpoint, save_checkpoint
from fer.train.config import TrialConfig
from fer.train.infer import predict_logits
from fer.train.metrics import compute_metrics
from fer.train.models import build_model


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


# --- bootstrap CI, offsets, results CSV (issue 4) -------------------------------------


def test_bootstrap_interval_contains_the_point_estimate_and_narrows_with_n():
    from sklearn.metrics import f1_score

    from fer.evaluate.evaluate import bootstrap_macro_f1

    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1600):
        y = rng.integers(0, 4, n)
        pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 4, n))
        low, high = bootstrap_macro_f1(y, pred, 4, samples=300)
        assert low <= f1_score(y, pred, average="macro") <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x the images, about half the width
    assert bootstrap_macro_f1(y, pred, 4, samples=50) == bootstrap_macro_f1(y, pred, 4, samples=50)



@pytest.mark.parametrize("n, classes, chunked", [(300, 5, False), (40, 7, False), (2**21 + 3, 3, True)])
def test_bootstrap_scores_are_sklearns_macro_f1_on_each_resample(n, classes, chunked):
    """The counted macro-F1 of every resample equals sklearn's f1_score(average="macro",
    labels=range(K), zero_division=0) on the same resampled images, with classes that some
    resamples miss (7 classes in 40 images) and when the resamples are drawn in chunks."""
    from sklearn.metrics import f1_score

    from fer.evaluate.evaluate import _bootstrap_scores

    rng = np.random.default_rng(3)
    y = rng.integers(0, classes, n)
    a = np.where(rng.random(n) < 0.6, y, rng.integers(0, classes, n))
    b = rng.integers(0, classes - 1, n)  # never predicts the last class
    samples = 3 if chunked else 25
    scores = _bootstrap_scores(y, [a, b], classes, samples, seed=5)
    draw = np.random.default_rng(5)
    picks = [draw.integers(0, n, n) for _ in range(samples)] if chunked else draw.integers(0, n, (samples, n))
    for row, pick in zip(scores, picks):
        expected = [f1_score(y[pick], p[pick], labels=list(range(classes)), average="macro", zero_division=0)
                    for p in (a, b)]
        assert row == pytest.approx(expected, abs=1e-12)


def test_paired_bootstrap_matches_a_hand_computed_case():
    """Two images, labels [0, 1]; a is right on both, b wrong on both. The 4 equally likely
    resamples: {0,1} and {1,0} give a 1.0 and b 0.0; {0,0} gives a 0.5 (class 1 absent
    counts 0 with zero_division=0) and b 0.0; {1,1} likewise. So the difference is 0.5 or
    1.0 with probability 1/2 each: the 2.5th percentile is 0.5, the 97.5th 1.0, and the
    point estimate on the two images is 1.0."""
    from fer.evaluate.evaluate import paired_bootstrap_macro_f1

    labels, right, wrong = np.array([0, 1]), np.array([0, 1]), np.array([1, 0])
    point, low, high = paired_bootstrap_macro_f1(labels, right, wrong, 2, samples=400)
    assert (point, low, high) == (1.0, 0.5, 1.0)
    point, low, high = paired_bootstrap_macro_f1(labels, wrong, right, 2, samples=400)
    assert (point, low, high) == (-1.0, -1.0, -0.5)
    # the same predictions: every resample's difference is exactly 0
    assert paired_bootstrap_macro_f1(labels, right, right, 2, samples=50) == (0.0, 0.0, 0.0)


def test_paired_interval_is_narrower_than_the_unpaired_one():
    """Two similar models: the paired interval of the difference resolves what two separate
    intervals (which overlap) cannot."""
    from fer.evaluate.evaluate import bootstrap_macro_f1, paired_bootstrap_macro_f1

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 800)
    b = np.where(rng.random(800) < 0.6, y, rng.integers(0, 4, 800))
    a = np.where(rng.random(800) < 0.25, y, b)  # b, with a quarter of its answers fixed
    point, low, high = paired_bootstrap_macro_f1(y, a, b, 4, samples=300)
    assert 0 < low <= point <= high
    a_low, a_high = bootstrap_macro_f1(y, a, 4, samples=300)
    b_low, b_high = bootstrap_macro_f1(y, b, 4, samples=300)
    assert high - low < min(a_high - a_low, b_high - b_low)

def test_cli_reports_ci_offsets_tta_and_appends_csv_rows(checkpoint, tmp_path, capsys):
    csv_path = tmp_path / "compare.csv"
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "r"), "--csv", str(csv_path),
            "--bootstrap", "50"]
    assert main(args) == 0
    assert main(args + ["--tta"]) == 0
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "without post-hoc offsets" in printed
    import pandas as pd

    rows = pd.read_csv(csv_path)
    assert len(rows) == 2 and rows["tta"].tolist() == [False, True]
    assert (rows["macro_f1_ci_low"] <= rows["macro_f1"]).all() and (rows["macro_f1"] <= rows["macro_f1_ci_high"]).all()
    metrics = json.loads((tmp_path / "r" / "test_metrics.json").read_text())
    assert len(metrics["macro_f1_ci95"]) == 2 and "macro_f1" in metrics["without_offsets"]


def test_cli_default_csv_lands_in_the_output_folder(checkpoint, tmp_path):
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "r"), "--bootstrap", "10"]) == 0
    assert (tmp_path / "r" / "evaluations.csv").exists()


def test_offsets_from_the_checkpoint_change_metrics(tmp_path):
    from fer.evaluate.evaluate import evaluate_checkpoint

    csv = write_csv(str(tmp_path / "d"), seed=0, scale=0.02)
    cfg = TrialConfig(data=str(csv), image_size=24)
    torch.manual_seed(0)
    model = build_model(cfg.model, 7, in_channels=1)
    offsets = [0.0, 50.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # everything becomes Disgust
    ckpt = make_checkpoint(model.state_dict(), cfg, FER_CLASSES, np.ones(7, dtype=np.int64), epoch=1,
                           stage="student", metrics={}, in_channels=1, posthoc_offsets=offsets)
    path = save_checkpoint(ckpt, tmp_path / "best.pt")
    metrics = evaluate_checkpoint(str(path), out_dir=str(tmp_path / "r"), bootstrap=10)
    assert np.asarray(metrics["confusion"])[:, 1].sum() == np.asarray(metrics["confusion"]).sum()
    assert "macro_f1" in metrics["without_offsets"]
