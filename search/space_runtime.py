"""The runtime search space: a validated `Space` that Optuna samples from (define-by-run).

`search.space_yaml.load_space` builds it from a YAML file; `search.space` is the public
face of both. No torch and no Optuna at import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fer.train.config import TrialConfig, apply_overrides
from search.samplers import SEARCH_SAMPLERS
from search.space_schema import DISTRIBUTIONS, Param, complete_baseline, located_error


@dataclass
class Space:
    """A validated search space; call it with an Optuna trial to sample one config."""

    path: str
    parameters: list[Param]
    fixed: dict[str, Any]
    metric: str = "val_macro_f1"
    mode: str = "max"
    sampler: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 4
    # Stage-aware search (search/optuna_bridge.py): each teacher that finishes stage 1 is
    # reused by up to this many more trials, which search only the stage-2 knobs; 0 = off.
    student_forks: int = 0
    baseline: dict[str, Any] = field(default_factory=dict)
    time_attr: str = "epoch"
    grace_period: int = 1
    reduction_factor: float = 2.0
    num_samples: int = 12
    max_concurrent: int = 2
    # The confirmation stage (search/confirm.py): the best `confirm_top` configurations and
    # the plain baseline, raced over up to `confirm_seeds` fresh seeds each
    # (search/racing.py); 0 in either turns it off.
    confirm_top: int = 3
    confirm_seeds: int = 3
    description: str = ""
    # key path -> line in the file (search.space_yaml), so later checks can point at a key
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def teacher_epochs(self) -> int:
        """The global epoch at which stage 1 ends (fixed, or TrialConfig's default)."""
        return int(self.fixed.get("epochs", TrialConfig.epochs))

    @property
    def max_t(self) -> int:
        """ASHA's horizon in global epochs: both stages."""
        return self.teacher_epochs + int(self.fixed.get("student_epochs", TrialConfig.student_epochs))

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: suggest the active parameters, return the fixed values."""
        chosen: dict[str, Any] = {}
        constants = dict(self.fixed)
        for param in self.parameters:
            if not param.active(chosen):
                continue
            chosen[param.name] = param.suggest(trial)
            if param.kind == "fixed":
                constants[param.name] = param.value
        return constants

    def baseline_point(self) -> dict[str, Any]:
        """The baseline's searched values (active parameters only), for points_to_evaluate."""
        return complete_baseline(self.parameters, self.baseline, self.path)

    def trial_config(self, params: dict[str, Any], base: TrialConfig | None = None) -> TrialConfig:
        """The TrialConfig a trial with these sampled `params` runs."""
        merged = {**self.fixed, **params}
        return apply_overrides(base or TrialConfig(), merged, source=f"{self.path} (trial config)")

    def check_models(self) -> None:
        """Resolve every model name a trial of this space can get (fixed, searched, the
        baseline's) with fer.train.config.check_model; a SpaceError names file:line: key. Needs
        timm and torch, so it runs in the search plan, not in `load_space`."""
        from fer.train.config import check_model

        for keypath, name in self.model_values():
            try:
                check_model(name, source="space")
            except ValueError as err:
                raise located_error(self.path, self.lines, keypath, str(err).removeprefix("space: ")) from None

    def model_values(self) -> list[tuple[tuple, str]]:
        """(key path, model name) for each model a trial can get, the default when none is set."""
        found: list[tuple[tuple, str]] = []
        if "model" in self.fixed:
            found.append((("fixed", "model"), self.fixed["model"]))
        for param in (p for p in self.parameters if p.name == "model"):
            key = next((k[2] for k in self.lines if len(k) == 3 and k[:2] == ("parameters", "model")
                        and k[2] in DISTRIBUTIONS), param.kind)
            keypath = ("parameters", "model", key)
            if param.kind == "fixed":
                found.append((keypath, param.value))
            found += [(keypath + (i,), value) for i, value in enumerate(param.values)]
        if not found:
            found.append(((), TrialConfig.model))
        if "model" in self.baseline:
            found.append((("searcher", "baseline", "model"), self.baseline["model"]))
        unique: dict[str, tuple] = {}
        for keypath, name in found:
            unique.setdefault(name, keypath)  # each name once, at its first place
        return [(keypath, name) for name, keypath in unique.items()]

    def build_sampler(self):
        return SEARCH_SAMPLERS[self.sampler](self.seed, self.n_startup_trials)

    def with_budget(self, **budget: Any) -> Space:
        """A copy with a different budget (epochs, student_epochs, num_samples, grace_period, ...)."""
        fixed = dict(self.fixed)
        for key in ("epochs", "student_epochs", "epoch_images"):
            if key in budget:
                fixed[key] = budget.pop(key)
        new = dataclasses.replace(self, fixed=fixed, **budget)
        new.grace_period = min(new.grace_period, new.max_t)
        return new

    def summary(self) -> str:
        lines = [f"space {self.name} ({self.path}): {self.metric} ({self.mode})"]
        lines += [f"  {p.name}: {p.describe()}" for p in self.parameters]
        lines.append("  fixed: " + ", ".join(f"{k}={v}" for k, v in self.fixed.items()))
        lines.append(
            f"  searcher: optuna {self.sampler} (seed {self.seed}), baseline first: "
            + ", ".join(f"{k}={v}" for k, v in self.baseline_point().items())
        )
        if self.student_forks:
            lines.append(f"  stage-aware: each teacher that finishes stage 1 is reused by up to {self.student_forks} "
                         "more trial(s) searching only the stage-2 knobs (single-worker trials, local storage)")
        lines.append(
            f"  scheduler: ASHA on {self.time_attr}, grace {self.grace_period}, "
            f"reduction {self.reduction_factor}, max_t {self.max_t}"
        )
        return "\n".join(lines)
