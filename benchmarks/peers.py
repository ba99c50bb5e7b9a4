"""Classical peers of the pipeline, and a small real data set that ships with scikit-learn.

The peers use the same splits as `fer.train`: they fit on the labelled train split (and the
semi-supervised ones on the unlabeled pool too, its labels hidden) and read test once.

  linear            LogisticRegression(class_weight="balanced") on the pixels / 255;
  label_spreading   LabelSpreading(kernel="knn", n_neighbors=7) (Zhou et al. 2004) on 50 PCA
                    components fitted on train + pool, the pool as unlabeled points;
  self_training     SelfTrainingClassifier (Yarowsky 1995) around an SVC(class_weight="balanced")
                    whose probabilities are calibrated on 3 folds, on the same components.

`write_digits` builds the real data set: scikit-learn's bundled handwritten digits
(UCI optdigits, 8x8, nothing downloaded), digits 0-6 as seven classes upsampled to 48x48
grayscale, a long-tailed labelled train split (16:1 between the largest and the smallest
class, as FER2013's Happy : Disgust), every remaining image of each class in the pool, and
balanced val and test splits; written as a split folder `fer.data` reads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

DIGIT_CLASSES = 7
DIGITS_VAL, DIGITS_TEST = 20, 30  # images per class
DIGITS_HEAD, DIGITS_RATIO = 90, 16.0  # labelled images of the largest class; largest : smallest


def digits_split_counts(rng: np.random.Generator) -> np.ndarray:
    """Labelled train images per class: DIGITS_HEAD * ratio^(-rank / 6), ranks shuffled."""
    ranks = rng.permutation(DIGIT_CLASSES)
    return np.round(DIGITS_HEAD * DIGITS_RATIO ** (-ranks / (DIGIT_CLASSES - 1))).astype(int)


def write_digits(folder: Path, seed: int = 0) -> str:
    """The long-tailed digits split folder (train/val/test/unlabeled.csv, classes.txt); its path."""
    import pandas as pd
    from PIL import Image
    from sklearn.datasets import load_digits

    from fer.io import atomic_write

    digits = load_digits()
    rng = np.random.default_rng(seed)
    train_counts = digits_split_counts(rng)
    rows: dict[str, list[tuple[int, np.ndarray]]] = {s: [] for s in ("train", "val", "test", "unlabeled")}
    for k in range(DIGIT_CLASSES):
        idx = rng.permutation(np.flatnonzero(digits.target == k))
        cuts = np.cumsum([DIGITS_VAL, DIGITS_TEST, train_counts[k]])
        for split, part in zip(("val", "test", "train", "unlabeled"), np.split(idx, cuts)):
            rows[split].extend((k, digits.images[i]) for i in part)
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        order = rng.permutation(len(items))
        pixels = [_upsample(items[i][1], Image) for i in order]
        frame = pd.DataFrame({"emotion": [items[i][0] for i in order], "pixels": pixels})
        atomic_write(folder / f"{split}.csv", lambda handle, f=frame: handle.write(f.to_csv(index=False).encode()))
    (folder / "classes.txt").write_text("".join(f"{k}\n" for k in range(DIGIT_CLASSES)))
    return str(folder)


def _upsample(image: np.ndarray, pil: Any) -> str:
    """An 8x8 digit (0-16) as 48x48 uint8 pixels, bilinear, space-separated as FER2013 writes them."""
    small = pil.fromarray(np.round(image * (255.0 / 16.0)).astype(np.uint8))
    return " ".join(map(str, np.asarray(small.resize((48, 48), pil.BILINEAR)).reshape(-1)))


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _scored(name: str, fit_predict: Callable[[], np.ndarray], truth: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import f1_score

    start = time.time()
    predicted = fit_predict()
    return {"method": name, "test_macro_f1": float(f1_score(truth, predicted, average="macro")),
            "seconds": time.time() - start}


def classical_peers(data: Any, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Test macro-F1 and seconds of the three peers above on a `fer.data.Dataset`."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier
    from sklearn.svm import SVC

    train, test, pool = data.splits["train"], data.splits["test"], data.splits["unlabeled"]
    x_train, x_test, x_pool = _flat(train.images), _flat(test.images), _flat(pool.images)
    unlabeled = np.full(len(x_pool), -1)

    def linear() -> np.ndarray:
        clf = LogisticRegression(class_weight="balanced", max_iter=1000).fit(x_train, train.labels)
        return clf.predict(x_test)

    def semi(model: Any) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            pca = PCA(n_components=50, random_state=seed).fit(np.concatenate([x_train, x_pool]))
            features = pca.transform(np.concatenate([x_train, x_pool]))
            model.fit(features, np.concatenate([train.labels, unlabeled]))
            return model.predict(pca.transform(x_test))
        return run

    # SVC's own probability=True is deprecated (scikit-learn 1.9): calibrated on 3 folds instead
    # (fewer folds where a class has fewer than 3 labelled images: benchmarks/label_fraction.py's 1/16)
    folds = int(min(3, np.bincount(train.labels).min()))
    svc = CalibratedClassifierCV(SVC(class_weight="balanced", random_state=seed), cv=folds, ensemble=False)
    peers = [("linear", linear), ("label_spreading", semi(LabelSpreading(kernel="knn", n_neighbors=7))),
             ("self_training", semi(SelfTrainingClassifier(svc)))]
    return {name: _scored(name, run, test.labels) for name, run in peers}
