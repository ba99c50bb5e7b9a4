"""Ray Tune + Optuna + ASHA over YAML search spaces (`python -m search.run`).

Only `search/` and `trainables/` import Ray; `search.space` itself does not, so a space
can be validated (and its tests run) without starting anything.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """The public names of `search.space` (the public face of search spaces), resolved lazily
    so that `import search.run` and friends do not pay for them twice."""
    space = importlib.import_module("search.space")
    if name in space.__all__:
        return getattr(space, name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(importlib.import_module("search.space").__all__))
