"""Pseudo-label selection on crafted probability tables, temperature scaling, CSV/summary."""

import csv

import numpy as np
import pytest
import torch

from fer.ssl.pseudo import (
    aligned_quotas,
    SELECTIONS,
    crest_keep_rates,
    fit_temperature,
    get_selection,
    select_pseudo_labels,
    summarize_selection,
    write_pseudo_csv,
)
from fer.train.consistency import flexmatch_thresholds


def table(rows, num_classes=3):
    """Probability rows from (predicted class, confidence); the rest is spread evenly."""
    probs = np.empty((len(rows), num_classes))
    for i, (label, conf) in enumerate(rows):
        probs[i] = (1.0 - conf) / (num_classes - 1)
        probs[i, label] = conf
    return probs


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_every_selection_returns_aligned_arrays(selection):
    probs = table([(0, 0.95), (1, 0.5), (2, 0.97), (0, 0.4)])
    idx, labels, conf = select_pseudo_labels(probs, selection=selection, threshold=0.9,
                                             class_counts=np.array([10, 5, 2]), crest_alpha=0.5)
    assert len(idx) == len(labels) == len(conf)
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(labels, probs[idx].argmax(1))
    np.testing.assert_allclose(conf, probs[idx].max(1), rtol=1e-6)


def test_threshold_keeps_confident_only():
    probs = table([(0, 0.95), (1, 0.5), (2, 0.9), (0, 0.89), (1, 0.99)])
    idx, labels, conf = select_pseudo_labels(probs, selection="threshold", threshold=0.9,
                                             class_counts=np.array([1, 1, 1]))
    assert idx.tolist() == [0, 2, 4]
    assert labels.tolist() == [0, 2, 1]


def test_crest_keep_rates_favour_rare_classes():
    # counts ranked 0 > 1 > 2: class k gets (N_{K+1-k}/N_1)^alpha
    np.testing.assert_allclose(crest_keep_rates(np.array([100, 50, 20]), 1.0), [0.2, 0.5, 1.0])
    np.testing.assert_allclose(crest_keep_rates(np.array([20, 100, 50]), 1.0), [1.0, 0.2, 0.5])
    np.testing.assert_allclose(crest_keep_rates(np.array([100, 50, 20]), 0.0), [1, 1, 1])
    # a class with no training samples is left out of the ranking and kept fully
    np.testing.assert_allclose(crest_keep_rates(np.array([100, 0, 25]), 0.5), [0.5, 1.0, 1.0])


def test_crest_caps_each_class_keeping_most_confident():
    rows = [(0, 0.91 + 0.008 * i) for i in range(10)]          # 0..9: majority, rate 0.2 -> 2 kept
    rows += [(1, 0.93), (1, 0.97), (1, 0.95), (1, 0.92)]       # 10..13: rate 0.5 -> 2 kept
    rows += [(2, 0.91), (2, 0.99), (2, 0.9)]                   # 14..16: rate 1 -> all kept
    rows += [(2, 0.6), (0, 0.5)]                               # 17, 18: below threshold
    idx, labels, _ = select_pseudo_labels(table(rows), selection="crest", threshold=0.9,
                                          class_counts=np.array([100, 50, 20]), crest_alpha=1.0)
    assert idx.tolist() == [8, 9, 11, 12, 14, 15, 16]
    assert np.bincount(labels, minlength=3).tolist() == [2, 2, 3]


def test_aligned_keeps_as_many_as_threshold_shared_out_by_the_labelled_prior():
    rows = [(0, 0.99 - 0.001 * i) for i in range(10)]      # 0..9: the easy class, all confident
    rows += [(1, 0.6), (1, 0.8), (1, 0.7)]                  # 10..12: below the threshold
    rows += [(2, 0.5)]                                      # 13: rare, one candidate
    probs = table(rows)
    # 10 would pass the threshold; the prior 6:3:1 makes the quotas 6, 3 and 1
    idx, labels, conf = select_pseudo_labels(probs, selection="aligned", threshold=0.9,
                                             class_counts=np.array([60, 30, 10]))
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13]  # each class's most confident first
    assert np.bincount(labels, minlength=3).tolist() == [6, 3, 1]
    threshold_idx, _, _ = select_pseudo_labels(probs, selection="threshold", threshold=0.9)
    assert len(idx) == len(threshold_idx) == 10
    assert aligned_quotas(10, np.array([60, 30, 10])).tolist() == [6, 3, 1]
    assert aligned_quotas(7, np.array([0, 0, 0])).tolist() == [2, 2, 2]  # no counts: uniform


def flex_rows():
    rows = [(0, 0.95)] * 10                      # 0..9   sigma_0 = 10
    rows += [(1, 0.95)] * 4 + [(1, 0.34)] * 2    # 10..15 sigma_1 = 4
    rows += [(2, 0.97)] + [(2, 0.5)] * 3         # 16..19 sigma_2 = 1
    rows += [(0, 0.6)]                           # 20     majority, not confident
    return rows


