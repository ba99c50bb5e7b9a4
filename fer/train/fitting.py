"""Train one stage of a trial: the plain-PyTorch loop every search trial runs.

`fit` trains a model on uint8 image arrays and keeps the epoch with the best validation
macro-F1. It knows nothing about Ray: when `torch.distributed` is initialised (Ray Train's
TorchTrainer does that, as does `torchrun`) it wraps the model in DistributedDataParallel,
trains on its shard of every epoch and all-reduces the validation confusion matrix, so
every rank reports metrics over the WHOLE validation split (the pieces: `fer.train.loop`).

What a stage trains on, how long and from where is a `Stage`; `fer.ssl.pipeline` builds one
per stage (`Stage.teacher`, `Stage.student`). The CLI is `fer.train`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fer.train.checkpoint import make_checkpoint
from fer.train.config import TrialConfig
from fer.train.consistency import Consistency, Debias, plan_epoch
from fer.train.infer import Ranks, autocast_dtype, memory_format, resolve_device
from fer.train.loop import (
    Loop,
    PoolSteps,
    TrainSource,
    batch_bounds,
    build_optimizer,
    build_scheduler,
    epoch_metrics,
    epoch_order,
    epoch_seed,
    log_epoch,
    progress_bar,
    rank_indices,
    recalibrate_bn,
    reduce_train_loss,
    validate,
)
from fer.train.losses import build_loss
from fer.train.models import build_model
from fer.train.posthoc import fit_offsets, macro_f1
from fer.train.state import FitState
from fer.train.transforms import make_train_transform

# report(metrics, checkpoint, state): every epoch, on every rank. `checkpoint` is the
# epoch's own model checkpoint (fer.train.checkpoint's contract dict); `state` is the `FitState`
# that `fit(..., resume=state)` continues from after this epoch. Its tensors are live:
# save it (`state.to_dict()`) before the callback returns.
Report = Callable[[dict[str, Any], "dict[str, Any] | None", FitState], None]


@dataclass
class Stage:
    """What one call of `fit` trains: its images, labels and class counts (the loss's
    weights/prior), how many epochs with which augmentation, where its global epoch numbers
    start, per-sample loss weights (pseudo-labels) and the weights to start from."""

    name: str  # "teacher" or "student": the metrics' and checkpoints' stage
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    counts: np.ndarray  # images per class, for the loss
    epochs: int
    augment: str
    epoch_offset: int = 0  # reported epoch = epoch_offset + local epoch + 1
    sample_weight: np.ndarray | None = None  # one float per image, multiplies its loss
    init_state: dict[str, torch.Tensor] | None = None  # state dict to start from
    consistency: Consistency | None = None  # online stage 2: the pool and FixMatch's settings
    lr_scale: float = 1.0  # peak learning rate = cfg.lr * lr_scale
    schedule: str = "cosine"  # after the warmup (fer.names.SCHEDULES): stage 2 takes cfg.student_schedule
    ema: float = 0.0  # decay of the weight average validated and handed out (stage 2: cfg.student_ema); 0 = off

    @classmethod
    def of(cls, cfg: TrialConfig, name: str, images: np.ndarray, labels: np.ndarray, counts: np.ndarray, *,
           epoch_offset: int | None = None, sample_weight: np.ndarray | None = None,
           init_state: dict[str, torch.Tensor] | None = None) -> "Stage":
        """The stage `name` of cfg: its epochs and augmentation; the student's epochs follow the teacher's."""
        student = name == "student"
        return cls(name=name, images=images, labels=labels, counts=np.asarray(counts),
                   epochs=cfg.student_epochs if student else cfg.epochs,
                   augment=cfg.student_augment if student else cfg.augment,
                   epoch_offset=(cfg.epochs if student else 0) if epoch_offset is None else epoch_offset,
                   sample_weight=sample_weight, init_state=init_state,
                   lr_scale=cfg.student_lr_scale if student else 1.0,
                   schedule=cfg.student_schedule if student else "cosine",
                   ema=cfg.student_ema if student else 0.0)

    @classmethod
    def teacher(cls, cfg: TrialConfig, data: Any) -> "Stage":
        """Stage 1: the labelled train split of a `fer.data.Dataset`."""
        train = data.splits["train"]
        return cls.of(cfg, "teacher", train.images, train.labels, data.class_counts("train"))

    @classmethod
    def student(cls, cfg: TrialConfig, images: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                counts: np.ndarray, init: dict[str, torch.Tensor] | None, round: int = 1) -> "Stage":
        """Stage 2's round `round` (of cfg.student_rounds, cfg.round_epochs each): train + kept
        pool images, pseudo-labels weighted, from `init` (or scratch)."""
        return replace(cls.of(cfg, "student", images, labels, counts, sample_weight=weights, init_state=init,
                              epoch_offset=cfg.epochs + (round - 1) * cfg.round_epochs), epochs=cfg.round_epochs)

    def online(self, cfg: TrialConfig, pool: Any, val: Any = None, labeller: np.ndarray | None = None) -> "Stage":
        """This stage with the `pool` split (its labels, if any, only as held-out truth) trained
        online every step, as cfg's student_mode (fixmatch, flexmatch) says (fer.train.consistency);
        with cfg.pool_debias the weak views get the student's post-hoc offsets, fitted on `val`;
        `labeller`, a second labeller's distribution over the pool, is mixed into them at
        cfg.pool_labeller_weight (None: the student's own predictions alone)."""
        counts = np.asarray(self.counts, dtype=np.float64)
        debias = None
        if cfg.pool_debias:
            if val is None:
                raise ValueError("pool_debias fits the student's post-hoc offsets on val: Stage.online needs val")
            debias = Debias(images=val.images, labels=val.labels, counts=self.counts, posthoc=cfg.posthoc)
        spec = Consistency(images=pool.images, prior=counts / counts.sum(), threshold=cfg.pseudo_threshold,
                           weight=cfg.pseudo_weight, mode=cfg.student_mode, align=cfg.pool_align,
                           ratio=cfg.pool_ratio, truth=pool.labels, debias=debias,
                           soft=cfg.pool_targets == "soft",
                           labeller=labeller, labeller_weight=cfg.pool_labeller_weight)
        return replace(self, consistency=spec)


@dataclass
class FitResult:
    model: nn.Module  # the best epoch's weights loaded, eval mode, on the training device
    best_metrics: dict[str, Any]  # the flat metrics reported for the best epoch
    best_epoch: int  # global epoch (epoch_offset + local epoch + 1) of the best weights
    history: list[dict[str, Any]]  # one flat metrics dict per epoch, as reported
    checkpoint: dict[str, Any] | None = None  # the best epoch's checkpoint dict (contract)
    best_confusion: np.ndarray | None = None  # validation confusion matrix of the best epoch
    stopped_early: bool = False


@dataclass
class _Run:
    """Everything one `fit` call trains with, and its best epoch so far."""

    cfg: TrialConfig
    stage: Stage
    val: Any
    classes: list[str]
    device: torch.device
    ddp: Ranks
    in_channels: int
    model: nn.Module
    loop: Loop
    source: TrainSource
    first: np.ndarray  # this rank's order of the stage's first epoch
    steps_per_epoch: int
    result: FitResult
    best: dict[str, Any] = field(default_factory=lambda: {"f1": -math.inf})


def fit(cfg: TrialConfig, stage: Stage, val: Any, classes: list[str], *, device: str | torch.device | None = None,
        report: Report | None = None, writer: Any = None, progress: bool = True,
        resume: FitState | None = None) -> FitResult:
    """Train `stage` and return its best epoch (by validation macro-F1).

    `val` is a `fer.data.Split` (images uint8 (N, H, W, C), labels int64).
    `report(metrics, checkpoint, state)` is called once per epoch on every rank; the
    checkpoint is the contract's dict of this epoch's weights (every epoch has one, so
    whichever epoch a search keeps as its best by score can be exported). `fit(...,
    resume=state)` continues after that epoch and ends exactly as the uninterrupted run
    would: augmentation and dropout are reseeded at every epoch start from (seed, rank,
    epoch), the sampler's order already is a function of the epoch. `writer` is a
    TensorBoard SummaryWriter (rank 0 logs to it).
    """
    run = _setup(cfg, stage, val, classes, device, resume)
    first_epoch = 0 if resume is None else _restore(run, resume)
    for epoch in range(first_epoch, stage.epochs):
        metrics, checkpoint = _train_epoch(run, epoch, progress, writer)
        # identical decision on every rank: metrics are all-reduced
        run.result.stopped_early = bool(cfg.patience) and epoch - run.best["epoch"] >= cfg.patience
        if report is not None:
            report(metrics, checkpoint, _state(run, epoch))
        if run.result.stopped_early:
            break
    run.model.load_state_dict(run.best["state"])
    run.model.eval()
    return run.result


def _setup(cfg: TrialConfig, stage: Stage, val: Any, classes: list[str], device: str | torch.device | None,
           resume: FitState | None) -> _Run:
    """Check the inputs; build the model (from the resume state's weights), loss, optimizer,
    schedule, data source and step loop."""
    _check_inputs(stage.images, stage.labels, val, classes, stage.sample_weight, stage.epochs)
    device = resolve_device(device)
    ddp = Ranks.current(device)
    in_channels = int(stage.images.shape[-1])
    init_state = stage.init_state
    if resume is not None:
        resume.check_fits(stage.epochs)
        init_state = resume.model
    model, net, layout = _build_model(cfg, len(classes), in_channels, init_state, device, ddp)
    criterion = build_loss(cfg, np.asarray(stage.counts)).to(device)
    optimizer = build_optimizer(cfg, model, cfg.lr * stage.lr_scale)
    source = TrainSource(stage.images, stage.labels, stage.sample_weight, device)
    first = rank_indices(epoch_order(cfg, stage.labels, stage.epoch_offset), ddp)
    steps_per_epoch = len(batch_bounds(len(first), cfg.batch_size))
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, stage.epochs, stage.schedule)
    dtype = autocast_dtype(device) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    transform = make_train_transform(stage.augment, cfg.image_size)
    loop = Loop(net, criterion, optimizer, scheduler, scaler, transform, dtype, layout,
                cfg.grad_clip, stage.epochs * steps_per_epoch)
    if stage.consistency is not None:
        loop.pool = PoolSteps(stage.consistency, cfg.image_size, device)
    if stage.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        loop.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(stage.ema), use_buffers=True)
    result = FitResult(model=model, best_metrics={}, best_epoch=0, history=[])
    return _Run(cfg, stage, val, classes, device, ddp, in_channels, model, loop, source, first, steps_per_epoch,
                result)


