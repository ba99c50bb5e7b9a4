"""The confirmation stage: the search's best configurations and the plain baseline,
retrained to the full budget with fresh seeds; the winner is the best mean validation score.

Why: at the search's budget, run-to-run noise is as large as the differences between
imbalance remedies (BENCHMARKS.md: one retrain of a winner with another thread count
moved its val macro-F1 from 0.359 to 0.282), so the single best search trial is partly
the luckiest one: the winner's curse. Averaging R runs of each of the K best
configurations, with seeds the search never used, ranks them by what they do on
average; the plain baseline gets the same runs, so the comparison is like for like.

The plain baseline is what a user without this tool would train and keep: plain
cross-entropy, decided by argmax, scored by argmax val (search/baseline.py). On a metric that
scores each model with its post-hoc offsets, the plain recipe *with* its offsets is a
configuration of its own, and is raced when the search ranks it among the best: the tool
then says what the offsets alone buy over the baseline.

Seeds are raced (search/racing.py): every configuration gets one fresh seed, the baseline
no more, and the contenders get further seeds (up to R values) only while they cannot be
told apart; a contender's full-budget run in the search counts as one of its values.

The runs are Ray trials of their own Tune experiment, `<experiment>/confirm`, with the
search's resources and concurrency (a run takes the CPUs of trials its first wave cannot fill:
`widened`); its trials are {"candidate": NAME, "seed": S}
(trainables.candidate_trial) proposed by the race's Tune searcher, and `confirm_spec.json`
names each candidate's config. An interrupted confirmation continues with `search.run
--resume` like the search does: finished runs are kept, unfinished ones continue from
their last checkpoint, and the race goes on from Tune's saved searcher state.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from search.baseline import (AFTER_TRAINING, PLAIN_METRIC, SEES_AFTER_TRAINING, plain_config, ranked_as,
                             search_baseline_is_plain)
from search.report import TrialRecord, collect_trials, rank_trials

CONFIRM_DIR = "confirm"  # the confirmation's Tune experiment, inside the search's folder
CONFIRM_SPEC = "confirm_spec.json"
BASELINE = "baseline"
@dataclass
class Candidate:
    """One configuration the confirmation retrains."""

    name: str  # rank1, rank2, ... by search score, or "baseline"
    config: dict[str, Any]  # TrialConfig overrides, without the seed
    search_trial: str | None = None  # the search trial it came from
    search_val: float | None = None  # that trial's best score in the search
    # That trial's score when it ran the full budget (ASHA did not stop it): counted as one
    # value of the configuration, from the search's seed (search/racing.py, rule 2).
    prior: float | None = None
    # The plain baseline only: the search's seed when its search trial, which trains like the
    # plain baseline and ran the full budget (ASHA keeps it: search/tuner.py), is its run.
    search_seed: int | None = None
    runs: list[TrialRecord] = field(default_factory=list)  # filled in by add_run
    seeds: dict[str, int] = field(default_factory=dict)  # run trial id -> seed

    @property
    def metric(self) -> str | None:
        """The metric its runs are scored by when not the space's: the plain baseline's is
        PLAIN_METRIC (argmax), as it is tested, also where the search scored its run with offsets."""
        return PLAIN_METRIC if self.name == BASELINE else None

    def add_run(self, record: TrialRecord, seed: int) -> None:
        self.runs.append(record.scored_by(self.metric) if self.metric else record)
        self.seeds[record.trial_id] = seed

    def fresh(self, mode: str) -> list[float]:
        """Best score of each finished fresh-seed run."""
        return [r.best(mode)[1] for r in self.runs if r.status == "TERMINATED" and r.best(mode)[1] is not None]

    def values(self, mode: str) -> list[float]:
        """What the configuration is judged by: its full-budget search run's score, when
        counted, then its fresh runs' scores."""
        return ([self.prior] if self.prior is not None else []) + self.fresh(mode)

    def mean(self, mode: str) -> float | None:
        values = self.values(mode)
        return statistics.fmean(values) if values else None

    def sd(self, mode: str) -> float | None:
        """Sample standard deviation across seeds (None with fewer than two runs)."""
        values = self.values(mode)
        return statistics.stdev(values) if len(values) > 1 else None

    def best_run(self, mode: str) -> TrialRecord | None:
        """The run handed on (tested, exported): the fresh seed with the best validation
        score, ties to the lower seed. Never a contender's search run, whose score is the best
        of several trials (the winner's curse). The plain baseline's run may be its search
        run: the baseline was fixed before the search and picked by no score, so its run is
        as unbiased a draw as a fresh seed, trained alike (the full budget)."""
        sign = 1.0 if mode == "max" else -1.0
        done = [r for r in self.runs if r.status == "TERMINATED" and r.best(mode)[1] is not None]
        return max(done, key=lambda r: (sign * r.best(mode)[1], -self.seeds[r.trial_id]), default=None)


