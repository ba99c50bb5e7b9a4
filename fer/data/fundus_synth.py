"""Generated fundus-like DR folders (seeded), for tests and benchmarks/dr_scale.py.

Each photograph is a JPEG of a bright, textured disc (the retina) on a black border, wider
than high (4:3 to 3:2) and often cut off at the top and bottom, as fundus cameras frame it,
with vessels and, by grade, more and larger lesions (dark red dots, yellow exudates), so a
model can learn something. Labels follow DDR's grade mix (DDR: Li et al. 2019, 12,522
images; No DR 46%, Mild 5%, Moderate 36%, Severe 2%, Proliferative 11%) and its split sizes
(train 50%, val 20%, test 30%, stratified by grade). The layout is fer.data's DR folder.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DDR_GRADE_MIX = (0.46, 0.05, 0.36, 0.02, 0.11)
DDR_SPLITS = {"train": 0.5, "val": 0.2, "test": 0.3}


def draw_fundus(rng: np.random.Generator, width: int, grade: int) -> Image.Image:
    """One photograph `width` px wide; lesions grow with `grade` (0-4)."""
    height = int(width / rng.uniform(4 / 3, 3 / 2))
    radius = height / 2 * rng.uniform(0.95, 1.15)  # > 1: cut off at the top and bottom
    cx, cy = width / 2 + rng.uniform(-0.05, 0.05) * width, height / 2 + rng.uniform(-0.03, 0.03) * height
    texture = Image.effect_noise((width // 8, height // 8), 40).resize((width, height), Image.Resampling.BILINEAR)
    base = (int(rng.integers(150, 220)), int(rng.integers(60, 110)), int(rng.integers(20, 50)))
    retina = Image.merge("RGB", [texture.point(lambda v, c=c: min(255, c + (v - 128) // 4)) for c in base])
    mask = Image.new("L", (width, height))
    ImageDraw.Draw(mask).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    draw = ImageDraw.Draw(retina)
    for _ in range(8):  # vessels from the optic disc
        angle = rng.uniform(0, 2 * np.pi)
        x0, y0 = cx - 0.3 * radius, cy
        draw.line((x0, y0, x0 + np.cos(angle) * radius, y0 + np.sin(angle) * radius),
                  fill=(110, 20, 10), width=max(1, width // 300))
    draw.ellipse((cx - 0.38 * radius, cy - 0.08 * radius, cx - 0.22 * radius, cy + 0.08 * radius), fill=(250, 220, 150))
    for _ in range(int(grade * rng.integers(4, 10))):  # haemorrhages and exudates
        r, a = radius * np.sqrt(rng.uniform(0, 0.8)), rng.uniform(0, 2 * np.pi)
        x, y, s = cx + r * np.cos(a), cy + r * np.sin(a), width / 250 * (1 + grade * rng.uniform(0.3, 0.8))
        draw.ellipse((x - s, y - s, x + s, y + s), fill=(90, 10, 10) if rng.random() < 0.6 else (240, 230, 120))
    photo = Image.new("RGB", (width, height))
    photo.paste(retina.filter(ImageFilter.GaussianBlur(width / 1000)), mask=mask)
    return photo


def draw_labels(n: int, rng: np.random.Generator, mix=DDR_GRADE_MIX) -> np.ndarray:
    """n grades in `mix` proportions (largest remainders), shuffled; every grade at least once."""
    counts = np.maximum(1, np.floor(np.asarray(mix) * n).astype(int))
    counts[np.argmax(counts)] += n - counts.sum()
    return rng.permutation(np.repeat(np.arange(len(mix)), counts))


def stratified_splits(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image's split, DDR_SPLITS's shares of every grade (train first: a rare grade's
    only image trains)."""
    split_of = np.empty(len(labels), object)
    names, shares = list(DDR_SPLITS), np.cumsum(list(DDR_SPLITS.values()))
    for grade in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == grade))
        cuts = np.ceil(shares * len(members)).astype(int)
        for k, split in enumerate(names):
            split_of[members[(cuts[k - 1] if k else 0):cuts[k]]] = split
    return split_of


def write_fundus_folder(root: str | os.PathLike, n: int, seed: int = 0, sides: tuple[int, int] = (1024, 2048),
                        quality: int = 90, workers: int | None = None) -> Path:
    """A DR folder of `n` photographs `sides` px wide, split like DDR; returns its path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = draw_labels(n, rng)
    widths = rng.integers(sides[0], sides[1] + 1, n)
    seeds = rng.integers(0, 2**31, n)
    split_of = stratified_splits(labels, rng)
    for split in DDR_SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        image = draw_fundus(np.random.default_rng(seeds[i]), int(widths[i]), int(labels[i]))
        image.save(root / split_of[i] / f"{i:06d}.jpg", quality=quality)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(one, range(n)))
    for split in DDR_SPLITS:
        rows = [i for i in range(n) if split_of[i] == split]
        (root / f"{split}.txt").write_text("".join(f"{i:06d}.jpg {labels[i]}\n" for i in rows))
    return root
