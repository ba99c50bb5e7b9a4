import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fer.train import transforms as T
from fer.train.transforms import (
    AUGMENTS,
    MEAN,
    STD,
    TRIVIAL_OPS,
    make_eval_transform,
    make_train_transform,
    random_erase,
    tta_views,
)


def _faces(n=16, c=1, size=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("kind", list(AUGMENTS))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("source", "size"), [(48, 48), (48, 64), (64, 32)])
def test_train_transform_shapes_and_range(kind, channels, source, size):
    out = make_train_transform(kind, size)(_faces(8, channels, source))
    assert out.shape == (8, channels, size, size) and out.dtype == torch.float32
    assert out.min() >= (0 - MEAN) / STD - 1e-5 and out.max() <= (1 - MEAN) / STD + 1e-5


@pytest.mark.parametrize("kind", ["weak", "strong", "fundus"])
def test_randomness_is_per_sample(kind):
    same = _faces(1).expand(16, -1, -1, -1).contiguous()
    out = make_train_transform(kind, 48)(same)
    distinct = {tuple(o.flatten()[:200].tolist()) for o in out}
    assert len(distinct) > 12


@pytest.mark.parametrize("kind", list(AUGMENTS))
def test_seeded_and_deterministic(kind):
    tf, batch = make_train_transform(kind, 48), _faces()
    torch.manual_seed(3)
    a = tf(batch)
    torch.manual_seed(3)
    torch.testing.assert_close(tf(batch), a)


def test_fundus_rotates_a_retina_about_its_centre_and_keeps_the_border_black():
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 28 ** 2)
    retina = torch.zeros(16, 3, 64, 64, dtype=torch.uint8)
    retina[:, 0][:, disc] = 200
    retina[:, 1, 20:44, 30:34] = 255  # an asymmetric vessel, so rotations differ
    torch.manual_seed(0)
    out = make_train_transform("fundus", 64)(retina) * STD + MEAN  # back to [0, 1]
    corners = out[:, :, :6, :6]
    # uncovered corners are black like the border (lifted at most by a lower contrast: 0.2 x the
    # mean), not mirrored retina (0.78 in channel 0)
    assert corners.abs().max() < 0.2 * out.mean() + 1e-3
    bright = (out[:, 0] > 0.2).float().mean(dim=(1, 2))
    ratio = bright / disc.float().mean()  # zoom 0.95-1.1 scales the disc's area by 0.9-1.21
    assert ((ratio > 0.85) & (ratio < 1.27)).all() and ratio.std() > 0.02


def test_eval_is_resize_and_normalise():
    batch = _faces(4)
    torch.testing.assert_close(make_eval_transform(48)(batch), (batch.float() / 255 - MEAN) / STD)
    expected = TF.resize(batch, [96, 96], antialias=True).float() / 255
    torch.testing.assert_close(make_eval_transform(96)(batch), (expected - MEAN) / STD)


def test_identity_warp_is_exact():
    images = _faces(4).float() / 255
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3)
    torch.testing.assert_close(T._warp(images, theta), images)
    flip = torch.tensor([[-1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3)
    torch.testing.assert_close(T._warp(images, flip), images.flip(-1))


# Each photometric op against torchvision's single-image functional with the same magnitude.
_REFERENCE = {
    "Brightness": lambda img, m: TF.adjust_brightness(img, 1 + m),
    "Color": lambda img, m: TF.adjust_saturation(img, 1 + m),
    "Contrast": lambda img, m: TF.adjust_contrast(img, 1 + m),
    "Sharpness": lambda img, m: TF.adjust_sharpness(img, 1 + m),
    "Posterize": lambda img, m: TF.posterize((img * 255).round().to(torch.uint8), int(8 - round(m))).float() / 255,
    "Solarize": lambda img, m: TF.solarize(img, 1 - m),
    "AutoContrast": lambda img, m: TF.autocontrast(img),
    "Equalize": lambda img, m: TF.equalize(img),
    "Identity": lambda img, m: img,
}


@pytest.mark.parametrize("name", [k for k, v in TRIVIAL_OPS.items() if v[0] is not None])
@pytest.mark.parametrize("channels", [1, 3])
def test_photometric_ops_match_torchvision(name, channels):
    images = _faces(3, channels, 16).float() / 255
    fn, top, signed = TRIVIAL_OPS[name]
    mags = torch.tensor([top * 0.3, top * 0.8, -top * 0.5 if signed else top])
    out = fn(images, mags)
    for img, m, o in zip(images, mags, out):
        torch.testing.assert_close(o, _REFERENCE[name](img, float(m)), atol=1e-5, rtol=1e-5)


def test_every_trivial_op_is_drawn():
    torch.manual_seed(0)
    op, m, order, counts = T._draw_trivial(2000)
    assert sum(counts) == 2000 and (op[order].diff() >= 0).all()
    assert set(op.tolist()) == set(range(len(TRIVIAL_OPS)))
    tops = torch.tensor([v[1] for v in TRIVIAL_OPS.values()])
    assert (m.abs() <= tops[op] + 1e-6).all()


def test_random_erase_rectangles():
    torch.manual_seed(0)
    images = torch.ones(200, 1, 48, 48)
    erased = random_erase(images, p=0.5)
    fraction = (erased == 0).float().mean(dim=(1, 2, 3))
    hit = fraction > 0
    assert 60 < hit.sum() < 140
    assert fraction[hit].max() <= 0.34 * 1.2 and fraction[hit].min() >= 0.01


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [48, 64])
def test_tta_views(channels, size):
    batch = _faces(4, channels, 48)
    views = tta_views(batch, size)
    assert len(views) == 6
    base = make_eval_transform(size)(batch)
    torch.testing.assert_close(views[0], base)
    torch.testing.assert_close(views[1], base.flip(-1))
    d = max(1, round(size / 16))
    for v in views:
        assert v.shape == (4, channels, size, size)
    # the last view is the image moved up-left by d pixels
    torch.testing.assert_close(views[-1][..., : size - d, : size - d], base[..., d:, d:])


def test_unknown_augment_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown augmentation 'heavy'.*none, weak, strong"):
        make_train_transform("heavy", 48)


def test_rejects_float_input():
    with pytest.raises(ValueError, match=r"expected a uint8 batch"):
        make_train_transform("weak", 48)(torch.zeros(2, 1, 48, 48))