def _restore(run: _Run, resume: FitState) -> int:
    """Load the optimizer, schedule, step, history and best epoch of `resume`; the first
    epoch still to train (none when patience had ended the stage)."""
    # a stage that patience ended resumes ended: the uninterrupted run trained no further
    run.result.stopped_early = resume.stopped_early
    run.loop.optimizer.load_state_dict(resume.optimizer)
    run.loop.scheduler.load_state_dict(resume.scheduler)
    run.loop.scaler.load_state_dict(resume.scaler)
    run.loop.step = resume.step
    if run.loop.ema is not None:
        if resume.ema is None:
            raise ValueError(f"{run.stage.name}: the resume state has no weight average, but the stage keeps one "
                             f"(student_ema={run.stage.ema}); resume with the configuration it was saved with")
        run.loop.ema.load_state_dict(resume.ema)
    run.result.history.extend(dict(m) for m in resume.history)
    run.best = dict(resume.best, confusion=np.asarray(resume.best["confusion"], dtype=np.int64))
    _set_best(run)
    return run.stage.epochs if resume.stopped_early else resume.epoch


def _train_epoch(run: _Run, epoch: int, progress: bool, writer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One epoch: train, recalibrate BatchNorm, validate, keep the best; its metrics and checkpoint."""
    cfg, stage, ddp = run.cfg, run.stage, run.ddp
    global_epoch = stage.epoch_offset + epoch + 1
    start = time.perf_counter()  # the timed part: everything but validation
    if run.loop.pool is not None:  # from the weights at the epoch's start: a resumed epoch plans the same
        run.loop.pool.begin(plan_epoch(stage.consistency, run.model, steps=run.steps_per_epoch,
                                       batch_size=cfg.batch_size, seed=cfg.seed, epoch=global_epoch, ddp=ddp,
                                       image_size=cfg.image_size, device=run.device))
    torch.manual_seed(epoch_seed(cfg.seed, ddp.rank, global_epoch))
    order = run.first if epoch == 0 else rank_indices(epoch_order(cfg, stage.labels, stage.epoch_offset + epoch), ddp)
    bar = progress_bar(progress and ddp.main, run.steps_per_epoch, f"{stage.name} {global_epoch}")
    loss_sum, seen, lr = run.loop.run_epoch(run.source, order, cfg.batch_size, bar)
    train_loss = reduce_train_loss(loss_sum, seen, ddp)
    seconds = time.perf_counter() - start
    if not math.isfinite(train_loss):
        raise FloatingPointError(
            f"{stage.name}: training loss became {'NaN' if math.isnan(train_loss) else 'inf'} at epoch "
            f"{global_epoch} (lr {lr:.3g}, model {cfg.model}, loss {cfg.loss}); try a lower lr or grad_clip > 0")
    # the weights this epoch validates, keeps and hands out: the live ones, or their average
    evaluated = run.model if run.loop.ema is None else run.loop.ema.module
    recalibrate_bn(run.model, run.source, order, cfg.image_size, cfg.batch_size, run.loop.dtype,
                   run.loop.memory_format, ddp)  # the live weights label the pool at the next epoch's start
    if evaluated is not run.model:
        recalibrate_bn(evaluated, run.source, order, cfg.image_size, cfg.batch_size, run.loop.dtype,
                       run.loop.memory_format, ddp)
    cm, val_loss, logits = validate(evaluated, run.val, len(run.classes), cfg, run.device)
    # the epoch's own post-hoc offsets: its checkpoint decides with them wherever it is handed out
    offsets = fit_offsets(logits, run.val.labels, stage.counts, cfg.posthoc)
    metrics = epoch_metrics(cm, run.classes, stage=stage.name, epoch=global_epoch, train_loss=train_loss, lr=lr,
                            val_loss=val_loss, seconds=seconds, images=seen * ddp.world,
                            posthoc_f1=macro_f1(run.val.labels, logits, offsets))
    if run.loop.pool is not None:
        metrics.update(run.loop.pool.stats())
    run.result.history.append(metrics)
    checkpoint = _keep_best(run, evaluated, epoch, metrics, cm, [float(v) for v in offsets])
    if bar is not None:
        bar.set_postfix(loss=f"{train_loss:.4f}", val_f1=f"{metrics['val_macro_f1']:.4f}")
        bar.close()
    elif progress and ddp.main:
        print(f"{stage.name} epoch {global_epoch}: train loss {train_loss:.4f}, val macro-F1 "
              f"{metrics['val_macro_f1']:.4f}, {seconds:.1f} s", flush=True)
    if writer is not None and ddp.main:
        log_epoch(writer, metrics, cm, run.classes, global_epoch)
    return metrics, checkpoint


def _keep_best(run: _Run, evaluated: nn.Module, epoch: int, metrics: dict[str, Any], cm: np.ndarray,
               offsets: list[float]) -> dict[str, Any]:
    """Make this epoch's `evaluated` weights the best when its macro-F1 is higher (ties keep the
    earlier); its checkpoint, with the epoch's post-hoc offsets."""
    if metrics["val_macro_f1"] > run.best["f1"]:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in evaluated.state_dict().items()}
        run.best = {"f1": metrics["val_macro_f1"], "epoch": epoch, "state": weights, "metrics": metrics,
                    "confusion": cm, "offsets": offsets}
        return _set_best(run)
    # this epoch's own weights (live tensors: saved by report before training goes on)
    return make_checkpoint(evaluated.state_dict(), run.cfg, run.classes, run.stage.counts, epoch=metrics["epoch"],
                           stage=run.stage.name, metrics={**metrics, "val_confusion": cm.tolist()},
                           in_channels=run.in_channels, posthoc_offsets=offsets)


