"""Ray Tune + Optuna + ASHA over YAML search spaces (`python -m search.run`).

Only `search/` and `trainables/` import Ray; `search.space` itself does not, so a space
can be validated (and its tests run) without starting anything.
"""

from search.space import (
    DISTRIBUTIONS,
    SEARCH_SAMPLERS,
    Param,
    Space,
    SpaceError,
    load_space,
    resolve_space_path,
    sample_configs,
)

__all__ = [
    "DISTRIBUTIONS",
    "SEARCH_SAMPLERS",
    "Param",
    "Space",
    "SpaceError",
    "load_space",
    "resolve_space_path",
    "sample_configs",
]
