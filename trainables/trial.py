"""The Tune trial: one search config in, the whole two-stage pipeline run, every epoch reported.

Ray at the edge, as in Ray's `doc/source/train/doc_code/train_tune_interop.py`: the
Tune function trainable below is the driver; with several workers it starts ONE Ray
Train `TorchTrainer` for the whole pipeline (stage 1, distributed pseudo-labelling,
stage 2), so a trial pays for one worker-group start, not one per stage. With one
worker it runs the pipeline in its own process and reports with `ray.tune.report`.
Measured with benchmarks/trial_overhead.py on a 2-core machine (quiet / busy): a fresh
single-worker trial starts its pipeline 5 / 10 s after `Tuner.fit()` (actor start and
imports); with `TuneConfig(reuse_actors=True)` the next trial starts 0.02 s after the
previous one ends, and training runs at 0.92-0.94 x a bare loop's speed. Ray Train's
local mode (`num_workers=0`) would add 1.6-3 s per trial (an empty fit, import
included) and refuses `ray.train.report` inside Tune. A 2-worker trial costs 21 / 38 s
to start and tear down its worker group (controller, cleaner and worker processes);
when ASHA stops it, its placement group is released at once (trainables/release.py).

    trainable = make_trainable(dataset, TrialResources(workers=2, cpus_per_worker=1))
    tuner = tune.Tuner(trainable, param_space={"lr": tune.loguniform(1e-4, 1e-2), ...},
                       tune_config=tune.TuneConfig(metric="val_macro_f1", mode="max",
                                                   scheduler=ASHAScheduler(time_attr="epoch")))
    best = best_checkpoint_path(tuner.fit().get_best_result())
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np
import pyarrow.fs
import ray  # plain ray; ray.tune and ray.train are imported where used (import trainables stays light)

from fer.ssl.teachers import TeacherStore
from fer.train.config import TrialConfig, apply_overrides
from trainables.checkpoints import checkpoint_config, resume_state, train_run_name
from trainables.release import record_placement_group, release_on_stop, remove_recorded
from trainables.resources import TrialResources, process_group_backend, scaling_config, trial_resources
from trainables.worker import (
    DataRef,
    MappedRef,
    RankJob,
    Tail,
    detect_device,
    raise_if_diverged,
    replay_shared_teacher,
    run_rank,
    train_worker,
    tune_report,
)

HEALTH_CHECK_INTERVAL_S = "0.5"  # Ray Train controller poll period for multi-worker trials
# Ray logs "Checkpoint successfully created at ..." at INFO for every epoch's report, from
# the trial process (single worker) and from rank 0's Train worker (several), and forwards
# it to the driver's terminal between the live table's updates; WARNING keeps Ray Train's
# warnings and errors. The checkpoint paths are in each trial's result.json.
RAY_TRAIN_LOG_LEVEL = "WARNING"


def pipeline_trial(config: dict[str, Any], data: DataRef | MappedRef, resources: TrialResources = TrialResources(),
                   metric: str = "val_macro_f1", mode: str = "max", teachers: str | None = None,
                   tail: str | None = None) -> None:
    """Tune function trainable. `config` holds TrialConfig field overrides (the sampled
    search parameters plus any fixed values); `data`, `resources`, the search's
    `metric`/`mode` (which checkpoint storage keeps) and `teachers` come through
    `tune.with_parameters` (use `make_trainable`). A retried or restored trial resumes after
    its last reported epoch; one that diverged before fails again at once instead of
    retraining. With `teachers` (a fer.ssl.teachers.TeacherStore folder), a single-worker trial
    stores its finished teacher there, and one whose teacher is there already starts at
    stage 2 (multi-worker trials train their own: every rank would have to see the file).
    With `tail` (search/tail.py's file), a single-worker CPU trial takes the threads the
    search's tail gives it after each epoch."""
    from ray import tune

    started = time.time()
    logging.getLogger("ray.train._internal.storage").setLevel(RAY_TRAIN_LOG_LEVEL)  # see RAY_TRAIN_LOG_LEVEL
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_overrides(TrialConfig(), config, source=f"trial {trial_id} config")
    shared = teachers if resources.workers == 1 else None
    job = RankJob(cfg=cfg, data=data, trial_dir=trial_folder(),
                  threads=max(1, int(resources.cpus_per_worker)), started=started, teachers=shared,
                  tail=Tail(tail, trial_id) if tail is not None and resources.cpu_threads_only else None)
    raise_if_diverged(job.trial_dir)
    if resources.workers == 1:
        resume = resume_state(tune.get_checkpoint())
        if resume is None and shared is not None:
            resume = replay_shared_teacher(TeacherStore(shared), cfg)
        run_rank(job, 0, tune_report, detect_device(in_train_worker=False), resume)
    else:
        run_worker_group(job, resources, trial_id, metric, mode)


def run_worker_group(job: RankJob, resources: TrialResources, trial_id: str,
                     metric: str = "val_macro_f1", mode: str = "max") -> None:
    """One TorchTrainer for the whole pipeline; its reports reach Tune via TuneReportCallback."""
    import ray.train
    import ray.train.torch
    from ray.tune.integration.ray_train import TuneReportCallback

    storage = _storage()
    # The controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and a
    # worker's report waits in a queue of one until polled, so the default adds up to 2 s to
    # short epochs and to every teardown. Ray Train passes the variable on to its controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    placement_file = os.path.join(tempfile.gettempdir(), f"fer-train-pg-{trial_id}-{os.getpid()}")
    release_on_stop(placement_file)  # ASHA's stop must free the workers' CPUs/GPUs (release.py)
    trainer = ray.train.torch.TorchTrainer(
        _per_worker,
        train_loop_config={"job": job},
        torch_config=ray.train.torch.TorchConfig(backend=process_group_backend(resources)),
        scaling_config=scaling_config(resources),
        run_config=ray.train.RunConfig(
            name=train_run_name(trial_id),
            storage_path=storage.experiment_fs_path,  # <experiment>/train-<trial id>/checkpoint_epoch_NNNN
            storage_filesystem=storage.storage_filesystem,
            checkpoint_config=checkpoint_config(ray.train.CheckpointConfig, metric, mode),
            callbacks=[TuneReportCallback(), record_placement_group(placement_file)],
            logging_config=ray.train.LoggingConfig(log_level=RAY_TRAIN_LOG_LEVEL),
        ),
    )
    try:
        trainer.fit()  # a worker's exception (e.g. NaN loss) is raised here and errors the trial
    finally:
        remove_recorded(placement_file)  # normally already gone with the worker group


def _per_worker(loop_config: dict[str, Any]) -> None:
    train_worker(loop_config["job"])


def candidate_trial(config: dict[str, Any], data: DataRef | MappedRef, candidates: dict[str, dict[str, Any]],
                    resources: TrialResources = TrialResources(), metric: str = "val_macro_f1",
                    mode: str = "max", teachers: str | None = None, tail: str | None = None) -> None:
    """Tune function trainable for repeated runs of known configurations: `config` is
    {"candidate": NAME, "seed": S}, and the trial runs `candidates[NAME]` with seed S
    (initial weights, sampling order and augmentation all follow the seed). Tune's table
    and trials.csv then show which configuration and seed a run is."""
    chosen = {**candidates[config["candidate"]], "seed": int(config["seed"])}
    pipeline_trial(chosen, data, resources, metric, mode, teachers, tail)


def put_dataset(dataset: Any) -> DataRef:
    """Put the decoded data set into the object store once, on the driver."""
    return DataRef(ray.put(dataset))


# A data set up to this size (its images, test split left out) goes through the object store,
# so its files need not be on any worker node (FER2013 whole is 66 MB); a larger one (DR at
# 512 px: 9.8 GB) is memory-mapped from each node's cache, never copied into the store.
OBJECT_STORE_MAX_BYTES = 256 * 2**20


def share_dataset(dataset: Any) -> DataRef | MappedRef:
    """How trials get `dataset`: a copy in the object store when it is small (or not mapped),
    else its cache paths (each trial maps the files read-only; a node without the cache entry
    decodes the source there, so the data path must be reachable from it)."""
    from dataclasses import replace

    from fer.data import Split

    size = sum(split.images.nbytes for split in dataset.splits.values())
    if getattr(dataset, "origin", None) is not None and size > OBJECT_STORE_MAX_BYTES:
        return MappedRef(dataset.origin)
    # plain arrays (views of the mapped files): ray.put copies them into the store once
    in_memory = {name: Split(np.asarray(split.images), split.labels) for name, split in dataset.splits.items()}
    return put_dataset(replace(dataset, splits=in_memory, origin=None))


def make_trainable(data: Any, resources: TrialResources = TrialResources(), metric: str = "val_macro_f1",
                   mode: str = "max", candidates: dict[str, dict[str, Any]] | None = None,
                   teachers: str | None = None, tail: str | None = None) -> Callable[..., Any]:
    """`pipeline_trial` with the data reference, resources and the search metric bound: give
    it to `tune.Tuner`, with `checkpoint_config(tune.CheckpointConfig, metric, mode)` in its
    RunConfig. `data` is a `fer.data.Dataset` (shared here, once: `share_dataset`), a
    `DataRef` or a `MappedRef`. With `candidates` (name -> TrialConfig overrides) it is `candidate_trial`.
    `teachers`: a folder every trial can read and write where finished teachers are shared
    (fer.ssl.teachers; None: each trial trains its own). `tail`: the search's tail file
    (search/tail.py; None: every trial keeps its request's threads)."""
    from ray import tune

    from trainables.internals import name_trial_actors

    ref = data if isinstance(data, (DataRef, MappedRef)) else share_dataset(data)
    name_trial_actors(pipeline_trial)
    name_trial_actors(candidate_trial)
    if candidates is None:
        bound = tune.with_parameters(pipeline_trial, data=ref, resources=resources, metric=metric, mode=mode,
                                     teachers=teachers, tail=tail)
    else:
        bound = tune.with_parameters(candidate_trial, data=ref, candidates=candidates, resources=resources,
                                     metric=metric, mode=mode, teachers=teachers, tail=tail)
    return tune.with_resources(bound, trial_resources(resources))


def trial_folder() -> str:
    """The trial's folder in experiment storage when that is a local (or mounted) file
    system, so TensorBoard logs land there as they are written; otherwise Tune's local
    trial folder, which reaches storage with `tune.SyncConfig(sync_artifacts=True)`."""
    from ray import tune

    storage = _storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        path = storage.trial_fs_path
    else:
        path = tune.get_context().get_trial_dir()
    os.makedirs(path, exist_ok=True)
    return path


def _storage() -> Any:
    # Ray has no public accessor for the trial's StorageContext (storage path, file system,
    # experiment and trial folder names): trainables/internals.py reaches it.
    from trainables.internals import trial_storage

    return trial_storage()
