import numpy as np
import pandas as pd
import pytest

from fer.data import synth

SCALE = 0.1


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return synth.generate(seed=0, scale=SCALE)


def counts(frame: pd.DataFrame, usage: str) -> np.ndarray:
    rows = frame[frame["Usage"] == usage]
    return np.bincount(rows["emotion"].to_numpy(), minlength=len(synth.CLASSES))


def test_same_seed_gives_identical_frame(frame):
    pd.testing.assert_frame_equal(frame, synth.generate(seed=0, scale=SCALE))


def test_different_seed_gives_different_frame(frame):
    other = synth.generate(seed=1, scale=SCALE)
    assert len(other) == len(frame)
    assert not other["pixels"].equals(frame["pixels"])


def test_columns_and_pixel_format(frame):
    assert list(frame.columns) == ["emotion", "pixels", "Usage"]
    assert set(frame["Usage"]) == {"Training", "PublicTest", "PrivateTest", "Unlabeled"}
    assert frame["emotion"].dtype.kind == "i"
    assert frame["emotion"].between(0, len(synth.CLASSES) - 1).all()
    for text in frame["pixels"].iloc[::50]:
        assert "  " not in text and text == text.strip()
        values = np.array(text.split(" "), dtype=np.int64)
        assert values.shape == (48 * 48,)
        assert values.min() >= 0 and values.max() <= 255
        assert values.std() > 5  # a drawn face, not a flat image


def test_classes_are_fer2013_order():
    assert synth.CLASSES == ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


@pytest.mark.parametrize("scale", [0.2, 1.0])
def test_training_mix_follows_fer2013(scale):
    train = synth.split_counts(scale)["train"]
    expected = synth.FER_TRAIN_COUNTS * synth.TRAIN_FRACTION * scale
    assert np.all(np.abs(train - expected) <= 0.5)  # within rounding
    if scale == 1.0:
        assert 2900 <= train.sum() <= 3100
        assert train[1] >= 40  # Disgust keeps enough images to learn from
    assert train[3] / train[1] == pytest.approx(16.5, rel=0.15)  # Disgust : Happy about 1 : 16


def test_frame_counts_match_split_counts(frame):
    expected = synth.split_counts(SCALE)
    for name, usage in synth.USAGES.items():
        np.testing.assert_array_equal(counts(frame, usage), expected[name])


def test_val_and_test_are_balanced():
    split = synth.split_counts(1.0)
    for name in ("val", "test"):
        assert split[name].min() >= 60  # a stable Disgust F1
        assert split[name].max() <= 1.5 * split[name].min()


def test_unlabeled_pool_keeps_true_labels_and_training_mix(frame):
    pool = counts(frame, "Unlabeled")
    assert pool.sum() > 0 and (pool > 0).all()
    np.testing.assert_array_equal(pool, counts(frame, "Training"))


PAIRS = [(k, 6) for k in range(6)] + [(1, 0), (2, 5)]  # each vs Neutral; the confusable pairs


PAIR_IDS = [f"{synth.CLASSES[a]}-{synth.CLASSES[b]}" for a, b in PAIRS]


@pytest.mark.parametrize("label, other", PAIRS, ids=PAIR_IDS)
def test_expression_changes_the_drawn_face(label, other):
    # Same people, pose and lighting (same parameter draws), different expression: the
    # drawn features must move visibly, also for the subtle Disgust / Angry pair.
    n = 60
    params = [synth.sample_params(np.full(n, k), np.random.default_rng(0)) for k in (label, other)]
    faces = [synth.render(p, np.random.default_rng(1)) for p in params]
    changed = np.abs(faces[0].astype(int) - faces[1].astype(int)) > 20
    assert changed.mean() > 0.004  # about 10 of 2,304 pixels per face


def test_bad_scale_raises():
    with pytest.raises(ValueError, match="scale must be > 0, got 0"):
        synth.split_counts(0)
    with pytest.raises(ValueError, match="eval_scale must be > 0, got -1"):
        synth.split_counts(0.5, eval_scale=-1)


def test_val_and_test_can_be_sized_apart_from_the_labels():
    """Few labels, measured on as many val and test images as the full-size set: the
    labelled split and the pool are those of `scale`, the labelled split the same images."""
    few, full = synth.split_counts(0.125, eval_scale=1.0), synth.split_counts(1.0)
    np.testing.assert_array_equal(few["train"], synth.split_counts(0.125)["train"])
    np.testing.assert_array_equal(few["unlabeled"], few["train"])
    for name in ("val", "test"):
        np.testing.assert_array_equal(few[name], full[name])
    small, measured = (synth.generate_arrays(0, 0.02, eval_scale) for eval_scale in (None, 0.1))
    np.testing.assert_array_equal(small["train"][1], measured["train"][1])  # drawn first: the same faces
    assert len(measured["test"][0]) == 70 and len(small["test"][0]) == 14


def test_write_csv_roundtrips(tmp_path):
    path = synth.write_csv(str(tmp_path / "out"), seed=3, scale=0.05)
    assert path.endswith("fer2013_demo.csv")
    read = pd.read_csv(path)
    pd.testing.assert_frame_equal(read, synth.generate(seed=3, scale=0.05))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fer2013_demo.csv"]


def test_cli_writes_csv_preview_and_prints_counts(tmp_path, capsys):
    preview = tmp_path / "preview.png"
    argv = ["--out", str(tmp_path), "--seed", "1", "--scale", "0.05", "--preview", str(preview)]
    assert synth.main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "fer2013_demo.csv") in out
    for word in ["Training", "PublicTest", "PrivateTest", "Unlabeled", *synth.CLASSES]:
        assert word in out
    assert preview.stat().st_size > 1000


def test_cli_rejects_bad_scale(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path), "--scale", "-1"])
    assert "--scale must be > 0" in capsys.readouterr().err


def test_pool_multiple_gives_few_labels_and_a_large_pool(tmp_path, capsys):
    """The pool follows the labelled split's class mix at `pool_multiple` times its size; the
    labelled, val and test faces are the same as without it (the pool is drawn last)."""
    counts = synth.split_counts(0.25, eval_scale=2.0, pool_multiple=7.0)
    np.testing.assert_array_equal(counts["unlabeled"], np.rint(counts["train"] * 7.0))
    assert counts["train"].sum() == 753 and counts["unlabeled"].sum() == 5271 and counts["val"].sum() == 1400
    plain, large = (synth.generate_arrays(0, 0.02, None, multiple) for multiple in (1.0, 3.0))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(plain[name][1], large[name][1])
    assert len(large["unlabeled"][0]) == 3 * len(plain["unlabeled"][0])
    assert synth.main(["--out", str(tmp_path), "--scale", "0.02", "--pool-multiple", "3"]) == 0
    frame = pd.read_csv(tmp_path / "fer2013_demo.csv", usecols=["emotion", "Usage"])
    assert (frame["Usage"] == "Unlabeled").sum() == len(large["unlabeled"][0])
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path / "no"), "--pool-multiple", "0"])
    assert "--pool-multiple must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pool_multiple must be > 0, got -1"):
        synth.split_counts(1.0, pool_multiple=-1)
    assert not (tmp_path / "no").exists()
