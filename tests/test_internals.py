"""The doors to Ray's and Optuna's internals (search/internals.py, trainables/internals.py):
outside the tested versions their first use fails in one line naming the range, and the
packages import none of Ray Train's internals just by being imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from search import internals as search_internals
from trainables import internals as trainables_internals


def test_trainables_door_names_the_tested_ray_range(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(trainables_internals.VersionError) as info:
        trainables_internals.trial_storage()
    assert str(info.value) == "trainables needs Ray >=2.60,<2.61 (tested); found 2.61.0"


def test_search_door_names_the_tested_ray_range(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.59.3")
    with pytest.raises(trainables_internals.VersionError) as info:
        search_internals.asha_brackets(object())
    assert str(info.value) == "search needs Ray >=2.60,<2.61 (tested); found 2.59.3"


def test_search_door_names_the_tested_optuna_range(monkeypatch):
    import optuna

    monkeypatch.setattr(optuna, "__version__", "5.1.0")
    with pytest.raises(trainables_internals.VersionError) as info:
        search_internals.optuna_study(object())
    assert str(info.value) == "search needs Optuna >=4.0,<5.1 (tested); found 5.1.0"
    assert "\n" not in str(info.value)


def test_installed_versions_pass_the_doors():
    search_internals.check_versions()
    trainables_internals.require_ray()


@pytest.mark.parametrize("module", ["trainables", "search.run", "search.internals", "trainables.internals"])
def test_importing_reaches_no_ray_train_internals(module):
    code = (f"import sys, {module}; "
            "print([m for m in sys.modules if m.startswith('ray.train.v2._internal')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