def confirm_seeds(space: Any, count: int) -> list[int]:
    """Seeds the search never used: the search's trials all ran with its one seed, and
    reusing it would hand the top configurations their lucky search run again."""
    from fer.train.config import TrialConfig

    base = int(space.fixed.get("seed", TrialConfig.seed))
    return [base + 1 + r for r in range(count)]


def choose_candidates(records: list[TrialRecord], space: Any, top: int) -> tuple[list[Candidate], list[str]]:
    """The `top` best configurations of the search by best score that score differently
    from each other and from the plain baseline, then the plain baseline; and a note for
    each configuration passed over. Configurations score alike when they train alike and,
    where the metric sees post-hoc offsets, also decide alike (search/baseline.ranked_as):
    on such a metric the plain recipe with its offsets is raced, the plain baseline (argmax)
    staying the reference. A configuration whose search trial ran the full budget carries
    that score as its `prior`; the plain baseline carries its search trial's seed when that
    trial trains like it and ran the full budget (`with_search_run`), and its search score
    as the baseline is tested: by PLAIN_METRIC."""
    baseline = plain_config(space)
    seen, chosen, notes = [ranked_as(space, baseline)], [], []
    sees = space.metric in SEES_AFTER_TRAINING
    for record in rank_trials(records, space.mode):
        config = {k: v for k, v in record.config.items() if k != "seed"}
        scored = ranked_as(space, config)
        if scored in seen:
            what = "the plain baseline, the reference" if scored == seen[0] else "a better-ranked configuration"
            how = (f"and decides like it ({', '.join(AFTER_TRAINING)})" if sees else
                   f"(it differs at most in {', '.join(AFTER_TRAINING)}, which acts after training)")
            notes.append(f"search trial {record.trial_id} trains like {what} {how}: not confirmed again")
            continue
        seen.append(scored)
        score = record.best(space.mode)[1]
        full = record.status == "TERMINATED" and not record.stopped_early
        chosen.append(Candidate(f"rank{len(chosen) + 1}", config, record.trial_id, score, score if full else None))
        if len(chosen) == top:
            break
    plain = Candidate(BASELINE, baseline)
    search_baseline = next((r for r in records if r.baseline), None)
    if search_baseline is not None and search_baseline.status == "TERMINATED" and \
            not search_baseline.stopped_early and search_baseline_is_plain(space):
        plain.search_trial = search_baseline.trial_id
        plain.search_val = search_baseline.scored_by(plain.metric).best(space.mode)[1]
        plain.search_seed = int(search_baseline.config.get("seed", space.trial_config({}).seed))
    return chosen + [plain], notes


def with_search_run(candidates: list[Candidate], records: list[TrialRecord]) -> list[Candidate]:
    """The plain baseline with its search trial as one of its runs, where it carries a
    search seed (choose_candidates): the race then gives it no fresh seed."""
    by_id = {r.trial_id: r for r in records}
    for c in candidates:
        if c.search_seed is not None and c.search_trial in by_id and c.search_trial not in c.seeds:
            c.add_run(by_id[c.search_trial], c.search_seed)
    return candidates