def test_flexmatch_thresholds_match_the_paper():
    probs = table(flex_rows())
    conf, pred = probs.max(1), probs.argmax(1)
    # sigma = [10, 4, 1], unused = 21 - 15 = 6 < max sigma, so beta = sigma / 10
    linear = flexmatch_thresholds(conf, pred, 3, 0.9, mapping="linear")
    np.testing.assert_allclose(linear, [0.9, 0.36, 0.09])
    convex = flexmatch_thresholds(conf, pred, 3, 0.9)  # M(x) = x / (2 - x)
    np.testing.assert_allclose(convex, [0.9, 0.9 * 0.4 / 1.6, 0.9 * 0.1 / 1.9])
    # warmup: when most of the pool is unused, that count normalises instead
    big_pool = np.concatenate([conf, np.full(30, 0.5)]), np.concatenate([pred, np.zeros(30, int)])
    warm = flexmatch_thresholds(*big_pool, 3, 0.9, mapping="linear")
    np.testing.assert_allclose(warm, 0.9 * np.array([10, 4, 1]) / 36)
    cold = flexmatch_thresholds(*big_pool, 3, 0.9, mapping="linear", warmup=False)
    np.testing.assert_allclose(cold, [0.9, 0.36, 0.09])


def test_flexmatch_selects_with_adaptive_thresholds():
    idx, labels, _ = select_pseudo_labels(table(flex_rows()), selection="flexmatch", threshold=0.9,
                                          class_counts=np.array([100, 50, 20]))
    # class 0 keeps only >= 0.9; class 1 (T=0.225) keeps its 0.34s; class 2 (T=0.047) keeps all
    assert idx.tolist() == list(range(20))
    assert 20 not in idx.tolist()


def test_unknown_selection_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown pseudo-label selection 'topk'.*threshold, crest, flexmatch"):
        get_selection("topk")
    with pytest.raises(ValueError, match="3 class counts for 2 classes"):
        select_pseudo_labels(np.full((2, 2), 0.5), class_counts=np.array([1, 2, 3]))


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(6000, 5))
    true_t = 2.0
    probs = torch.softmax(torch.from_numpy(logits) / true_t, dim=1).numpy()
    labels = np.array([rng.choice(5, p=p / p.sum()) for p in probs])
    assert abs(fit_temperature(logits, labels) - true_t) < 0.15
    assert fit_temperature(np.zeros((0, 5)), np.zeros(0, int)) == 1.0


def test_csv_and_summary(tmp_path):
    classes = ["a", "b", "c"]
    path = write_pseudo_csv(str(tmp_path / "pseudo_labeled.csv"), np.array([3, 7]), np.array([1, 2]),
                            np.array([0.95, 0.91]), classes)
    with open(path) as handle:
        rows = list(csv.reader(handle))
    assert rows == [["pool_index", "label", "confidence", "class"],
                    ["3", "1", "0.950000", "b"], ["7", "2", "0.910000", "c"]]
    summary, text = summarize_selection(np.array([0, 0, 1, 0]), classes,
                                        true_labels=np.array([0, 1, 1, 0]), pool_size=10)
    assert summary["per_class"]["a"] == {"kept": 3, "precision": pytest.approx(2 / 3)}
    assert summary["per_class"]["b"] == {"kept": 1, "precision": 1.0}
    assert summary["per_class"]["c"] == {"kept": 0, "precision": None}
    assert summary["precision"] == 0.75 and summary["kept"] == 4
    assert "precision" in text and "of 10 pool images" in text
    no_truth, text = summarize_selection(np.array([2]), classes)
    assert "precision" not in no_truth and "precision" not in text


def test_predict_pool_probabilities_and_temperature():
    from torch import nn

    from fer.ssl.pseudo import predict_pool
    from fer.train.infer import gather_rows

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    images = np.random.default_rng(0).integers(0, 256, (10, 12, 12, 1), dtype=np.uint8)
    probs = predict_pool(model, images, image_size=12, batch_size=4)
    assert probs.shape == (10, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    hot = predict_pool(model, images, image_size=12, temperature=0.1)
    flat = predict_pool(model, images, image_size=12, temperature=10.0)
    assert hot.max(1).mean() > probs.max(1).mean() > flat.max(1).mean()
    np.testing.assert_array_equal(hot.argmax(1), probs.argmax(1))  # temperature keeps the argmax
    assert predict_pool(model, images, image_size=12, tta=True).shape == (10, 3)
    assert predict_pool(model, images[:0], image_size=12).shape == (0, 3)
    # without torch.distributed, gather_rows just puts rows back at their indices
    np.testing.assert_array_equal(gather_rows(np.array([[1], [2]]), np.array([1, 0]), 2), [[2], [1]])
