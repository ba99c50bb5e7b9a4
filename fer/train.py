"""Train one stage of a trial: the plain-PyTorch loop every search trial runs.

`fit` trains a model on uint8 image arrays and keeps the epoch with the best validation
macro-F1. It knows nothing about Ray: when `torch.distributed` is initialised (Ray Train's
TorchTrainer does that, as does `torchrun`) it wraps the model in DistributedDataParallel,
trains on its shard of every epoch and all-reduces the validation confusion matrix, so
every rank reports metrics over the WHOLE validation split.

    python -m fer.train [--data PATH] [--config FILE.yaml] [--set key=value ...] --out DIR [--resume]

The CLI runs the whole pipeline of a trial (`fer.pipeline.run_pipeline`: teacher ->
pseudo-labels -> student -> post-hoc offsets); stage 2 is skipped when the data set has no
unlabeled pool or student_epochs is 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fer.checkpoint import make_checkpoint, to_plain
from fer.config import TrialConfig, apply_overrides, load_config_file, parse_set_args
from fer.evaluate import autocast, autocast_dtype, predict_logits, to_nchw
from fer.losses import build_loss
from fer.metrics import metrics_from_confusion
from fer.models import build_model
from fer.samplers import epoch_indices, shard
from fer.transforms import make_train_transform

# report(metrics, checkpoint, state): every epoch, on every rank. `checkpoint` is the
# epoch's own model checkpoint (fer.checkpoint's contract dict); `state` is what
# `fit(..., resume=state)` needs to go on after this epoch (see `fit`).
Report = Callable[[dict[str, Any], "dict[str, Any] | None", dict[str, Any]], None]

# fused=True: one kernel for all parameters instead of a Python loop over them; on CPU
# this cut MobileNetV3-small's AdamW step from ~35 ms to ~6 ms (2 cores).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda groups, cfg, fused: torch.optim.AdamW(groups, lr=cfg.lr, fused=fused),
    "sgd": lambda groups, cfg, fused: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused),
}

# Validation runs without gradients, so it can afford bigger batches than training.
EVAL_BATCH_MIN = 256
# Keep the whole uint8 training array on the GPU (one copy, batches gathered there) when it
# needs at most this share of the free GPU memory; bigger arrays stay on the host.
GPU_DATA_SHARE = 0.25
# Before each validation, BatchNorm's running statistics are re-estimated on this many
# training images (PreciseBN: Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm").
# Short trials need it: torchvision's MobileNetV3 uses BN momentum 0.01, so after an
# epoch of a few dozen steps its running stats still mostly hold their initial values
# (eval-mode accuracy near chance while batch-stat accuracy is ~100% on toy data).
PRECISE_BN_IMAGES = 1024


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
class _Dist:
    rank: int = 0
    world: int = 1
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def fit(
    cfg: TrialConfig,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val: Any,
    classes: list[str],
    *,
    counts: np.ndarray,
    stage: str = "teacher",
    sample_weight: np.ndarray | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    report: Report | None = None,
    epoch_offset: int = 0,
    writer: Any = None,
    progress: bool = True,
    epochs: int | None = None,
    augment: str | None = None,
    resume: dict[str, Any] | None = None,
) -> FitResult:
    """Train one stage and return the best epoch (by validation macro-F1).

    `val` is a `fer.data.Split` (images uint8 (N, H, W, C), labels int64). `counts` are
    the class counts the loss uses for its weights/prior. `sample_weight` (one float per
    training image, e.g. the pseudo-label weight) multiplies each sample's loss.
    `init_state` is a state dict to start from (the student starting from the teacher).
    `epochs`/`augment` default to cfg.epochs/cfg.augment, or to cfg.student_epochs/
    cfg.student_augment when stage == "student".
    `report(metrics, checkpoint, state)` is called once per epoch on every rank; the
    checkpoint is the contract's dict of this epoch's weights (every epoch has one, so
    whichever epoch a search keeps as its best by score can be exported). `state` holds the current weights, optimizer, scheduler and grad-scaler states,
    the step count, the history and the best epoch so far (weights, metrics, confusion):
    plain tensors, numbers, lists and dicts (torch.save/weights_only-loadable), referencing
    live tensors, so save it before training goes on. `fit(..., resume=state)` continues
    after that epoch and ends exactly as the uninterrupted run would: augmentation and
    dropout are reseeded at every epoch start from (seed, rank, epoch), the sampler's
    order already is a function of the epoch.
    """
    student = stage == "student"
    epochs = epochs if epochs is not None else (cfg.student_epochs if student else cfg.epochs)
    augment = augment if augment is not None else (cfg.student_augment if student else cfg.augment)
    _check_inputs(train_images, train_labels, val, classes, sample_weight, epochs)
    device = resolve_device(device)
    ddp = _dist_info(device)
    in_channels = int(train_images.shape[-1])

    channels_last = cfg.channels_last and device.type == "cuda"
    if resume is not None:
        _check_resume(resume, epochs)
        init_state = resume["model"]
    model, net = _build_model(cfg, len(classes), in_channels, init_state, device, channels_last, ddp)
    criterion = build_loss(cfg, np.asarray(counts)).to(device)
    optimizer = build_optimizer(cfg, model)
    source = _TrainSource(train_images, train_labels, sample_weight, device)
    first = _rank_indices(_epoch_order(cfg, train_labels, epoch_offset), ddp)
    steps_per_epoch = len(_batch_bounds(len(first), cfg.batch_size))
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, epochs)
    dtype = autocast_dtype(device) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    transform = make_train_transform(augment, cfg.image_size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loop = _Loop(net, criterion, optimizer, scheduler, scaler, transform, dtype, memory_format,
                 cfg.grad_clip, epochs * steps_per_epoch)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"f1": -math.inf}
    result = FitResult(model=model, best_metrics={}, best_epoch=0, history=history)
    first_epoch = 0
    if resume is not None:
        # a stage that patience ended resumes ended: the uninterrupted run trained no further
        result.stopped_early = bool(resume.get("stopped_early", False))
        first_epoch = epochs if result.stopped_early else resume["epoch"]
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        loop.step = int(resume["step"])
        history.extend(dict(m) for m in resume["history"])
        best = dict(resume["best"], confusion=np.asarray(resume["best"]["confusion"], dtype=np.int64))
        _set_best(result, best, cfg, classes, counts, stage, in_channels, epoch_offset)
    for epoch in range(first_epoch, epochs):
        global_epoch = epoch_offset + epoch + 1
        torch.manual_seed(_epoch_seed(cfg.seed, ddp.rank, global_epoch))
        start = time.perf_counter()  # the timed part: everything but validation
        order = first if epoch == 0 else _rank_indices(_epoch_order(cfg, train_labels, epoch_offset + epoch), ddp)
        bar = _progress_bar(progress and ddp.main, steps_per_epoch, f"{stage} {global_epoch}")
        loss_sum, seen, lr = loop.run_epoch(source, order, cfg.batch_size, bar)
        train_loss = _reduce_train_loss(loss_sum, seen, ddp)
        seconds = time.perf_counter() - start
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"{stage}: training loss became {'NaN' if math.isnan(train_loss) else 'inf'} at epoch "
                f"{global_epoch} (lr {lr:.3g}, model {cfg.model}, loss {cfg.loss}); try a lower lr or grad_clip > 0")
        recalibrate_bn(model, source, order, cfg.image_size, cfg.batch_size, dtype, memory_format, ddp)
        cm, val_loss = validate(model, val, len(classes), cfg, device, ddp)
        metrics = _epoch_metrics(cm, classes, stage=stage, epoch=global_epoch, train_loss=train_loss, lr=lr,
                                 val_loss=val_loss, seconds=seconds, images=seen * ddp.world)
        history.append(metrics)
        if metrics["val_macro_f1"] > best["f1"]:  # ties keep the earlier epoch
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = {"f1": metrics["val_macro_f1"], "epoch": epoch, "state": weights, "metrics": metrics,
                    "confusion": cm}
            checkpoint = _set_best(result, best, cfg, classes, counts, stage, in_channels, epoch_offset)
        else:  # this epoch's own weights (live tensors: saved by report before training goes on)
            checkpoint = make_checkpoint(model.state_dict(), cfg, classes, counts, epoch=global_epoch, stage=stage,
                                         metrics={**metrics, "val_confusion": cm.tolist()}, in_channels=in_channels)
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.4f}", val_f1=f"{metrics['val_macro_f1']:.4f}")
            bar.close()
        if writer is not None and ddp.main:
            log_epoch(writer, metrics, cm, classes, global_epoch)
        # identical decision on every rank: metrics are all-reduced
        result.stopped_early = bool(cfg.patience) and epoch - best["epoch"] >= cfg.patience
        if report is not None:
            state = {"epoch": epoch + 1, "step": loop.step, "history": history,
                     "stopped_early": result.stopped_early,
                     # the best epoch's CPU copy when that is this epoch: saved once, not twice
                     "model": best["state"] if best["epoch"] == epoch else model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(),
                     "best": {**best, "confusion": best["confusion"].tolist()}}
            report(metrics, checkpoint, state)
        if result.stopped_early:
            break
    model.load_state_dict(best["state"])
    model.eval()
    return result


def _set_best(result: FitResult, best: dict[str, Any], cfg: TrialConfig, classes: list[str], counts: np.ndarray,
              stage: str, in_channels: int, epoch_offset: int) -> dict[str, Any]:
    """Record `best` (local epoch index, weights, metrics, confusion) in `result`; returns its checkpoint."""
    global_epoch = epoch_offset + best["epoch"] + 1
    checkpoint = make_checkpoint(best["state"], cfg, classes, counts, epoch=global_epoch, stage=stage,
                                 metrics={**best["metrics"], "val_confusion": best["confusion"].tolist()},
                                 in_channels=in_channels)
    result.best_metrics, result.best_epoch, result.checkpoint = best["metrics"], global_epoch, checkpoint
    result.best_confusion = best["confusion"]
    return checkpoint


def _epoch_seed(seed: int, rank: int, global_epoch: int) -> int:
    """The torch seed of one rank's epoch (augmentation, dropout): a resumed run draws the
    same numbers as an uninterrupted one, and every rank draws different ones."""
    return seed + 7919 * (rank + 1) + 104729 * global_epoch


def _check_resume(resume: dict[str, Any], epochs: int) -> None:
    missing = [k for k in ("epoch", "step", "history", "model", "optimizer", "scheduler", "scaler", "best")
               if k not in resume]
    if missing:
        raise ValueError(f"resume state is missing {', '.join(missing)}")
    if not 1 <= resume["epoch"] <= epochs:
        raise ValueError(f"resume state is after epoch {resume['epoch']} of a {epochs}-epoch stage")


def _build_model(cfg: TrialConfig, num_classes: int, in_channels: int, init_state: dict | None,
                 device: torch.device, channels_last: bool, ddp: _Dist) -> tuple[nn.Module, nn.Module]:
    """The plain model and the module to train through (the DDP wrapper when distributed)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
    model = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels, dropout=cfg.dropout,
                        pretrained=None if init_state is not None else cfg.pretrained,
                        image_size=cfg.image_size, stem=cfg.stem)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if ddp.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, net


