"""Batch augmentation of uint8 image tensors, with independent randomness per sample.

Input: uint8 (B, C, H, W), C = 1 or 3, on any device. Output: float32 (B, C, S, S),
normalised with MEAN / STD (export bakes the same constants into the ONNX graph).

Why not a `torchvision.transforms.v2.Compose` called on the batch: v2 draws ONE set of
random parameters per call, so a 4-D batch gets the same crop, flip and op for every
image. Looping v2 over single images is correct but costs a Python dispatch per op per
image, and on a GPU it would leave the model waiting on the CPU. So each augmentation
below draws its parameters as (B,) tensors (on the CPU, sent in one copy) and applies
them in one vectorised op:

- geometry (random resized crop, rotation, shear, translation, horizontal flip) is
  composed into one 2x3 affine matrix per image and applied with one `grid_sample`;
- the photometric ops of TrivialAugment run once per op on the images that drew it;
  Equalize and AutoContrast are torchvision's own (v2.functional, parameter-free);
- random erasing (Zhong et al. 2020) is one masked fill.

Deterministic resizing and normalisation use v2.functional directly.

Cost per batch of 128 48x48 gray images (2 CPU threads; H100 with bf16 autocast):
weak 2.1 ms / 0.6 ms, strong 8.7 ms / 3.5 ms, against 394 ms / 35 ms for one
MobileNetV3-small forward + backward + AdamW step on the same batch. A v2 loop over the
single images took 82 ms (weak) and 95 ms (strong) on the same CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from fer import names
from fer.names import check_registry

MEAN = 0.5  # per channel, for C = 1 and C = 3 alike
STD = 0.5


def _check_batch(batch: torch.Tensor) -> None:
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(
            f"expected a uint8 batch (B, C, H, W) with C in (1, 3), got {batch.dtype} {tuple(batch.shape)}"
        )


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-2:] == (size, size):
        return batch
    return TF.resize(batch, [size, size], antialias=True)


def _to_float(batch: torch.Tensor) -> torch.Tensor:
    return TF.to_dtype(batch, torch.float32, scale=True)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> model input."""
    return (images - MEAN) / STD


# ---------------------------------------------------------------------------------------
# Geometry: one affine per image.


# Random parameters are drawn on the CPU from torch's global generator (so one seed gives
# the same augmentation on any device) and reach the batch's device in one copy: the
# dozens of tiny parameter ops would otherwise each cost a kernel launch on a GPU.


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high)


