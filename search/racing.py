"""The confirmation stage as a race: fresh seeds go only where they can still change the
winner.

Why: retraining every confirmed configuration and the plain baseline with R seeds costs
(K + 1) x R full runs, about twice the search's own wall time on 2 cores (BENCHMARKS.md),
while most of those runs cannot change the outcome: the baseline is the reference for the
test comparison, not a contender, and a configuration whose first fresh run lies far below
the leader's is not going to win. Racing (Maron & Moore 1994; irace, Lopez-Ibanez et al.
2016; SMAC's intensification, Hutter et al. 2011) spends runs while contenders cannot be
told apart and stops a contender once it is clearly worse.

The rules, all read from finished runs only (so a resumed race makes the same decisions):
1. Every contender and the plain baseline get one fresh seed. The baseline gets no more:
   one run is what the test comparison needs.
2. A contender's full-budget run in the search (not stopped by ASHA) counts as one of its
   values, and as one of its `seeds`, as SMAC counts an incumbent's past runs; it still
   gets at least one fresh seed, the run that is tested and exported.
3. A contender is dropped when its mean lies clearly below the leader's: the difference
   exceeds 1.96 pooled standard deviations of one run times sqrt(1/n + 1/n_leader), the
   pooled sd read from every contender with two or more values. While no contender has two
   values there is no sd, and a contender below the leader is dropped (SMAC's rule: a
   challenger no better than the incumbent on its runs so far is rejected).
4. While two or more contenders remain, each of them with the fewest values gets the next
   seed, up to len(`seeds`) values each; then the race ends and the best mean wins.

`next_run` is the whole policy as a pure function; `RacingSearcher` hands its choices to
Ray Tune as a Searcher, so the confirmation's runs are ordinary Tune trials (concurrency,
fault tolerance, `--resume`, the live table) and the race is in Tune's searcher state.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher

Z95 = 1.96  # two-sided 95% normal quantile: a contender outside the leader's interval is dropped
WAIT, DONE = "wait", "done"  # next_run's answers when no run is to start now


@dataclass
class RaceState:
    """What the race knows: per configuration, each fresh seed's best score (None when the
    run errored) and the seeds still running; per contender, its full-budget search run."""

    contenders: list[str]  # best search rank first; ties in mean go to the better rank
    baseline: str
    seeds: list[int]  # the fresh seeds, in the order they are handed out
    mode: str = "max"
    prior: dict[str, float] = field(default_factory=dict)  # contender -> its full-budget search score
    done: dict[str, dict[int, float | None]] = field(default_factory=dict)
    running: dict[str, set[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: the searcher's saved state (nothing in the product unpickles)."""
        return {"contenders": self.contenders, "baseline": self.baseline, "seeds": self.seeds, "mode": self.mode,
                "prior": self.prior,
                "done": {name: [[seed, value] for seed, value in runs.items()] for name, runs in self.done.items()},
                "running": {name: sorted(seeds) for name, seeds in self.running.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RaceState:
        return cls(contenders=list(data["contenders"]), baseline=data["baseline"],
                   seeds=[int(s) for s in data["seeds"]], mode=data["mode"],
                   prior={name: float(v) for name, v in data["prior"].items()},
                   done={name: {int(seed): value for seed, value in runs} for name, runs in data["done"].items()},
                   running={name: {int(s) for s in seeds} for name, seeds in data["running"].items()})

    def values(self, name: str) -> list[float]:
        """The scores a contender is judged by: its full-budget search run, then its fresh seeds."""
        fresh = [v for v in self.done.get(name, {}).values() if v is not None and math.isfinite(v)]
        return ([self.prior[name]] if name in self.prior else []) + fresh

    def used(self, name: str) -> set[int]:
        return set(self.done.get(name, {})) | self.running.get(name, set())

    def next_seed(self, name: str) -> int | None:
        return next((s for s in self.seeds if s not in self.used(name)), None)

    def planned(self, name: str) -> int:
        """Values it has or will have once its running seeds finish."""
        return len(self.values(name)) + len(self.running.get(name, set()))

    def longest(self) -> int:
        """Runs in the race's longest course without errors: each contender to len(seeds)
        values with at least one fresh seed, the baseline once unless it has its run (the
        search's, search/baseline.py)."""
        baseline = 0 if _has_fresh_value(self, self.baseline) else 1
        return baseline + sum(max(len(self.seeds) - (c in self.prior), 1) for c in self.contenders)

    def room(self, name: str) -> bool:
        """Whether it may get another fresh seed: up to len(seeds) values, the search run
        counted, and a fresh seed left."""
        return self.planned(name) < len(self.seeds) and self.next_seed(name) is not None


def pooled_sd(state: RaceState) -> float | None:
    """The sd of one run's score, pooled over contenders with two or more values."""
    groups = [v for v in (state.values(c) for c in state.contenders) if len(v) >= 2]
    dof = sum(len(v) - 1 for v in groups)
    if not dof:
        return None
    return math.sqrt(sum(statistics.variance(v) * (len(v) - 1) for v in groups) / dof)


def standing(state: RaceState) -> tuple[list[str], dict[str, str]]:
    """(contenders still in the race, best mean first; why each other one left it)."""
    sign = 1.0 if state.mode == "max" else -1.0
    scored = [c for c in state.contenders if state.values(c)]
    rank = {c: i for i, c in enumerate(state.contenders)}
    scored.sort(key=lambda c: (-sign * statistics.fmean(state.values(c)), rank[c]))
    if not scored:
        return [], {}
    leader, sd = scored[0], pooled_sd(state)
    lead = statistics.fmean(state.values(leader))
    alive, dropped = [leader], {}
    for name in scored[1:]:
        values = state.values(name)
        gap = sign * (lead - statistics.fmean(values))
        if sd is None:
            clearly_worse = gap > 0
            why = f"below {leader} ({gap:+.4f}) with no second run yet to measure the noise"
        else:
            margin = Z95 * sd * math.sqrt(1 / len(values) + 1 / len(state.values(leader)))
            clearly_worse = gap > margin
            why = f"{gap:.4f} below {leader}, more than the 95% margin {margin:.4f} (pooled sd {sd:.4f})"
        if clearly_worse:
            dropped[name] = f"dropped after {len(values)} value(s): {why}"
        else:
            alive.append(name)
    return alive, dropped


def next_run(state: RaceState, blocked: frozenset[tuple[str, int]] = frozenset()) -> tuple[str, int] | str:
    """(configuration, seed) to start now, or WAIT (a running seed decides what comes next,
    or every run due now is `blocked`), or DONE. `blocked` runs are due but must not start
    yet (RacingSearcher: their teacher is being trained by a running one); the next due run
    goes first."""
    held = False
    for name in [*state.contenders, state.baseline]:  # rule 1: one fresh seed each
        if not _has_fresh_value(state, name) and not state.running.get(name):
            seed = state.next_seed(name)
            if seed is not None:
                if (name, seed) not in blocked:
                    return name, seed
                held = True
    if any(state.running.get(c) and not state.values(c) for c in state.contenders):
        return WAIT  # a contender's first score is still coming: nothing to compare yet
    alive, _ = standing(state)
    if len(alive) > 1:  # rule 4: the contenders that cannot be told apart get another seed
        fewest = min(state.planned(c) for c in alive)
        for name in alive:
            if state.planned(name) == fewest and not state.running.get(name) and state.room(name):
                if (name, state.next_seed(name)) not in blocked:
                    return name, state.next_seed(name)
                held = True
    return WAIT if held or any(state.running.values()) else DONE


def _has_fresh_value(state: RaceState, name: str) -> bool:
    return any(v is not None for v in state.done.get(name, {}).values())


class RacingSearcher(Searcher):
    """Ray Tune's view of the race: `suggest` returns {"candidate": NAME, "seed": S} for
    trainables.candidate_trial, None while the race waits on a running seed, FINISHED when
    it is over. Its state is plain data (RaceState.to_dict), saved with Tune's searcher
    checkpoint, so `--resume` continues the race.

    `teachers` (configuration -> its teacher's identity, fer.ssl.teachers.teacher_key at a common
    seed) and `teacher_epochs`: two configurations with the same teacher train it once per
    seed (the experiment's teacher store), so a run due while another of its teacher and seed
    is still in stage 1 waits and the next due run starts first."""

    def __init__(self, state: RaceState, metric: str, teachers: dict[str, str] | None = None,
                 teacher_epochs: int = 0):
        super().__init__(metric=metric, mode=state.mode)
        self.state = state
        self.trials: dict[str, tuple[str, int]] = {}  # Tune trial id -> (configuration, seed)
        self.best: dict[str, float] = {}  # Tune trial id -> its best score so far
        self.teachers = dict(teachers or {})
        self.teacher_epochs = int(teacher_epochs)
        self.epochs: dict[str, int] = {}  # Tune trial id -> its last reported epoch

    def blocked(self) -> frozenset[tuple[str, int]]:
        """Runs whose teacher (same teacher, same seed) a running trial is still training."""
        held = set()
        for trial_id, (name, seed) in self.trials.items():
            if seed not in self.state.running.get(name, set()) or \
                    self.epochs.get(trial_id, 0) >= self.teacher_epochs or name not in self.teachers:
                continue
            held |= {(other, seed) for other, key in self.teachers.items()
                     if other != name and key == self.teachers[name]}
        return frozenset(held)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        choice = next_run(self.state, self.blocked())
        if choice == DONE:
            return Searcher.FINISHED
        if choice == WAIT:
            return None
        name, seed = choice
        self.trials[trial_id] = (name, seed)
        self.state.running.setdefault(name, set()).add(seed)
        return {"candidate": name, "seed": seed}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(result.get("epoch"), (int, float)):
            self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(result["epoch"]))
        value = result.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        sign = 1.0 if self.mode == "max" else -1.0
        if trial_id not in self.best or sign * float(value) > sign * self.best[trial_id]:
            self.best[trial_id] = float(value)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.trials:
            return
        if result is not None and not error:
            self.on_trial_result(trial_id, result)
        name, seed = self.trials[trial_id]
        self.state.running.get(name, set()).discard(seed)
        self.state.done.setdefault(name, {})[seed] = None if error else self.best.get(trial_id)

    def save(self, checkpoint_path: str) -> None:
        state = {"race": self.state.to_dict(), "trials": self.trials, "best": self.best,
                 "teachers": self.teachers, "teacher_epochs": self.teacher_epochs, "epochs": self.epochs}
        with open(checkpoint_path, "w") as f:
            json.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self.state = RaceState.from_dict(state["race"])
        self.trials = {trial: (name, int(seed)) for trial, (name, seed) in state["trials"].items()}
        self.best = {trial: float(value) for trial, value in state["best"].items()}
        self.teachers = dict(state.get("teachers", {}))
        self.teacher_epochs = int(state.get("teacher_epochs", 0))
        self.epochs = {trial: int(epoch) for trial, epoch in state.get("epochs", {}).items()}
