"""search.space: the YAML reader, its error messages and the define-by-run sampling."""

from __future__ import annotations

import textwrap

import optuna
import pytest

from fer.train.config import TrialConfig, config_choices
from search.space import DISTRIBUTIONS, SPACES_DIR, SpaceError, load_space, sample_configs

SHIPPED = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))

VALID = """\
metric: {name: val_macro_f1, mode: max}
fixed:
  epochs: 2
  student_epochs: 1
parameters:
  loss:
    choice: [ce, focal]
  focal_gamma:
    uniform: [0.5, 3.0]
    when: {loss: focal}
  lr:
    loguniform: [1.0e-4, 1.0e-2]
searcher:
  baseline: {loss: ce}
scheduler: {grace_period: 1, reduction_factor: 2}
"""


def write(tmp_path, text: str, name: str = "space.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_parse_and_sample(name):
    space = load_space(name)
    assert space.max_t == space.fixed["epochs"] + space.fixed["student_epochs"]
    # the Quickstart ranks models as they are handed out (with their post-hoc offsets); CI's smoke by argmax;
    # DR grading by quadratic weighted kappa
    expected = {"imbalance": "val_macro_f1_posthoc", "smoke": "val_macro_f1", "dr": "val_kappa"}
    assert space.metric == expected[name] and space.mode == "max"
    for params in sample_configs(space, 8):
        space.trial_config(params)  # every sample is a config the trial accepts


def test_bare_name_with_or_without_extension(tmp_path):
    assert load_space("imbalance").path == load_space("imbalance.yaml").path
    assert load_space(write(tmp_path, VALID)).name == "space"


def test_imbalance_baseline_is_plain_cross_entropy():
    base = load_space("imbalance").baseline_point()
    assert base["loss"] == "ce" and base["class_weights"] == "none" and base["class_cap"] == 0
    assert "focal_gamma" not in base and "cb_beta" not in base
    assert base["lr"] == TrialConfig.lr  # unlisted values fall back to the TrialConfig default


@pytest.mark.parametrize("kind", sorted(DISTRIBUTIONS))
def test_every_distribution_parses(tmp_path, kind):
    spec = {
        "choice": "choice: [ce, focal]",
        "categorical": "categorical: [ce, focal]",
        "uniform": "uniform: [0.5, 2.0]",
        "loguniform": "loguniform: [0.5, 2.0]",
        "int": "int: [0, 3]",
        "fixed": "fixed: 1.5",
    }[kind]
    name = {"choice": "loss", "categorical": "loss", "int": "class_cap"}.get(kind, "focal_gamma")
    space = load_space(write(tmp_path, f"parameters:\n  {name}:\n    {spec}\n"))
    for params in sample_configs(space, 4):
        assert space.trial_config(params)


BAD = {
    "unknown top-level key": (
        VALID + "bogus: 1\n",
        ["line 16", "'bogus'", "Allowed keys: description, metric"],
    ),
    "unknown distribution": (
        VALID.replace("uniform: [0.5, 3.0]", "normal: [0.5, 3.0]"),
        ["line 9", "parameters.focal_gamma.normal", "unknown distribution 'normal'", "loguniform"],
    ),
    "low above high": (
        VALID.replace("[1.0e-4, 1.0e-2]", "[1.0e-2, 1.0e-4]"),
        ["line 12", "parameters.lr.loguniform", "low 0.01 > high 0.0001"],
    ),
    "condition on a missing parameter": (
        VALID.replace("when: {loss: focal}", "when: {optimiser: sgd}"),
        ["line 10", "parameters.focal_gamma.when.optimiser", "not a parameter declared above", "loss"],
    ),
    "condition on a value the parent cannot take": (
        VALID.replace("when: {loss: focal}", "when: {loss: focall}"),
        ["parameters.focal_gamma.when.loss", "'focall' is not a value of loss", "Allowed: ce, focal"],
    ),
    "parameter the trial config does not have": (
        VALID.replace("  lr:\n", "  learning_rate:\n"),
        ["line 11", "parameters.learning_rate", "not a trial config field", "lr, weight_decay"],
    ),
    "choice value the trial does not accept": (
        VALID.replace("[ce, focal]", "[ce, focal, hinge]"),
        ["line 7", "parameters.loss.choice.2", "loss='hinge' is not allowed", "Choose one of: ce, focal"],
    ),
    "range outside what the trial accepts": (
        VALID.replace("[0.5, 3.0]", "[0.5, 30.0]"),
        ["parameters.focal_gamma.uniform.1", "outside the allowed range [0.0, 10.0]"],
    ),
    "fixed value of the wrong type": (
        VALID.replace("epochs: 2", "epochs: two"),
        ["line 3", "fixed.epochs", "expects int"],
    ),
    "unknown fixed key": (
        VALID.replace("epochs: 2", "epoch: 2"),
        ["fixed.epoch", "not a trial config field", "epochs"],
    ),
    "data set from a space": (
        VALID.replace("epochs: 2", "data: faces.csv"),
        ["fixed.data", "comes from --data"],
    ),
    "searched epochs": (
        VALID.replace("  lr:\n", "  epochs:\n    int: [1, 3]\n  lr:\n").replace("  epochs: 2\n", ""),
        ["parameters.epochs", "must be fixed", "max_t"],
    ),
    "baseline outside the space": (
        VALID.replace("baseline: {loss: ce}", "baseline: {loss: ce, lr: 0.5}"),
        ["searcher.baseline.lr", "outside the parameter's loguniform"],
    ),
    "baseline default outside the space": (
        VALID.replace("[1.0e-4, 1.0e-2]", "[1.0e-4, 1.0e-3]"),
        ["searcher.baseline", "needs a value for 'lr'", "default 0.002"],
    ),
    "test metric": (
        VALID.replace("name: val_macro_f1", "name: test_macro_f1"),
        ["line 1", "metric.name", "validation metric"],
    ),
    "bad mode": (
        VALID.replace("mode: max", "mode: maximise"),
        ["metric.mode", "Allowed: max, min"],
    ),
    "unknown sampler": (
        VALID.replace("baseline: {loss: ce}", "sampler: cmaes"),
        ["searcher.sampler", "unknown sampler 'cmaes'", "tpe, random"],
    ),
    "student forks with no stage-2 knob searched": (
        VALID.replace("  baseline: {loss: ce}", "  student_forks: 1\n  baseline: {loss: ce}"),
        ["line 14", "searcher.student_forks", "searches no stage-2 knob", "pseudo_threshold", "set it to 0"],
    ),
    "negative student forks": (
        VALID.replace("  baseline: {loss: ce}", "  student_forks: -1\n  baseline: {loss: ce}"),
        ["searcher.student_forks"],
    ),
    "grace period beyond max_t": (
        VALID.replace("grace_period: 1", "grace_period: 5"),
        ["scheduler.grace_period", "beyond max_t = epochs + student_epochs = 3"],
    ),
    "reduction factor of one": (
        VALID.replace("reduction_factor: 2", "reduction_factor: 1"),
        ["scheduler.reduction_factor", "must be > 1"],
    ),
    "two distributions": (
        VALID.replace("choice: [ce, focal]", "choice: [ce, focal]\n    uniform: [0, 1]"),
        ["parameters.loss", "exactly one distribution"],
    ),
    "no parameters": (
        "fixed: {epochs: 1}\n",
        ["parameters", "at least one parameter"],
    ),
    "not a mapping": (
        "- loss\n- lr\n",
        ["expected a mapping"],
    ),
    "not YAML": (
        "parameters: {loss: [ce\n",
        ["not valid YAML"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_message_names_file_key_and_allowed(tmp_path, case):
    text, expected = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        if part.startswith("line "):
            assert f"{path}:{part.split()[1]}:" in message, message
        else:
            assert part in message, message


def test_missing_space_lists_the_shipped_ones():
    with pytest.raises(SpaceError, match="Available spaces: .*imbalance.*smoke"):
        load_space("imbalanse")


def test_conditional_parameters_only_when_their_parent_says_so():
    space = load_space("imbalance")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), direction="maximize")
    seen = set()
    for _ in range(60):
        trial = study.ask()
        space(trial)
        params = trial.params
        seen.add(params["loss"])
        assert ("focal_gamma" in params) == (params["loss"] == "focal")
        assert ("cb_beta" in params) == (params["class_weights"] == "effective")
        study.tell(trial, 0.5)
    assert seen == {"ce", "focal", "logit_adjusted"}


def test_define_by_run_returns_fixed_values_for_the_trial():
    space = load_space("imbalance")
    study = optuna.create_study()
    constants = space(study.ask())
    assert constants["model"] == "resnet10t" and constants["image_size"] == 48


def test_enqueued_baseline_is_sampled_first():
    space = load_space("imbalance")
    study = optuna.create_study(sampler=space.build_sampler(), direction="maximize")
    study.enqueue_trial(space.baseline_point())
    trial = study.ask()
    space(trial)
    assert trial.params == space.baseline_point()


@pytest.mark.parametrize("field", sorted(config_choices()))
def test_space_choices_follow_the_lookup_dicts(tmp_path, field):
    """A choice the lookup dict lacks is refused at load, naming file, line, key and the allowed names."""
    allowed = config_choices()[field]
    default = getattr(TrialConfig(), field)
    path = write(tmp_path, f"parameters:\n  {field}:\n    choice: [{default}, no_such_{field}]\n")
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert f"{path}:3:" in message, message
    assert f"parameters.{field}.choice.1" in message, message
    assert f"{field}='no_such_{field}' is not allowed" in message, message
    assert f"Choose one of: {', '.join(allowed)}" in message, message


def test_student_forks_with_a_stage_two_knob_parse(tmp_path):
    text = VALID.replace("  baseline: {loss: ce}", "  student_forks: 2\n  baseline: {loss: ce}").replace(
        "  lr:\n", "  pseudo_threshold:\n    uniform: [0.3, 0.9]\n  lr:\n")
    space = load_space(write(tmp_path, text))
    assert (space.student_forks, space.teacher_epochs, space.max_t) == (2, 2, 3)
    assert "reused by up to 2 more trial(s) searching only the stage-2 knobs" in space.summary()
    assert load_space("smoke").student_forks == 1 and "stage-aware" not in load_space(write(tmp_path, VALID)).summary()


def test_with_budget_shrinks_the_horizon():
    space = load_space("imbalance").with_budget(epochs=1, student_epochs=1, num_samples=2)
    assert space.max_t == 2 and space.num_samples == 2 and space.grace_period <= 2


def test_loading_every_shipped_space_imports_no_torch():
    """Reading and validating a space is plain data: model names wait for Space.check_models."""
    import subprocess
    import sys

    code = ("import sys; from search.space import load_space; "
            f"[load_space(name) for name in {SHIPPED!r}]; "
            "print(sorted(m for m in ('torch', 'timm', 'ray', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_model_among_choices_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "parameters:\n  model:\n    choice: [resnet10t, resnet_18]\n")
    space = load_space(path)  # no model is resolved while reading
    with pytest.raises(SpaceError) as info:
        space.check_models()
    message = str(info.value)
    assert message.startswith(f"{path}:3: parameters.model.choice.1: model='resnet_18': Unknown model 'resnet_18'")
    assert "\n" not in message


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_models_resolve(name):
    load_space(name).check_models()
