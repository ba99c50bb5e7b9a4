"""The pieces of one training epoch: data on the device, the step loop, BatchNorm
recalibration, whole-split validation, optimizer and schedule, and each rank's share.

`fer.train.fitting.fit` puts them together. Under torch.distributed (Ray Train's TorchTrainer or
`torchrun`) every rank runs the same number of steps on its shard of each epoch, and the
validation logits are gathered, so every rank sees the numbers of the WHOLE validation split.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fer.train.config import TrialConfig
from fer.train.consistency import Consistency, EpochPlan, Tally, epoch_stats, pool_loss
from fer.train.infer import Ranks, autocast, predict_logits_sharded, to_nchw
from fer.train.metrics import metrics_from_confusion
from fer.train.samplers import epoch_indices, shard

# fused=True: one kernel for all parameters instead of a Python loop over them; on CPU
# this cut MobileNetV3-small's AdamW step from ~35 ms to ~6 ms (2 cores).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda groups, cfg, lr, fused: torch.optim.AdamW(groups, lr=lr, fused=fused),
    "sgd": lambda groups, cfg, lr, fused: torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=fused),
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


class TrainSource:
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
class Loop:
    net: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    transform: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype | None
    memory_format: torch.memory_format  # the model's (fer.train.infer.memory_format), made explicit
    # for every input: with one channel the two are ambiguous and DDP warns about gradient strides
    grad_clip: float
    total_steps: int
    step: int = 0
    pool: "PoolSteps | None" = None  # stage 2's online consistency (fer.train.consistency), else None
    ema: Any = None  # torch's AveragedModel of the weights, updated every step (cfg.student_ema), else None

    def run_epoch(self, source: TrainSource, order: np.ndarray, batch_size: int,
                  bar: Any) -> tuple[torch.Tensor, int, float]:
        """One pass over `order`; returns the summed loss and sample count as device tensors
        (no host sync per step) and the learning rate of the last step."""
        self.net.train()
        index = torch.from_numpy(order).to(source.home)
        loss_sum = torch.zeros((), device=source.device)
        seen = 0
        lr = self.optimizer.param_groups[0]["lr"]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for start, end in batch_bounds(len(order), batch_size):
            x, y, w = source.batch(index[start:end])
            x = self.transform(x).contiguous(memory_format=self.memory_format)
            if self.pool is None:
                with autocast(source.device, self.dtype):
                    logits = self.net(x)
                loss = self.criterion(logits.float(), y, sample_weight=w)
            else:
                loss = self.pool.loss(self, x, y, w, start, end)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(getattr(self.net, "module", self.net))
            lr = self.optimizer.param_groups[0]["lr"]
            if self.step < self.total_steps - 1:  # later epochs may not outrun the cosine's end
                self.scheduler.step()
            self.step += 1
            loss_sum += loss.detach() * (end - start)
            seen += end - start
            if bar is not None:
                bar.update(1)
        return loss_sum, seen, lr


class PoolSteps:
    """The pool's half of each online stage-2 step (FixMatch, `fer.train.consistency`): its weak and
    strong views go through the network with the labelled batch, in one forward pass."""

    def __init__(self, spec: Consistency, image_size: int, device: torch.device):
        from fer.train.transforms import make_train_transform

        self.spec = spec
        self.source = TrainSource(spec.images, np.zeros(len(spec.images), dtype=np.int64), None, device)
        self.truth = None if spec.truth is None else torch.as_tensor(np.asarray(spec.truth), dtype=torch.long)
        self.weak = make_train_transform("weak", image_size)
        self.strong = make_train_transform("strong", image_size)
        self.plan: EpochPlan | None = None  # this epoch's, set by begin() before each epoch
        self.index: torch.Tensor | None = None
        self.tally = Tally.zeros(device)

    def stats(self) -> dict[str, Any]:
        """This epoch's pool numbers for its metrics (fer.train.consistency.epoch_stats)."""
        return epoch_stats(self.plan, self.tally, self.truth is not None)

    def begin(self, plan: EpochPlan) -> None:
        self.plan, self.tally = plan, Tally.zeros(self.source.device)
        self.index = torch.from_numpy(plan.order).to(self.source.home)

    def loss(self, loop: Loop, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, start: int,
             end: int) -> torch.Tensor:
        ratio = self.spec.ratio
        picked = self.index[start * ratio:end * ratio]
        u, _, _ = self.source.batch(picked)
        views = [x, self.weak(u).contiguous(memory_format=loop.memory_format),
                 self.strong(u).contiguous(memory_format=loop.memory_format)]
        with autocast(self.source.device, loop.dtype):
            logits = loop.net(torch.cat(views))
        labelled, weak, strong = logits.split([len(x), len(u), len(u)])
        truth = None if self.truth is None else self.truth[picked.cpu()].to(self.source.device)
        labeller = None if self.spec.labeller is None else self.spec.labeller[picked.cpu()]
        unlabelled = pool_loss(weak, strong, self.plan, truth, self.tally, self.spec.oracle, self.spec.soft,
                               labeller, self.spec.labeller_weight)
        return loop.criterion(labelled.float(), y, sample_weight=w) + self.spec.weight * unlabelled