class _TrainSource:
    """The training arrays as tensors, on the GPU when they fit (no per-step host copies)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, weights: np.ndarray | None,
                 device: torch.device):
        data = to_nchw(images)  # a view, no copy
        labels_t = torch.tensor(np.asarray(labels), dtype=torch.long)
        weights_t = None if weights is None else torch.tensor(np.asarray(weights), dtype=torch.float32)
        home = torch.device("cpu")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if data.numel() <= GPU_DATA_SHARE * free:
                home = device
        self.home, self.device = home, device
        self.images = data.to(home)
        self.labels = labels_t.to(home)
        self.weights = None if weights_t is None else weights_t.to(home)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = self.images[index].to(self.device, non_blocking=True)
        y = self.labels[index].to(self.device, non_blocking=True)
        w = None if self.weights is None else self.weights[index].to(self.device, non_blocking=True)
        return x, y, w


@dataclass
class _Loop:
    net: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    transform: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype | None
    memory_format: torch.memory_format  # channels_last on CUDA; else plain NCHW (with one
    # channel the two are ambiguous and DDP warns about gradient strides unless it is explicit)
    grad_clip: float
    total_steps: int
    step: int = 0

    def run_epoch(self, source: _TrainSource, order: np.ndarray, batch_size: int,
                  bar: Any) -> tuple[torch.Tensor, int, float]:
        """One pass over `order`; returns the summed loss and sample count as device tensors
        (no host sync per step) and the learning rate of the last step."""
        self.net.train()
        index = torch.from_numpy(order).to(source.home)
        loss_sum = torch.zeros((), device=source.device)
        seen = 0
        lr = self.optimizer.param_groups[0]["lr"]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for start, end in _batch_bounds(len(order), batch_size):
            x, y, w = source.batch(index[start:end])
            x = self.transform(x).contiguous(memory_format=self.memory_format)
            with autocast(source.device, self.dtype):
                logits = self.net(x)
            loss = self.criterion(logits.float(), y, sample_weight=w)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            if self.step < self.total_steps - 1:  # later epochs may not outrun the cosine's end
                self.scheduler.step()
            self.step += 1
            loss_sum += loss.detach() * (end - start)
            seen += end - start
            if bar is not None:
                bar.update(1)
        return loss_sum, seen, lr


def build_optimizer(cfg: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and normalisation weights (1-D tensors),
    as in timm's `param_groups_weight_decay` and torchvision's `--norm-weight-decay 0`."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {cfg.optimizer!r} is not supported. Choose one of: {', '.join(OPTIMIZERS)}")
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # Fused kernels exist for float parameters on CPU and CUDA; anything else takes the default path.
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
                for p in decay + no_decay) or None
    return OPTIMIZERS[cfg.optimizer](groups, cfg, fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup then cosine decay to zero, stepped every iteration (short ASHA trials
    see a smooth schedule instead of a few big per-epoch jumps)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    total = max(1, epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.0)
    if warmup == 0:
        return cosine
    # start_factor 0.01 as torchvision's references (--lr-warmup-decay 0.01).
    ramp = LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, else the current CUDA device when there is one, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dist_info(device: torch.device) -> _Dist:
    if not (dist.is_available() and dist.is_initialized()):
        return _Dist()
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), comm_device=comm)


def _epoch_order(cfg: TrialConfig, labels: np.ndarray, epoch: int) -> np.ndarray:
    return np.asarray(epoch_indices(labels, epoch, sampler=cfg.sampler, class_cap=cfg.class_cap, seed=cfg.seed,
                                    min_size=cfg.epoch_images))


def _rank_indices(order: np.ndarray, ddp: _Dist) -> np.ndarray:
    """This rank's share of an epoch, all ranks the same length.

    DDP needs every rank to run the same number of steps (each backward all-reduces), but
    plain shards differ in length by one. As torch's DistributedSampler does, the epoch
    is padded to a multiple of the world size with its own first indices (at most
    world-1 repeated images per epoch), then sharded (`shard(..., pad=True)`).
    """
    if ddp.world == 1:
        return order
    return np.asarray(shard(order, ddp.rank, ddp.world, pad=True))


def _batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) batches; a trailing batch of one image is dropped, since
    BatchNorm cannot train on a single 1x1 feature map (e.g. 16 px inputs)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        bounds.pop()
    return bounds


def _reduce_train_loss(loss_sum: torch.Tensor, seen: int, ddp: _Dist) -> float:
    stats = torch.stack([loss_sum.double().to(ddp.comm_device),
                         torch.tensor(float(seen), dtype=torch.float64, device=ddp.comm_device)])
    if ddp.world > 1:
        dist.all_reduce(stats)
    total, count = stats.tolist()
    return total / max(count, 1.0)


def recalibrate_bn(model: nn.Module, source: _TrainSource, order: np.ndarray, image_size: int, batch_size: int,
                   dtype: torch.dtype | None, memory_format: torch.memory_format, ddp: _Dist,
                   images: int = PRECISE_BN_IMAGES) -> None:
    """Re-estimate BatchNorm running stats as the plain average over the first `images` of
    this epoch's (unaugmented) training images, then average them over the ranks."""
    from torch.optim.swa_utils import update_bn

    from fer.transforms import make_eval_transform

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or images <= 0:
        return
    transform = make_eval_transform(image_size)
    index = torch.from_numpy(order[:images]).to(source.home)

    def batches():
        for start, end in _batch_bounds(len(index), batch_size):
            x, _, _ = source.batch(index[start:end])
            yield transform(x).contiguous(memory_format=memory_format)

    with torch.no_grad(), autocast(source.device, dtype):
        update_bn(batches(), model)  # torch's SWA helper: momentum None = cumulative average
    if ddp.world > 1:
        for norm in norms:
            for buffer in (norm.running_mean, norm.running_var):
                total = buffer.to(ddp.comm_device)
                dist.all_reduce(total)
                buffer.copy_(total / ddp.world)


