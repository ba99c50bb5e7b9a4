"""The package surface: every re-exported name resolves to the object its owning module
defines, unknown names fail by name, the command-line entry points answer --help, and
light modules stay light."""

import importlib
import subprocess
import sys

import pytest

import fer
from support import ROOT


def test_all_is_the_sorted_export_table():
    assert fer.__all__ == sorted(fer._EXPORTS)
    assert set(fer.__all__) <= set(dir(fer))


@pytest.mark.parametrize("name", fer.__all__)
def test_every_export_resolves_to_its_owner(name):
    owner = fer._EXPORTS[name]
    value = getattr(fer, name)
    assert value is getattr(importlib.import_module(owner), name)  # the owner's object, not a copy
    defined_in = getattr(value, "__module__", None)
    if callable(value) and defined_in is not None:  # classes and functions: defined in the owner (or a module of it)
        assert defined_in == owner or defined_in.startswith(owner + "."), f"fer.{name} comes from {defined_in}"
    assert fer.__dict__[name] is value  # cached after the first lookup


def test_unknown_attribute_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match=r"^module 'fer' has no attribute 'nope'$"):
        fer.nope  # noqa: B018
    assert not hasattr(fer, "Nope") and "nope" not in dir(fer)


# Every `python -m` entry point the README documents.
ENTRY_POINTS = ["fer.train", "fer.evaluate", "fer.export", "fer.data.synth", "fer.data", "search.run", "search.export"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_point_help_exits_zero_with_usage(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m {module}"), out.stdout[:300]
    assert "--help" in out.stdout and "Traceback" not in out.stderr


def test_config_and_space_do_not_import_torch_or_ray():
    # search.space validates a YAML space before anything heavy starts.
    code = "import sys, fer.train.config, search.space; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_fer_never_imports_ray():
    code = "import sys, fer; [getattr(fer, n) for n in fer.__all__]; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