def build_optimizer(cfg: TrialConfig, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD at peak rate `lr` (cfg.lr unless given); no weight decay on biases and
    normalisation weights (1-D tensors), as in timm's `param_groups_weight_decay` and
    torchvision's `--norm-weight-decay 0`."""
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
    return OPTIMIZERS[cfg.optimizer](groups, cfg, cfg.lr if lr is None else lr, fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int,
                    epochs: int, schedule: str = "cosine") -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup then cosine decay to zero (or, `schedule="constant"`, the peak rate to the
    end), stepped every iteration (short ASHA trials see a smooth schedule instead of a few big
    per-epoch jumps).

    The warmup takes at most half the stage: a 1-epoch stage (the search's student and its
    control) with a 1-epoch warmup would end at the peak learning rate, never decaying."""
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule={schedule!r} is not allowed. Choose one of: cosine, constant")
    total = max(1, epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total // 2)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.0) if schedule == "cosine" \
        else ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return cosine
    # start_factor 0.01 as torchvision's references (--lr-warmup-decay 0.01).
    ramp = LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def epoch_seed(seed: int, rank: int, global_epoch: int) -> int:
    """The torch seed of one rank's epoch (augmentation, dropout): a resumed run draws the
    same numbers as an uninterrupted one, and every rank draws different ones."""
    return seed + 7919 * (rank + 1) + 104729 * global_epoch


def epoch_order(cfg: TrialConfig, labels: np.ndarray, epoch: int) -> np.ndarray:
    return np.asarray(epoch_indices(labels, epoch, sampler=cfg.sampler, class_cap=cfg.class_cap, seed=cfg.seed,
                                    min_size=cfg.epoch_images))


def rank_indices(order: np.ndarray, ddp: Ranks) -> np.ndarray:
    """This rank's share of an epoch, all ranks the same length.

    DDP needs every rank to run the same number of steps (each backward all-reduces), but
    plain shards differ in length by one. As torch's DistributedSampler does, the epoch
    is padded to a multiple of the world size with its own first indices (at most
    world-1 repeated images per epoch), then sharded (`shard(..., pad=True)`).
    """
    if ddp.world == 1:
        return order
    return np.asarray(shard(order, ddp.rank, ddp.world, pad=True))


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) batches; a trailing batch of one image is dropped, since
    BatchNorm cannot train on a single 1x1 feature map (e.g. 16 px inputs)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        bounds.pop()
    return bounds


def reduce_train_loss(loss_sum: torch.Tensor, seen: int, ddp: Ranks) -> float:
    stats = torch.stack([loss_sum.double().to(ddp.comm_device),
                         torch.tensor(float(seen), dtype=torch.float64, device=ddp.comm_device)])
    if ddp.world > 1:
        dist.all_reduce(stats)
    total, count = stats.tolist()
    return total / max(count, 1.0)


def recalibrate_bn(model: nn.Module, source: TrainSource, order: np.ndarray, image_size: int, batch_size: int,
                   dtype: torch.dtype | None, memory_format: torch.memory_format, ddp: Ranks,
                   images: int = PRECISE_BN_IMAGES) -> None:
    """Re-estimate BatchNorm running stats as the plain average over the first `images` of
    this epoch's (unaugmented) training images, then average them over the ranks."""
    from torch.optim.swa_utils import update_bn

    from fer.train.transforms import make_eval_transform

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or images <= 0:
        return
    transform = make_eval_transform(image_size)
    index = torch.from_numpy(order[:images]).to(source.home)

    def batches():
        for start, end in batch_bounds(len(index), batch_size):
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


def validate(model: nn.Module, val: Any, num_classes: int, cfg: TrialConfig,
             device: torch.device) -> tuple[np.ndarray, float, np.ndarray]:
    """Confusion matrix, mean cross-entropy and logits (N, K) float32 over the WHOLE
    validation split.

    Each rank predicts its shard of the split (the plain module, not the DDP wrapper, so
    uneven shards need no collective per batch) and the logits are gathered
    (`fer.train.infer.predict_logits_sharded`): every rank gets the exact whole-split numbers, and
    the logits the post-hoc offsets of the epoch are fitted on.
    """
    logits = predict_logits_sharded(model, val.images, image_size=cfg.image_size,
                                    batch_size=max(EVAL_BATCH_MIN, cfg.batch_size), device=device,
                                    amp=cfg.amp).float()
    labels = torch.from_numpy(np.asarray(val.labels, dtype=np.int64))
    preds = logits.argmax(dim=1)
    cm = np.bincount((labels * num_classes + preds).numpy(),
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return cm, float(F.cross_entropy(logits, labels)), logits.numpy()  # fit refuses an empty val split


def metric_key(name: str) -> str:
    """Class name -> metric-key suffix ("No DR" -> "No_DR"), safe for Tune and TensorBoard."""
    return re.sub(r"\W+", "_", name).strip("_") or "class"


def epoch_metrics(cm: np.ndarray, classes: list[str], *, stage: str, epoch: int, train_loss: float,
                  lr: float, val_loss: float, seconds: float, images: int, posthoc_f1: float) -> dict[str, Any]:
    """The flat metrics one epoch reports (Tune, TensorBoard, history). `posthoc_f1` is the
    epoch's val macro-F1 with its own post-hoc offsets (fer.train.posthoc, cfg.posthoc fitted on val):
    how the model would decide if it were handed out."""
    m = metrics_from_confusion(cm, classes)
    # Tune's live table shows the first four numeric metrics of a result: the objectives
    # come right after the epoch so that they are among them (ray.tune.experimental.output).
    out: dict[str, Any] = {
        "epoch": epoch, "val_macro_f1": float(m["macro_f1"]), "val_macro_f1_posthoc": float(posthoc_f1),
        "val_loss": val_loss, "train_loss": train_loss,
        "stage": stage, "lr": float(lr), "val_balanced_accuracy": float(m["balanced_accuracy"]),
        "val_accuracy": float(m["accuracy"]), "val_weighted_f1": float(m["weighted_f1"]),
        "val_kappa": float(m["kappa"]),
    }
    for name in classes:
        out[f"val_f1_{metric_key(name)}"] = float(m["per_class"][name]["f1"])
    out["train_seconds"] = seconds
    out["train_images"] = images  # this epoch's length (all ranks), which the pool control matches
    out["train_images_per_s"] = images / max(seconds, 1e-9)
    return out


def log_epoch(writer: Any, metrics: dict[str, Any], cm: np.ndarray, classes: list[str], step: int) -> None:
    """TensorBoard: losses, lr, headline metrics, per-class F1 and the confusion image."""
    stage = metrics["stage"]
    writer.add_scalar(f"{stage}/train_loss", metrics["train_loss"], step)
    writer.add_scalar(f"{stage}/lr", metrics["lr"], step)
    for key in ("val_loss", "val_macro_f1", "val_macro_f1_posthoc", "val_balanced_accuracy", "val_accuracy", "val_kappa"):
        writer.add_scalar(f"{stage}/{key}", metrics[key], step)
    for name in classes:
        writer.add_scalar(f"{stage}/val_f1/{metric_key(name)}", metrics[f"val_f1_{metric_key(name)}"], step)
    from fer.train.metrics import confusion_figure

    writer.add_figure(f"{stage}/val_confusion", confusion_figure(cm, classes), step, close=False)
    writer.flush()


def progress_bar(show: bool, total: int, desc: str) -> Any:
    """A tqdm bar over one epoch's batches on a terminal; None otherwise (a log file gets
    fit's one line per epoch instead of carriage-return frames)."""
    if not show or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=True)
