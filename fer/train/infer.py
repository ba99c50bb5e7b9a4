"""Batched and sharded inference, and where this process stands in torch.distributed.

A leaf below training, evaluation, pseudo-labelling and export: `predict_logits` is the one
batched inference loop (the trainer's validation, the pseudo-labeller, evaluation and the
search's test read all use it), `predict_logits_sharded` splits it over DDP ranks, and
`Ranks.current()` is the one answer to "which rank am I, of how many".
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place in torch.distributed (rank 0 of 1 when it is not initialised)."""

    rank: int = 0
    world: int = 1
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, device: torch.device | None = None) -> "Ranks":
        """The running process group's rank and size; collectives on `device` under NCCL."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        comm = device if device is not None and dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), comm_device=comm)


def is_main() -> bool:
    """True on rank 0, and in a process that is not distributed: the one that writes files."""
    return Ranks.current().main


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for `device`, or None for full precision (CPU).

    bfloat16 where the GPU supports it: same exponent range as float32, so no loss
    scaling is needed and no overflow to inf; float16 (with a GradScaler) otherwise.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype`, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) array -> (N, C, H, W) tensor view sharing its memory (no copy)."""
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only (zero-copy); nothing writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(images)
    if data.shape[-1] == 1:  # plain NCHW strides: with one channel, a permuted view would look
        return data.squeeze(-1).unsqueeze(1)  # channels_last to conv, and DDP warns about grad strides
    return data.permute(0, 3, 1, 2)


# On CPU, oneDNN's channels_last (NHWC) kernels pay for depthwise convolutions and for large
# inputs, and not for a plain ResNet on small gray images (benchmarks/cpu_step.py --formats, one
# training step at 2 threads): MobileNetV3 and EfficientNet 1.5-1.8x at 48 px gray, every model
# tried 1.25-1.45x at 224 px RGB; ResNet-10t/18/50 at 48 px 0.8-1.0x.
CPU_CHANNELS_LAST_SIDE = 128


def memory_format(model: nn.Module, device: torch.device, image_size: int,
                  enabled: bool = True) -> torch.memory_format:
    """The memory format to train and predict in: channels_last on CUDA, and on CPU for a model
    with depthwise convolutions or at `CPU_CHANNELS_LAST_SIDE` px and up; NCHW otherwise or
    when not `enabled` (TrialConfig.channels_last)."""
    if not enabled:
        return torch.contiguous_format
    if device.type == "cuda" or image_size >= CPU_CHANNELS_LAST_SIDE:
        return torch.channels_last
    depthwise = any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
                    for m in unwrap(model).modules())
    return torch.channels_last if depthwise else torch.contiguous_format


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _head(net: nn.Module) -> nn.Linear | None:
    """The classifier layer: the last Linear in module order (as `fer.train.models.head_name`)."""
    return next((m for m in reversed(list(net.modules())) if isinstance(m, nn.Linear)), None)


def _num_outputs(net: nn.Module) -> int:
    head = _head(net)
    return head.out_features if head is not None else 0


# An inference batch holds at most this many bytes of its input as float32: at 48 px that is
# every batch of 256 images, at 512 px RGB (3 MiB an image) 42 of them. Whole batches of 256
# 512-px photographs took a search's driver to 5.0 GB of private memory at DDR's size (export
# and test read) and a trial to 2.5 GB (benchmarks/dr_scale.py --measures search).
BATCH_BYTES = 128 * 2**20