def _send(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Move CPU tensors (first dim n) to `device` as float32, in one pinned async copy."""
    if device.type == "cpu":
        return [t.float() for t in tensors]
    flat = torch.cat([t.reshape(len(t), -1).float() for t in tensors], dim=1)
    moved = flat.pin_memory().to(device, non_blocking=True)
    widths = [t[0].numel() if len(t) else 0 for t in tensors]
    return [part.reshape(t.shape) for part, t in zip(moved.split(widths, dim=1), tensors)]


def _crop_flip_affine(n: int, scale=(0.8, 1.0), ratio=(0.9, 1.1), degrees=10.0) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates ([-1, 1], grid_sample's).

    A random resized crop keeping 80-100% of the area (aspect 0.9-1.1), a rotation of
    up to `degrees` and a horizontal flip with probability 0.5: small enough to keep a
    48x48 face recognisable.
    """
    area = _uniform(n, *scale)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    cx = (torch.rand(n) * 2 - 1) * (1 - w)
    cy = (torch.rand(n) * 2 - 1) * (1 - h)
    angle = _uniform(n, -degrees, degrees) * (math.pi / 180)
    flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    row0 = torch.stack([w * flip * cos, -h * sin, cx], dim=1)
    row1 = torch.stack([w * flip * sin, h * cos, cy], dim=1)
    return torch.stack([row0, row1], dim=1)


def _warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # Reflection padding: rotated corners show mirrored image, not black wedges.
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Affine `first` applied to coordinates already mapped by `second` (3x3 product)."""
    pad = first.new_zeros(len(first), 1, 3)
    pad[..., 2] = 1.0
    return (torch.cat([first, pad], 1) @ torch.cat([second, pad], 1))[:, :2]


# ---------------------------------------------------------------------------------------
# TrivialAugment (Müller & Hutter 2021): each image draws ONE op and a uniform magnitude.
# Op set and ranges of RandAugment (Cubuk et al. 2020; torchvision's RandAugment space),
# the "TA (RA)" variant of the paper, except translation: at most 0.3 of the side instead
# of 150/331, so a 48x48 face stays in view. Geometric ops become affine matrices and are
# merged into the crop/flip warp; "Color" is saturation, a no-op for gray images.


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(images) if images.shape[1] == 3 else images


def _brightness(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), 1 + m)


def _color(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images), 1 + m)


def _contrast(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mean = _gray(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, 1 + m)


def _sharpness(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # torchvision's adjust_sharpness: blend with a 3x3 smoothed copy, borders untouched.
    c = images.shape[1]
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(c, 1, 3, 3)
    blurred = images.clone()
    blurred[..., 1:-1, 1:-1] = F.conv2d(images, kernel, groups=c)
    return _blend(images, blurred, 1 + m)


def _posterize(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # Keep 8 - m bits of the uint8 value, m in [0, 4].
    step = (2.0 ** m.round()).view(-1, 1, 1, 1)
    return torch.floor(torch.floor(images * 255 + 0.5) / step) * step / 255


def _solarize(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    threshold = (1 - m).view(-1, 1, 1, 1)
    return torch.where(images >= threshold, 1 - images, images)


def _autocontrast(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return TF.autocontrast(images)


def _equalize(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return TF.equalize(images)


def _identity(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return images


# name -> (image op or None for geometric ops, max magnitude, signed)
TRIVIAL_OPS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, float, bool]] = {
    "Identity": (_identity, 0.0, False),
    "ShearX": (None, 0.3, True),
    "ShearY": (None, 0.3, True),
    "TranslateX": (None, 0.3, True),  # fraction of the side
    "TranslateY": (None, 0.3, True),
    "Rotate": (None, 30.0, True),  # degrees
    "Brightness": (_brightness, 0.9, True),
    "Color": (_color, 0.9, True),
    "Contrast": (_contrast, 0.9, True),
    "Sharpness": (_sharpness, 0.9, True),
    "Posterize": (_posterize, 4.0, False),  # bits removed
    "Solarize": (_solarize, 1.0, False),  # 1 - threshold
    "AutoContrast": (_autocontrast, 0.0, False),
    "Equalize": (_equalize, 0.0, False),
}
_OP_NAMES = list(TRIVIAL_OPS)


def _geometric_affine(op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(n, 2, 3) matrices of the geometric TrivialAugment ops (identity for the others)."""
    n = len(op)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    is_op = {name: op == _OP_NAMES.index(name) for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")}
    theta[:, 0, 1] = torch.where(is_op["ShearX"], m, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(is_op["ShearY"], m, theta[:, 1, 0])
    theta[:, 0, 2] = torch.where(is_op["TranslateX"], 2 * m, theta[:, 0, 2])  # [-1, 1] spans 2
    theta[:, 1, 2] = torch.where(is_op["TranslateY"], 2 * m, theta[:, 1, 2])
    angle = torch.where(is_op["Rotate"], m * (math.pi / 180), torch.zeros_like(m))
    rot = torch.stack(
        [torch.stack([angle.cos(), -angle.sin(), torch.zeros_like(m)], 1),
         torch.stack([angle.sin(), angle.cos(), torch.zeros_like(m)], 1)], 1
    )
    return _compose(theta, rot)


class _TrivialDraw(NamedTuple):
    op: torch.Tensor  # (n,) op index per image
    magnitude: torch.Tensor  # (n,) signed magnitude
    order: torch.Tensor  # image indices sorted by op
    counts: list[int]  # images per op


def _draw_trivial(n: int) -> _TrivialDraw:
    """Per image: an op index and a signed magnitude drawn uniformly up to the op's max."""
    op = torch.randint(len(_OP_NAMES), (n,))
    top = torch.tensor([TRIVIAL_OPS[k][1] for k in _OP_NAMES])[op]
    signed = torch.tensor([TRIVIAL_OPS[k][2] for k in _OP_NAMES])[op]
    sign = torch.where(signed & (torch.rand(n) < 0.5), -1.0, 1.0)
    magnitude = torch.rand(n) * top * sign
    order = torch.argsort(op, stable=True)
    return _TrivialDraw(op, magnitude, order, torch.bincount(op, minlength=len(_OP_NAMES)).tolist())


def _apply_photometric(
    images: torch.Tensor, magnitude: torch.Tensor, order: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """Each photometric op on the rows that drew it (`order` groups the rows by op)."""
    out, start = images, 0
    for name, count in zip(_OP_NAMES, counts):
        rows = order[start : start + count]
        start += count
        fn = TRIVIAL_OPS[name][0]
        if count and fn is not None and fn is not _identity:
            out = out.index_copy(0, rows, fn(images[rows], magnitude[rows]))
    return out


def _draw_erase(n: int, height: int, width: int, p: float = 0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> torch.Tensor:
    """(n, 4) rectangles [top, left, bottom, right); empty when the image is not erased."""
    area = _uniform(n, *scale) * height * width
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]))
    h = torch.sqrt(area * log_r.exp()).round().clamp(1, height)
    w = torch.sqrt(area / log_r.exp()).round().clamp(1, width)
    top = (torch.rand(n) * (height - h + 1)).floor()
    left = (torch.rand(n) * (width - w + 1)).floor()
    on = torch.rand(n) < p
    return torch.stack([top, left, torch.where(on, top + h, top), left + w], dim=1)


def _erase(images: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    n, _, height, width = images.shape
    top, left, bottom, right = (boxes[:, i].view(n, 1, 1) for i in range(4))
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    mask = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return images.masked_fill(mask[:, None], value)


def random_erase(
    images: torch.Tensor, p: float = 0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value: float = 0.0
) -> torch.Tensor:
    """One rectangle per image with probability p (v2.RandomErasing's defaults), vectorised."""
    (boxes,) = _send(images.device, _draw_erase(len(images), *images.shape[-2:], p, scale, ratio))
    return _erase(images, boxes, value)


# ---------------------------------------------------------------------------------------
# Pipelines


def _none(batch: torch.Tensor, size: int) -> torch.Tensor:
    return normalize(_to_float(_resize(batch, size)))


def _weak(batch: torch.Tensor, size: int) -> torch.Tensor:
    images = _to_float(_resize(batch, size))
    (theta,) = _send(images.device, _crop_flip_affine(len(images)))
    return normalize(_warp(images, theta))


def _strong(batch: torch.Tensor, size: int) -> torch.Tensor:
    images = _to_float(_resize(batch, size))
    n = len(images)
    draw = _draw_trivial(n)
    theta = _compose(_crop_flip_affine(n), _geometric_affine(draw.op, draw.magnitude))
    boxes = _draw_erase(n, size, size)
    theta, magnitude, order, boxes = _send(images.device, theta, draw.magnitude, draw.order, boxes)
    images = _apply_photometric(_warp(images, theta), magnitude, order.long(), draw.counts)
    return _erase(normalize(images), boxes)


def _fundus_affine(n: int, zoom=(0.95, 1.1), shift: float = 0.05) -> torch.Tensor:
    """(n, 2, 3) matrices: a rotation by any angle (a fundus photograph has no "up" the
    grade depends on), a horizontal flip with probability 0.5 (with the free rotation that
    covers vertical flips too), a zoom of 0.95-1.1 and a shift of up to 5% of the side."""
    angle = torch.rand(n) * (2 * math.pi)
    scale = 1 / _uniform(n, *zoom)  # output -> input coordinates: zooming in samples a smaller area
    flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos() * scale, angle.sin() * scale
    cx, cy = _uniform(n, -shift, shift), _uniform(n, -shift, shift)
    return torch.stack([torch.stack([flip * cos, -sin, cx], 1), torch.stack([flip * sin, cos, cy], 1)], 1)


def _fundus(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Fundus photographs (a round retina on black, `fer.data.fundus`): any-angle rotation,
    flips, zoom, then brightness and contrast of +-20% (cameras and exposure differ); the
    corners a rotation uncovers are black like the border (zero padding), not mirrored retina."""
    images = _to_float(_resize(batch, size))
    n = len(images)
    theta, bright, contrast = _send(images.device, _fundus_affine(n), _uniform(n, -0.2, 0.2), _uniform(n, -0.2, 0.2))
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return normalize(_contrast(_brightness(images, bright), contrast))


AUGMENTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "none": _none,  # resize + normalise
    "weak": _weak,  # crop / rotate / flip
    "strong": _strong,  # weak + TrivialAugment + random erasing
    "fundus": _fundus,  # any-angle rotation, flips, zoom, brightness / contrast
}
check_registry(AUGMENTS, names.AUGMENTS, "fer.train.transforms.AUGMENTS")


def get_augment(kind: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    if kind not in AUGMENTS:
        raise ValueError(f"Unknown augmentation {kind!r}. Valid augmentations: {', '.join(AUGMENTS)}")
    return AUGMENTS[kind]


def make_train_transform(kind: str, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (B, C, H, W) -> normalised float32 (B, C, S, S), random per image.

    Randomness comes from torch's global CPU generator (torch.manual_seed), whatever the
    batch's device.
    """
    fn = get_augment(kind)

    def transform(batch: torch.Tensor) -> torch.Tensor:
        _check_batch(batch)
        return fn(batch, image_size)

    return transform


def make_eval_transform(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Deterministic: resize (antialiased) + normalise."""
    return make_train_transform("none", image_size)


def tta_views(batch_uint8: torch.Tensor, image_size: int) -> list[torch.Tensor]:
    """Test-time views: identity, horizontal flip, and the image shifted by about 1/16 of
    its side towards each corner (reflection padded); all normalised (B, C, S, S)."""
    _check_batch(batch_uint8)
    base = _none(batch_uint8, image_size)
    d = max(1, round(image_size / 16))
    padded = F.pad(base, (d, d, d, d), mode="reflect")
    views = [base, base.flip(-1)]
    for dy, dx in ((0, 0), (0, 2 * d), (2 * d, 0), (2 * d, 2 * d)):
        views.append(padded[..., dy : dy + image_size, dx : dx + image_size])
    return views
