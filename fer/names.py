"""The names a trial's choice-valued fields accept, and nothing else (a leaf: no imports).

`fer.train.config` validates a value against these tuples, so checking a YAML space needs no
torch; each registry (`fer.train.losses.LOSSES`, `fer.train.samplers.SAMPLERS`, ...) checks at import
that its keys are exactly its tuple here, so the two cannot drift apart.
"""

from __future__ import annotations

LOSSES = ("ce", "focal", "logit_adjusted", "balanced_softmax")
WEIGHT_SCHEMES = ("none", "inverse", "sqrt_inverse", "effective")
STEMS = ("standard", "small")
MODELS = ("mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "efficientnet_b0")  # our own adaptations
POSTHOC = ("none", "tau", "bias")
SELECTIONS = ("threshold", "crest", "flexmatch", "aligned")
PSEUDO_GRAPHS = ("none", "pixels", "features", "auto")
SAMPLERS = ("uniform", "sqrt", "balanced")
AUGMENTS = ("none", "weak", "strong", "fundus")
OPTIMIZERS = ("adamw", "sgd")
STUDENT_INITS = ("teacher", "scratch")
# stage 2's learning-rate schedule after its warmup (fer.train.loop.build_scheduler)
SCHEDULES = ("cosine", "constant")
# fer.ssl.pipeline: the teacher's selected pseudo-labels, or online consistency (fer.train.consistency)
STUDENT_MODES = ("offline", "fixmatch", "flexmatch")
ONLINE_MODES = ("fixmatch", "flexmatch")
# fer.train.consistency: a kept weak view's argmax, or its sharpened distribution, as the strong view's target
POOL_TARGETS = ("hard", "soft")
# fer.data.fundus: how a DR folder's photographs become squares, and an optional filter
LOAD_CROPS = ("retina", "squash")
LOAD_FILTERS = ("none", "graham")


def check_registry(registry: object, names: tuple[str, ...], what: str) -> None:
    """Raise at import when a registry's keys differ from its names tuple (a developer error)."""
    keys = tuple(registry)
    if keys != names:
        raise RuntimeError(f"{what} registry {keys} differs from fer.names {names}; update both together")