def write_confirm_spec(folder: Path, candidates: list[Candidate], seeds: list[int]) -> None:
    spec = {"seeds": seeds, "candidates": [
        {"name": c.name, "config": c.config, "search_trial": c.search_trial, "search_val": c.search_val,
         "prior": c.prior, "search_seed": c.search_seed} for c in candidates]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIRM_SPEC).write_text(json.dumps(spec, indent=2, default=str))


def read_confirm_spec(folder: Path) -> tuple[list[Candidate], list[int]] | None:
    path = folder / CONFIRM_SPEC
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    return [Candidate(**c) for c in spec["candidates"]], [int(s) for s in spec["seeds"]]


def race_of(candidates: list[Candidate], seeds: list[int], mode: str) -> Any:
    """The race (search/racing.py) as the candidates' collected runs have it: each fresh
    seed's best score (None when it errored), the seeds still unfinished, the priors."""
    from search.racing import RaceState

    state = RaceState(contenders=[c.name for c in candidates if c.name != BASELINE], baseline=BASELINE,
                      seeds=list(seeds), mode=mode,
                      prior={c.name: c.prior for c in candidates if c.prior is not None and c.name != BASELINE})
    for c in candidates:
        for run in c.runs:
            seed = c.seeds[run.trial_id]
            if run.status == "TERMINATED":
                state.done.setdefault(c.name, {})[seed] = run.best(mode)[1]
            elif run.status == "ERROR":
                state.done.setdefault(c.name, {})[seed] = None
            else:
                state.running.setdefault(c.name, set()).add(seed)
    return state


def run_confirmation(plan: Any, records: list[TrialRecord]) -> list[Candidate]:
    """Start, or continue after an interruption, the confirmation's race; returns the
    candidates (their runs are read with `collect_confirmation`)."""
    from ray import tune

    from search.progress import CONFIRM_COLUMNS
    from search.racing import RacingSearcher
    from search.tuner import fit_concurrency, restore_tuner, run_config, tail_callbacks, trial_data, tune_config
    from trainables import make_trainable

    experiment = f"{plan.experiment.rstrip('/')}/{CONFIRM_DIR}"
    saved = read_confirm_spec(plan.local_dir)
    if saved is None:
        candidates, notes = choose_candidates(records, plan.space, plan.confirm_top)
        seeds = confirm_seeds(plan.space, plan.confirm_seeds)
        for note in notes:
            print(f"note: {note}")
        write_confirm_spec(plan.local_dir, candidates, seeds)
    else:  # resumed: the same candidates, whatever the search's records say now
        candidates, seeds = saved
    candidates = with_search_run(candidates, records)
    teachers = shared_teachers(plan, candidates)
    lanes = first_wave_teachers(candidates, teachers)
    resources, concurrency = widened(plan.resources, fit_concurrency(plan), lanes)
    if resources != plan.resources:
        print(f"confirmation: its first runs train {lanes} teacher(s) at once, so each run takes "
              f"{resources.cpus_per_worker:g} CPUs (torch threads), {concurrency} run(s) at a time")
        plan = replace(plan, resources=resources)
    trainable = make_trainable(trial_data(plan), plan.resources, plan.space.metric, plan.space.mode,
                               candidates={c.name: c.config for c in candidates}, teachers=plan.teachers,
                               tail=plan.tail)
    counted = [c.name for c in candidates if c.prior is not None]
    most = race_of(candidates, seeds, plan.space.mode).longest()
    print(f"\nconfirmation: {', '.join(c.name for c in candidates)} raced over fresh seeds {seeds} at the full "
          f"budget: one seed each, more only while contenders cannot be told apart (at most {most} runs "
          f"unless one errors)"
          + (f"; the search's full-budget run counts as one value of {', '.join(counted)}" if counted else "")
          + ("; the baseline's run is its search trial" if any(c.search_seed is not None for c in candidates) else ""))
    if saved is not None and tune.Tuner.can_restore(experiment):
        tuner = restore_tuner(experiment, trainable)
    else:
        searcher = RacingSearcher(race_of(candidates, seeds, plan.space.mode), plan.space.metric,
                                  teachers=teachers, teacher_epochs=plan.space.teacher_epochs)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune_config(plan, concurrency, search_alg=searcher,
                                    num_samples=len(candidates) * len(seeds)),
            run_config=run_config(plan, CONFIRM_DIR, plan.experiment, columns=CONFIRM_COLUMNS,
                                  callbacks=tail_callbacks(plan, concurrency)),
        )
    tuner.fit()
    return candidates


