"""Post-hoc logit offsets: tau (logit adjustment) and per-class bias on a crafted biased table."""

import numpy as np
import pytest

from fer.train.posthoc import POSTHOC, apply_offsets, fit_offsets, get_posthoc, log_prior, macro_f1


def biased_table(seed=0, n=1400):
    """Balanced val labels, logits = signal + noise + log prior (a long-tailed model's bias)."""
    rng = np.random.default_rng(seed)
    counts = np.array([1000, 300, 100, 30])
    labels = rng.integers(0, 4, size=n)
    logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[labels]
    return logits + 1.0 * log_prior(counts), labels, counts


@pytest.mark.parametrize("method", list(POSTHOC))
def test_offsets_never_hurt_val_macro_f1(method):
    logits, labels, counts = biased_table()
    offsets = fit_offsets(logits, labels, counts, method)
    assert offsets.shape == (4,) and np.all(np.isfinite(offsets))
    assert macro_f1(labels, logits, offsets) >= macro_f1(labels, logits)


def test_none_is_zero():
    logits, labels, counts = biased_table()
    np.testing.assert_array_equal(fit_offsets(logits, labels, counts, "none"), np.zeros(4))


def test_tau_undoes_the_prior_bias():
    logits, labels, counts = biased_table()
    offsets = fit_offsets(logits, labels, counts, "tau")
    tau = offsets[0] / -log_prior(counts)[0]
    assert 0.6 <= tau <= 1.4  # the table was biased by exactly 1.0 * log prior
    before, after = macro_f1(labels, logits), macro_f1(labels, logits, offsets)
    assert after > before + 0.1
    # and it generalises to a fresh draw from the same distribution
    test_logits, test_labels, _ = biased_table(seed=1)
    assert macro_f1(test_labels, test_logits, offsets) > macro_f1(test_labels, test_logits) + 0.1


def test_bias_fixes_a_bias_the_prior_does_not_explain():
    logits, labels, counts = biased_table()
    logits = logits - log_prior(counts) + np.array([0.0, 0.0, 1.5, -1.5])  # class 2 over-, 3 under-predicted
    offsets = fit_offsets(logits, labels, counts, "bias")
    assert offsets[3] - offsets[2] > 1.5
    assert abs(offsets.mean()) < 1e-9
    assert macro_f1(labels, logits, offsets) > macro_f1(labels, logits) + 0.1


def test_zero_count_class_gives_finite_offsets():
    logits, labels, _ = biased_table()
    assert np.all(np.isfinite(fit_offsets(logits, labels, np.array([10, 5, 0, 3]), "tau")))


def test_apply_offsets():
    logits = np.zeros((2, 3))
    np.testing.assert_allclose(apply_offsets(logits, [1.0, 0.0, -1.0]), [[1, 0, -1]] * 2)
    assert apply_offsets(logits, None) is not None


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown post-hoc rule 'temp'. Choose one of: none, tau, bias"):
        get_posthoc("temp")
    with pytest.raises(ValueError, match="3 class counts for 4 classes"):
        fit_offsets(np.zeros((2, 4)), np.zeros(2, int), np.ones(3), "tau")
