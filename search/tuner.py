"""The search's Tuner: Optuna TPE proposing, ASHA stopping, Ray Tune running the trials;
and the Tune settings the search and the confirmation stage share (concurrency that fits
the cluster, trial names, checkpoint keeping, the data set as trials receive it).

`plan` is search.plan's Plan (space, resources, storage, max_concurrent, max_failures,
dataset, name, study_path), or anything with those attributes (the benchmarks build one);
this module sits below search.run, search.confirm and benchmarks/common.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NoEarlyStops:
    """What PruningOptunaSearch asks a scheduler when there is none (FIFO): no trial was stopped early."""

    stopped_early: frozenset = frozenset()


def fit_concurrency(plan: Any) -> int:
    """The requested concurrency, lowered to the number of trials the cluster can hold."""
    import ray

    from trainables import max_concurrent_trials

    fits = max_concurrent_trials(plan.resources, ray.cluster_resources())  # raises if one trial never fits
    if fits < plan.max_concurrent:
        print(f"note: the cluster holds {fits} trial(s) at once; --max-concurrent {plan.max_concurrent} lowered")
    return min(fits, plan.max_concurrent)


def trial_name(trial: Any) -> str:
    """Trial folders and table rows named by trial id alone: no timestamp, no config dump."""
    return f"trial_{trial.trial_id}"


def tune_config(plan: Any, max_concurrent: int, **more: Any) -> Any:
    """What the search's and the confirmation's Tuners share."""
    from ray import tune

    return tune.TuneConfig(
        metric=plan.space.metric,
        mode=plan.space.mode,
        max_concurrent_trials=max_concurrent,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
        # A single-worker trial trains in its own process: reusing that process saves
        # ~5 s of actor start per trial (benchmarks/trial_overhead.py), which is most of
        # the fixed cost of the many trials ASHA stops after a few epochs. Multi-worker
        # trials start a Ray Train worker group anyway, so there is nothing to reuse.
        reuse_actors=plan.resources.workers == 1,
        **more,
    )


def run_config(plan: Any, name: str, storage: str, columns: dict[str, str] | None = None, **more: Any) -> Any:
    """What the search's and the confirmation's Tuners keep; `columns` are the live table's
    parameter columns (config key -> column name; default: the space's searched parameters);
    `more` goes to tune.RunConfig (a benchmark's callbacks and verbosity)."""
    from ray import tune

    from search.progress import progress_reporter, quiet_driver, search_columns
    from trainables import checkpoint_config

    quiet_driver()  # before the RunConfig: it reads which output engine to use
    more.setdefault("verbose", 1)  # the table; 3 adds every result of every trial
    more.setdefault("progress_reporter",
                    progress_reporter(plan.space.metric, search_columns(plan.space) if columns is None else columns))
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        # Every epoch reports a checkpoint folder with its resume state; keep the best
        # by the search metric (what export reads) and the latest (what a retried or
        # resumed trial continues from).
        checkpoint_config=checkpoint_config(tune.CheckpointConfig, plan.space.metric, plan.space.mode),
        **more,
    )


def tail_callbacks(plan: Any, max_concurrent: int) -> list:
    """The Tune callback that gives idle CPUs to the trials still running (search/tail.py)
    through `plan.tail`, the file the trainable was given; none without one."""
    if plan.tail is None:
        return []
    from search.tail import TailThreads

    return [TailThreads(plan.tail, max_concurrent, plan.resources.cpus_per_worker)]


def restore_tuner(experiment: str, trainable: Any) -> Any:
    """Tuner.restore for `--resume`: unfinished trials continue, errored ones stay errored.
    The restored RunConfig brings its live table back; the driver's switches are set again."""
    from ray import tune

    from search.progress import quiet_driver

    quiet_driver()
    return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                              restart_errored=False)


def check_resumable(experiment: Path) -> None:
    """Refuse, in one line, an experiment whose newest Tune searcher state is empty.

    Tune writes `searcher-state-*.pkl` in place, not atomically; a driver killed while it
    was writing one leaves it empty, and Tuner.restore then waits forever for a searcher
    that yields no trial and never finishes (seen once in CI: the resumed search hung)."""
    states = sorted(Path(experiment).glob("searcher-state-*.pkl"))
    if states and states[-1].stat().st_size == 0:
        raise ValueError(f"{experiment}: Tune's searcher state {states[-1].name} is empty (the driver was "
                         "killed while writing it), so this search cannot be resumed; start it again "
                         "under a new --name")


