"""What every rank runs: the whole fer pipeline, with Ray reporting at its epoch ends.

`run_rank` is shared by both ways a trial trains: in Tune's own trial process (one
worker, reports through `ray.tune.report`) and as the per-worker function of a Ray Train
`TorchTrainer` (several workers, `torch.distributed` already initialised by Ray Train,
reports through `ray.train.report`). The pipeline itself is plain PyTorch and learns its
rank from `torch.distributed`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
import torch

from fer.ssl.teachers import TeacherStore, teacher_finished
from fer.train.config import SHARED_TEACHER_KEY, TrialConfig
from fer.train.state import PipelineState
from trainables.checkpoints import checkpoint_dir_name, report_with_checkpoint, resume_state

TIMING_FILE = "trial_timing.json"  # wall-clock marks of the trial (rank 0), for overhead checks
# Written by rank 0 when the loss diverged. Tune retries every error up to max_failures
# times, and a retry would resume from the last epoch and diverge again, deterministically;
# with this file it fails at once with the same message instead.
DIVERGED_FILE = "diverged.txt"
TENSORBOARD_DIR = "tensorboard"
# The best val_macro_f1 of the trial so far (both stages), reported next to the epoch's own
# so the live table can show it; added last, after the epoch's metrics, and never the
# search metric: ASHA, checkpoint keeping and search/report.py read their keys by name.
BEST_KEY = "best_val_macro_f1"


@dataclass(frozen=True)
class DataRef:
    """An object-store reference to a `fer.data.Dataset`, put there once by the driver.

    Wrapped because `tune.with_parameters` `ray.put`s its arguments and refuses a bare
    ObjectRef; wrapped, the reference itself travels to the trial and on to every Train
    worker, and each of them maps the arrays read-only out of the object store (zero-copy
    on its node) instead of receiving a pickled copy.
    """

    ref: ray.ObjectRef

    def get(self) -> Any:
        return ray.get(self.ref)


@dataclass(frozen=True)
class MappedRef:
    """A `fer.data.Dataset` memory-mapped from fer.data's cache, passed as its few paths
    (`fer.data.MappedOrigin`) instead of through the object store: each trial and Train
    worker maps the `.npy` files read-only itself, so the processes on a node share the page
    cache and none holds the whole set (the object store would hold a second copy). On a
    node without the cache entry the source is decoded there, once."""

    origin: Any  # fer.data.MappedOrigin

    def get(self) -> Any:
        from fer.data import open_mapped

        return open_mapped(self.origin)


@dataclass(frozen=True)
class RankJob:
    """Everything a rank needs, picklable (the Train worker function's config)."""

    cfg: TrialConfig
    data: DataRef | MappedRef
    trial_dir: str  # where rank 0 writes TensorBoard logs, pipeline outputs and timings
    threads: int  # torch intra-op threads: the CPUs the rank was given
    started: float  # wall-clock time the trial function was entered
    teachers: str | None = None  # a fer.ssl.teachers.TeacherStore folder: finished teachers are shared
    tail: Tail | None = None  # where the search publishes its tail's thread counts (search/tail.py)


@dataclass(frozen=True)
class Tail:
    """The search's tail file (search/tail.py writes it) and this trial's id in it."""

    path: str
    trial_id: str


def detect_device(in_train_worker: bool) -> torch.device:
    """The GPU Ray assigned to this process if CUDA sees one, else CPU: detected, not assumed."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if in_train_worker:
        import ray.train.torch

        return ray.train.torch.get_device()  # the local rank's GPU
    return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU


def run_rank(job: RankJob, rank: int, report: Callable[[dict[str, Any], dict, PipelineState], None],
             device: torch.device, resume: PipelineState | None = None) -> None:
    """Run the pipeline on this rank, from `resume` (a reported epoch's state) when given;
    rank 0 alone writes TensorBoard logs and outputs."""
    from fer.ssl.pipeline import run_pipeline

    torch.set_num_threads(job.threads)
    data = job.data.get()
    writer = _make_writer(job.trial_dir) if rank == 0 else None
    marks: dict[str, Any] = {"trial_start": job.started, "pipeline_start": time.time(), "threads": job.threads}
    if job.teachers is not None and rank == 0:
        report = storing_teachers(TeacherStore(job.teachers), job.cfg, report)
    if job.tail is not None:
        report = following_tail(job.tail, job.threads, report, marks)
    if resume is not None:
        marks["resumed_after_epoch"] = resume.global_epoch()
        if rank == 0:
            print(f"resuming after epoch {marks['resumed_after_epoch']} from the trial's last checkpoint", flush=True)
    try:
        run_pipeline(job.cfg, data, device=device, report=report, resume=resume,
                     out_dir=job.trial_dir if rank == 0 else None, writer=writer, progress=False)
    except FloatingPointError as err:
        if rank == 0:
            with open(os.path.join(job.trial_dir, DIVERGED_FILE), "w", encoding="utf-8") as handle:
                handle.write(str(err))
        raise
    finally:
        if writer is not None:
            writer.close()
    marks["pipeline_end"] = time.time()
    if rank == 0:
        with open(os.path.join(job.trial_dir, TIMING_FILE), "w", encoding="utf-8") as handle:
            json.dump(marks, handle)


def storing_teachers(store: TeacherStore, cfg: TrialConfig,
                     report: Callable[[dict[str, Any], dict, PipelineState], None]
                     ) -> Callable[[dict[str, Any], dict, PipelineState], None]:
    """`report` that first stores the finished teacher (before Tune hears of its last epoch,
    so a trial forked from it finds it), unless the store has it already or there is no
    stage 2 to share it for. A store that cannot be written is one warning: runs then train
    their own teachers."""

    def report_and_store(metrics: dict[str, Any], checkpoint: dict, state: PipelineState) -> None:
        if cfg.student_epochs > 0 and teacher_finished(cfg, state) and not os.path.isfile(store.path(cfg)):
            try:
                store.save(cfg, metrics, checkpoint, state)
            except OSError as err:  # sharing saves time; the trial's own checkpoints are what must land
                print(f"warning: the finished teacher could not be stored for other runs to share ({err})",
                      flush=True)
        report(metrics, checkpoint, state)

    return report_and_store


def following_tail(tail: Tail, threads: int, report: Callable[[dict[str, Any], dict, PipelineState], None],
                   marks: dict[str, Any]) -> Callable[[dict[str, Any], dict, PipelineState], None]:
    """`report` that then sets torch's thread count to what the search's tail file gives this
    trial (never below `threads`, its request; the request when the file says nothing or
    cannot be read), so the next epoch trains on the CPUs finished trials left idle.
    `marks["thread_changes"]` records [epoch reported, threads] at each change."""

    def report_and_follow(metrics: dict[str, Any], checkpoint: dict, state: PipelineState) -> None:
        report(metrics, checkpoint, state)
        wanted = max(threads, tail_threads_of(tail))
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
            marks.setdefault("thread_changes", []).append([state.global_epoch(), wanted])

    return report_and_follow


def tail_threads_of(tail: Tail) -> int:
    """This trial's entry in the tail file; 0 when it has none."""
    try:
        with open(tail.path, encoding="utf-8") as handle:
            return int(json.load(handle)["threads"].get(tail.trial_id, 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not written yet, or not ours to read
        return 0


def replay_shared_teacher(store: TeacherStore, cfg: TrialConfig) -> PipelineState | None:
    """If the store holds cfg's teacher, report its epochs as this trial's own (the same
    numbers: the same teacher), marked SHARED_TEACHER_KEY, the last with its checkpoint and state,
    and return the state to run stage 2 from; None when there is no such teacher. Tune's
    scheduler and searcher see the curve a trained teacher would have given."""
    from ray import tune

    shared = store.load(cfg)
    if shared is None:
        return None
    best = float("-inf")
    for metrics in shared.state.fit.history[:-1]:
        best = max(best, float(metrics["val_macro_f1"]))
        tune.report({**metrics, BEST_KEY: best, SHARED_TEACHER_KEY: True})
    tune_report({**shared.metrics, SHARED_TEACHER_KEY: True}, shared.checkpoint, shared.state)
    print(f"teacher shared: stage 1 of this configuration was trained by an earlier run ({store.path(cfg)}); "
          f"its {len(shared.state.fit.history)} epochs replayed, stage 2 starts now", flush=True)
    return shared.state


def raise_if_diverged(trial_dir: str) -> None:
    """Fail a retried trial at once if its loss diverged before (see DIVERGED_FILE)."""
    path = os.path.join(trial_dir, DIVERGED_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            raise FloatingPointError(f"{handle.read()} (diverged on an earlier attempt; not retried)")


def train_worker(job: RankJob) -> None:
    """Ray Train per-worker function of a multi-worker trial. A retried trial starts a Train
    run of the same name (train-<trial id>) in the same storage, which Ray Train restores:
    `ray.train.get_checkpoint()` is then the run's latest checkpoint, on every rank."""
    import ray.train

    from trainables.internals import train_report_logger

    train_report_logger().setLevel("WARNING")  # one line per rank per epoch, with the whole metrics dict
    rank = ray.train.get_context().get_world_rank()
    run_rank(job, rank, train_report(rank), detect_device(in_train_worker=True),
             resume_state(ray.train.get_checkpoint()))


def train_report(rank: int) -> Callable[[dict[str, Any], dict, PipelineState], None]:
    """`report(metrics, checkpoint, state)` for a Train worker. Every rank reports every
    epoch (Ray Train waits for all of them); only rank 0 uploads the checkpoint folder, and
    only rank 0's metrics reach Tune, which is right because fit all-reduces validation
    over ranks and every rank holds the same state."""
    import ray.train

    def report(metrics: dict[str, Any], checkpoint: dict, state: PipelineState) -> None:
        metrics = with_best(metrics, state)
        if rank != 0:
            ray.train.report(metrics)
            return
        report_with_checkpoint(ray.train.report, ray.train.Checkpoint.from_directory, metrics, checkpoint, state,
                               checkpoint_dir_name=checkpoint_dir_name(metrics["epoch"]))

    return report


def tune_report(metrics: dict[str, Any], checkpoint: dict, state: PipelineState) -> None:
    """`report(metrics, checkpoint, state)` for a single-worker trial, straight to Tune."""
    from ray import tune

    report_with_checkpoint(tune.report, tune.Checkpoint.from_directory, with_best(metrics, state), checkpoint, state)


def with_best(metrics: dict[str, Any], state: PipelineState) -> dict[str, Any]:
    """The epoch's metrics plus the trial's best score so far (a copy: `metrics` is also
    the fit's history entry)."""
    return {**metrics, BEST_KEY: state.best_score()}


def _make_writer(trial_dir: str) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(trial_dir, TENSORBOARD_DIR))