def first_wave_teachers(candidates: list[Candidate], teachers: dict[str, str]) -> int:
    """How many teachers the race's first runs train at once: one fresh seed of every
    contender, and of the baseline unless its search trial is its run; configurations that
    share a teacher (`teachers`, shared_teachers) train it once, the others wait for it."""
    first = [c.name for c in candidates if c.search_seed is None]
    return len({teachers.get(name, name) for name in first})


def widened(resources: Any, concurrency: int, lanes: int) -> tuple[Any, int]:
    """(resources, concurrency) of the confirmation's runs: the search's, except that each
    single-worker CPU run takes the CPUs of the trials the cluster holds (`concurrency`) but
    the first wave cannot fill (it trains `lanes` teachers at once). On 2 cores the
    Quickstart's two contenders share a teacher: one run at a time on 2 threads, instead of
    one on 1 thread while the other waits for its teacher and a core idles. GPU and
    multi-worker runs keep the search's resources."""
    factor = concurrency // max(1, lanes)
    if factor <= 1 or not resources.cpu_threads_only:
        return resources, concurrency
    return replace(resources, cpus_per_worker=resources.cpus_per_worker * factor), concurrency // factor


def shared_teachers(plan: Any, candidates: list[Candidate]) -> dict[str, str]:
    """Each candidate's teacher identity (fer.ssl.teachers.teacher_key at a common seed), where
    its runs share teachers through the experiment's store; {} where they cannot."""
    from fer.ssl.teachers import teacher_key
    from fer.train.config import TrialConfig, apply_overrides

    if plan.teachers is None:
        return {}
    return {c.name: teacher_key(apply_overrides(TrialConfig(), {**c.config, "seed": 0}, models=False))
            for c in candidates}


def collect_confirmation(experiment: str | Path, candidates: list[Candidate], metric: str, time_attr: str,
                         max_t: int) -> list[Candidate]:
    """Each candidate with its runs, read back from the local experiment folder's `confirm`
    (for URI storage, its synced-down copy), each scored as Candidate.add_run says."""
    folder = Path(experiment, CONFIRM_DIR)
    if not list(folder.glob("experiment_state-*.json")):  # interrupted before Tune saved any state
        return candidates
    records = collect_trials(folder, metric, time_attr, max_t, {}, also=(PLAIN_METRIC,))
    by_name = {c.name: c for c in candidates}
    for record in records:
        candidate = by_name[record.config["candidate"]]
        seed = int(record.config["seed"])
        record.config = {**candidate.config, "seed": seed}
        record.stage, record.candidate = "confirm", candidate.name
        record.baseline = candidate.name == BASELINE
        candidate.add_run(record, seed)
    return candidates


def race_over(candidates: list[Candidate], seeds: list[int], mode: str) -> bool:
    """Whether the collected runs finish the race: none unfinished, and no seed left to
    start (an interrupted confirmation says no)."""
    from search.racing import DONE, next_run

    return next_run(race_of(candidates, seeds, mode)) == DONE


def dropped(candidates: list[Candidate], seeds: list[int], mode: str) -> dict[str, str]:
    """Why each contender left the race, as its collected runs have it."""
    from search.racing import standing

    return standing(race_of(candidates, seeds, mode))[1]


