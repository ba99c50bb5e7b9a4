"""Stage 2 online (student_mode fixmatch / flexmatch, fer.train.consistency): the pool's loss, per-class
thresholds, distribution alignment, training, exact resume, the ablation numbers, bad input."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import fer.train.fitting
from fer.ssl.pipeline import run_pipeline
from fer.train.config import TrialConfig, apply_overrides
from fer.train.consistency import Consistency, EpochPlan, Tally, plan_epoch, pool_loss
from fer.train.infer import Ranks
from fer.train.state import PipelineState
from support import saved_and_loaded, untimed
from test_pipeline import make_data, tiny_cfg, tiny_model


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    import fer.train.models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores
    monkeypatch.setattr(fer.train.fitting, "build_model", tiny_model)
    monkeypatch.setattr(fer.train.models, "build_model", tiny_model)  # the teacher rebuilt from its checkpoint
    yield
    torch.set_num_threads(threads)


def online_cfg(**overrides):
    return tiny_cfg(**{"student_mode": "fixmatch", "pseudo_threshold": 0.5, "student_augment": "weak", **overrides})


def plan(thresholds, align=(1.0, 1.0, 1.0)):
    k = len(thresholds)
    return EpochPlan(order=np.arange(4), thresholds=torch.tensor(thresholds, dtype=torch.float32),
                     align=torch.tensor(align[:k], dtype=torch.float32))


def test_the_pool_loss_trains_the_strong_view_on_confident_weak_predictions_only():
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 5.0]])  # sure, unsure, sure
    strong = torch.zeros(3, 3, requires_grad=True)
    tally = Tally.zeros(torch.device("cpu"))
    loss = pool_loss(weak, strong, plan([0.9, 0.9, 0.9]), torch.tensor([0, 1, 1]), tally)
    # two of three views kept, each with CE log(3) against a uniform strong prediction
    assert float(loss.detach()) == pytest.approx(2 * np.log(3) / 3, rel=1e-5)
    assert (float(tally.kept), float(tally.correct), tally.seen) == (2.0, 1.0, 3)
    loss.backward()
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0  # the unsure view gets no gradient


def test_soft_targets_are_the_kept_weak_views_sharpened_distribution():
    from fer.train.consistency import SHARPEN

    weak = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.1, 0.0]])  # kept, not kept
    strong = torch.tensor([[0.5, 0.0, -0.5], [1.0, 0.0, 0.0]], requires_grad=True)
    tally = Tally.zeros(torch.device("cpu"))
    loss = pool_loss(weak, strong, plan([0.5, 0.5, 0.5]), None, tally, soft=True)
    target = torch.softmax(weak[0] / SHARPEN, dim=0)  # softmax(z) ** (1/T), renormalised
    expected = -(target * torch.log_softmax(strong[0], dim=0)).sum() / 2  # the unsure view counts as 0
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    hard = pool_loss(weak, strong, plan([0.5, 0.5, 0.5]), None, Tally.zeros(torch.device("cpu")))
    assert float(hard.detach()) != pytest.approx(float(loss.detach()))  # the argmax's CE is another number
    assert float(tally.kept) == 1.0


def test_a_second_labeller_mixed_in_can_keep_and_relabel_a_weak_view():
    """pool_labeller_weight: (1 - w) * the weak view's probabilities + w * the labeller's."""
    from fer.train.consistency import mix

    weak = torch.tensor([[0.0, 0.1, 0.0], [4.0, 0.0, 0.0]])  # unsure; sure of class 0
    labeller = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # sure of class 2; of class 1
    strong = torch.zeros(2, 3)
    alone, mixed = Tally.zeros(torch.device("cpu")), Tally.zeros(torch.device("cpu"))
    truth = torch.tensor([2, 0])
    pool_loss(weak, strong, plan([0.6, 0.6, 0.6]), truth, alone)
    pool_loss(weak, strong, plan([0.6, 0.6, 0.6]), truth, mixed, labeller=labeller, labeller_weight=0.5)
    assert (float(alone.kept), float(alone.correct)) == (1.0, 1.0)  # the sure view, class 0
    # mixed: view 1 is 0.66 for class 2 (kept, right); view 2 0.51 for class 1 against 0.48 (dropped)
    assert (float(mixed.kept), float(mixed.correct)) == (1.0, 1.0)
    probs = mix(torch.softmax(weak, dim=1), labeller, 0.5)
    assert probs.argmax(dim=1).tolist() == [2, 1] and torch.allclose(probs.sum(dim=1), torch.ones(2))
    assert torch.equal(mix(weak, labeller, 0.0), weak) and torch.equal(mix(weak, None, 0.5), weak)


def test_alignment_can_turn_a_head_prediction_into_a_tail_label():
    weak = torch.tensor([[1.0, 0.0]])  # 0.73 for the head class
    tally = Tally.zeros(torch.device("cpu"))
    strong = torch.zeros(1, 2)
    pool_loss(weak, strong, plan([0.0, 0.0], align=(0.1, 10.0)), torch.tensor([1]), tally)
    assert float(tally.correct) == 1.0  # the aligned label is class 1


def test_an_epoch_plan_lowers_thresholds_of_classes_the_student_rarely_predicts():
    data = make_data()
    pool = data.splits["unlabeled"]
    model = tiny_model("x", 4)
    with torch.no_grad():  # a model that predicts class 0 with confidence, whatever the image
        model[-1].weight.zero_()
        model[-1].bias.copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))
    spec = Consistency(images=pool.images, prior=np.full(4, 0.25), threshold=0.9, weight=1.0,
                       mode="flexmatch", align=False, truth=pool.labels)
    epoch = plan_epoch(spec, model, steps=3, batch_size=8, seed=0, epoch=5, ddp=Ranks(), image_size=16,
                       device=torch.device("cpu"))
    assert epoch.thresholds[0] == pytest.approx(0.9) and torch.all(epoch.thresholds[1:] == 0)
    assert len(epoch.order) == 3 * 8 and set(epoch.order) <= set(range(len(pool.images)))
    assert epoch.stats["pool_pass_kept"] == 1.0
    assert epoch.stats["pool_pass_accuracy"] == pytest.approx(np.mean(pool.labels == 0))
    # alignment to a uniform prior divides out the constant head bias: every class reachable again
    aligned = plan_epoch(Consistency(images=pool.images, prior=np.full(4, 0.25), threshold=0.9, weight=1.0,
                                     align=True),
                         model, steps=3, batch_size=8, seed=0, epoch=5, ddp=Ranks(), image_size=16,
                         device=torch.device("cpu"))
    # (a constant prediction aligned to uniform is uniform: 0.25, below every threshold)
    assert aligned.stats["pool_pass_kept"] == 0.0 and aligned.align[0] < aligned.align[1] == aligned.align[3]
    again = plan_epoch(spec, model, steps=3, batch_size=8, seed=0, epoch=5, ddp=Ranks(), image_size=16,
                       device=torch.device("cpu"))
    assert np.array_equal(again.order, epoch.order)  # a function of (seed, epoch): a resumed epoch draws the same


def test_debiasing_labels_the_pool_with_the_students_post_hoc_offsets_of_the_moment(monkeypatch):
    import fer.train.consistency
    from fer.train.consistency import Debias
    from fer.train.infer import predict_logits

    data = make_data()
    pool, val = data.splits["unlabeled"], data.splits["val"]
    torch.manual_seed(0)
    model = tiny_model("x", 4)
    counts = np.array([40, 20, 12, 8])
    fitted, calls = np.array([-1.0, 0.0, 0.5, 2.0]), []

    def fit_offsets(logits, labels, class_counts, kind):
        calls.append((logits, labels, class_counts, kind))
        return fitted

    monkeypatch.setattr(fer.train.consistency, "fit_offsets", fit_offsets)
    debias = Debias(images=val.images, labels=val.labels, counts=counts, posthoc="bias")
    spec = Consistency(images=pool.images, prior=counts / counts.sum(), threshold=0.0, weight=1.0,
                       mode="fixmatch", truth=pool.labels, debias=debias)
    model.train()
    epoch = plan_epoch(spec, model, steps=3, batch_size=8, seed=0, epoch=5, ddp=Ranks(), image_size=16,
                       device=torch.device("cpu"))
    assert model.training  # put back as it was
    (logits, labels, class_counts, kind), = calls  # fitted once, on the model's val logits now (eval mode)
    model.eval()
    assert np.allclose(logits, predict_logits(model, val.images, image_size=16).numpy(), atol=1e-5)
    assert labels is val.labels and class_counts is counts and kind == "bias"
    # the weak views' probabilities are multiplied by exp(offsets): softmax(logits + offsets)
    assert torch.allclose(epoch.align, torch.exp(torch.as_tensor(fitted, dtype=torch.float32)))
    assert epoch.stats["pool_debias_spread"] == pytest.approx(3.0)
    weak = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # the head class's raw argmax becomes class 3's label
    tally = Tally.zeros(torch.device("cpu"))
    pool_loss(weak, torch.zeros(1, 4), epoch, torch.tensor([3]), tally)
    assert float(tally.correct) == 1.0
    plain = plan_epoch(replace(spec, debias=None), model, steps=3, batch_size=8, seed=0, epoch=5, ddp=Ranks(),
                       image_size=16, device=torch.device("cpu"))
    assert torch.all(plain.align == 1) and "pool_debias_spread" not in plain.stats and len(calls) == 1


def test_a_fixmatch_run_trains_on_the_pool_and_reports_what_it_kept(tmp_path, capsys):
    result = run_pipeline(online_cfg(pool_picks=True), make_data(), progress=False, out_dir=str(tmp_path))
    printed = capsys.readouterr().out
    kept = result.metrics["pseudo_kept"]  # the teacher's confident picks join the labelled images
    assert f"stage 2 online (fixmatch): 80 labelled images and {kept} teacher picks, and all 60 pool images " \
           "every step: threshold 0.5, alignment off" in printed
    assert result.student is not None and result.control is not None
    last = result.student.history[-1]
    assert 0.0 <= last["pool_kept_share"] <= 1.0 and "pool_pass_accuracy" in last
    assert last["train_images"] == 80 + kept  # an epoch is the labelled images' (and picks'); the pool rides along
    assert result.metrics["student_mode"] == "fixmatch"
    # without the picks the labelled stream is the labelled split alone, and the pool only online
    alone = run_pipeline(online_cfg(pool_picks=False, pool_debias=True), make_data(), progress=False)
    printed = capsys.readouterr().out
    assert "80 labelled images and none of the teacher's picks (pool_picks false), and all 60 pool images " \
           "every step: threshold 0.5, alignment off, debiasing on, hard targets" in printed
    assert alone.student.history[-1]["train_images"] == 80
    assert np.array_equal(alone.student.checkpoint["class_counts"], make_data().class_counts("train"))
    assert "pool_debias_spread" in alone.student.history[-1]
    assert {"control_val_macro_f1", "pool_gain_val", "pool_helped"} <= set(result.metrics)
    assert (tmp_path / "pseudo_labeled.csv").exists()  # the picks, as offline
    # the pool really is in the loss: with its weight at 0 the student trains as without it
    zero = run_pipeline(online_cfg(pseudo_weight=0.0, pseudo_threshold=0.0), make_data(), progress=False)
    some = run_pipeline(online_cfg(pseudo_threshold=0.0), make_data(), progress=False)
    a, b = zero.student.checkpoint["model"], some.student.checkpoint["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_the_labellers_graph_helped_distribution_reaches_the_weak_views(capsys):
    """At pool_labeller_weight 1 the weak views are labelled as the stage-2 labeller labels the
    pool, where its labels include a graph: the epoch pass's accuracy is the labeller's, and the
    student trains otherwise. The teacher alone (no graph) is not mixed in."""
    data = make_data()

    def run(**overrides):
        return run_pipeline(online_cfg(**{"pseudo_threshold": 0.0, "pseudo_graph": "pixels", **overrides}), data,
                            progress=False)

    own, graph = run(pool_labeller_weight=0.0), run(pool_labeller_weight=1.0)
    assert ", the teacher's graph-helped labels mixed in at 1" in capsys.readouterr().out
    for epoch in graph.student.history:
        assert epoch["pool_pass_accuracy"] == pytest.approx(graph.metrics["pseudo_label_accuracy"])
    assert own.student.history[-1]["pool_pass_accuracy"] != pytest.approx(graph.metrics["pseudo_label_accuracy"])
    a, b = own.student.checkpoint["model"], graph.student.checkpoint["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)
    alone = run(pool_labeller_weight=1.0, pseudo_graph="none")
    assert "the teacher's labels not mixed in (no graph: the teacher alone)" in capsys.readouterr().out
    plain = run(pool_labeller_weight=0.0, pseudo_graph="none")
    a, b = alone.student.checkpoint["model"], plain.student.checkpoint["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode,align,schedule,debias,labeller,ema", [
    ("fixmatch", True, "cosine", False, 0.0, 0.0), ("flexmatch", False, "cosine", False, 0.0, 0.9),
    ("flexmatch", False, "constant", False, 0.8, 0.0), ("flexmatch", False, "constant", True, 0.0, 0.0)])
def test_resuming_an_online_run_after_any_epoch_ends_with_the_same_model(mode, align, schedule, debias, labeller,
                                                                         ema):
    cfg = online_cfg(student_init="teacher", dropout=0.1, student_mode=mode, pool_align=align,
                     student_schedule=schedule, pool_debias=debias, pool_picks=not debias,
                     pool_targets="soft" if debias else "hard", pool_labeller_weight=labeller, student_ema=ema,
                     pseudo_graph="pixels" if labeller else "auto")  # the labeller is mixed in with a graph
    data, states = make_data(), []
    whole = run_pipeline(cfg, data, progress=False,
                         report=lambda metrics, ckpt, state: states.append(saved_and_loaded(state.to_dict())))
    assert [(s["stage"], s["fit"]["epoch"]) for s in states] == [("teacher", 1), ("teacher", 2),
                                                                ("student", 1), ("student", 2)]
    for global_epoch, state in enumerate(states, 1):
        resumed = run_pipeline(cfg, data, progress=False, resume=PipelineState.from_dict(state))
        assert untimed(resumed.history) == untimed(whole.history)
        a, b = whole.checkpoint["model"], resumed.checkpoint["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_fer_train_writes_the_online_ablation_to_metrics_json(tmp_path, monkeypatch, capsys):
    import fer.train.cli
    from fer.data.synth import write_csv

    path = write_csv(str(tmp_path / "data"), seed=1, scale=0.03, eval_scale=0.05)
    out = tmp_path / "out"
    code = fer.train.cli.main(["--data", path, "--out", str(out), "--no-progress", "--set", "model=resnet10t",
                           "--set", "epochs=1", "--set", "student_epochs=1", "--set", "epoch_images=0",
                           "--set", "image_size=16"])  # stage 2 online by default: flexmatch
    assert code == 0
    printed = capsys.readouterr().out
    assert "student: 1 epochs of at least" in printed and "two views (flexmatch)" in printed
    assert "pool online (flexmatch): the best student epoch trained on " in printed
    assert "pool views, precision " in printed  # the demo data's pool keeps its labels as held-out truth
    pipeline = json.loads((out / "metrics.json").read_text())["pipeline"]
    assert pipeline["student_mode"] == "flexmatch"
    assert {"control_val_macro_f1", "pool_gain_val", "pool_gain_val_ci95", "pool_kept_share"} <= set(pipeline)


def test_a_bad_online_setting_is_refused_naming_the_key_and_what_is_allowed():
    with pytest.raises(ValueError, match="--set: student_mode='online' is not allowed. "
                                         "Choose one of: offline, fixmatch, flexmatch"):
        apply_overrides(TrialConfig(), {"student_mode": "online"}, source="--set", models=False)
    with pytest.raises(ValueError, match=r"--set: pool_ratio=0 is outside the allowed range \[1, 64\]"):
        apply_overrides(TrialConfig(), {"pool_ratio": 0}, source="--set", models=False)
    with pytest.raises(ValueError, match=r"--set: pool_labeller_weight=1.5 is outside the allowed range \[0.0, 1.0\]"):
        apply_overrides(TrialConfig(), {"pool_labeller_weight": 1.5}, source="--set", models=False)
    with pytest.raises(ValueError, match="labeller_weight > 0 needs the labeller's distribution over every pool image"):
        Consistency(images=np.zeros((3, 4, 4, 1), np.uint8), prior=np.ones(2) / 2, threshold=0.9, weight=1.0,
                    labeller=np.ones((2, 2)) / 2, labeller_weight=0.5)
    with pytest.raises(ValueError, match="student_mode flexmatch needs a non-empty unlabeled pool"):
        Consistency(images=np.zeros((0, 4, 4, 1), np.uint8), prior=np.ones(2) / 2, threshold=0.9, weight=1.0,
                    mode="flexmatch")


@pytest.mark.parametrize("mode", ["fixmatch", "flexmatch"])
def test_each_online_mode_searches_in_a_space(tmp_path, mode):
    from search.space import load_space

    space = tmp_path / "online.yaml"
    space.write_text("fixed:\n  student_mode: " + mode + "\nparameters:\n  pseudo_threshold:\n    uniform: [0.5, 0.95]\n"
                     "  pseudo_selection:\n    choice: [threshold, crest]\n")
    loaded = load_space(str(space))
    assert loaded.trial_config({"pseudo_threshold": 0.7, "pseudo_selection": "crest"}).student_mode == mode


def test_the_oracle_trains_every_pool_view_on_its_true_label():
    """The oracle of benchmarks/label_fraction.py: the pool's true labels replace the weak views'
    pseudo-labels and no view is masked, with the same steps and views as the student."""
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 5.0]])  # sure, unsure, sure
    strong = torch.zeros(3, 3, requires_grad=True)
    truth = torch.tensor([1, 1, 2])
    tally = Tally.zeros(torch.device("cpu"))
    loss = pool_loss(weak, strong, plan([0.9, 0.9, 0.9]), truth, tally, oracle=True)
    assert float(loss.detach()) == pytest.approx(np.log(3), rel=1e-5)  # all three views count
    assert (float(tally.kept), float(tally.correct)) == (3.0, 3.0)
    loss.backward()
    assert strong.grad[0, 1] < 0 and strong.grad[0, 0] > 0  # the sure-but-wrong view is pulled to its true class


def test_an_oracle_without_the_pools_true_labels_is_refused():
    with pytest.raises(ValueError, match=r"an oracle stage 2 needs the pool's true labels \(Consistency.truth\)"):
        Consistency(images=np.zeros((4, 4, 4, 1), np.uint8), prior=np.ones(2) / 2, threshold=0.9, weight=1.0,
                    oracle=True)