def bounded_batch(images: np.ndarray, batch_size: int) -> int:
    """`batch_size`, lowered so a batch of `images` (N, H, W, C) as float32 fits BATCH_BYTES."""
    per_image = 4 * int(np.prod(images.shape[1:], dtype=np.int64))
    return max(1, min(batch_size, BATCH_BYTES // max(per_image, 1)))


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    *,
    image_size: int,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    tta: bool = False,
    amp: bool = True,
) -> torch.Tensor:
    """Logits (N, K) float32 on CPU for uint8 images (N, H, W, C), model in eval mode.

    With `tta` the logits are averaged over `fer.train.transforms.tta_views` (identity, flip,
    shifted crops): averaged logits keep softmax, temperature scaling and post-hoc offsets
    meaningful. A DDP wrapper is looked through (no collective per batch).
    """
    from fer.train.transforms import make_eval_transform, tta_views

    net = unwrap(model)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    if len(images) == 0:
        return torch.zeros(0, _num_outputs(net))
    was_training = net.training
    net.eval()
    dtype = autocast_dtype(device) if amp else None
    layout = memory_format(net, device, image_size)
    transform = make_eval_transform(image_size)
    data = to_nchw(images)
    outputs = []
    batch_size = bounded_batch(images, batch_size)
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size].to(device, non_blocking=True)
        views = tta_views(batch, image_size) if tta else [transform(batch)]
        logits = 0.0
        for view in views:
            with autocast(device, dtype):
                logits = logits + net(view.contiguous(memory_format=layout)).float()
        outputs.append(logits / len(views))
    net.train(was_training)
    return torch.cat(outputs).cpu()


def gather_rows(local: np.ndarray, local_indices: np.ndarray, total: int) -> np.ndarray:
    """Reassemble per-rank row blocks into one (total, ...) array in the original order.

    Every rank passes the rows it computed and their global indices; every rank gets the
    whole array back (all_gather_object works on both gloo and nccl).
    """
    ranks = Ranks.current()
    if ranks.world == 1:
        out = np.empty((total,) + local.shape[1:], dtype=local.dtype)
        out[local_indices] = local
        return out
    pieces: list = [None] * ranks.world
    dist.all_gather_object(pieces, (np.asarray(local_indices), local))
    # a rank with an empty shard may hold a (0, 0) array: take the row shape from the others
    shape_from = max((rows for _, rows in pieces), key=len)
    out = np.empty((total,) + shape_from.shape[1:], dtype=shape_from.dtype)
    seen = np.zeros(total, dtype=bool)
    for indices, rows in pieces:
        if len(indices):
            out[indices] = rows
        seen[indices] = True
    if not seen.all():
        raise RuntimeError(f"gather_rows: {int((~seen).sum())} of {total} rows missing after all_gather")
    return out


def predict_logits_sharded(model: nn.Module, images: np.ndarray, **kwargs) -> torch.Tensor:
    """`predict_logits` on this rank's shard (`fer.train.samplers.shard`), gathered so every rank
    has all N rows in order. Without torch.distributed (or with one rank) this is just
    `predict_logits`."""
    return torch.from_numpy(_sharded(lambda part: predict_logits(model, part, **kwargs).numpy(), images))


def predict_features_sharded(model: nn.Module, images: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), penultimate features (N, D)) float32 from one pass, no TTA: the features
    are what the classifier layer (the last Linear, as `fer.train.models.head_name` finds it, for timm
    and torchvision models alike) receives, read by a forward pre-hook during `predict_logits`;
    sharded and gathered like `predict_logits_sharded`."""
    head = _head(unwrap(model))

    def both(part: np.ndarray) -> np.ndarray:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach().float().cpu()))
        try:
            logits = predict_logits(model, part, **kwargs, tta=False)
        finally:
            hook.remove()
        features = torch.cat(captured) if captured else torch.zeros(0, head.in_features)
        return torch.cat([logits, features], dim=1).numpy()  # one array, so one gather

    rows = _sharded(both, images)
    return rows[:, :head.out_features], rows[:, head.out_features:]


def _sharded(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """`predict` on this rank's shard of `images`, gathered in order on every rank."""
    ranks = Ranks.current()
    if ranks.world == 1:
        return predict(images)
    from fer.train.samplers import shard

    mine = shard(np.arange(len(images)), ranks.rank, ranks.world)
    return gather_rows(predict(images[mine]), mine, len(images))