def rank_confirmed(candidates: list[Candidate], mode: str) -> list[Candidate]:
    """The searched configurations by mean score over their seeds, best first. The plain
    baseline is the reference, not a contender; whether it scored higher is reported."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [c for c in candidates if c.name != BASELINE and c.mean(mode) is not None]
    return sorted(scored, key=lambda c: -sign * c.mean(mode))


def pick_confirmed(candidates: list[Candidate], mode: str) -> Candidate | None:
    """The winner: the best mean score over its seeds (rank_confirmed)."""
    return next(iter(rank_confirmed(candidates, mode)), None)


def describe(candidate: Candidate, mode: str, dropped: str | None = None) -> dict[str, Any]:
    """A candidate as summary.json and the terminal show it; `dropped` says why the race
    stopped giving it seeds."""
    sd = candidate.sd(mode)
    return {
        "name": candidate.name,
        "metric": candidate.metric,  # None: the space's
        "search_trial": candidate.search_trial,
        "search_val": candidate.search_val,
        "search_run_counted": candidate.prior is not None,
        "dropped": dropped,
        "val_mean": candidate.mean(mode),
        "val_sd": sd,
        "runs": [{"trial_id": r.trial_id, "seed": candidate.seeds[r.trial_id], "val": r.best(mode)[1],
                  "status": r.status, "teacher_shared": r.shared_epochs > 0,
                  "search_run": candidate.search_seed is not None and r.trial_id == candidate.search_trial}
                 for r in sorted(candidate.runs, key=lambda r: candidate.seeds[r.trial_id])],
    }


def format_candidate(summary: dict[str, Any], metric: str) -> str:
    mean, sd = summary["val_mean"], summary["val_sd"]
    spread = "n/a" if mean is None else f"{mean:.4f}"
    if mean is not None and sd is not None and math.isfinite(sd):
        spread += f" ± {sd:.4f}"
    seeds = ", ".join((f"{r['seed']}: {r['val']:.4f}" if r["val"] is not None and r["status"] == "TERMINATED"
                       else f"{r['seed']}: {r['status']}") + (" (teacher shared)" if r.get("teacher_shared") else "")
                      + (" (its search run)" if r.get("search_run") else "")
                      for r in summary["runs"])
    origin = ""
    if summary["search_trial"]:
        counted = ", counted: it ran the full budget" if summary.get("search_run_counted") else ""
        origin = f" (search trial {summary['search_trial']}, {summary['search_val']:.4f}{counted})"
    line = f"  {summary['name']:<9} {summary.get('metric') or metric} {spread}  [seed {seeds}]{origin}"
    return line + (f"\n            {summary['dropped']}" if summary.get("dropped") else "")


def plot_seed_spread(candidates: list[Candidate], winner: Candidate | None, metric: str, mode: str,
                     path: Path) -> None:
    """Each confirmed configuration's runs (one dot per seed) with mean ± sd, next to its
    single score in the search: how much of the search's ranking was luck."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(candidates) + 2), 4.5))
    for x, candidate in enumerate(candidates):
        values = candidate.fresh(mode)
        color = "tab:red" if candidate is winner else ("black" if candidate.name == BASELINE else "tab:blue")
        ax.scatter([x] * len(values), values, color=color, alpha=0.7, zorder=3)
        if candidate.values(mode):
            sd = candidate.sd(mode) or 0.0
            ax.errorbar(x + 0.15, candidate.mean(mode), yerr=sd, fmt="s", color=color, capsize=4, zorder=4)
        if candidate.search_val is not None:
            ax.scatter([x - 0.15], [candidate.search_val], marker="x", color="tab:gray", zorder=3)
    ax.set_xticks(range(len(candidates)), [c.name + (" (winner)" if c is winner else "")
                                           + (f"\n({c.metric})" if c.metric else "") for c in candidates])
    ax.set_ylabel(f"best {metric} per run")
    ax.set_title("confirmation: one dot per fresh seed, square = mean ± sd (with the search run\n"
                 "where it ran the full budget), x = the configuration's one run in the search", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
