"""What a CPU training step gets out of the core, and which switches change it, in one run.

For one model at one image size: training images/s of a bare step (forward, cross-entropy,
backward, fused AdamW) in plain NCHW, in channels_last, under torch.compile, and at other
batch sizes, each at 1 and 2 threads; and the step's FLOPs (torch.utils.flop_counter) as a
fraction of what this machine's float32 matmul reaches (torch.mm of two 2048 x 2048
matrices, the attainable peak rather than a datasheet number). Issue 24 asks which of
these pays on CPU before any becomes a default.

    python benchmarks/cpu_step.py                   # resnet10t at 48 px, ~4 min on 2 cores
    python benchmarks/cpu_step.py --model mobilenet_v3_small --image-size 32 --no-compile

--formats MODEL,... measures only plain NCHW against channels_last, for each model on the two
inputs the product trains on (48 px gray at batch 128, FER; 224 px RGB at batch 32, DR), next
to what `fer.train.infer.memory_format` picks on CPU, and whether that is the faster:

    python benchmarks/cpu_step.py --formats resnet10t,resnet18,mobilenet_v3_small,efficientnet_b0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn

from fer.train.models import build_model


def step_fn(model: nn.Module, batch: int, image_size: int, channels_last: bool, compiled: bool,
            in_channels: int = 1):
    """One training step's closure on fixed random data, and the model it trains."""
    net = model.to(memory_format=torch.channels_last) if channels_last else model
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    forward = torch.compile(net) if compiled else net
    x = torch.randn(batch, in_channels, image_size, image_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(forward(x), y).backward()
        optimizer.step()

    return step


def images_per_s(step, batch: int, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):  # first calls: allocator, oneDNN primitive cache, compilation
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def variant_speed(model_name: str, batch: int, image_size: int, steps: int, *, channels_last: bool = False,
                  compiled: bool = False, in_channels: int = 1) -> float:
    """Training images/s of `step_fn` on a freshly built (seeded) model."""
    torch.manual_seed(0)
    model = build_model(model_name, 7, in_channels, 0.0, image_size=image_size)
    return images_per_s(step_fn(model, batch, image_size, channels_last, compiled, in_channels), batch, steps)


def step_flops(model_name: str, batch: int, image_size: int) -> int:
    """FLOPs of one training step (forward + backward), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_name, 7, 1, 0.0)
    x, y = torch.randn(batch, 1, image_size, image_size), torch.randint(0, 7, (batch,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


FORMAT_INPUTS = ((1, 48, 128), (3, 224, 32))  # (channels, side, batch): FER's gray faces, DR's photographs


def format_rows(models: list[str], steps: int, inputs: tuple[tuple[int, int, int], ...]) -> list[dict[str, Any]]:
    """NCHW against channels_last images/s for each model and input, and the product's pick."""
    from fer.train.infer import memory_format

    rows = []
    for name in models:
        for channels, side, batch in inputs:
            speed = {layout: variant_speed(name, batch, side, steps, channels_last=layout == "channels_last",
                                           in_channels=channels) for layout in ("NCHW", "channels_last")}
            model = build_model(name, 7, channels, 0.0, image_size=side)
            picked = memory_format(model, torch.device("cpu"), side) == torch.channels_last
            gain = speed["channels_last"] / speed["NCHW"]
            rows.append({"model": name, "channels": channels, "image_size": side, "batch": batch, **speed,
                         "channels_last_x": gain, "picks": "channels_last" if picked else "NCHW",
                         "pick_is_faster": picked == (gain > 1)})
    return rows


def main_formats(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads[0])
    rows = format_rows(args.formats.split(","), args.steps, FORMAT_INPUTS)
    print(f"training images/s at {args.threads[0]} threads")
    for r in rows:
        print(f"  {r['model']:<20} {r['channels']}x{r['image_size']:>3} px  NCHW {r['NCHW']:7.1f}  channels_last "
              f"{r['channels_last']:7.1f}  {r['channels_last_x']:5.2f}x  picks {r['picks']:<13} "
              f"{'(the faster)' if r['pick_is_faster'] else '(the slower)'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads[0], "formats": rows}, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--formats", default=None, metavar="MODEL,...",
                        help="only NCHW against channels_last for these models, at 48 px gray and 224 px RGB")
    args = parser.parse_args(argv)
    if args.formats:
        return main_formats(args)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("plain NCHW", {}), ("channels_last", {"channels_last": True}),
        (f"batch {args.batch_size // 2}", {"batch": args.batch_size // 2}),
        (f"batch {args.batch_size * 2}", {"batch": args.batch_size * 2})]
    if not args.no_compile:
        variants.append(("torch.compile", {"compiled": True}))
    flops = step_flops(args.model, args.batch_size, args.image_size) / args.batch_size
    results: dict[str, Any] = {"model": args.model, "image_size": args.image_size, "flops_per_image": flops,
                               "threads": {}}
    print(f"{args.model} at {args.image_size} px: {flops / 1e9:.3f} GFLOP per training image (forward + backward)")
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = matmul_flops_per_s()
        rows = {}
        for name, kw in variants:
            rows[name] = variant_speed(args.model, kw.get("batch", args.batch_size), args.image_size, args.steps,
                                       channels_last=kw.get("channels_last", False),
                                       compiled=kw.get("compiled", False))
        base = rows["plain NCHW"]
        print(f"threads {threads}: matmul peak {peak / 1e9:.1f} GFLOP/s")
        for name, value in rows.items():
            print(f"  {name:<14} {value:7.1f} images/s  {value / base:5.2f}x plain  "
                  f"{value * flops / peak:6.1%} of the matmul peak")
        results["threads"][threads] = {"matmul_gflops": peak / 1e9, "images_per_s": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
