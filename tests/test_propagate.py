"""fer.ssl.propagate: the label-spreading graph that helps the teacher label the pool, its choice
on val, the penultimate features it can be built on, and its place in the pipeline."""

import numpy as np
import pytest
import torch
from torch import nn

import fer.train.fitting
from fer.names import PSEUDO_GRAPHS
from fer.ssl.pipeline import run_pipeline
from fer.ssl.propagate import CANDIDATES, feature_space, graph_pseudo_probs, pixel_space, spread
from fer.train.config import TrialConfig, apply_overrides
from fer.train.infer import predict_features_sharded, predict_logits
from test_pipeline import make_data, tiny_cfg, tiny_model


def clusters(per_class, num_classes=3, seed=0, spread_sd=0.05):
    """Points in tight clusters, one per class, far apart: a graph labels them perfectly."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = np.eye(num_classes) * 5.0
    return centres[labels] + rng.normal(0, spread_sd, (len(labels), num_classes)), labels


def test_spread_labels_unlabelled_points_by_their_cluster():
    train, train_labels = clusters(4, seed=0)
    rest, rest_labels = clusters(10, seed=1)
    dist = spread(np.concatenate([train, rest]), train_labels, num_classes=4)
    assert dist.shape == (30, 4)  # one row per unlabelled point, a column per class
    np.testing.assert_allclose(dist.sum(axis=1), 1.0)
    assert (dist.argmax(axis=1) == rest_labels).all()
    assert not dist[:, 3].any()  # a class the labels never name gets nothing


def test_pixel_space_downsamples_and_is_deterministic():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 48, 48, 1), dtype=np.uint8)
    space = pixel_space(images, seed=3)
    assert space.shape == (60, 50)
    np.testing.assert_array_equal(space, pixel_space(images, seed=3))
    small = pixel_space(rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8))
    assert small.shape == (20, 20)  # fewer images than components: as many components as images


def test_feature_space_rows_have_unit_norm():
    features = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(feature_space(features), [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]])


def _one_hot(labels, num_classes=3, confidence=0.9):
    probs = np.full((len(labels), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(labels)), labels] = confidence
    return probs


def _graph_case(seed=0):
    """A teacher that calls every class-2 image class 0, and a space whose clusters are right."""
    train, train_labels = clusters(5, seed=seed)
    pool, pool_labels = clusters(20, seed=seed + 1)
    val, val_labels = clusters(10, seed=seed + 2)
    wrong = lambda labels: np.where(labels == 2, 0, labels)  # noqa: E731
    good = np.concatenate([train, pool, val])
    noise = np.random.default_rng(seed).normal(size=good.shape)
    return (_one_hot(wrong(pool_labels)), _one_hot(wrong(val_labels)), train_labels, val_labels,
            pool_labels, {"pixels": good, "features": noise})


def test_auto_uses_the_graph_that_labels_val_best():
    teacher_pool, teacher_val, train_labels, val_labels, pool_labels, spaces = _graph_case()
    asked = []
    probs, summary = graph_pseudo_probs("auto", teacher_pool, teacher_val, train_labels, val_labels,
                                        lambda name: asked.append(name) or spaces[name])
    assert asked == ["pixels", "features"]
    assert summary["graph"] == "pixels"
    assert set(summary["graph_val_macro_f1"]) == {"none", "pixels", "features"}
    assert summary["graph_val_macro_f1"]["pixels"] > summary["graph_val_macro_f1"]["none"]
    assert (probs.argmax(axis=1) == pool_labels).all()  # the graph fixed the teacher's class-2 mistakes
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_auto_keeps_the_teacher_when_no_graph_labels_val_better():
    teacher_pool, teacher_val, train_labels, val_labels, pool_labels, spaces = _graph_case()
    right_pool, right_val = _one_hot(pool_labels), _one_hot(val_labels)  # a teacher that is always right
    probs, summary = graph_pseudo_probs("auto", right_pool, right_val, train_labels, val_labels,
                                        lambda name: spaces["features"])  # both graphs are noise
    assert summary["graph"] == "none"
    np.testing.assert_array_equal(probs, right_pool)


@pytest.mark.parametrize("graph", ["none", "pixels", "features"])
def test_a_fixed_graph_is_the_only_one_built_and_used(graph):
    teacher_pool, teacher_val, train_labels, val_labels, _, spaces = _graph_case()
    asked = []
    probs, summary = graph_pseudo_probs(graph, teacher_pool, teacher_val, train_labels, val_labels,
                                        lambda name: asked.append(name) or spaces[name])
    assert asked == ([] if graph == "none" else [graph])
    assert summary["graph"] == graph and list(summary["graph_val_macro_f1"]) == [graph]
    if graph == "none":
        np.testing.assert_array_equal(probs, teacher_pool)


def test_candidates_follow_the_names():
    assert tuple(CANDIDATES) == PSEUDO_GRAPHS
    assert CANDIDATES["auto"] == ("none", "pixels", "features")


def test_predict_features_are_what_the_classifier_layer_receives():
    torch.manual_seed(0)
    model = tiny_model("tiny", 4).eval()
    images = np.random.default_rng(0).integers(0, 255, (10, 16, 16, 1), dtype=np.uint8)
    logits, features = predict_features_sharded(model, images, image_size=16, batch_size=4)
    assert logits.shape == (10, 4) and features.shape == (10, 8)
    np.testing.assert_array_equal(logits, predict_logits(model, images, image_size=16, batch_size=4).numpy())
    head = model[-1]
    torch.testing.assert_close(torch.from_numpy(features) @ head.weight.T + head.bias, torch.from_numpy(logits),
                               rtol=1e-4, atol=1e-5)


def test_one_pass_gives_logits_and_features_unless_tta(monkeypatch):
    """With a feature graph possible, val and the pool are predicted once for logits and
    features; the graph's features cost one more pass, over train. With TTA the logits need
    their own passes."""
    import fer.ssl.labelling

    calls = []
    for name in ("predict_features_sharded", "predict"):
        original = getattr(fer.ssl.labelling, name)
        monkeypatch.setattr(fer.ssl.labelling, name,
                            lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    data, model = make_data(), tiny_model("tiny", 4).eval()
    for cfg, expected in ((tiny_cfg(pseudo_graph="auto"), ["predict_features_sharded"] * 3),
                          (tiny_cfg(pseudo_graph="pixels"), ["predict"] * 2),
                          (tiny_cfg(pseudo_graph="features", pseudo_tta=True),
                           ["predict"] * 2 + ["predict_features_sharded"] * 3)):
        calls.clear()
        fer.ssl.labelling.pseudo_label(cfg, model, data)
        assert calls == expected, cfg.pseudo_graph


def test_a_bad_graph_name_is_one_line_naming_the_choices():
    with pytest.raises(ValueError) as err:
        apply_overrides(TrialConfig(), {"pseudo_graph": "knn"}, "--set", models=False)
    assert str(err.value) == ("--set: pseudo_graph='knn' is not allowed. "
                              "Choose one of: none, pixels, features, auto")


@pytest.fixture
def _tiny_net(monkeypatch):
    monkeypatch.setattr(fer.train.fitting, "build_model", tiny_model)
    torch.set_num_threads(1)


@pytest.mark.parametrize("graph", list(PSEUDO_GRAPHS))
def test_every_graph_choice_trains_both_stages_and_is_recorded(_tiny_net, graph, capsys):
    result = run_pipeline(tiny_cfg(pseudo_graph=graph, epochs=1, student_epochs=1, pool_control=False),
                          make_data(), progress=False)
    assert result.student is not None
    chosen = result.pseudo["graph"]
    assert chosen == graph if graph != "auto" else chosen in CANDIDATES["auto"]
    assert result.metrics["pseudo_graph"] == chosen
    assert set(result.pseudo["graph_val_macro_f1"]) == set(CANDIDATES[graph])
    assert 0.0 <= result.pseudo["pool_label_accuracy"] <= 1.0  # the test pool keeps its true labels
    assert result.checkpoint["metrics"]["pipeline"]["pseudo_graph"] == chosen  # in metrics.json via best.pt
    assert f"pseudo-label source ({graph}): val macro-F1 of its labels:" in capsys.readouterr().out
