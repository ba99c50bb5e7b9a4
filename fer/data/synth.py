"""Embedded demo data: deterministic synthetic 48x48 faces in FER2013's CSV format.

The search needs a data set that is small enough to run on a laptop, ships with the
code (nothing is downloaded) and is hard in the same ways FER2013 is:

* the training split is imbalanced like FER2013's (Disgust : Happy is about 1 : 16),
* the minority classes are confusable with majority ones: Disgust shares Angry's
  lowered, inward-sloping brows and narrowed eyes and differs only by a nose wrinkle and
  a one-sided raised upper lip; Fear shares Surprise's raised brows, wide eyes and open
  mouth and differs by straighter, inward-tilted brows and a wider, lower mouth,
* every expression is drawn with a random intensity, so weak expressions overlap
  Neutral (and Sad / Angry overlap each other), giving a non-zero Bayes error,
* nuisance variation (pose, scale, face shape, skin tone, lighting gradient, contrast,
  blur, noise) that a model has to ignore.

So a plain cross-entropy model under-predicts Disgust, and class weighting, re-sampling,
logit adjustment and pseudo-labels (the pool is drawn from the training distribution)
have something to fix. Faces are rendered as anti-aliased parametric shapes evaluated on
the pixel grid for a whole batch at once, so the default set (about 7,400 images) takes
a few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fer.io import atomic_write

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
SIZE = 48
CSV_NAME = "fer2013_demo.csv"

# FER2013 training-split counts (Goodfellow et al. 2013, ICML challenges in
# representation learning), in label order.
FER_TRAIN_COUNTS = np.array([3995, 436, 4097, 7215, 4830, 3171, 4965])
# scale=1.0 gives about 3,000 training images (28,709 * 0.105); Disgust keeps 46.
TRAIN_FRACTION = 0.105
EVAL_PER_CLASS = 100  # PublicTest and PrivateTest, per class, at scale=1.0
USAGES = {"train": "Training", "val": "PublicTest", "test": "PrivateTest", "unlabeled": "Unlabeled"}

# Expression parameters, in face units (the face ellipse is about 1.25 wide, 1.6 tall;
# y grows downwards). Each class is a displacement from the Neutral face; a sample's
# displacement is scaled by its expression intensity and jittered, so classes overlap.
PARAMS = [
    "brow_raise",  # brows up (+) / down (-)
    "brow_slope",  # inner ends down (+, frown) / up (-, worry)
    "brow_arch",  # middle of the brow above its ends
    "eye_open",  # eyelid opening, 1 = neutral
    "mouth_curve",  # corners up (+, smile) / down (-)
    "mouth_open",  # lip separation
    "mouth_width",  # half width
    "lip_raise",  # one-sided raised upper lip (side chosen at random)
    "wrinkle",  # contrast of the nose wrinkle lines
    "mouth_drop",  # mouth centre moved down
]
NEUTRAL = np.array([0.0, 0.0, 0.025, 1.0, 0.0, 0.0, 0.20, 0.0, 0.0, 0.0])
DELTAS = np.array(
    [
        # raise  slope  arch   eye   curve  open   width  lip    wrink  drop
        [-0.05, 0.09, -0.01, -0.35, -0.035, 0.015, -0.02, 0.00, 0.00, 0.00],  # Angry
        [-0.045, 0.075, -0.01, -0.40, -0.045, 0.015, -0.01, 0.045, 0.55, 0.00],  # Disgust
        [0.06, -0.05, -0.02, 0.45, -0.02, 0.07, 0.05, 0.00, 0.00, 0.02],  # Fear
        [0.01, 0.00, 0.00, -0.25, 0.10, 0.04, 0.07, 0.00, 0.00, 0.00],  # Happy
        [0.015, -0.07, 0.00, -0.30, -0.07, 0.00, -0.01, 0.00, 0.00, 0.01],  # Sad
        [0.085, 0.00, 0.04, 0.60, 0.00, 0.10, -0.05, 0.00, 0.00, 0.03],  # Surprise
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # Neutral
    ]
)
# Per-parameter jitter (standard deviation), the same for every class: person-to-person
# variation that blurs the class boundaries.
JITTER = np.array([0.025, 0.035, 0.015, 0.18, 0.03, 0.02, 0.025, 0.015, 0.18, 0.015])


def split_counts(scale: float = 1.0, eval_scale: float | None = None,
                 pool_multiple: float = 1.0) -> dict[str, np.ndarray]:
    """Images per class for each split: train and unlabeled follow FER2013's training mix.
    `eval_scale` sizes val and test on their own (None: as `scale`), so a set with few labels
    can still be measured on as many val and test images as the full-size one; the unlabeled
    pool has `pool_multiple` times the labelled split's images of each class."""
    eval_scale = scale if eval_scale is None else eval_scale
    for name, value in (("scale", scale), ("eval_scale", eval_scale), ("pool_multiple", pool_multiple)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    train = np.maximum(1, np.rint(FER_TRAIN_COUNTS * TRAIN_FRACTION * scale)).astype(np.int64)
    per_class = max(2, int(round(EVAL_PER_CLASS * eval_scale)))
    evaluation = np.full(len(CLASSES), per_class, dtype=np.int64)
    pool = np.maximum(1, np.rint(train * pool_multiple)).astype(np.int64)
    return {"train": train, "val": evaluation, "test": evaluation.copy(), "unlabeled": pool}


def sample_params(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw expression and nuisance parameters for each label; one row per face."""
    n = len(labels)
    # Intensity: most expressions are clear, some are faint and look almost Neutral.
    intensity = np.clip(rng.beta(2.2, 1.3, n) * 1.15, 0.05, 1.15)
    expr = NEUTRAL + DELTAS[labels] * intensity[:, None] + rng.normal(0, 1, (n, len(PARAMS))) * JITTER
    p = {name: expr[:, i] for i, name in enumerate(PARAMS)}
    p["eye_open"] = np.clip(p["eye_open"], 0.15, 2.0)
    p["mouth_open"] = np.clip(p["mouth_open"], 0.0, None)
    p["mouth_width"] = np.clip(p["mouth_width"], 0.09, 0.34)
    p["wrinkle"] = np.clip(p["wrinkle"], 0.0, 1.0)
    p["lip_raise"] = np.abs(p["lip_raise"]) * rng.choice([-1.0, 1.0], n)
    # Nuisance: pose, scale, identity, photometry.
    p["angle"] = rng.normal(0, 0.12, n)  # radians
    p["shift_x"] = rng.normal(0, 0.05, n)
    p["shift_y"] = rng.normal(0, 0.05, n)
    p["scale"] = rng.uniform(0.95, 1.2, n)  # FER2013 crops are tight
    p["face_w"] = rng.uniform(0.56, 0.70, n)
    p["face_h"] = rng.uniform(0.78, 0.90, n)
    p["eye_gap"] = rng.uniform(0.23, 0.30, n)
    p["eye_y"] = rng.normal(-0.12, 0.025, n)
    p["mouth_y"] = rng.normal(0.42, 0.025, n)
    p["skin"] = rng.uniform(95, 215, n)
    p["background"] = rng.uniform(15, 240, n)
    p["hair"] = rng.uniform(10, 120, n)
    p["hair_line"] = rng.uniform(-0.75, -0.45, n)
    p["feature_dark"] = rng.uniform(0.25, 0.5, n)  # features are this fraction of skin
    p["light_x"] = rng.normal(0, 0.25, n)  # lighting gradient, fraction per face unit
    p["light_y"] = rng.normal(0, 0.15, n)
    p["contrast"] = rng.uniform(0.7, 1.2, n)
    p["noise"] = rng.uniform(3, 14, n)
    p["blur"] = rng.uniform(0.0, 0.8, n)
    return p


# Per-face parameters shaped (N, 1, 1) so they broadcast over the (N, 48, 48) pixel grid.
Columns = dict[str, np.ndarray]
Num = float | np.ndarray


def ramp(d: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (negative inside), about a pixel wide."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def ellipse_sd(x: np.ndarray, y: np.ndarray, cx: Num, cy: Num, a: Num, b: Num) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse."""
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return (r - 1.0) * np.minimum(a, b)


def segment_sd(
    x: np.ndarray, y: np.ndarray, x0: Num, y0: Num, x1: Num, y1: Num, half_width: Num
) -> np.ndarray:
    """Signed distance to a thick line segment (a capsule)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - x0 - t * dx, y - y0 - t * dy) - half_width


def paint(img: np.ndarray, coverage: np.ndarray, value: Num) -> np.ndarray:
    """Blend `value` over `img` where the shape covers the pixel."""
    return img + coverage * (value - img)


def face_coordinates(c: Columns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel centres mapped into each face's own frame (inverse of rotate, scale, shift)."""
    u = (np.arange(SIZE, dtype=np.float32) + 0.5) / SIZE * 2.0 - 1.0
    gy, gx = np.meshgrid(u, u, indexing="ij")
    cos, sin, s = np.cos(c["angle"]), np.sin(c["angle"]), c["scale"]
    x0, y0 = gx[None] - c["shift_x"], gy[None] - c["shift_y"]
    x = (cos * x0 + sin * y0) / s
    y = (-sin * x0 + cos * y0) / s
    px = (2.0 / SIZE) / s  # one pixel in face units
    return x, y, px


def draw_brows(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, px: np.ndarray, c: Columns
) -> np.ndarray:
    """Brows: height, inner-end slope (frown / worry) and arch (FACS AU1, AU2, AU4)."""
    ax = np.abs(x)
    base = c["eye_y"] - 0.17 - c["brow_raise"]
    t = (ax - 0.10) / 0.30  # 0 at the inner end, 1 at the outer end
    centre = base + c["brow_slope"] * (0.5 - t) * 2.0 - c["brow_arch"] * 4.0 * t * (1.0 - t)
    slope = -c["brow_slope"] * 2.0 / 0.30 - c["brow_arch"] * 4.0 * (1.0 - 2.0 * t) / 0.30
    d_line = np.abs(y - centre) / np.sqrt(1.0 + slope**2) - 0.03
    d_ends = np.maximum(0.10 - ax, ax - 0.40)
    cov = ramp(np.maximum(d_line, d_ends), px)
    return paint(img, cov, c["skin"] * c["feature_dark"] * 0.8)


def draw_eyes(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, px: np.ndarray, c: Columns
) -> np.ndarray:
    """Eyes: lid opening from squint (Happy, Angry) to wide (Surprise, Fear; FACS AU5)."""
    ax = np.abs(x)
    half_h = 0.018 + 0.045 * c["eye_open"]
    cx, cy = c["eye_gap"], c["eye_y"]
    white = np.minimum(c["skin"] * 1.25 + 20.0, 250.0)
    sd = ellipse_sd(ax, y, cx, cy, 0.10, half_h)
    img = paint(img, ramp(np.abs(sd) - 0.012, px), c["skin"] * c["feature_dark"])
    img = paint(img, ramp(sd + 0.012, px), white)
    iris = np.maximum(ellipse_sd(ax, y, cx, cy, 0.045, 0.045), sd + 0.01)
    return paint(img, ramp(iris, px), c["skin"] * c["feature_dark"] * 0.5)


def draw_nose(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, px: np.ndarray, c: Columns
) -> np.ndarray:
    """Nose line, nostrils and, for Disgust, wrinkles across the bridge."""
    dark = c["skin"] * (1.0 - 0.35 * (1.0 - c["feature_dark"]))
    img = paint(img, ramp(segment_sd(x, y, 0.0, -0.02, 0.03, 0.17, 0.012), px) * 0.5, dark)
    nostrils = ellipse_sd(np.abs(x), y, 0.055, 0.2, 0.03, 0.018)
    img = paint(img, ramp(nostrils, px) * 0.8, c["skin"] * c["feature_dark"])
    # Disgust: wrinkles across the bridge of the nose (FACS AU9, nose wrinkler; Ekman & Friesen 1978).
    ax = np.abs(x)
    w = c["wrinkle"]
    for k in range(2):
        off = 0.05 * k
        d = segment_sd(ax, y, 0.03, -0.03 + off, 0.13, 0.03 + off, 0.011)
        img = paint(img, ramp(d, px) * w, c["skin"] * c["feature_dark"])
    return img


def draw_mouth(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, px: np.ndarray, c: Columns
) -> np.ndarray:
    """Mouth: curve, opening, width and a one-sided raised upper lip."""
    w = c["mouth_width"]
    xn = np.clip(x / w, -1.0, 1.0)
    lid = 1.0 - xn**2
    # Centre line: corners up for +curve; a raised upper lip lifts one side (FACS AU10,
    # upper lip raiser, often one-sided in disgust). The side is random, so a horizontal
    # flip keeps the label.
    mid = c["mouth_y"] + c["mouth_drop"] - c["mouth_curve"] * (xn**2 - 0.3)
    mid = mid - c["lip_raise"] * np.clip(xn, 0, 1)
    upper = mid - c["mouth_open"] * 0.4 * lid - 0.5 * np.abs(c["lip_raise"]) * lid
    lower = mid + c["mouth_open"] * lid
    thick = 0.018
    d = np.maximum.reduce([upper - thick - y, y - lower - thick, np.abs(x) - w])
    img = paint(img, ramp(d, px), c["skin"] * c["feature_dark"] * 0.6)
    return img


def render(p: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Render faces for parameter rows; returns uint8 (N, 48, 48)."""
    c = {k: v[:, None, None].astype(np.float32) for k, v in p.items()}
    x, y, px = face_coordinates(c)
    img = np.broadcast_to(c["background"], x.shape).astype(np.float32)
    img = paint(img, ramp(ellipse_sd(x, y, 0.0, -0.2, c["face_w"] * 1.12, c["face_h"]), px), c["hair"])
    img = paint(img, ramp(ellipse_sd(x, y, 0.0, 0.0, c["face_w"], c["face_h"]), px), c["skin"])
    # Hair fringe: covers the forehead above a random hairline.
    fringe = np.maximum(y - c["hair_line"], ellipse_sd(x, y, 0.0, -0.2, c["face_w"] * 1.12, c["face_h"]))
    img = paint(img, ramp(fringe, px), c["hair"])
    for draw in (draw_brows, draw_eyes, draw_nose, draw_mouth):
        img = draw(img, x, y, px, c)
    img = blur(img, p["blur"])
    light = 1.0 + c["light_x"] * x + c["light_y"] * y
    img = (img * light - 128.0) * c["contrast"] + 128.0
    img = img + rng.normal(0.0, 1.0, img.shape).astype(np.float32) * c["noise"]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per-image separable Gaussian blur (3-tap kernel whose width follows sigma)."""
    s = np.maximum(sigma, 1e-3)[:, None, None].astype(np.float32)
    side = np.exp(-0.5 / s**2)
    k0, k1 = 1.0 / (1.0 + 2.0 * side), side / (1.0 + 2.0 * side)
    for axis in (1, 2):
        padded = np.concatenate([img.take([0], axis), img, img.take([-1], axis)], axis=axis)
        lo = padded.take(range(0, SIZE), axis)
        hi = padded.take(range(2, SIZE + 2), axis)
        img = k0 * img + k1 * (lo + hi)
    return img


def make_split(
    counts: np.ndarray, rng: np.random.Generator, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled labels with exactly `counts` per class, and their rendered faces."""
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    params = sample_params(labels, rng)
    images = np.empty((len(labels), SIZE, SIZE), dtype=np.uint8)
    for start in range(0, len(labels), chunk):
        part = {k: v[start : start + chunk] for k, v in params.items()}
        images[start : start + chunk] = render(part, rng)
    return labels, images


def format_pixels(images: np.ndarray) -> list[str]:
    """FER2013 pixel strings: space-separated decimal values, row-major."""
    table = np.array([str(v) for v in range(256)], dtype=object)
    flat = images.reshape(len(images), -1)
    return [" ".join(table[row]) for row in flat]


def generate_arrays(seed: int = 0, scale: float = 1.0, eval_scale: float | None = None,
                    pool_multiple: float = 1.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split: (labels int64 (N,), images uint8 (N, 48, 48)); the same for the same seed."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return {name: make_split(counts, rng) for name, counts in
            split_counts(scale, eval_scale, pool_multiple).items()}


def generate(seed: int = 0, scale: float = 1.0, eval_scale: float | None = None,
             pool_multiple: float = 1.0) -> pd.DataFrame:
    """The demo data set as a FER2013-style frame: columns emotion, pixels, Usage.

    Unlabeled rows keep their true emotion so pseudo-label precision can be reported
    (a real FER2013 file would leave it empty).
    """
    frames = []
    for name, (labels, images) in generate_arrays(seed, scale, eval_scale, pool_multiple).items():
        columns = {"emotion": labels, "pixels": format_pixels(images), "Usage": USAGES[name]}
        frames.append(pd.DataFrame(columns))
    return pd.concat(frames, ignore_index=True)


def write_csv(out_dir: str, seed: int = 0, scale: float = 1.0, eval_scale: float | None = None,
              pool_multiple: float = 1.0) -> str:
    """Write `fer2013_demo.csv` into `out_dir` atomically and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CSV_NAME)
    frame = generate(seed, scale, eval_scale, pool_multiple)
    atomic_write(Path(path), lambda handle: handle.write(frame.to_csv(index=False).encode()))
    return path


def save_preview(path: str, seed: int = 0, per_class: int = 8, zoom: int = 3) -> str:
    """A PNG grid: one row per class (labelled), `per_class` training-distribution faces."""
    from PIL import Image, ImageDraw

    rng = np.random.Generator(np.random.PCG64(seed))
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    params = sample_params(labels, rng)
    images = render(params, rng)
    label_w, cell = 70, SIZE * zoom + 4
    sheet = Image.new("L", (label_w + per_class * cell, len(CLASSES) * cell), 255)
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        row, column = divmod(i, per_class)
        tile = Image.fromarray(image).resize((SIZE * zoom, SIZE * zoom), Image.NEAREST)
        sheet.paste(tile, (label_w + column * cell + 2, row * cell + 2))
        if column == 0:
            draw.text((4, row * cell + cell // 2 - 6), CLASSES[row], fill=0)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    sheet.save(path)
    return path


def count_table(frame: pd.DataFrame) -> str:
    """Per-split class counts as a small text table."""
    table = pd.crosstab(frame["Usage"], frame["emotion"]).reindex(
        index=list(USAGES.values()), columns=range(len(CLASSES)), fill_value=0
    )
    table.columns = CLASSES
    table["total"] = table.sum(axis=1)
    return table.to_string()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fer.data.synth", description="Write the embedded demo data set as a FER2013 CSV."
    )
    parser.add_argument("--out", required=True, help="directory to write fer2013_demo.csv into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = about 3,000 training images")
    parser.add_argument("--eval-scale", type=float, default=None,
                        help="val and test size on its own (default: --scale); 1.0 = 100 images a class")
    parser.add_argument("--pool-multiple", type=float, default=1.0,
                        help="unlabeled pool images per labelled image, per class (default 1.0; few labels and "
                             "a large pool, where semi-supervised learning is for: --scale 0.25 --pool-multiple 7)")
    parser.add_argument("--preview", help="also save a PNG grid of sample faces per class here")
    args = parser.parse_args(argv)
    for flag, value in (("--scale", args.scale), ("--eval-scale", args.eval_scale),
                        ("--pool-multiple", args.pool_multiple)):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    start = time.perf_counter()
    path = write_csv(args.out, seed=args.seed, scale=args.scale, eval_scale=args.eval_scale,
                     pool_multiple=args.pool_multiple)
    print(f"wrote {path} ({time.perf_counter() - start:.1f}s)")
    print(count_table(pd.read_csv(path, usecols=["emotion", "Usage"])))
    if args.preview:
        print(f"preview: {save_preview(args.preview, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
