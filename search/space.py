"""Search spaces: the one reader of `spaces/*.yaml`.

A space file names the parameters to search (with their distributions and the
conditions under which they exist), the values held fixed, the metric, the
searcher (Optuna TPE plus a baseline evaluated first) and the ASHA scheduler.
`load_space` validates all of it against `fer.config.TrialConfig` before Ray
starts; every error names the file, the line, the key and what is allowed.

The parsed `Space` is itself the define-by-run function handed to Ray's
`OptunaSearch` (`space(trial)`), so conditional parameters such as `focal_gamma`
only exist in trials whose `loss` is `focal`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from fer.config import TrialConfig, apply_overrides, config_field_names, yaml_problem

SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"

TOP_KEYS = ("description", "metric", "fixed", "parameters", "searcher", "scheduler", "run")
METRIC_KEYS = ("name", "mode")
SEARCHER_KEYS = ("sampler", "seed", "n_startup_trials", "baseline")
SCHEDULER_KEYS = ("name", "time_attr", "grace_period", "reduction_factor")
RUN_KEYS = ("num_samples", "max_concurrent", "confirm_top", "confirm_seeds")
PARAM_OPTION_KEYS = ("when", "step")
MODES = ("max", "min")
SCHEDULERS = ("asha",)
# Fields a space may not set: the data comes from `--data`, never from a space.
RESERVED = ("data",)

# --smoke: the smallest budget that still runs both stages, a pruning decision and
# an export, so CI exercises the whole path in about a minute.
# One pass per epoch (epoch_images 0): CI's tiny data sets are not repeated up to a real budget.
SMOKE_BUDGET = {"epochs": 1, "student_epochs": 1, "epoch_images": 0, "num_samples": 2, "grace_period": 1,
                "confirm_top": 1, "confirm_seeds": 2}


class SpaceError(ValueError):
    """A space file that cannot be searched; the message names file, line, key and what is allowed."""


def _sampler_tpe(seed: int, n_startup_trials: int):
    import optuna

    # multivariate + group: TPE models the joint density within each group of
    # parameters that appear together, which is what a conditional space needs
    # (Falkner et al. 2018, BOHB; Optuna's `group` option).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=True
        )


def _sampler_random(seed: int, n_startup_trials: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SEARCH_SAMPLERS: dict[str, Callable[[int, int], Any]] = {
    "tpe": _sampler_tpe,
    "random": _sampler_random,
}

# distribution name -> number of YAML arguments it takes. `categorical` is an alias of `choice`.
DISTRIBUTIONS: dict[str, str] = {
    "choice": "a list of values",
    "categorical": "a list of values",
    "uniform": "[low, high]",
    "loguniform": "[low, high], low > 0",
    "int": "[low, high]",
    "fixed": "a single value",
}


@dataclass(frozen=True)
class Param:
    """One searched (or conditionally fixed) TrialConfig field."""

    name: str
    kind: str  # a key of DISTRIBUTIONS, `categorical` normalised to `choice`
    values: tuple = ()  # choice options
    low: float | None = None
    high: float | None = None
    step: float | None = None
    value: Any = None  # fixed
    when: tuple[tuple[str, tuple], ...] = ()  # (parent, allowed parent values) pairs
    line: int | None = None

    def active(self, chosen: dict[str, Any]) -> bool:
        """True if every parent is present in `chosen` with one of the allowed values."""
        return all(parent in chosen and chosen[parent] in allowed for parent, allowed in self.when)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        if self.kind == "fixed":
            return value == self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1))
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step)
        return self.value

    def describe(self) -> str:
        if self.kind == "choice":
            text = "choice " + ", ".join(map(str, self.values))
        elif self.kind == "fixed":
            text = f"fixed {self.value}"
        else:
            text = f"{self.kind} [{self.low}, {self.high}]"
        if self.when:
            text += " when " + " and ".join(f"{p} in {list(v)}" for p, v in self.when)
        return text


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
    baseline: dict[str, Any] = field(default_factory=dict)
    time_attr: str = "epoch"
    grace_period: int = 1
    reduction_factor: float = 2.0
    num_samples: int = 12
    max_concurrent: int = 2
    # The confirmation stage (search/confirm.py): the best `confirm_top` configurations and
    # the plain baseline, each retrained `confirm_seeds` times; 0 in either turns it off.
    confirm_top: int = 3
    confirm_seeds: int = 3
    description: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def max_t(self) -> int:
        """ASHA's horizon in global epochs: both stages."""
        return int(self.fixed.get("epochs", TrialConfig.epochs)) + int(
            self.fixed.get("student_epochs", TrialConfig.student_epochs)
        )

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
        return _complete_baseline(self.parameters, self.baseline, self.path, None)

    def trial_config(self, params: dict[str, Any], base: TrialConfig | None = None) -> TrialConfig:
        """The TrialConfig a trial with these sampled `params` runs."""
        merged = {**self.fixed, **params}
        return apply_overrides(base or TrialConfig(), merged, source=f"{self.path} (trial config)")

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
        lines.append(
            f"  scheduler: ASHA on {self.time_attr}, grace {self.grace_period}, "
            f"reduction {self.reduction_factor}, max_t {self.max_t}"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading


def resolve_space_path(name_or_path: str) -> Path:
    """A path to an existing file, or a bare name looked up in `spaces/` (with or without .yaml)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    if os.sep not in name_or_path and "/" not in name_or_path:
        for option in (SPACES_DIR / name_or_path, SPACES_DIR / f"{name_or_path}.yaml"):
            if option.is_file():
                return option
    available = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    raise SpaceError(
        f"{name_or_path}: search space not found (not a file, and not a name in {SPACES_DIR}). "
        f"Available spaces: {available}"
    )


def _node_lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map key paths to 1-based line numbers (yaml.compose keeps the marks safe_load drops)."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            for sub, line in _node_lines(value_node, path + (key,)).items():
                lines.setdefault(sub, line)  # a key's own line wins over its value's
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_node_lines(item, path + (index,)))
    return lines


class _Reader:
    """Carries the file name and line table so every error can point at its key."""

    def __init__(self, path: str, lines: dict[tuple, int]):
        self.path = path
        self.lines = lines

    def error(self, keypath: tuple, message: str) -> SpaceError:
        line = None
        for end in range(len(keypath), -1, -1):
            line = self.lines.get(keypath[:end])
            if line is not None:
                break
        where = f"{self.path}:{line}" if line else self.path
        key = ".".join(str(k) for k in keypath)
        return SpaceError(f"{where}: {key}: {message}" if key else f"{where}: {message}")

    def mapping(self, value: Any, keypath: tuple, allowed: tuple | None = None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(keypath, f"expected a mapping, got {type(value).__name__} {value!r}")
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise self.error(
                        keypath + (key,), f"unknown key {key!r}. Allowed keys: {', '.join(allowed)}"
                    )
        return value

    def number(self, value: Any, keypath: tuple, *, integer: bool = False, low: float | None = None) -> Any:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and integer:
            ok = float(value).is_integer()
        if ok and isinstance(value, float):
            ok = math.isfinite(value)
        if not ok:
            kind = "an integer" if integer else "a number"
            raise self.error(keypath, f"expected {kind}, got {value!r}")
        if low is not None and value < low:
            raise self.error(keypath, f"must be at least {low}, got {value!r}")
        return int(value) if integer else value

    def trial_value(self, name: str, value: Any, keypath: tuple) -> Any:
        """Coerce and range-check `value` for TrialConfig field `name` (fer.config's rules)."""
        try:
            cfg = apply_overrides(TrialConfig(), {name: value}, source="space")
        except ValueError as err:
            message = str(err).removeprefix("space: ")
            raise self.error(keypath, message) from None
        return getattr(cfg, name)


def load_space(name_or_path: str | os.PathLike) -> Space:
    """Read and validate a space file; raises SpaceError before anything starts."""
    path = resolve_space_path(str(name_or_path))
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        raise SpaceError(f"{source}: {yaml_problem(err)}") from None
    reader = _Reader(source, _node_lines(node) if node is not None else {})
    data = reader.mapping(data, (), TOP_KEYS)
    return _parse(reader, data)


def _parse(reader: _Reader, data: dict) -> Space:
    fields = config_field_names()
    fixed = _parse_fixed(reader, reader.mapping(data.get("fixed"), ("fixed",)), fields)
    raw_params = reader.mapping(data.get("parameters"), ("parameters",))
    if not raw_params:
        raise reader.error(("parameters",), "a space needs at least one parameter to search")
    parameters: list[Param] = []
    for name, spec in raw_params.items():
        parameters.append(_parse_param(reader, name, spec, fields, fixed, parameters))
    for key in ("epochs", "student_epochs"):
        if key in raw_params:
            raise reader.error(
                ("parameters", key),
                f"{key} must be fixed: ASHA's max_t is epochs + student_epochs of every trial",
            )

    metric = reader.mapping(data.get("metric"), ("metric",), METRIC_KEYS)
    searcher = reader.mapping(data.get("searcher"), ("searcher",), SEARCHER_KEYS)
    scheduler = reader.mapping(data.get("scheduler"), ("scheduler",), SCHEDULER_KEYS)
    run = reader.mapping(data.get("run"), ("run",), RUN_KEYS)

    space = Space(path=reader.path, parameters=parameters, fixed=fixed)
    space.description = str(data.get("description") or "")
    _parse_metric(reader, metric, space)
    _parse_searcher(reader, searcher, space)
    _parse_scheduler(reader, scheduler, space)
    if "num_samples" in run:
        space.num_samples = reader.number(run["num_samples"], ("run", "num_samples"), integer=True, low=1)
    if "max_concurrent" in run:
        space.max_concurrent = reader.number(
            run["max_concurrent"], ("run", "max_concurrent"), integer=True, low=1
        )
    for key in ("confirm_top", "confirm_seeds"):
        if key in run:
            setattr(space, key, reader.number(run[key], ("run", key), integer=True, low=0))
    return space


def _check_field(reader: _Reader, name: Any, keypath: tuple, fields: list[str]) -> None:
    if name in RESERVED:
        raise reader.error(keypath, f"{name!r} cannot be set in a space (it comes from --data)")
    if name not in fields:
        raise reader.error(
            keypath,
            f"{name!r} is not a trial config field. Allowed: "
            + ", ".join(f for f in fields if f not in RESERVED),
        )


def _parse_fixed(reader: _Reader, raw: dict, fields: list[str]) -> dict[str, Any]:
    fixed = {}
    for name, value in raw.items():
        _check_field(reader, name, ("fixed", name), fields)
        fixed[name] = reader.trial_value(name, value, ("fixed", name))
    return fixed


def lookup_distribution(name: str, reader: _Reader, keypath: tuple) -> str:
    if name not in DISTRIBUTIONS:
        raise reader.error(
            keypath,
            f"unknown distribution {name!r}. Allowed: "
            + "; ".join(f"{k} ({v})" for k, v in DISTRIBUTIONS.items()),
        )
    return "choice" if name == "categorical" else name


def _parse_param(
    reader: _Reader, name: Any, spec: Any, fields: list[str], fixed: dict, earlier: list[Param]
) -> Param:
    keypath = ("parameters", name)
    _check_field(reader, name, keypath, fields)
    if name in fixed:
        raise reader.error(keypath, f"{name!r} is both fixed and searched; keep one")
    if not isinstance(spec, dict):
        raise reader.error(
            keypath,
            f"expected a mapping like {{choice: [a, b]}} or {{loguniform: [1e-4, 1e-2]}}, got {spec!r}",
        )
    kinds = [k for k in spec if k not in PARAM_OPTION_KEYS]
    if len(kinds) != 1:
        raise reader.error(
            keypath,
            f"needs exactly one distribution, got {kinds or 'none'}. Allowed: {', '.join(DISTRIBUTIONS)}"
            f"; options: {', '.join(PARAM_OPTION_KEYS)}",
        )
    kind = lookup_distribution(kinds[0], reader, keypath + (kinds[0],))
    args = spec[kinds[0]]
    argpath = keypath + (kinds[0],)
    line = reader.lines.get(keypath)
    when = _parse_when(reader, spec.get("when"), keypath + ("when",), earlier)

    if kind == "fixed":
        return Param(name, kind, value=reader.trial_value(name, args, argpath), when=when, line=line)
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise reader.error(argpath, f"expected a non-empty list of values, got {args!r}")
        values = tuple(reader.trial_value(name, v, argpath + (i,)) for i, v in enumerate(args))
        if len(set(values)) != len(values):
            raise reader.error(argpath, f"repeated values in {list(values)}")
        return Param(name, kind, values=values, when=when, line=line)

    if not isinstance(args, list) or len(args) != 2:
        raise reader.error(argpath, f"expected {DISTRIBUTIONS[kind]}, got {args!r}")
    integer = kind == "int"
    low = reader.number(args[0], argpath + (0,), integer=integer)
    high = reader.number(args[1], argpath + (1,), integer=integer)
    if low > high:
        raise reader.error(argpath, f"low {low} > high {high}")
    if kind == "loguniform" and low <= 0:
        raise reader.error(argpath, f"loguniform needs low > 0, got {low}")
    if integer and config_kind(name) != "int":
        raise reader.error(argpath, f"{name} is a {config_kind(name)} field; use uniform or loguniform")
    if not integer and config_kind(name) not in ("float", "int"):
        raise reader.error(argpath, f"{name} is a {config_kind(name)} field; use choice or fixed")
    reader.trial_value(name, low, argpath + (0,))
    reader.trial_value(name, high, argpath + (1,))
    step = None
    if "step" in spec:
        step = reader.number(spec["step"], keypath + ("step",), integer=integer)
        if step <= 0 or kind == "loguniform":
            raise reader.error(keypath + ("step",), "step must be > 0 and is only for uniform and int")
    return Param(name, kind, low=low, high=high, step=step, when=when, line=line)


def config_kind(name: str) -> str:
    """`int`, `float`, `str` or `bool`: the type of TrialConfig field `name`."""
    field_type = next(f.type for f in dataclasses.fields(TrialConfig) if f.name == name)
    return str(field_type).split("|")[0].strip()


def _parse_when(reader: _Reader, raw: Any, keypath: tuple, earlier: list[Param]) -> tuple:
    """`when: {loss: focal}` or `when: {loss: [focal, logit_adjusted]}`; parents declared above."""
    if raw is None:
        return ()
    raw = reader.mapping(raw, keypath)
    by_name = {p.name: p for p in earlier}
    conditions = []
    for parent, allowed in raw.items():
        if parent not in by_name:
            declared = ", ".join(p.name for p in earlier if p.kind == "choice") or "none"
            raise reader.error(
                keypath + (parent,),
                f"condition on {parent!r}, which is not a parameter declared above. "
                f"Choice parameters declared above: {declared}",
            )
        param = by_name[parent]
        if param.kind != "choice":
            raise reader.error(
                keypath + (parent,), f"conditions must be on a choice parameter; {parent!r} is {param.kind}"
            )
        values = allowed if isinstance(allowed, list) else [allowed]
        for value in values:
            if value not in param.values:
                raise reader.error(
                    keypath + (parent,),
                    f"{value!r} is not a value of {parent}. Allowed: {', '.join(map(str, param.values))}",
                )
        conditions.append((parent, tuple(values)))
    return tuple(conditions)


def _parse_metric(reader: _Reader, raw: dict, space: Space) -> None:
    if "name" in raw:
        name = raw["name"]
        # Selection may only ever look at validation metrics: test is read only by
        # search.finish, once for the winner and once for the plain baseline.
        if not isinstance(name, str) or not name.startswith("val_"):
            raise reader.error(("metric", "name"), f"must be a validation metric (val_...), got {name!r}")
        space.metric = name
    if "mode" in raw:
        if raw["mode"] not in MODES:
            raise reader.error(("metric", "mode"), f"{raw['mode']!r} is not allowed. Allowed: {', '.join(MODES)}")
        space.mode = raw["mode"]


def _parse_searcher(reader: _Reader, raw: dict, space: Space) -> None:
    if "sampler" in raw:
        if raw["sampler"] not in SEARCH_SAMPLERS:
            raise reader.error(
                ("searcher", "sampler"),
                f"unknown sampler {raw['sampler']!r}. Allowed: {', '.join(SEARCH_SAMPLERS)}",
            )
        space.sampler = raw["sampler"]
    if "seed" in raw:
        space.seed = reader.number(raw["seed"], ("searcher", "seed"), integer=True, low=0)
    if "n_startup_trials" in raw:
        space.n_startup_trials = reader.number(
            raw["n_startup_trials"], ("searcher", "n_startup_trials"), integer=True, low=0
        )
    baseline = reader.mapping(raw.get("baseline"), ("searcher", "baseline"))
    space.baseline = _complete_baseline(space.parameters, baseline, space.path, reader)


def _complete_baseline(
    parameters: list[Param], given: dict, source: str, reader: _Reader | None
) -> dict[str, Any]:
    """The baseline point: given values, else TrialConfig defaults, for active parameters only."""
    by_name = {p.name: p for p in parameters}
    keypath = ("searcher", "baseline")
    for name in given:
        if name not in by_name:
            message = f"{name!r} is not a searched parameter. Searched: {', '.join(by_name)}"
            raise reader.error(keypath + (name,), message) if reader else SpaceError(message)
    point: dict[str, Any] = {}
    for param in parameters:
        if not param.active(point):
            continue
        if param.name in given:
            value = given[param.name]
            if not param.contains(value):
                message = f"{value!r} is outside the parameter's {param.describe()}"
                raise reader.error(keypath + (param.name,), message) if reader else SpaceError(message)
        else:
            value = param.value if param.kind == "fixed" else getattr(TrialConfig, param.name)
            if not param.contains(value):
                message = (
                    f"the baseline needs a value for {param.name!r}: its default {value!r} is "
                    f"outside {param.describe()}"
                )
                raise reader.error(keypath, message) if reader else SpaceError(f"{source}: {message}")
        point[param.name] = value
    return {k: v for k, v in point.items() if by_name[k].kind != "fixed"}


def _parse_scheduler(reader: _Reader, raw: dict, space: Space) -> None:
    if raw.get("name", "asha") not in SCHEDULERS:
        raise reader.error(
            ("scheduler", "name"), f"unknown scheduler {raw['name']!r}. Allowed: {', '.join(SCHEDULERS)}"
        )
    if raw.get("time_attr", "epoch") != "epoch":
        # The global epoch increases across both stages; training_iteration restarts on retry.
        raise reader.error(("scheduler", "time_attr"), f"only 'epoch' is supported, got {raw['time_attr']!r}")
    if "grace_period" in raw:
        space.grace_period = reader.number(raw["grace_period"], ("scheduler", "grace_period"), integer=True, low=1)
    if "reduction_factor" in raw:
        factor = reader.number(raw["reduction_factor"], ("scheduler", "reduction_factor"))
        if factor <= 1:
            raise reader.error(("scheduler", "reduction_factor"), f"must be > 1, got {factor}")
        space.reduction_factor = factor
    if space.grace_period > space.max_t:
        raise reader.error(
            ("scheduler", "grace_period"),
            f"{space.grace_period} is beyond max_t = epochs + student_epochs = {space.max_t}",
        )


def sample_configs(space: Space, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Draw `n` configs with an in-memory Optuna study (random sampler): a dry run of the space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize" if space.mode == "max" else "minimize")
    configs = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)
        configs.append({**trial.params, **constants})
        study.tell(trial, 0.0)
    return configs
