"""What a data set is once loaded: splits of uint8 images and int64 labels, the class names
of the two supported tasks, and the one error type bad input raises."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fer import names

FER_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
# The five grades of the International Clinical DR severity scale (EyePACS / APTOS labels).
DR_CLASSES = ["No DR", "Mild", "Moderate", "Severe", "Proliferative"]
FER_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test", "Unlabeled": "unlabeled"}
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """Bad input data; the message names the file, the row or line, and what was expected."""


@dataclass(frozen=True)
class LoadOptions:
    """How a source is read. Only DR folders use size, crop and filter (FER images are
    decoded as they are); skip_bad applies to every image file."""

    size: int = 128  # side of the square images
    crop: str = "retina"  # fer.data.fundus.LOAD_CROPS: retina (crop the black border, pad) or squash
    filter: str = "none"  # fer.data.fundus.LOAD_FILTERS: none or graham (Ben Graham's local colour)
    skip_bad: bool = False  # leave out unreadable, missing or unlisted images (counted) instead of raising

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"load_size must be a positive integer, got {self.size!r}")
        for key, value, allowed in (("load_crop", self.crop, names.LOAD_CROPS),
                                    ("load_filter", self.filter, names.LOAD_FILTERS)):
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not allowed. Choose one of: {', '.join(allowed)}")

    def key(self) -> bytes:
        """What the decoded DR arrays depend on (skip_bad does not change a kept image)."""
        return b"size %d crop %s filter %s" % (self.size, self.crop.encode(), self.filter.encode())


@dataclass(eq=False)  # arrays have no single truth value for ==
class Split:
    images: np.ndarray  # uint8 (N, H, W, C), C-contiguous; C = 1 (FER) or 3 (DR)
    labels: np.ndarray | None  # int64 (N,); for "unlabeled" the held-out true labels or None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class MappedOrigin:
    """Where a loaded data set's memory-mapped arrays live, picklable: a process on the same
    node opens the cache entry itself (`fer.data.open_mapped`) instead of receiving a copy; on
    another node, where the entry is missing, the source is decoded there once."""

    entry: str  # the cache entry folder
    splits: tuple[str, ...]  # the splits to open (a search's trials never open "test")
    source: str  # Dataset.source
    path: str | None  # the --data path (None: the embedded demo data)
    options: LoadOptions
    cache_dir: str


@dataclass(frozen=True)
class Decoded:
    """What a layout decodes: class names, splits, and the inputs skip_bad left out."""

    classes: list[str]
    splits: dict[str, Split]
    skipped: list[str] = field(default_factory=list)  # "<where>: <why>", one a bad file


@dataclass(eq=False)
class Dataset:
    classes: list[str]
    splits: dict[str, Split]  # "train", "val", "test" and optionally "unlabeled"
    source: str  # the path, or "embedded demo data (seed S)"
    origin: MappedOrigin | None = None  # set when the images are memory-mapped from the cache
    skipped: list[str] = field(default_factory=list)  # bad inputs left out by skip_bad

    def without(self, *dropped: str) -> "Dataset":
        """The same data set without the `dropped` splits (a search hands trials no "test")."""
        splits = {name: split for name, split in self.splits.items() if name not in dropped}
        origin = None if self.origin is None else replace(self.origin, splits=tuple(splits))
        return Dataset(self.classes, splits, self.source, origin, list(self.skipped))

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