def _set_best(run: _Run) -> dict[str, Any]:
    """Record run.best (local epoch index, weights, metrics, confusion) in the result; its checkpoint."""
    best, result = run.best, run.result
    global_epoch = run.stage.epoch_offset + best["epoch"] + 1
    checkpoint = make_checkpoint(best["state"], run.cfg, run.classes, run.stage.counts, epoch=global_epoch,
                                 stage=run.stage.name,
                                 metrics={**best["metrics"], "val_confusion": best["confusion"].tolist()},
                                 in_channels=run.in_channels, posthoc_offsets=best.get("offsets"))
    result.best_metrics, result.best_epoch, result.checkpoint = best["metrics"], global_epoch, checkpoint
    result.best_confusion = best["confusion"]
    return checkpoint


def _state(run: _Run, epoch: int) -> FitState:
    """What `fit(..., resume=...)` needs to go on after `epoch` (live tensors)."""
    best, loop = run.best, run.loop
    # the best epoch's CPU copy when that is this epoch: saved once, not twice (with a weight
    # average the best is the average's, and the live weights are saved besides)
    weights = best["state"] if best["epoch"] == epoch and loop.ema is None else run.model.state_dict()
    return FitState(epoch=epoch + 1, step=loop.step, history=run.result.history, model=weights,
                    optimizer=loop.optimizer.state_dict(), scheduler=loop.scheduler.state_dict(),
                    scaler=loop.scaler.state_dict(), best=best, stopped_early=run.result.stopped_early,
                    ema=None if loop.ema is None else loop.ema.state_dict())


