"""The Ray Tune settings the search and the confirmation stage share: concurrency that fits
the cluster, trial names, checkpoint keeping, and the data set as trials receive it.

`plan` is search.run's Plan (space, resources, storage, max_concurrent, max_failures,
dataset); this module sits below both search.run and search.confirm.
"""

from __future__ import annotations

from typing import Any


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


def run_config(plan: Any, name: str, storage: str) -> Any:
    from ray import tune

    from trainables import checkpoint_config

    return tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        # Every epoch reports a checkpoint folder with its resume state; keep the best
        # by the search metric (what export reads) and the latest (what a retried or
        # resumed trial continues from).
        checkpoint_config=checkpoint_config(tune.CheckpointConfig, plan.space.metric, plan.space.mode),
    )


def trial_data(plan: Any) -> Any:
    """The data set as trials get it, put into Ray's object store once per search: without
    its test split, so no trial can read test; only search.finish does, for the two
    models it compares."""
    if plan.data_ref is None:
        from fer.data import Dataset
        from trainables import put_dataset

        dataset = plan.dataset
        splits = {name: split for name, split in dataset.splits.items() if name != "test"}
        plan.data_ref = put_dataset(Dataset(classes=dataset.classes, splits=splits, source=dataset.source))
    return plan.data_ref