def validate(model: nn.Module, val: Any, num_classes: int, cfg: TrialConfig, device: torch.device,
             ddp: _Dist | None = None) -> tuple[np.ndarray, float]:
    """Confusion matrix and mean cross-entropy over the WHOLE validation split.

    Each rank predicts a contiguous block of the split (the plain module, not the DDP
    wrapper, so uneven blocks need no collective per batch), then the confusion counts and
    loss sums are all-reduced: every rank gets the exact whole-split numbers.
    """
    ddp = ddp or _Dist()
    n = len(val.labels)
    lo, hi = ddp.rank * n // ddp.world, (ddp.rank + 1) * n // ddp.world
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = 0.0
    if hi > lo:
        logits = predict_logits(model, val.images[lo:hi], image_size=cfg.image_size,
                                batch_size=max(EVAL_BATCH_MIN, cfg.batch_size), device=device, amp=cfg.amp)
        labels = torch.from_numpy(np.asarray(val.labels[lo:hi], dtype=np.int64))
        preds = logits.argmax(dim=1)
        cm = np.bincount((labels * num_classes + preds).numpy(),
                         minlength=num_classes * num_classes).reshape(num_classes, num_classes)
        loss_sum = float(F.cross_entropy(logits, labels, reduction="sum"))
    if ddp.world > 1:
        packed = torch.tensor(np.append(cm.ravel().astype(np.float64), loss_sum), device=ddp.comm_device)
        dist.all_reduce(packed)
        values = packed.cpu().numpy()
        cm = np.rint(values[:-1]).astype(np.int64).reshape(num_classes, num_classes)
        loss_sum = float(values[-1])
    return cm, loss_sum / max(n, 1)


