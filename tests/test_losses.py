import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fer.train.config import TrialConfig
from fer.train.losses import LOSSES, WEIGHT_SCHEMES, build_loss, class_weights
from fer.train.posthoc import log_prior

COUNTS = np.array([400, 40, 100, 8], dtype=np.int64)


def _batch(k=4, n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 2, torch.randint(0, k, (n,), generator=gen)


@pytest.mark.parametrize("scheme", list(WEIGHT_SCHEMES))
def test_weights_mean_one_and_order(scheme):
    w = class_weights(scheme, COUNTS)
    assert w.dtype == torch.float32 and w.shape == (4,)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)
    if scheme != "none":  # rarer class, larger weight
        order = np.argsort(COUNTS)
        assert (np.diff(w.numpy()[order]) < 0).all()


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        ("none", [1, 1, 1, 1]),
        ("inverse", [1 / 400, 1 / 40, 1 / 100, 1 / 8]),
        ("sqrt_inverse", [400**-0.5, 40**-0.5, 100**-0.5, 8**-0.5]),
    ],
)
def test_weights_known_counts(scheme, expected):
    expected = np.array(expected) / np.mean(expected)
    np.testing.assert_allclose(class_weights(scheme, COUNTS).numpy(), expected, rtol=1e-6)


def test_effective_number_limits():
    inverse = class_weights("inverse", COUNTS).numpy()
    uniform = np.ones(4)
    np.testing.assert_allclose(class_weights("effective", COUNTS, beta=1 - 1e-9).numpy(), inverse, rtol=1e-4)
    np.testing.assert_allclose(class_weights("effective", COUNTS, beta=1e-6).numpy(), uniform, rtol=1e-4)
    np.testing.assert_allclose(class_weights("effective", COUNTS, beta=0.0).numpy(), uniform)
    # Cui et al. 2019 eq. (1) directly.
    beta = 0.99
    raw = (1 - beta) / (1 - beta ** COUNTS.astype(float))
    np.testing.assert_allclose(class_weights("effective", COUNTS, beta).numpy(), raw / raw.mean(), rtol=1e-5)


@pytest.mark.parametrize("scheme", list(WEIGHT_SCHEMES))
def test_zero_count_class_gets_largest_present_weight(scheme):
    counts = np.array([500, 50, 0, 5])
    w = class_weights(scheme, counts).numpy()
    assert np.isfinite(w).all()
    present = counts > 0
    assert w[present].mean() == pytest.approx(1.0, rel=1e-6)
    assert w[2] == pytest.approx(w[present].max())


def test_all_zero_counts_rejected():
    with pytest.raises(ValueError, match="all zero"):
        class_weights("inverse", np.zeros(3))


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown class weight scheme 'bogus'.*none, inverse, sqrt_inverse, effective"):
        class_weights("bogus", COUNTS)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown loss 'hinge'.*ce, focal, logit_adjusted, balanced_softmax"):
        build_loss(TrialConfig(loss="hinge"), COUNTS)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("scheme", list(WEIGHT_SCHEMES))
def test_every_loss_finite_with_gradient(loss, scheme):
    counts = np.array([300, 0, 30, 3])  # includes an empty class
    fn = build_loss(TrialConfig(loss=loss, class_weights=scheme, label_smoothing=0.1), counts)
    logits, targets = _batch()
    logits.requires_grad_(True)
    value = fn(logits, targets)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("scheme", list(WEIGHT_SCHEMES))
def test_focal_gamma_zero_is_cross_entropy(scheme):
    logits, targets = _batch()
    weight = class_weights(scheme, COUNTS)
    focal = build_loss(TrialConfig(loss="focal", focal_gamma=0.0, class_weights=scheme), COUNTS)
    torch.testing.assert_close(focal(logits, targets), F.cross_entropy(logits, targets, weight=weight))
    ce = build_loss(TrialConfig(loss="ce", class_weights=scheme), COUNTS)
    torch.testing.assert_close(ce(logits, targets), F.cross_entropy(logits, targets, weight=weight))


def test_focal_matches_formula():
    logits, targets = _batch()
    p_t = logits.softmax(1)[torch.arange(len(targets)), targets]
    expected = (-(1 - p_t) ** 2 * p_t.log()).mean()
    focal = build_loss(TrialConfig(loss="focal", focal_gamma=2.0), COUNTS)
    torch.testing.assert_close(focal(logits, targets), expected)


def test_focal_finite_when_confident():
    logits = torch.tensor([[60.0, -60.0, 0.0, 0.0]], requires_grad=True)
    fn = build_loss(TrialConfig(loss="focal", focal_gamma=0.5), COUNTS)
    fn(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits.grad).all()


def test_label_smoothing_matches_torch():
    logits, targets = _batch()
    fn = build_loss(TrialConfig(loss="ce", label_smoothing=0.1), COUNTS)
    torch.testing.assert_close(fn(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.1))


@pytest.mark.parametrize(("loss", "tau"), [("logit_adjusted", 0.7), ("balanced_softmax", 1.0)])
def test_logit_adjusted_shifts_by_log_prior(loss, tau):
    logits, targets = _batch()
    fn = build_loss(TrialConfig(loss=loss, la_tau=0.7), COUNTS)
    prior = torch.tensor(COUNTS / COUNTS.sum(), dtype=torch.float32)
    expected = F.cross_entropy(logits + tau * prior.log(), targets)
    torch.testing.assert_close(fn(logits, targets), expected)


def test_log_prior_zero_class_finite():
    lp = torch.as_tensor(log_prior(np.array([10, 0, 10])))
    assert torch.isfinite(lp).all()
    assert lp[1].item() == pytest.approx(np.log(0.5 / 20.5))
    assert lp.exp().sum().item() == pytest.approx(1.0)


def test_sample_weight_reduction():
    logits, targets = _batch(n=8)
    cfg = TrialConfig(loss="ce", class_weights="inverse")
    fn = build_loss(cfg, COUNTS)
    per = F.cross_entropy(logits, targets, reduction="none")
    cw = class_weights("inverse", COUNTS)[targets]
    sw = torch.linspace(0.1, 1.0, 8)
    torch.testing.assert_close(fn(logits, targets, sw), (cw * sw * per).sum() / cw.sum())
    # Ones change nothing; a uniform 0.5 halves the loss (not renormalised).
    torch.testing.assert_close(fn(logits, targets, torch.ones(8)), fn(logits, targets))
    torch.testing.assert_close(fn(logits, targets, torch.full((8,), 0.5)), 0.5 * fn(logits, targets))


def test_loss_moves_with_module_device_and_state_dict():
    fn = build_loss(dataclasses.replace(TrialConfig(), loss="logit_adjusted", class_weights="effective"), COUNTS)
    assert set(fn.state_dict()) == {"weight", "log_prior"}
