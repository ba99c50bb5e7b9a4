"""Search spaces: the public API of `spaces/*.yaml` (reader, runtime `Space`, schema).

A space file names the parameters to search (with their distributions and the
conditions under which they exist), the values held fixed, the metric, the
searcher (Optuna TPE plus a baseline evaluated first) and the ASHA scheduler.
`load_space` (search/space_yaml.py, the one reader) validates all of it against
`fer.train.config.TrialConfig` before Ray starts, without importing torch; every error names
the file, the line, the key and what is allowed. `Space.check_models` then resolves
the model names (timm), also before Ray starts.

The parsed `Space` is itself the define-by-run function handed to Ray's
`OptunaSearch` (`space(trial)`), so conditional parameters such as `focal_gamma`
only exist in trials whose `loss` is `focal`.
"""

from __future__ import annotations

from search.samplers import SEARCH_SAMPLERS, sample_configs
from search.space_runtime import Space
from search.space_schema import DISTRIBUTIONS, SMOKE_BUDGET, Param, SpaceError
from search.space_yaml import SPACES_DIR, load_space, resolve_space_path

__all__ = [
    "DISTRIBUTIONS",
    "SEARCH_SAMPLERS",
    "SMOKE_BUDGET",
    "SPACES_DIR",
    "Param",
    "Space",
    "SpaceError",
    "load_space",
    "resolve_space_path",
    "sample_configs",
]