def metric_key(name: str) -> str:
    """Class name -> metric-key suffix ("No DR" -> "No_DR"), safe for Tune and TensorBoard."""
    return re.sub(r"\W+", "_", name).strip("_") or "class"


def _epoch_metrics(cm: np.ndarray, classes: list[str], *, stage: str, epoch: int, train_loss: float,
                   lr: float, val_loss: float, seconds: float, images: int) -> dict[str, Any]:
    m = metrics_from_confusion(cm, classes)
    # Tune's live table shows the first four numeric metrics of a result: the objective
    # comes right after the epoch so that it is one of them (ray.tune.experimental.output).
    out: dict[str, Any] = {
        "epoch": epoch, "val_macro_f1": float(m["macro_f1"]), "val_loss": val_loss, "train_loss": train_loss,
        "stage": stage, "lr": float(lr), "val_balanced_accuracy": float(m["balanced_accuracy"]),
        "val_accuracy": float(m["accuracy"]), "val_weighted_f1": float(m["weighted_f1"]),
        "val_kappa": float(m["kappa"]),
    }
    for name in classes:
        out[f"val_f1_{metric_key(name)}"] = float(m["per_class"][name]["f1"])
    out["train_seconds"] = seconds
    out["train_images_per_s"] = images / max(seconds, 1e-9)
    return out


