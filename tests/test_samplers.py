import numpy as np
import pytest

from fer.train.samplers import SAMPLERS, epoch_indices, shard

# 3 classes: 500 / 60 / 7 images, interleaved.
LABELS = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [500, 60, 7]))
SIZES = np.bincount(LABELS)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("cap", [0, 50])
def test_deterministic_in_seed_and_epoch(sampler, cap):
    a = epoch_indices(LABELS, 3, sampler=sampler, class_cap=cap, seed=5)
    b = epoch_indices(LABELS, 3, sampler=sampler, class_cap=cap, seed=5)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64
    assert not np.array_equal(a, epoch_indices(LABELS, 4, sampler=sampler, class_cap=cap, seed=5))
    assert not np.array_equal(a, epoch_indices(LABELS, 3, sampler=sampler, class_cap=cap, seed=6))


def test_uniform_visits_every_image_once():
    idx = epoch_indices(LABELS, 0)
    np.testing.assert_array_equal(np.sort(idx), np.arange(len(LABELS)))


@pytest.mark.parametrize("cap", [1, 7, 50, 60, 499, 1000])
def test_cap_counts_exactly_per_class(cap):
    for epoch in range(3):
        idx = epoch_indices(LABELS, epoch, class_cap=cap, seed=1)
        assert len(np.unique(idx)) == len(idx)  # no repeats inside an epoch
        np.testing.assert_array_equal(np.bincount(LABELS[idx], minlength=3), np.minimum(SIZES, cap))


def test_cap_reshuffles_and_covers_majority():
    cap = 50
    seen = [set(epoch_indices(LABELS, e, class_cap=cap, seed=2)) for e in range(12)]
    majority = set(np.flatnonzero(LABELS == 0))
    assert seen[0] != seen[1]
    # 500 / 50 = 10 epochs per cycle: every majority image within the first 10 epochs.
    assert majority <= set().union(*seen[:10])
    # Images of the minority classes are in every epoch.
    minority = set(np.flatnonzero(LABELS == 2))
    assert all(minority <= s for s in seen)


def test_cap_covers_majority_when_cap_does_not_divide():
    cap = 45  # 500 = 11 * 45 + 5: the last epoch of a cycle is topped up
    seen = set().union(*(set(epoch_indices(LABELS, e, class_cap=cap)) for e in range(12)))
    assert set(np.flatnonzero(LABELS == 0)) <= seen


@pytest.mark.parametrize("cap", [0, 100])
def test_balanced_equal_per_class(cap):
    idx = epoch_indices(LABELS, 0, sampler="balanced", class_cap=cap)
    size = len(LABELS) if cap == 0 else int(np.minimum(SIZES, cap).sum())
    assert len(idx) == size
    per_class = np.bincount(LABELS[idx], minlength=3)
    assert per_class.max() - per_class.min() <= 1
    # small class repeated in whole passes: every image of class 2 appears 27 or 28 times
    reps = np.bincount(idx, minlength=len(LABELS))[LABELS == 2]
    assert reps.min() >= size // 3 // 7 and reps.max() <= size // 3 // 7 + 1


def test_sqrt_proportional_to_root_counts():
    idx = epoch_indices(LABELS, 0, sampler="sqrt")
    assert len(idx) == len(LABELS)
    per_class = np.bincount(LABELS[idx], minlength=3)
    expected = len(LABELS) * np.sqrt(SIZES) / np.sqrt(SIZES).sum()
    assert np.abs(per_class - expected).max() < 1


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_empty_class_never_drawn(sampler):
    labels = np.array([0] * 20 + [2] * 5)  # class 1 has no images
    idx = epoch_indices(labels, 0, sampler=sampler)
    assert set(labels[idx]) == {0, 2}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_shards_disjoint_and_covering(world_size, sampler):
    idx = epoch_indices(LABELS, 1, sampler=sampler, class_cap=40)
    shards = [shard(idx, r, world_size) for r in range(world_size)]
    # disjoint positions of the epoch order, covering it exactly
    positions = np.concatenate([np.arange(len(idx))[r::world_size] for r in range(world_size)])
    assert sorted(positions.tolist()) == list(range(len(idx)))
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.sort(idx))
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_padded_shards_equal_length(world_size):
    idx = np.arange(10)
    shards = [shard(idx, r, world_size, pad=True) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert set(np.concatenate(shards)) == set(range(10))


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown sampler 'oversample'.*uniform, sqrt, balanced"):
        epoch_indices(LABELS, 0, sampler="oversample")


def test_bad_rank_message():
    with pytest.raises(ValueError, match=r"rank=2, world_size=2"):
        shard(np.arange(4), 2, 2)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("cap", [0, 50])
def test_min_size_repeats_whole_passes_of_a_small_split(sampler, cap):
    from fer.train.samplers import passes_per_epoch

    one_pass = len(epoch_indices(LABELS, 0, sampler=sampler, class_cap=cap, seed=2))
    passes = passes_per_epoch(LABELS, cap, 2000)
    assert passes == -(-2000 // one_pass) and passes > 1
    for epoch in (0, 1):
        idx = epoch_indices(LABELS, epoch, sampler=sampler, class_cap=cap, seed=2, min_size=2000)
        assert len(idx) == 2000  # the last pass is cut short
        # pass p of epoch e is the sampler's own pass e * passes + p
        for p in range(passes):
            own = epoch_indices(LABELS, epoch * passes + p, sampler=sampler, class_cap=cap, seed=2)
            np.testing.assert_array_equal(idx[p * one_pass:(p + 1) * one_pass], own[:len(idx[p * one_pass:])])
    if sampler == "uniform" and cap == 0:  # every image once per whole pass
        counts = np.bincount(epoch_indices(LABELS, 0, min_size=passes * one_pass), minlength=len(LABELS))
        np.testing.assert_array_equal(counts, np.full(len(LABELS), passes))


def test_min_size_below_the_split_is_one_pass():
    for epoch in range(3):
        np.testing.assert_array_equal(epoch_indices(LABELS, epoch, min_size=100), epoch_indices(LABELS, epoch))


def test_min_size_must_not_be_negative():
    with pytest.raises(ValueError, match=r"min_size must be >= 0"):
        epoch_indices(LABELS, 0, min_size=-1)
