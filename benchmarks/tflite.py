"""TFLite variants of one trained model, side by side: size, latency, validation macro-F1.

For a `fer.train` checkpoint (by default one trained here with every default,
`python -m fer.train --out DIR`, about 6 min on 2 cores): ONNX fp32 (onnxruntime, the
product's main export) against the TFLite files `python -m fer.export --tflite
--tflite-quant fp16 dynamic-int8 int8` writes -- fp32, FP16 weights, dynamic-range INT8,
and full INT8 calibrated on 256 training images -- each measured in one run: file size,
median latency of one image (batch 1, one thread; onnxruntime CPU for ONNX, the LiteRT
interpreter for TFLite), macro-F1 on the validation split and top-1 agreement with fp32
PyTorch. Needs the optional extra `[tflite]`.

    python benchmarks/tflite.py                                # trains the default model first
    python benchmarks/tflite.py --checkpoint runs/x/best.pt    # or any fer.train / search checkpoint
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import format_table, save_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train_default(out: Path) -> str:
    """`python -m fer.train --out OUT` with every default; returns its best.pt."""
    cmd = [sys.executable, "-m", "fer.train", "--out", str(out), "--no-progress"]
    with open(out.with_suffix(".log"), "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {out.with_suffix('.log')}")
    return str(out / "best.pt")


def row(name: str, path: str, scores: np.ndarray, reference: np.ndarray, labels: np.ndarray,
        latency_ms: float, num_classes: int) -> dict[str, Any]:
    from fer.export.tflite import macro_f1

    return {"model": name, "file": os.path.basename(path), "mb": os.path.getsize(path) / 2**20,
            "latency_ms": latency_ms, "val_macro_f1": macro_f1(labels, scores, num_classes),
            "top1_agreement_with_torch": float((scores.argmax(1) == reference.argmax(1)).mean()),
            "max_abs_diff_vs_torch": float(np.abs(scores - reference).max())}


def measure(ckpt_path: str, out: Path, runs: int) -> list[dict[str, Any]]:
    import torch

    from fer.data import load_dataset
    from fer.export import tflite
    from fer.export.deploy import build_deploy_model
    from fer.export.export import calibration_images, export_onnx, measure_latency, run_onnx, run_torch
    from fer.train.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    ckpt = load_checkpoint(ckpt_path)
    dataset = load_dataset(ckpt["config"].get("data"), load_size=int(ckpt["config"].get("load_size", 128)))
    val = dataset.splits["val"]
    module = build_deploy_model(ckpt, val.images.shape[1:3])
    reference, k = run_torch(module, val.images), len(ckpt["classes"])
    onnx_path = str(out / "model.onnx")
    export_onnx(module, torch.from_numpy(val.images[:2].copy()), onnx_path)
    rows = [row("ONNX fp32 (onnxruntime)", onnx_path, run_onnx(onnx_path, val.images), reference, val.labels,
                measure_latency(onnx_path, val.images[0], runs)["median_ms"], k)]
    start = time.time()
    fp32 = tflite.convert(module, torch.from_numpy(val.images[:1].copy()), str(out / "model.tflite"))
    print(f"litert-torch conversion: {time.time() - start:.1f} s")
    calib = calibration_images(dataset)
    for mode in ("fp32",) + tflite.QUANT_MODES:
        path = fp32 if mode == "fp32" else tflite.quantize(fp32, str(out / f"model.{mode}.tflite"), mode, calib)
        rows.append(row(f"TFLite {mode}", path, tflite.run_tflite(path, val.images), reference, val.labels,
                        tflite.measure_latency(path, val.images[0], runs)["median_ms"], k))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a fer.train checkpoint (default: train one)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per latency (median)")
    parser.add_argument("--json", default=None, help="where the raw results go")
    args = parser.parse_args(argv)
    from fer.export.tflite import require_extra

    require_extra()
    with tempfile.TemporaryDirectory(prefix="fer-tflite-") as tmp:
        ckpt = args.checkpoint or train_default(Path(tmp) / "train")
        rows = measure(ckpt, Path(tmp), args.runs)
    header = ["model", "size MB", "latency ms (batch 1, 1 thread)", "val macro-F1", "top-1 = PyTorch",
              "max |diff|"]
    print(f"checkpoint: {args.checkpoint or 'python -m fer.train (every default), trained in this run'}")
    print(format_table(header, [[r["model"], round(r["mb"], 2), round(r["latency_ms"], 3),
                                 round(r["val_macro_f1"], 4), round(r["top1_agreement_with_torch"], 4),
                                 f"{r['max_abs_diff_vs_torch']:.1e}"] for r in rows]))
    path = save_json("tflite", "default", {"checkpoint": args.checkpoint, "rows": rows}, args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
