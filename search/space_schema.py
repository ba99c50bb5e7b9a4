"""What a space file may say: its keys, the distributions, one searched parameter (`Param`),
the baseline point, and the error every check raises (file:line: key: message).

Plain data, no torch and no Optuna: `search.space_yaml` reads a file into these, and
`search.space.Space` samples from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fer.train.config import TrialConfig

TOP_KEYS = ("description", "metric", "fixed", "parameters", "searcher", "scheduler", "run")
METRIC_KEYS = ("name", "mode")
SEARCHER_KEYS = ("sampler", "seed", "n_startup_trials", "student_forks", "baseline")
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

# distribution name -> number of YAML arguments it takes. `categorical` is an alias of `choice`.
DISTRIBUTIONS: dict[str, str] = {
    "choice": "a list of values",
    "categorical": "a list of values",
    "uniform": "[low, high]",
    "loguniform": "[low, high], low > 0",
    "int": "[low, high]",
    "fixed": "a single value",
}


class SpaceError(ValueError):
    """A space file that cannot be searched; the message names file, line, key and what is allowed."""


def located_error(path: str, lines: dict[tuple, int], keypath: tuple, message: str) -> SpaceError:
    """A SpaceError at `keypath`'s line in `path`, or the nearest enclosing key's line."""
    line = None
    for end in range(len(keypath), -1, -1):
        line = lines.get(keypath[:end])
        if line is not None:
            break
    where = f"{path}:{line}" if line else path
    key = ".".join(str(k) for k in keypath)
    return SpaceError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


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


def complete_baseline(parameters: list[Param], given: dict, source: str, reader: Any = None) -> dict[str, Any]:
    """The baseline point: given values, else TrialConfig defaults, for active parameters only.
    `reader` (search.space_yaml's) places an error at its line; without it the error names `source`."""
    by_name = {p.name: p for p in parameters}
    keypath = ("searcher", "baseline")

    def error(path: tuple, message: str, prefix: str = "") -> SpaceError:
        return reader.error(path, message) if reader else SpaceError(prefix + message)

    for name in given:
        if name not in by_name:
            raise error(keypath + (name,), f"{name!r} is not a searched parameter. Searched: {', '.join(by_name)}")
    point: dict[str, Any] = {}
    for param in parameters:
        if not param.active(point):
            continue
        if param.name in given:
            value = given[param.name]
            if not param.contains(value):
                raise error(keypath + (param.name,), f"{value!r} is outside the parameter's {param.describe()}")
        else:
            value = param.value if param.kind == "fixed" else getattr(TrialConfig, param.name)
            if not param.contains(value):
                raise error(keypath, f"the baseline needs a value for {param.name!r}: its default {value!r} is "
                                     f"outside {param.describe()}", prefix=f"{source}: ")
        point[param.name] = value
    return {k: v for k, v in point.items() if by_name[k].kind != "fixed"}
