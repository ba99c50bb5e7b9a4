"""Lazy re-exports (PEP 562) for a package `__init__`: it names its public objects and the
modules that own them, and a name's module is imported when the name is first used.

So importing one module of a package (`fer.train.config`, which a YAML space's validation
needs without torch) does not import the rest of it. tests/test_architecture.py reads
these `_EXPORTS` tables: a name imported through a package counts as an import of the
module that owns it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: each name of `exports` (name -> owning
    module) is looked up in its module on first use and kept in the package after that."""

    def __getattr__(name: str) -> Any:
        owner = exports.get(name)
        if owner is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(owner), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
