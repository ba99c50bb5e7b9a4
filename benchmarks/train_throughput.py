"""Images/s of fer.train.fitting.fit's loop vs a bare PyTorch loop doing the same work, in one run.

Both loops train the same model (same seed), batch size, data, augmentation, loss,
optimizer (fused AdamW), gradient clipping and (on CUDA) autocast + channels_last; the
bare loop just has none of fit's bookkeeping (sampler, shards, scheduler, loss
accumulation, progress, per-epoch validation). fit's number is its own per-epoch training time
(`train_images_per_s`, which excludes validation); the first epoch of each is warm-up
and not counted. The two alternate `--repeats` times and the best of each is kept, so
a noisy shared machine penalises neither. Goal: ratio >= 0.9.

    python benchmarks/train_throughput.py                      # ~1 min on 2 CPU cores
    python benchmarks/train_throughput.py --n 20000 --batch-size 256 --epochs 4 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from fer.data import Split
from fer.train.config import TrialConfig
from fer.train.fitting import Stage, fit
from fer.train.infer import autocast, autocast_dtype, resolve_device
from fer.train.losses import build_loss
from fer.train.models import build_model
from fer.train.transforms import make_train_transform


def make_data(n: int, size: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), rng.integers(0, classes, n)


def bare_loop(cfg: TrialConfig, images: np.ndarray, labels: np.ndarray, classes: int,
              device: torch.device) -> float:
    """The plainest loop of the same work; returns images/s over epochs 2..E."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, classes, images.shape[-1], cfg.dropout).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    criterion = build_loss(cfg, np.bincount(labels, minlength=classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    dtype = autocast_dtype(device) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    transform = make_train_transform(cfg.augment, cfg.image_size)
    home = device if cuda else torch.device("cpu")  # fit keeps small arrays on the GPU too
    data = torch.from_numpy(images).permute(0, 3, 1, 2).to(home)
    targets = torch.from_numpy(labels).to(home)
    model.train()
    seen, seconds = 0, 0.0
    for epoch in range(cfg.epochs):
        _sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(data), device=home)
        for i in range(0, len(order), cfg.batch_size):
            index = order[i:i + cfg.batch_size]
            x = transform(data[index].to(device, non_blocking=True))
            y = targets[index].to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits = model(x)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        loss.item()  # fit syncs once per epoch too
        _sync(device)
        if epoch > 0:
            seen += len(order)
            seconds += time.perf_counter() - start
    return seen / seconds


def fit_loop(cfg: TrialConfig, images: np.ndarray, labels: np.ndarray, classes: int,
             device: torch.device) -> float:
    """fit()'s training throughput over epochs 2..E (its own timer, validation excluded)."""
    val_x, val_y = make_data(64, images.shape[1], classes, seed=1)
    names = [f"class{k}" for k in range(classes)]
    stage = Stage.of(cfg, "teacher", images, labels, np.bincount(labels, minlength=classes))
    result = fit(cfg, stage, Split(val_x, val_y), names, device=device, progress=False)
    later = result.history[1:]
    return sum(m["train_images_per_s"] * m["train_seconds"] for m in later) / sum(m["train_seconds"] for m in later)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=512, help="training images")
    parser.add_argument("--epochs", type=int, default=3, help="per loop; the first is warm-up")
    parser.add_argument("--augment", default="weak")
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = TrialConfig(model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                      epochs=args.epochs, augment=args.augment, warmup_epochs=1)
    images, labels = make_data(args.n, args.image_size, args.classes)
    bare, trainer = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(cfg, images, labels, args.classes, device))
        trainer.append(fit_loop(cfg, images, labels, args.classes, device))
    print(f"device {device}, {args.model} {args.image_size}px, batch {args.batch_size}, "
          f"{args.n} images x {args.epochs - 1} timed epochs, augment {args.augment}, "
          f"threads {torch.get_num_threads()}")
    print(f"bare loop : {max(bare):9.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in bare)})")
    print(f"fer.fit   : {max(trainer):9.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in trainer)})")
    ratio = max(trainer) / max(bare)
    print(f"ratio fit/bare: {ratio:.3f} ({'ok' if ratio >= 0.9 else 'BELOW'} the 0.9 goal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
