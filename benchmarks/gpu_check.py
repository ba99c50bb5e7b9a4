"""The GPU check, prepared to run in one call when a CUDA machine is lent: every GPU path the
tests only exercise on CPU, each step one line (PASS / FAIL / SKIP and its numbers), the raw
results as JSON.

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json      # one GPU: about 6-8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny              # rehearsal on CPU (tests run it)

Steps (each a fresh process through the product's own front doors, with its own timeout):

  env         torch, CUDA and the devices
  augment     images/s of fer.train.transforms' weak, strong and fundus augmentation on uint8
              batches on the device (128 x 1 x 48 x 48 and 64 x 3 x 224 x 224), next to the CPU
  amp         `python -m fer.train` on the demo data with amp on and off: training images/s
              (fit's own, validation excluded) and val macro-F1 of each
  dr224       `python -m fer.train` on a generated fundus folder (DR layout, RGB) at 224 px,
              load_size 256, resnet18, fundus augmentation: training images/s at clinical size
  throughput  `benchmarks/train_throughput.py`: fit's loop against a bare PyTorch loop, ratio
  resume      `python -m fer.train` (6 epochs) stopped (SIGINT) after its second and resumed with
              --resume: the resumed run ends with as many epochs as an uninterrupted one and
              the same best epoch, its val macro-F1 within 0.02 (GPU kernels are not bitwise
              deterministic)
  fractional  `benchmarks/gpu_sharing.py --budget small`: 1, 2 and 4 trials sharing the GPU
              (--gpus-per-worker 1, 0.5, 0.25), AMP on and off
  ddp         `python -m search.run --space smoke --workers-per-trial 2 --gpus-per-worker 1`:
              a trial as NCCL DDP; SKIP on fewer than 2 GPUs (NCCL needs one GPU per rank)

Exit status: 0 when no step failed. With --tiny every size is cut so that the whole check
runs in a few minutes on CPU (the `fractional` and `ddp` steps need CUDA and skip there).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


class StepFailed(Exception):
    """A step's command failed or its numbers broke the step's rule."""


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command in the repository; its stdout, or StepFailed with the tail of its output."""
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise StepFailed(f"{' '.join(argv[:4])} ... exited {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}")
    return done.stdout


def train_metrics(out: Path) -> dict[str, Any]:
    """fer.train's metrics.json: fit's training images/s (mean of the epochs after the first) and val macro-F1."""
    summary = json.loads((out / "metrics.json").read_text())
    rates = [float(m["train_images_per_s"]) for m in summary["history"] if "train_images_per_s" in m]
    rate = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]
    return {"images_per_s": rate, "val_macro_f1": float(summary["val"]["val_macro_f1"]),
            "epochs": len(summary["history"]), "best_epoch": int(summary["best_epoch"])}


def fer_train(out: Path, args: argparse.Namespace, *sets: str, data: str | None = None,
              epochs: int | None = None) -> list[str]:
    argv = [PYTHON, "-m", "fer.train", "--out", str(out), "--device", args.device, "--no-progress",
            "--epochs", str(epochs or (2 if args.tiny else 4)), "--set", "student_epochs=0"]
    if args.tiny:
        argv += ["--set", "epoch_images=256", "--set", "model=resnet10t"]
    for item in sets:
        argv += ["--set", item]
    return argv + (["--data", data] if data else [])


# --------------------------------------------------------------------------- steps