def log_epoch(writer: Any, metrics: dict[str, Any], cm: np.ndarray, classes: list[str], step: int) -> None:
    """TensorBoard: losses, lr, headline metrics, per-class F1 and the confusion image."""
    stage = metrics["stage"]
    writer.add_scalar(f"{stage}/train_loss", metrics["train_loss"], step)
    writer.add_scalar(f"{stage}/lr", metrics["lr"], step)
    for key in ("val_loss", "val_macro_f1", "val_balanced_accuracy", "val_accuracy", "val_kappa"):
        writer.add_scalar(f"{stage}/{key}", metrics[key], step)
    for name in classes:
        writer.add_scalar(f"{stage}/val_f1/{metric_key(name)}", metrics[f"val_f1_{metric_key(name)}"], step)
    from fer.metrics import confusion_figure

    writer.add_figure(f"{stage}/val_confusion", confusion_figure(cm, classes), step, close=False)
    writer.flush()


def _progress_bar(show: bool, total: int, desc: str) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=True)


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


# --------------------------------------------------------------------------- CLI

def config_from_args(args: argparse.Namespace) -> TrialConfig:
    """Defaults <- --config file <- --data/--epochs <- --set (later wins)."""
    cfg = TrialConfig()
    if args.config:
        cfg = apply_overrides(cfg, load_config_file(args.config), source=args.config)
    shorthand = {}
    if args.data is not None:
        shorthand["data"] = args.data
    if args.epochs is not None:
        shorthand["epochs"] = args.epochs
    if shorthand:
        cfg = apply_overrides(cfg, shorthand, source="command line")
    if args.set:
        cfg = apply_overrides(cfg, parse_set_args(args.set), source="--set")
    return cfg


