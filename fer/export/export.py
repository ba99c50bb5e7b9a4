"""Export a checkpoint to ONNX that takes raw pixels and returns calibrated class scores.

    python -m fer.export --checkpoint runs/x/best.pt --out deploy/ [--int8] [--data PATH]
        [--tflite [--tflite-quant fp16 dynamic-int8 int8] [--tflite-max-f1-drop 0.02]]

The graph's input is `pixels`: uint8, (batch, H, W, C) -- channels last, exactly the
layout of `fer.data.Split.images` and of an image array from PIL/OpenCV with a batch axis
added -- with H, W, C fixed to the data set's image shape and a dynamic batch axis.
Inside the graph: cast to float, scale to [0, 1], bilinear resize to the model's
`image_size` (when it differs), normalise with `fer.train.transforms` MEAN/STD, run the
network, add the checkpoint's post-hoc offsets (`fer.train.posthoc`). The output `scores`
(batch, K) float32: argmax is the decision, softmax gives probabilities.

Written to --out: model.onnx, parity.json (onnxruntime vs PyTorch on >= 64 real images:
max |score difference| and top-1 agreement), model_card.json (classes, input spec,
metrics, config, sha256, ONNX Runtime CPU latency) and, with --int8, model.int8.onnx
(static QDQ quantization calibrated on real images) with its accuracy and macro-F1
change against fp32. With --tflite (the optional extra `[tflite]`), the same model as
model.tflite for the LiteRT interpreter, and quantized variants: see `fer.export.tflite`.
The card's "artifacts" lists every file written with its sha256, input and measured
parity (PyTorch vs the file; ONNX INT8: its top-1 agreement with fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from fer.export import tflite as litert
from fer.export.deploy import MIN_PARITY_IMAGES, PARITY_TOLERANCE, DeployModel, build_deploy_model
from fer.export.deploy import parity as parity_of  # `parity` names the check's result below
from fer.io import file_digest
from fer.train.infer import bounded_batch

OPSET = 18  # Resize with antialias needs opset >= 18


def export_onnx(module: DeployModel, sample: torch.Tensor, path: str) -> str:
    """Write `module` to ONNX with a dynamic batch axis; returns the exporter used.

    The TorchScript exporter goes first: it takes seconds on these CNNs where the dynamo
    exporter (torch.export + onnxscript) takes most of a minute on two cores. Dynamo is
    used when the TorchScript one cannot express the graph (an antialiased downscale,
    aten::_upsample_bilinear2d_aa) or fails.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    names = {"input_names": ["pixels"], "output_names": ["scores"], "opset_version": OPSET}
    errors = []
    if not module.antialias:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(module, (sample,), path, dynamo=False,
                                  dynamic_axes={"pixels": {0: "batch"}, "scores": {0: "batch"}},
                                  **names)
            return "torchscript"
        except Exception as err:
            errors.append(f"torchscript: {type(err).__name__}: {str(err).splitlines()[0]}")
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(module, (sample,), path, dynamo=True, dynamic_shapes={"pixels": {0: batch}},
                          external_data=False, verbose=False, **names)
        return "dynamo"
    except Exception as err:
        errors.append(f"dynamo: {type(err).__name__}: {str(err).splitlines()[0]}")
    raise RuntimeError(f"ONNX export of {type(module.model).__name__} failed: {'; '.join(errors)}")