def _build_model(cfg: TrialConfig, num_classes: int, in_channels: int, init_state: dict | None,
                 device: torch.device, ddp: Ranks) -> tuple[nn.Module, nn.Module, torch.memory_format]:
    """The plain model, the module to train through (the DDP wrapper when distributed) and the
    memory format both are in (`fer.train.infer.memory_format`)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
    model = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels, dropout=cfg.dropout,
                        pretrained=None if init_state is not None else cfg.pretrained,
                        image_size=cfg.image_size, stem=cfg.stem)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    layout = memory_format(model, device, cfg.image_size, cfg.channels_last)
    model.to(memory_format=layout)
    net = model
    if ddp.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, net, layout


def _check_inputs(images: np.ndarray, labels: np.ndarray, val: Any, classes: list[str],
                  sample_weight: np.ndarray | None, epochs: int) -> None:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"train images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"train images ({len(images)}) and labels ({len(labels)}) must be equal and non-empty")
    if sample_weight is not None and len(sample_weight) != len(labels):
        raise ValueError(f"sample_weight has {len(sample_weight)} entries for {len(labels)} images")
    if val.labels is None or len(val.labels) == 0:
        raise ValueError("the validation split needs labels (it selects the best epoch)")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    high = max(int(np.max(labels)), int(np.max(val.labels)))
    if high >= len(classes) or min(int(np.min(labels)), int(np.min(val.labels))) < 0:
        raise ValueError(f"labels must lie in [0, {len(classes) - 1}] for {len(classes)} classes, found {high}")
