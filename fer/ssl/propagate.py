"""Pseudo-labels helped by a graph: label spreading over labelled, pool and val images.

The teacher labels each pool image on its own. Label spreading (Zhou et al. 2004,
scikit-learn's `LabelSpreading`) labels it by its neighbours instead: a k-nearest-neighbour
graph over the labelled train images, the pool and val, the train labels spread along its
edges. The two err differently, so the pool's pseudo-label distribution is their mean, an
ensemble of two labellers. Where the graph is built matters:

  pixels    50 principal components of the images at most 32 px a side: what the classical
            peer in benchmarks/peers.py uses, strong where classes form clusters in pixel
            space (the digits set) and near chance where nuisance variation dominates (the
            demo faces: the peer's test macro-F1 is 0.13);
  features  the teacher's penultimate features, L2-normalised (Iscen et al. 2019, "Label
            Propagation for Deep Semi-supervised Learning"), where the teacher's own
            notion of similarity holds;
  auto      whichever of none, pixels and features labels val best.

Val images sit in the graph unlabelled, so the macro-F1 of each choice's labels on val says,
without the pool's labels, which labeller to trust: a choice the data decides (no test
split is read). The teacher alone is scored with its post-hoc offsets fitted on that same
val, which favours it; ties go to it too, so a graph is only used when it labels val better.

Measured on the digits set (benchmarks/quality.py's, seed-0 teacher, whole pool): the teacher
alone labels the pool at accuracy 0.957 (val macro-F1 0.964), with the pixel graph at 0.982
(0.993), so auto takes it; with the feature graph val macro-F1 falls to 0.933.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fer import names
from fer.names import check_registry
from fer.train.posthoc import macro_f1

GRAPH_SIDE = 32  # images are area-downsampled to at most this side before PCA
GRAPH_COMPONENTS = 50  # as the classical peer (benchmarks/peers.py)
# k and alpha of LabelSpreading: scikit-learn's knn kernel with 7 neighbours (the peer's) and
# alpha 0.2 (keep 80% of the spread label, 20% of the initial one; its default). On the digits
# set the graph's own labels (not averaged with the teacher's) on the seed-0 teacher's features
# scored val macro-F1 0.907-0.941 over k 7/15/30 x alpha 0.2/0.5/0.8, alpha 0.2 best at every k.
GRAPH_NEIGHBORS, GRAPH_ALPHA = 7, 0.2
CANDIDATES = {"none": ("none",), "pixels": ("pixels",), "features": ("features",),
              "auto": ("none", "pixels", "features")}
check_registry(CANDIDATES, names.PSEUDO_GRAPHS, "fer.ssl.propagate.CANDIDATES")


def pixel_space(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, <= 50) principal components of uint8 (N, H, W, C) images scaled to <= 32 px a side."""
    import torch
    import torch.nn.functional as F
    from sklearn.decomposition import PCA

    from fer.train.infer import to_nchw

    pixels = to_nchw(images).float() / 255.0
    if max(pixels.shape[-2:]) > GRAPH_SIDE:
        pixels = F.interpolate(pixels, size=(GRAPH_SIDE, GRAPH_SIDE), mode="area")
    flat = pixels.reshape(len(pixels), -1).numpy()
    components = min(GRAPH_COMPONENTS, *flat.shape)
    return PCA(n_components=components, random_state=seed).fit_transform(flat) if components else flat


def feature_space(features: np.ndarray) -> np.ndarray:
    """L2-normalised rows, so the graph's Euclidean neighbours are cosine neighbours."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def spread(space: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label distributions (M, K) of the rows of `space` after the first len(labels), which
    carry `labels`; classes the labels never name get probability 0."""
    from sklearn.semi_supervised import LabelSpreading

    labelled = len(labels)
    targets = np.concatenate([np.asarray(labels, dtype=np.int64), np.full(len(space) - labelled, -1)])
    neighbors = max(1, min(GRAPH_NEIGHBORS, len(space) - 1))
    model = LabelSpreading(kernel="knn", n_neighbors=neighbors, alpha=GRAPH_ALPHA).fit(space, targets)
    out = np.zeros((len(space) - labelled, num_classes))
    out[:, model.classes_[model.classes_ >= 0]] = model.label_distributions_[labelled:]
    return out


def graph_pseudo_probs(graph: str, teacher_pool: np.ndarray, teacher_val: np.ndarray, train_labels: np.ndarray,
                       val_labels: np.ndarray, space: Callable[[str], np.ndarray]) -> tuple[np.ndarray, dict]:
    """The pool's pseudo-label distribution under cfg.pseudo_graph, and what was chosen.

    `teacher_pool`/`teacher_val` are the teacher's (calibrated, debiased) probabilities;
    `space(name)` embeds train, pool and val, in that order, for "pixels" or "features". Each
    candidate's val macro-F1 is in the summary; the best is used (the first listed on ties).
    """
    num_classes, pool_size = teacher_pool.shape[1], len(teacher_pool)
    scores: dict[str, float] = {}
    pools: dict[str, np.ndarray] = {}
    for name in CANDIDATES[graph]:
        pools[name], val = teacher_pool, teacher_val
        if name != "none":
            spread_rest = spread(space(name), train_labels, num_classes)
            pools[name] = (teacher_pool + spread_rest[:pool_size]) / 2.0
            val = (teacher_val + spread_rest[pool_size:]) / 2.0
        scores[name] = macro_f1(val_labels, val)  # argmax of probabilities, as of logits
    chosen = max(scores, key=lambda name: (scores[name], -CANDIDATES[graph].index(name)))
    return pools[chosen], {"graph": chosen, "graph_val_macro_f1": scores}
