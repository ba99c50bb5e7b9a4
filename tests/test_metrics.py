import numpy as np
import pytest
from sklearn import metrics as skm

from fer.train.metrics import (
    compute_metrics,
    expected_calibration_error,
    format_per_class_table,
    metrics_from_confusion,
    plot_confusion,
)

CLASSES = ["Angry", "Disgust", "Fear", "Happy"]
Y_TRUE = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 2])
Y_PRED = np.array([0, 2, 0, 1, 2, 3, 3, 3, 0, 3, 2, 2])

SCALARS = ["accuracy", "macro_f1", "weighted_f1", "balanced_accuracy", "kappa"]


def test_equal_to_sklearn():
    m = compute_metrics(Y_TRUE, Y_PRED, CLASSES)
    labels = list(range(4))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="weighted"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y_TRUE, Y_PRED))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(Y_TRUE, Y_PRED, weights="quadratic"))
    assert m["confusion"] == skm.confusion_matrix(Y_TRUE, Y_PRED, labels=labels).tolist()
    p, r, f, s = skm.precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=labels)
    for k, name in enumerate(CLASSES):
        assert m["per_class"][name] == pytest.approx({"precision": p[k], "recall": r[k], "f1": f[k], "support": s[k]})
    assert "ece" not in m


def test_absent_class_scored_as_zero():
    # class 3 ("Happy") never occurs nor is predicted: F1 0, it still counts in macro-F1
    y = np.array([0, 1, 2, 0])
    m = compute_metrics(y, y, CLASSES)
    assert m["per_class"]["Happy"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(1.0)
    assert len(m["confusion"]) == 4


def _random_case(seed, n, k=5):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(k, n, p=[0.5, 0.3, 0.1, 0.1, 0.0])
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, k, n))
    return y_true, y_pred


@pytest.mark.parametrize(("seed", "n"), [(0, 1), (1, 10), (2, 200), (3, 1000)])
def test_confusion_route_equals_direct(seed, n):
    classes = list("abcde")
    y_true, y_pred = _random_case(seed, n)
    direct = compute_metrics(y_true, y_pred, classes)
    via_cm = metrics_from_confusion(np.array(direct["confusion"]), classes)
    assert via_cm == direct


def test_confusion_route_sums_shards():
    # what DDP does: each rank's matrix, summed, gives the whole split's metrics
    classes = list("abcde")
    y_true, y_pred = _random_case(7, 301)
    whole = compute_metrics(y_true, y_pred, classes)
    parts = [np.array(compute_metrics(y_true[r::3], y_pred[r::3], classes)["confusion"]) for r in range(3)]
    assert metrics_from_confusion(sum(parts), classes) == whole


def test_empty_split():
    direct = compute_metrics(np.zeros(0, int), np.zeros(0, int), CLASSES, probs=np.zeros((0, 4)))
    via_cm = metrics_from_confusion(np.zeros((4, 4), int), CLASSES)
    assert direct.pop("ece") == 0.0
    assert direct == via_cm
    assert via_cm["macro_f1"] == 0.0 and via_cm["per_class"]["Fear"]["support"] == 0


def test_degenerate_kappa_is_zero():
    m = compute_metrics(np.zeros(5, int), np.zeros(5, int), CLASSES)
    assert m["kappa"] == 0.0 and m["accuracy"] == 1.0


def test_ece_known_case():
    # two occupied bins: 4 samples at confidence 0.9 (3 right), 2 at 0.6 (1 right)
    probs = np.array([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 2)
    y_true = np.array([0, 0, 0, 1, 1, 0])
    expected = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(0.5 - 0.6)
    assert expected_calibration_error(y_true, probs) == pytest.approx(expected)
    m = compute_metrics(y_true, probs.argmax(1), ["x", "y"], probs=probs)
    assert m["ece"] == pytest.approx(expected)


def test_ece_perfectly_calibrated_is_zero():
    probs = np.array([[1.0, 0.0]] * 3)
    assert expected_calibration_error(np.zeros(3, int), probs) == 0.0


def test_bad_inputs_messages():
    with pytest.raises(ValueError, match=r"y_pred has labels outside 0..3"):
        compute_metrics(np.array([0, 1]), np.array([0, 7]), CLASSES)
    with pytest.raises(ValueError, match=r"must be 4x4 for 4 classes"):
        metrics_from_confusion(np.zeros((3, 3)), CLASSES)
    with pytest.raises(ValueError, match=r"probs must have shape \(2, 4\)"):
        compute_metrics(np.array([0, 1]), np.array([0, 1]), CLASSES, probs=np.ones((2, 3)))


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_writes_png(tmp_path, normalize):
    cm = np.array(compute_metrics(Y_TRUE, Y_PRED, CLASSES)["confusion"])
    path = plot_confusion(cm, CLASSES, tmp_path / "sub" / "cm.png", normalize=normalize)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_format_table_lists_classes():
    m = compute_metrics(Y_TRUE, Y_PRED, CLASSES, probs=np.eye(4)[Y_PRED])
    table = format_per_class_table(m)
    for name in CLASSES:
        assert name in table
    assert "macro_f1" in table and "ece" in table
