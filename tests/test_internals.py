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


def test_a_trial_actor_is_named_after_its_trial():
    """Tune's wrap_function puts the function's __mixins__ before FunctionTrainable, and its
    actor's repr (what the Ray dashboard's Actors page and log prefixes show) is `_name`:
    once setup has run, that is the function's name and the trial's."""
    from ray.tune.trainable.function_trainable import FunctionTrainable, wrap_function

    def pipeline_trial(config):
        return None

    actor_class = wrap_function(trainables_internals.name_trial_actors(pipeline_trial))
    mro = actor_class.__mro__
    assert mro.index(trainables_internals.TrialNamedActor) < mro.index(FunctionTrainable)

    class Trainable:  # what FunctionTrainable gives the mixin: the trial's name, then setup
        _name = "pipeline_trial"
        trial_name = "trial_1f640df6"

        def setup(self, config):
            self.configured = config

        def __repr__(self):
            return self._name

    class Actor(trainables_internals.TrialNamedActor, Trainable):
        pass

    actor = Actor()
    actor.setup({"lr": 0.01})
    assert repr(actor) == "pipeline_trial trial_1f640df6" and actor.configured == {"lr": 0.01}
    assert repr(Actor()) == "pipeline_trial"  # the class keeps its name; each actor gets its own