def trial_data(plan: Any) -> Any:
    """The data set as trials get it, shared once per search (trainables.share_dataset: the
    cache paths of a memory-mapped set, else one object-store copy): without its test split,
    so no trial can read (or even map) test; only search.finish does, for the two models it
    compares."""
    if plan.data_ref is None:
        from trainables import share_dataset

        plan.data_ref = share_dataset(plan.dataset.without("test"))
    return plan.data_ref


def kept_baseline(space: Any, confirming: bool) -> dict[str, Any] | None:
    """The search's baseline point when its trial must run to the end, else None. With the
    confirmation on, the plain baseline needs one full-budget run: where the search's
    baseline trial trains like it, ASHA lets that trial run to the end and the confirmation
    takes it (search/confirm.py) instead of starting another."""
    from search.baseline import search_baseline_is_plain

    return space.baseline_point() if confirming and search_baseline_is_plain(space) else None


def finish_from(space: Any, confirming: bool) -> int | None:
    """The epoch from which ASHA lets every trial finish: with the confirmation on, the
    teacher's last epoch, where a trial there has passed a rung before it (the race counts
    only full-budget search runs: search/asha.py); else None."""
    finish = confirming and space.grace_period < space.teacher_epochs < space.max_t
    return space.teacher_epochs if finish else None


def build_scheduler(space: Any, confirming: bool) -> Any:
    """The search's PersistentASHA: the kept baseline (kept_baseline) and the trials that
    reach `finish_from` run to the end."""
    from search.asha import PersistentASHA

    return PersistentASHA(time_attr=space.time_attr, max_t=space.max_t, grace_period=space.grace_period,
                          reduction_factor=space.reduction_factor, keep=kept_baseline(space, confirming),
                          finish_from=finish_from(space, confirming))


def build_tuner(plan: Any, trainable: Any, max_concurrent: int, *, asha: bool = True, **run: Any) -> Any:
    """The search's Tuner: PruningOptunaSearch (the space's sampler, its baseline first) with
    PersistentASHA, or with no scheduler when not `asha` (a benchmark's FIFO); `run` goes to
    tune.RunConfig. With `plan.tail`, idle CPUs go to the trials still running (search/tail.py):
    give the trainable the same file."""
    from ray import tune

    from search.internals import check_versions
    from search.optuna_bridge import PruningOptunaSearch, open_study_storage

    check_versions()  # the door to ASHA's and OptunaSearch's internals: one line if untested
    space = plan.space
    confirming = bool(plan.confirm_top and plan.confirm_seeds)
    keep = kept_baseline(space, confirming)
    scheduler = build_scheduler(space, confirming) if asha else None
    Path(plan.study_path).parent.mkdir(parents=True, exist_ok=True)
    searcher = PruningOptunaSearch(
        space=space,
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=[space.baseline_point()],
        sampler=space.build_sampler(),
        storage=open_study_storage(str(plan.study_path)),
        study_name=plan.name,
        max_t=space.max_t,
        time_attr=space.time_attr,
        scheduler=scheduler if asha else NoEarlyStops(),
        teacher_epochs=space.teacher_epochs,
        student_forks=space.student_forks if plan.teachers is not None else 0,
        unforked=keep,
    )
    run["callbacks"] = [*run.get("callbacks", []), *tail_callbacks(plan, max_concurrent)]
    return tune.Tuner(
        trainable,
        tune_config=tune_config(
            plan,
            max_concurrent,
            search_alg=searcher,  # Tune wraps it in a ConcurrencyLimiter(max_concurrent_trials)
            scheduler=scheduler,
            num_samples=plan.num_samples,
        ),
        run_config=run_config(plan, plan.name, plan.storage, **run),
    )


def run_search(plan: Any) -> None:
    """Start or resume the Tuner and wait for it; Ctrl-C returns with the state saved."""
    from search.plan import spec_of
    from search.report import write_spec
    from trainables import make_trainable

    max_concurrent = fit_concurrency(plan)
    trainable = make_trainable(trial_data(plan), plan.resources, plan.space.metric, plan.space.mode,
                               teachers=plan.teachers, tail=plan.tail)
    if plan.resume:
        check_resumable(plan.local_dir)
        tuner = restore_tuner(plan.experiment, trainable)
    else:
        plan.local_dir.mkdir(parents=True, exist_ok=True)
        write_spec(plan.local_dir, spec_of(plan))
        tuner = build_tuner(plan, trainable, max_concurrent)
    tuner.fit()