def _session(path: str, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(path: str, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores (N, K) from onnxruntime on CPU for uint8 images (N, H, W, C), in batches of at
    most BATCH_BYTES as float32 (`fer.train.infer.bounded_batch`)."""
    session = _session(path)
    name = session.get_inputs()[0].name
    batch_size = bounded_batch(images, batch_size)
    out = [session.run(None, {name: np.ascontiguousarray(images[i:i + batch_size])})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def run_torch(module: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    batch_size = bounded_batch(images, batch_size)
    out = [module(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


def check_parity(module: DeployModel, onnx_path: str, images: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """onnxruntime vs PyTorch on the same raw images (`fer.export.deploy.parity`)."""
    return parity_of(run_onnx(onnx_path, images), run_torch(module, images), tolerance)


def quantize_int8(onnx_path: str, out_path: str, calib_images: np.ndarray) -> str:
    """Static INT8 quantization with onnxruntime.quantization; returns out_path.

    QDQ format, uint8 activations with int8 per-channel weights (onnxruntime's
    recommended U8S8 pairing on x86 CPUs), MinMax ranges calibrated on real images. Only
    Conv/Gemm/MatMul are quantized: on the demo MobileNetV3 also quantizing the
    elementwise ops (hardswish, squeeze-excite products, the in-graph preprocessing) cut
    top-1 agreement with fp32 from 0.86 to 0.77 and was slower.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class ImageReader(CalibrationDataReader):
        """Feeds the calibration images a batch at a time."""

        def __init__(self) -> None:
            self.batches = iter([{"pixels": np.ascontiguousarray(calib_images[i:i + 32])}
                                 for i in range(0, len(calib_images), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    reader = ImageReader()
    prepared = out_path + ".prep.onnx"
    try:  # shape inference + graph optimisation, as onnxruntime recommends before quantizing
        quant_pre_process(onnx_path, prepared, skip_symbolic_shape=True)
        source = prepared
    except Exception as err:
        print(f"int8: quant_pre_process failed ({type(err).__name__}: {err}); quantizing the "
              f"model as exported")
        source = onnx_path
    try:
        quantize_static(source, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        if os.path.exists(prepared):
            os.unlink(prepared)
    return out_path


def measure_latency(onnx_path: str, image: np.ndarray, runs: int = 50, threads: int = 1) -> dict[str, Any]:
    """Median ONNX Runtime CPU latency of one image (batch 1) over `runs` timed runs."""
    session = _session(onnx_path, threads)
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(image[None])}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return {"batch": 1, "median_ms": statistics.median(times), "runs": runs,
            "provider": "CPUExecutionProvider", "intra_op_threads": threads}


def sha256_file(path: str) -> str:
    return file_digest(Path(path)).hex()


def _scores(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, labels=list(range(num_classes)),
                                   average="macro", zero_division=0)),
    }


def _input_spec(images: np.ndarray, image_size: int) -> dict[str, Any]:
    from fer.train.transforms import MEAN, STD

    _, height, width, channels = images.shape
    return {
        "name": "pixels", "dtype": "uint8", "layout": "NHWC",
        "shape": ["batch", int(height), int(width), int(channels)],
        "values": "raw pixels 0..255",
        "preprocessing_in_graph": f"float /255, bilinear resize to {image_size}x{image_size}"
                                  f" when needed, (x - {MEAN}) / {STD}",
    }


def export_checkpoint(ckpt_path_or_dict: str | dict[str, Any], out_dir: str, *, images: np.ndarray,
                      labels: np.ndarray | None = None, int8: bool = False,
                      calib_images: np.ndarray | None = None, latency_runs: int = 50,
                      data_source: str | None = None, provenance: dict[str, Any] | None = None,
                      tflite: litert.TFLiteOptions | None = None) -> dict[str, Any]:
    """Export, check parity, optionally quantize and convert to TFLite, write the model card;
    returns the card.

    `images` (uint8, N >= 64, (N, H, W, C)) are real images for the parity check and, with
    `labels`, the fp32 / INT8 metrics; `calib_images` calibrate INT8 (default: `images`).
    `provenance` (e.g. which search run, and why that one) goes into the card's "source".
    """
    from fer.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path_or_dict) if isinstance(ckpt_path_or_dict, (str, os.PathLike)) \
        else ckpt_path_or_dict
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"export: images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if images.shape[-1] != int(ckpt["in_channels"]):
        raise ValueError(f"export: images have {images.shape[-1]} channels, the checkpoint's model "
                         f"takes {ckpt['in_channels']}")
    classes = list(ckpt["classes"])
    os.makedirs(out_dir, exist_ok=True)
    module = build_deploy_model(ckpt, images.shape[1:3])
    onnx_path = os.path.join(out_dir, "model.onnx")
    exporter = export_onnx(module, torch.from_numpy(images[:2].copy()), onnx_path)
    parity = check_parity(module, onnx_path, images)
    parity.update(exporter=exporter, data=data_source)
    _write_json(os.path.join(out_dir, "parity.json"), parity)
    print(f"parity (onnxruntime vs PyTorch, {parity['images']} images): max |score diff| "
          f"{parity['max_abs_score_diff']:.2e} (tolerance {PARITY_TOLERANCE:g}), {top1_line(parity)} -> "
          f"{'PASSED' if parity['passed'] else 'FAILED'}{parity_shortfall(parity)}")
    fp32_scores = run_onnx(onnx_path, images)
    metrics = _onnx_metrics(ckpt, labels, fp32_scores, module.offsets.numpy())
    card: dict[str, Any] = {
        "file": "model.onnx", "sha256": sha256_file(onnx_path), "format": f"onnx opset {OPSET}",
        "exporter": exporter, "classes": classes, "input": _input_spec(images, module.image_size),
        "output": {"name": "scores", "dtype": "float32", "shape": ["batch", len(classes)],
                   "meaning": "logits + post-hoc offsets; argmax = class, softmax = probabilities"},
        "posthoc": ckpt["config"].get("posthoc"), "posthoc_offsets": ckpt.get("posthoc_offsets"),
        "metrics": metrics, "parity": parity, "latency": measure_latency(onnx_path, images[0], latency_runs),
        "config": ckpt["config"], "source": {"epoch": ckpt.get("epoch"), "stage": ckpt.get("stage"),
                                             "data": data_source, **(provenance or {})},
    }
    calib_images = calib_images if calib_images is not None else images
    if int8:
        card["int8"] = _export_int8(onnx_path, out_dir, images, labels, fp32_scores, calib_images,
                                    len(classes), latency_runs)
    onnx_files = [dict(file=card["file"], sha256=card["sha256"], parity=parity)] + ([card["int8"]] if int8 else [])
    card["artifacts"] = [dict(entry, format=card["format"], input=card["input"]) for entry in onnx_files]
    if tflite is not None:
        card["tflite"] = litert.export_tflite(module, out_dir, images, labels, run_torch(module, images),
                                              calib_images, tflite, latency_runs)
        card["artifacts"] += litert.artifacts(card["tflite"], card["input"])
    _write_json(os.path.join(out_dir, "model_card.json"), card)
    print(f"latency (ORT CPU, batch 1, 1 thread): {card['latency']['median_ms']:.2f} ms/image; "
          f"wrote {onnx_path} and model_card.json")
    return card


def _onnx_metrics(ckpt: dict[str, Any], labels: np.ndarray | None, fp32_scores: np.ndarray,
                  offsets: np.ndarray) -> dict[str, Any]:
    """The checkpoint's own metrics and, with labels, the ONNX model's with and without offsets."""
    metrics: dict[str, Any] = {"checkpoint": ckpt.get("metrics", {})}
    if labels is not None:
        k = len(ckpt["classes"])
        metrics["onnx_fp32"] = _scores(labels, fp32_scores.argmax(1), k)
        metrics["onnx_fp32_without_offsets"] = _scores(labels, (fp32_scores - offsets).argmax(1), k)
        metrics["images"] = int(len(labels))
    return metrics


def _export_int8(onnx_path: str, out_dir: str, images: np.ndarray, labels: np.ndarray | None,
                 fp32_scores: np.ndarray, calib_images: np.ndarray, num_classes: int,
                 latency_runs: int) -> dict[str, Any]:
    int8_path = quantize_int8(onnx_path, os.path.join(out_dir, "model.int8.onnx"), calib_images)
    int8_scores = run_onnx(int8_path, images)
    result: dict[str, Any] = {
        "file": "model.int8.onnx", "sha256": sha256_file(int8_path),
        "quantization": "static QDQ, uint8 activations / int8 per-channel weights, Conv/Gemm/MatMul, "
                        "MinMax calibration",
        "calibration_images": int(len(calib_images)),
        "top1_agreement_with_fp32": float((int8_scores.argmax(1) == fp32_scores.argmax(1)).mean()),
        "latency": measure_latency(int8_path, images[0], latency_runs),
    }
    if labels is not None:
        fp32 = _scores(labels, fp32_scores.argmax(1), num_classes)
        quant = _scores(labels, int8_scores.argmax(1), num_classes)
        result.update(metrics=quant, accuracy_change=quant["accuracy"] - fp32["accuracy"],
                      macro_f1_change=quant["macro_f1"] - fp32["macro_f1"])
    line = f"int8: top-1 agreement with fp32 {result['top1_agreement_with_fp32']:.3f}"
    if labels is not None:
        line += (f", accuracy change {result['accuracy_change']:+.4f}, macro-F1 change "
                 f"{result['macro_f1_change']:+.4f}")
    print(line + f"; {result['latency']['median_ms']:.2f} ms/image; wrote {int8_path}")
    return result


def _write_json(path: str, value: dict[str, Any]) -> None:
    from fer.io import to_plain

    with open(path, "w", encoding="utf-8") as handle:
        json.dump(to_plain(value), handle, indent=2)


def top1_line(parity: dict[str, Any]) -> str:
    if parity["top1_identical"]:
        return "top-1 identical: True"
    differ = round((1 - parity["top1_agreement"]) * parity["images"])
    return f"top-1 identical but for {differ} near tie(s)"


def parity_shortfall(parity: dict[str, Any]) -> str:
    """Why a parity check with scores within tolerance still failed: too few images to tell."""
    if parity["images"] >= MIN_PARITY_IMAGES:
        return ""
    return f" (only {parity['images']} images: the check needs at least {MIN_PARITY_IMAGES}, data set too small)"


def export_images(dataset, minimum: int = MIN_PARITY_IMAGES) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Real images for the checks: the whole test split, topped up from val then train
    when it has fewer than `minimum`."""
    parts = [("test", dataset.splits["test"])] if "test" in dataset.splits else []
    for name in ("val", "train"):
        have = sum(len(part.images) for _, part in parts)
        if have < minimum and name in dataset.splits:
            part = dataset.splits[name]
            keep = slice(0, minimum - have)
            parts.append((name, type(part)(part.images[keep],
                                           None if part.labels is None else part.labels[keep])))
    images = np.concatenate([part.images for _, part in parts])
    known = all(part.labels is not None for _, part in parts)
    labels = np.concatenate([part.labels for _, part in parts]) if known else None
    return images, labels, "+".join(name for name, _ in parts)


def calibration_images(dataset, count: int = 256) -> np.ndarray:
    """`count` training images spread evenly over the train split, for INT8 calibration."""
    train = dataset.splits["train"].images
    return train[np.linspace(0, len(train) - 1, min(count, len(train))).astype(int)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by fer.train")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--int8", action="store_true", help="also write a static INT8 model")
    parser.add_argument("--data", default=None, help="data for the checks (default: the checkpoint config's)")
    parser.add_argument("--latency-runs", type=int, default=50)
    litert.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        tflite = litert.options_from_args(args)  # before any expensive work: is the extra there?
        from fer.data import load_configured
        from fer.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        cfg = ckpt["config"]
        dataset = load_configured(args.data if args.data is not None else cfg.get("data"), cfg, crop_default="squash")
        if list(dataset.classes) != list(ckpt["classes"]):
            raise ValueError(f"{args.checkpoint}: checkpoint classes {ckpt['classes']} differ from "
                             f"the data set's {dataset.classes} ({dataset.source})")
        images, labels, splits = export_images(dataset)
        val = dataset.splits.get("val")
        if tflite is not None and val is not None and val.labels is not None:  # INT8 is kept on val's macro-F1
            tflite = dataclasses.replace(tflite, check_images=val.images, check_labels=val.labels)
        card = export_checkpoint(ckpt, args.out, images=images, labels=labels, int8=args.int8,
                                 calib_images=calibration_images(dataset), latency_runs=args.latency_runs,
                                 data_source=f"{dataset.source} [{splits}]", tflite=tflite)
    except (ValueError, OSError) as err:  # user errors: bad checkpoint or data path, unwritable --out
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if card["parity"]["passed"] and ("tflite" not in card or litert.passed(card["tflite"])) else 1


if __name__ == "__main__":
    sys.exit(main())
