"""What a data set is once loaded: splits of uint8 images and int64 labels, the class names
of the two supported tasks, and the one error type bad input raises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FER_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
# The five grades of the International Clinical DR severity scale (EyePACS / APTOS labels).
DR_CLASSES = ["No DR", "Mild", "Moderate", "Severe", "Proliferative"]
FER_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test", "Unlabeled": "unlabeled"}
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """Bad input data; the message names the file, the row or line, and what was expected."""


@dataclass(eq=False)  # arrays have no single truth value for ==
class Split:
    images: np.ndarray  # uint8 (N, H, W, C), C-contiguous; C = 1 (FER) or 3 (DR)
    labels: np.ndarray | None  # int64 (N,); for "unlabeled" the held-out true labels or None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(eq=False)
class Dataset:
    classes: list[str]
    splits: dict[str, Split]  # "train", "val", "test" and optionally "unlabeled"
    source: str  # the path, or "embedded demo data (seed S)"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.splits["train"].images.shape[3])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(s) for s in self.splits["train"].images.shape[1:])  # type: ignore[return-value]

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Images per class in `split`, int64 (num_classes,)."""
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; this data set has {', '.join(self.splits)}")
        labels = self.splits[split].labels
        if labels is None:
            raise ValueError(f"split {split!r} of {self.source} has no labels")
        return np.bincount(labels, minlength=self.num_classes).astype(np.int64)