def step_env(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(), "devices": []}
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out["devices"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    if args.device.startswith("cuda") and not out["cuda_available"]:
        raise StepFailed("--device cuda, but torch.cuda.is_available() is False")
    return out


def step_augment(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from fer.train.transforms import make_train_transform

    repeats = 3 if args.tiny else 20
    out: dict[str, Any] = {}
    devices = sorted({"cpu", args.device})
    for kind, shape, size in (("weak", (128, 1, 48, 48), 48), ("strong", (128, 1, 48, 48), 48),
                              ("fundus", (64 if not args.tiny else 8, 3, 224, 224), 224)):
        transform = make_train_transform(kind, size)
        for device in devices:
            batch = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
            transform(batch)  # warm-up (kernels, allocator)
            sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                transform(batch)
            sync()
            out[f"{kind}_{device}_images_per_s"] = shape[0] * repeats / (time.perf_counter() - start)
    return out


def step_amp(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for amp in ("true", "false"):
        folder = work / f"amp_{amp}"
        run(fer_train(folder, args, f"amp={amp}"), timeout=args.step_timeout)
        out[f"amp_{amp}"] = train_metrics(folder)
    out["amp_speedup"] = out["amp_true"]["images_per_s"] / out["amp_false"]["images_per_s"]
    return out


def step_dr224(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from fer.data.fundus_synth import write_fundus_folder

    folder = work / "fundus"
    n = 60 if args.tiny else 1000
    write_fundus_folder(folder, n, seed=0, sides=(512, 768) if args.tiny else (1024, 2048))
    out_dir = work / "dr224"
    size = "64" if args.tiny else "224"
    run(fer_train(out_dir, args, f"image_size={size}", f"load_size={int(size) + 32}", "model=resnet18",
                  "augment=fundus", "epoch_images=0", "batch_size=32" if args.tiny else "batch_size=64",
                  data=str(folder), epochs=2),
        timeout=args.step_timeout, env={"FER_CACHE_DIR": str(work / "cache")})
    return {"images": n, "image_size": int(size), **train_metrics(out_dir)}


def step_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    argv = [PYTHON, "benchmarks/train_throughput.py", "--device", args.device]
    argv += ["--n", "256", "--epochs", "2", "--repeats", "1"] if args.tiny else \
        ["--n", "20000", "--batch-size", "256", "--epochs", "4"]
    lines = run(argv, timeout=args.step_timeout).strip().splitlines()
    rates = {line.split(":")[0].strip(): float(line.split(":")[1].split()[0]) for line in lines
             if line.startswith(("bare loop", "fer.fit"))}
    return {"bare_images_per_s": rates["bare loop"], "fit_images_per_s": rates["fer.fit"],
            "ratio": rates["fer.fit"] / rates["bare loop"], "printed": lines}


def step_resume(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    whole, parted = work / "resume_whole", work / "resume_parted"
    # epochs after the stop: the window in which the poll below must see epoch 2's state before
    # the run ends and removes it (a GPU epoch of 20,000 48 px images takes seconds)
    epochs, extra = (6, ()) if args.tiny else (6, ("epoch_images=20000",))
    run(fer_train(whole, args, *extra, epochs=epochs), timeout=args.step_timeout)
    argv = fer_train(parted, args, *extra, epochs=epochs)
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = parted / "resume.pt"
    deadline = time.time() + args.step_timeout
    seen = 0
    while child.poll() is None and time.time() < deadline:  # stop it once the second epoch's state is saved
        if state.exists() and state.stat().st_mtime_ns != seen:
            seen = state.stat().st_mtime_ns
            if _saved_epoch(state) >= 2:
                child.send_signal(signal.SIGINT)
                break
        time.sleep(0.2)
    child.wait(timeout=120)
    if not state.exists():
        raise StepFailed(f"the run finished before it could be stopped after epoch 2 of {epochs}: nothing to resume")
    stopped_at = _saved_epoch(state)
    run(argv + ["--resume"], timeout=args.step_timeout)
    a, b = train_metrics(whole), train_metrics(parted)
    out = {"stopped_after_epoch": stopped_at, "whole": a, "resumed": b}
    if (a["epochs"], a["best_epoch"]) != (b["epochs"], b["best_epoch"]) or abs(a["val_macro_f1"] - b["val_macro_f1"]) > 0.02:
        raise StepFailed(f"resumed run differs: {json.dumps(out)}")
    return out


def _saved_epoch(state: Path) -> int:
    import torch

    try:  # fer.train writes it atomically: a read sees a whole file, or none once the run has ended
        saved = torch.load(state, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return 0
    return int(saved.get("epoch", 0))


def step_fractional(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if not args.device.startswith("cuda"):
        raise SkipStep("fractional GPUs need CUDA")
    printed = run([PYTHON, "benchmarks/gpu_sharing.py", "--budget", "small", "--json", str(work / "sharing.json")],
                  timeout=args.step_timeout)
    return {"printed": printed.strip().splitlines()[-8:], **json.loads((work / "sharing.json").read_text())}


def step_ddp(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    if not args.device.startswith("cuda") or torch.cuda.device_count() < 2:
        raise SkipStep(f"NCCL DDP needs 2 GPUs, one per rank; this machine has {torch.cuda.device_count()}")
    printed = run([PYTHON, "-m", "search.run", "--space", "smoke", "--workers-per-trial", "2", "--gpus-per-worker",
                   "1", "--storage", str(work / "ray"), "--name", "ddp", "--export-dir", str(work / "ddp_export")],
                  timeout=args.step_timeout)
    return {"printed": printed.strip().splitlines()[-6:]}


class SkipStep(Exception):
    """A step that cannot run here (the reason is its message)."""


STEPS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "env": step_env, "augment": step_augment, "amp": step_amp, "dr224": step_dr224, "throughput": step_throughput,
    "resume": step_resume, "fractional": step_fractional, "ddp": step_ddp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a rehearsal of the script)")
    parser.add_argument("--tiny", action="store_true", help="every size cut to minutes on CPU")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--step-timeout", type=float, default=300.0, help="seconds each command may take")
    parser.add_argument("--json", default=None, help="where the results go (default: benchmarks/results/gpu_check.json)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"device": args.device, "tiny": args.tiny, "steps": {}}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in args.steps:
            started = time.time()
            try:
                entry = {"status": "PASS", **STEPS[name](args, Path(tmp))}
            except SkipStep as why:
                entry = {"status": "SKIP", "reason": str(why)}
            except (StepFailed, subprocess.TimeoutExpired) as why:
                entry, failed = {"status": "FAIL", "reason": str(why)}, failed + 1
            entry["seconds"] = round(time.time() - started, 1)
            results["steps"][name] = entry
            numbers = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()
                       if k not in ("status", "printed", "reason") and not isinstance(v, (dict, list))}
            print(f"{entry['status']:4} {name:10} {entry.get('reason', '').splitlines()[0] if 'reason' in entry else json.dumps(numbers)}",
                  flush=True)
    path = Path(args.json or REPO / "benchmarks" / "results" / "gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"{failed} step(s) failed; results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
