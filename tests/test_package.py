"""The package surface: every re-exported name resolves, and light modules stay light."""

import subprocess
import sys

import pytest

import fer


@pytest.mark.parametrize("name", fer.__all__)
def test_every_export_resolves(name):
    assert getattr(fer, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fer.nope  # noqa: B018


def test_config_and_space_do_not_import_torch_or_ray():
    # search.space validates a YAML space before anything heavy starts.
    code = "import sys, fer.config, search.space; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_fer_never_imports_ray():
    code = "import sys, fer; [getattr(fer, n) for n in fer.__all__]; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