RESUME_FILE = "resume.pt"  # fer.train's per-epoch resume state in --out (removed when training ends)


def read_resume_file(out_dir: str, cfg: TrialConfig) -> dict[str, Any]:
    """The pipeline state saved in out_dir/resume.pt by an interrupted `fer.train` run of
    the same config; ValueError naming the file when there is none or it does not fit."""
    from dataclasses import asdict

    from fer.checkpoint import load_weights_only

    path = os.path.join(out_dir, RESUME_FILE)
    saved = load_weights_only(path, missing=f"nothing to resume (no {RESUME_FILE}: the run finished, "
                                            "or never saved an epoch)")
    if not isinstance(saved, dict) or not {"config", "pipeline"} <= set(saved):
        raise ValueError(f"{path}: not a fer.train resume file")
    changed = sorted(k for k, v in asdict(cfg).items() if saved["config"].get(k) != v)
    if changed:
        raise ValueError(f"{path}: saved by a run with a different config ({', '.join(changed)}); "
                         f"resume with the same --config/--set, or train into a new --out")
    return saved["pipeline"]


def train_main(cfg: TrialConfig, out_dir: str, *, device: str | None = None, progress: bool = True,
               resume: bool = False) -> dict[str, Any]:
    """Load the data, run the pipeline, write best.pt (with post-hoc offsets), metrics.json,
    pseudo_labeled.csv, tb/ and the confusion PNGs; test metrics of both stages.

    Every epoch's resume state goes to out_dir/resume.pt (atomically), removed when the
    run ends; `resume=True` continues an interrupted run of the same config from it."""
    from dataclasses import asdict

    from torch.utils.tensorboard import SummaryWriter

    from fer.budget import describe_budget
    from fer.checkpoint import save_checkpoint
    from fer.data import load_dataset
    from fer.evaluate import evaluate_model, write_report
    from fer.pipeline import run_pipeline

    state = read_resume_file(out_dir, cfg) if resume else None
    data = load_dataset(cfg.data, load_size=cfg.load_size)
    print(describe_budget(cfg, data), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    resume_path = os.path.join(out_dir, RESUME_FILE)
    config = asdict(cfg)

    def save_state(metrics: dict[str, Any], checkpoint: dict[str, Any], pipeline: dict[str, Any]) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        save_checkpoint({"config": config, "epoch": metrics["epoch"], "pipeline": pipeline}, resume_path)

    writer = SummaryWriter(os.path.join(out_dir, "tb"))
    try:
        result = run_pipeline(cfg, data, device=device, out_dir=out_dir, writer=writer, progress=progress,
                              report=save_state, resume=state)
    finally:
        writer.close()
    if os.path.exists(resume_path):
        os.remove(resume_path)
    ckpt, stage = result.checkpoint, result.metrics["final_stage"]
    final = result.student if stage == "student" else result.teacher
    summary: dict[str, Any] = {"data": data.source, "best_epoch": ckpt["epoch"], "final_stage": stage,
                               "checkpoint": result.checkpoint_path, "config": ckpt["config"],
                               "val": final.best_metrics, "pipeline": result.metrics,
                               "pseudo": result.pseudo, "history": result.history}

    def evaluate(model: nn.Module, split: str, offsets: list[float] | None) -> dict[str, Any]:
        part = data.splits[split]
        metrics, _ = evaluate_model(model, part.images, part.labels, data.classes,
                                    image_size=cfg.image_size, device=device, offsets=offsets)
        return metrics

    write_report(evaluate(result.model, "val", ckpt["posthoc_offsets"]), data.classes, out_dir, "val")
    if "test" in data.splits and data.splits["test"].labels is not None:
        test_metrics = evaluate(result.model, "test", ckpt["posthoc_offsets"])
        write_report(test_metrics, data.classes, out_dir, "test")
        summary["test"] = {k: test_metrics[k] for k in ("macro_f1", "balanced_accuracy", "accuracy", "kappa")}
        for name, fitted in (("teacher", result.teacher), ("student", result.student)):
            if fitted is not None:  # each stage's best weights, plain argmax
                summary[f"{name}_test_macro_f1"] = evaluate(fitted.model, "test", None)["macro_f1"]
        summary["test_without_offsets_macro_f1"] = summary[f"{stage}_test_macro_f1"]
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(to_plain(summary), handle, indent=2)
    _print_summary(summary, out_dir)
    return summary


def _print_summary(summary: dict[str, Any], out_dir: str) -> None:
    pipe = summary["pipeline"]
    for name in ("teacher", "student"):
        if f"{name}_val_macro_f1" in pipe:
            line = (f"{name}: best val macro-F1 {pipe[f'{name}_val_macro_f1']:.4f} "
                    f"(epoch {pipe[f'{name}_best_epoch']})")
            if f"{name}_test_macro_f1" in summary:
                line += f", test macro-F1 {summary[f'{name}_test_macro_f1']:.4f}"
            print(line)
    if summary.get("pseudo"):
        pseudo = summary["pseudo"]
        precision = "" if pseudo.get("precision") is None else f", precision {pseudo['precision']:.3f}"
        print(f"pseudo-labels: kept {pseudo['kept']} of {pseudo.get('pool_size', '?')}{precision}")
    line = (f"best epoch {summary['best_epoch']}: val macro-F1 {pipe['val_macro_f1_raw']:.4f} "
            f"({summary['final_stage']}; {pipe['val_macro_f1_posthoc']:.4f} with post-hoc {pipe['posthoc']} offsets)")
    if "test" in summary:
        line += (f"; test macro-F1 {summary['test']['macro_f1']:.4f} "
                 f"({summary['test_without_offsets_macro_f1']:.4f} without offsets)")
    print(line)
    print(f"wrote {out_dir}/best.pt, metrics.json, val_confusion.png, tb/"
          + (", pseudo_labeled.csv" if summary.get("pseudo") else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None,
                        help="FER2013 CSV, split folder or DR folder (default: embedded demo data)")
    parser.add_argument("--config", default=None, help="YAML file of TrialConfig overrides")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    parser.add_argument("--epochs", type=int, default=None, help="shorthand for --set epochs=N")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue an interrupted run in --out after its last epoch (from --out/{RESUME_FILE}; "
                             "same config)")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        train_main(cfg, args.out, device=args.device, progress=not args.no_progress, resume=args.resume)
    except (ValueError, FloatingPointError, OSError) as err:  # user-causable: bad input, divergence, unwritable --out
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
