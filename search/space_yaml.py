"""The one reader of `spaces/*.yaml`: parse and validate a space file into a `Space`.

Every check raises SpaceError naming the file, the line, the key and what is allowed,
before Ray starts. Values are checked with fer.train.config's rules (no torch: model names are
resolved later, by `Space.check_models`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import yaml

from fer.train.config import STAGE2_FIELDS, TrialConfig, check_rounds, coerce_field, config_field_names, yaml_problem
from search.samplers import SEARCH_SAMPLERS
from search.space_runtime import Space
from search.space_schema import (
    DISTRIBUTIONS,
    METRIC_KEYS,
    MODES,
    PARAM_OPTION_KEYS,
    RESERVED,
    RUN_KEYS,
    SCHEDULER_KEYS,
    SCHEDULERS,
    SEARCHER_KEYS,
    TOP_KEYS,
    Param,
    SpaceError,
    complete_baseline,
    located_error,
)

SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"


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
        return located_error(self.path, self.lines, keypath, message)

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
        """Coerce and range-check `value` for TrialConfig field `name` (fer.train.config's rules)."""
        try:
            # alone: a model name is resolved (timm, torch) by Space.check_models, the fields
            # against each other by _check_rounds once the whole space is read
            return coerce_field(name, value, source="space")
        except ValueError as err:
            message = str(err).removeprefix("space: ")
            raise self.error(keypath, message) from None


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
    _check_rounds(reader, fixed, parameters)
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

    space = Space(path=reader.path, parameters=parameters, fixed=fixed, lines=reader.lines)
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


def _check_rounds(reader: _Reader, fixed: dict, parameters: list[Param]) -> None:
    """Every student_rounds a trial can get must split the fixed student_epochs (fer.train.config.check_rounds)."""
    searched = next((p for p in parameters if p.name == "student_rounds"), None)
    if searched is None:
        candidates, keypath = [fixed.get("student_rounds", TrialConfig.student_rounds)], ("fixed", "student_rounds")
    else:
        candidates = list(searched.values) if searched.kind == "choice" else \
            [searched.value] if searched.kind == "fixed" else list(range(int(searched.low), int(searched.high) + 1))
        keypath = ("parameters", "student_rounds")
    epochs = fixed.get("student_epochs", TrialConfig.student_epochs)
    for rounds in candidates:
        try:
            check_rounds(TrialConfig(student_epochs=epochs, student_rounds=rounds), "space")
        except ValueError as err:
            raise reader.error(keypath, str(err).removeprefix("space: ")) from None


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
    if "student_forks" in raw:
        space.student_forks = reader.number(raw["student_forks"], ("searcher", "student_forks"), integer=True, low=0)
        _check_forks(reader, space)
    baseline = reader.mapping(raw.get("baseline"), ("searcher", "baseline"))
    space.baseline = complete_baseline(space.parameters, baseline, space.path, reader)


def _check_forks(reader: _Reader, space: Space) -> None:
    """Forks share a teacher and search the stage-2 knobs: the space must search some (stage 1
    ends at the same epoch in every trial: a space may not search `epochs`)."""
    if not space.student_forks:
        return
    searched = [p.name for p in space.parameters]
    if not any(name in STAGE2_FIELDS for name in searched):
        raise reader.error(("searcher", "student_forks"),
                           f"the space searches no stage-2 knob ({', '.join(STAGE2_FIELDS)}): a fork would "
                           "repeat its teacher's run; set it to 0 or search one")


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
