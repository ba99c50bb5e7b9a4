"""TFLite (LiteRT) export of the deploy model, checked in the LiteRT interpreter.

    python -m fer.export --checkpoint best.pt --out deploy/ --tflite --tflite-quant fp16 dynamic-int8 int8

The same `fer.export.deploy.DeployModel` the ONNX file holds (uint8 NHWC pixels in, calibrated
scores out, preprocessing inside) is converted straight from PyTorch by litert-torch
(Google's PyTorch -> LiteRT converter; no TensorFlow), quantized by ai-edge-quantizer and
run by ai-edge-litert's Interpreter. All three come with the optional extra `[tflite]`
(0.9 GB installed, JAX included), so every import of them here is lazy.

Written: model.tflite (fp32; parity with PyTorch on the export's real images: max |score
difference| and top-1 agreement) and, per `--tflite-quant`, model.fp16.tflite (fp16
weights), model.dynamic-int8.tflite (int8 weights, activations quantized on the fly),
model.int8.tflite (int8 weights and activations, calibrated on real training images). Each
quantized file gets its size, its agreement with PyTorch and its macro-F1 against the fp32
TFLite model on labelled images. Full INT8 is not written when it costs more validation
macro-F1 than `--tflite-max-f1-drop` (default 0.02): a full-integer model calibrated on
random inputs agreed with fp32 on only 85% of images, so it is checked, never trusted.

Batch: litert-torch 0.10 cannot export the deploy model with a dynamic batch axis (an
AssertionError on the symbolic dimension at the uint8 -> float cast), so the models take
batch 1: (1, H, W, C).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

INSTALL = "pip install -e '.[tflite]'"
EXTRA_MODULES = ("litert_torch", "ai_edge_quantizer", "ai_edge_litert")
QUANT_MODES = ("fp16", "dynamic-int8", "int8")
INT8_MAX_F1_DROP = 0.02  # validation macro-F1 full INT8 may lose against fp32 (the bound)
CALIBRATION_THREADS = 2


class ExtraMissing(ValueError):
    """The [tflite] extra is not installed; the message says how to install it."""


class ConversionError(ValueError):
    """litert-torch cannot convert this model; one line names the model and the reason
    (a ValueError, so the CLIs print it as `error: ...`)."""


@dataclass(frozen=True)
class TFLiteOptions:
    """What `--tflite` asks for; `check_*` are the labelled images full INT8 must keep its
    macro-F1 on (default: the export's labelled images)."""

    quant: tuple[str, ...] = ()  # any of QUANT_MODES, each written once, in QUANT_MODES order
    max_f1_drop: float = INT8_MAX_F1_DROP
    check_images: np.ndarray | None = None
    check_labels: np.ndarray | None = None


def require_extra() -> None:
    """Import the three packages of `[tflite]`, or raise one line naming the install command."""
    for name in EXTRA_MODULES:
        try:
            __import__(name)
        except ImportError:
            raise ExtraMissing(f"--tflite needs the optional extra [tflite] ({name} is not installed); "
                               f"install it with: {INSTALL}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The TFLite flags, shared by `python -m fer.export` and `python -m search.export`."""
    parser.add_argument("--tflite", action="store_true",
                        help=f"also write model.tflite (LiteRT, needs {INSTALL})")
    parser.add_argument("--tflite-quant", nargs="+", action="extend", default=[], metavar="MODE",
                        choices=QUANT_MODES, help=f"quantized TFLite variants to add, any of "
                        f"{', '.join(QUANT_MODES)} (several compare side by side; implies --tflite)")
    parser.add_argument("--tflite-max-f1-drop", type=float, default=INT8_MAX_F1_DROP, metavar="D",
                        help="refuse full INT8 when validation macro-F1 falls by more than D "
                             f"against fp32 (default {INT8_MAX_F1_DROP})")


def options_from_args(args: argparse.Namespace) -> TFLiteOptions | None:
    """TFLiteOptions for the parsed flags (None without them); checks the extra is installed
    before any data is loaded or model exported."""
    if not (args.tflite or args.tflite_quant):
        return None
    if not math.isfinite(args.tflite_max_f1_drop):
        raise ValueError(f"--tflite-max-f1-drop must be a number, got {args.tflite_max_f1_drop}")
    require_extra()
    return TFLiteOptions(quant=tuple(m for m in QUANT_MODES if m in args.tflite_quant),
                         max_f1_drop=args.tflite_max_f1_drop)


def convert(module: torch.nn.Module, sample: torch.Tensor, path: str) -> str:
    """Write `module` as a fp32 .tflite for batch-1 input like `sample[:1]`; returns path."""
    if getattr(module, "antialias", False):  # a DeployModel that downscales in the graph
        raise ConversionError(f"TFLite: the model takes {module.image_size}x{module.image_size} images, smaller than "
                              f"the data's {tuple(sample.shape[1:3])}, and litert-torch has no lowering for the "
                              f"antialiased downscale (aten._upsample_bilinear2d_aa); use the ONNX model, or train "
                              f"at the data's image size")
    import litert_torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        edge_model = litert_torch.convert(module.eval(), (sample[:1].contiguous(),))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConversionError(f"TFLite conversion of {type(getattr(module, 'model', module)).__name__} "
                              f"failed: {type(err).__name__}: {first}") from err
    edge_model.export(path)
    return path


def _recipe(mode: str):
    from ai_edge_quantizer import qtyping, recipe, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    if mode == "fp16":  # weight-only float casting: ai-edge-quantizer's fp16 recipe
        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                       num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        return manager.get_quantization_recipe()
    return {"dynamic-int8": recipe.dynamic_wi8_afp32, "int8": recipe.static_wi8_ai8}[mode]()


def quantize(fp32_path: str, out_path: str, mode: str, calib_images: np.ndarray | None = None) -> str:
    """Quantize a fp32 .tflite with ai-edge-quantizer (`mode` one of QUANT_MODES); full INT8
    is calibrated on `calib_images` (uint8, (N, H, W, C)) fed one at a time."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown TFLite quantization {mode!r}; valid: {', '.join(QUANT_MODES)}")
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(fp32_path)
    qt.load_quantization_recipe(_recipe(mode))
    calibration, feeds = None, None
    if qt.need_calibration:
        if calib_images is None or not len(calib_images):
            raise ValueError(f"TFLite {mode} needs calibration images")
        signature, input_name = _signature(fp32_path)
        feeds = {signature: [{input_name: np.ascontiguousarray(image[None])} for image in calib_images]}
    with warnings.catch_warnings():  # its calibration interpreters keep every tensor on purpose
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        if feeds is not None:
            calibration = qt.calibrate(feeds, num_threads=CALIBRATION_THREADS)
        result = qt.quantize(calibration, enable_progress_bar=False, enable_progress_report=False)
    result.export_model(out_path, overwrite=True)
    return out_path


def _interpreter(path: str, threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def _signature(path: str) -> tuple[str, str]:
    """(signature key, input name) of a one-input model, as the quantizer's calibration wants them."""
    signatures = _interpreter(path).get_signature_list()
    key = next(iter(signatures))
    return key, signatures[key]["inputs"][0]


def run_tflite(path: str, images: np.ndarray, threads: int = 1) -> np.ndarray:
    """Scores (N, K) float32 from the LiteRT interpreter, one image at a time (batch-1 models);
    an integer output (full INT8) is dequantized with its scale and zero point."""
    interpreter = _interpreter(path, threads)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    out = []
    for image in images:
        interpreter.set_tensor(source["index"], np.ascontiguousarray(image[None]))
        interpreter.invoke()
        out.append(interpreter.get_tensor(target["index"])[0].copy())
    scores = np.stack(out) if out else np.zeros((0, int(target["shape"][-1])))
    if np.issubdtype(scores.dtype, np.integer):
        scale, zero_point = target["quantization"]
        scores = (scores.astype(np.float32) - zero_point) * scale
    return scores.astype(np.float32)


def measure_latency(path: str, image: np.ndarray, runs: int = 50) -> dict[str, Any]:
    """Median LiteRT interpreter latency of one image (batch 1, 1 thread) over `runs` runs."""
    interpreter = _interpreter(path, threads=1)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.set_tensor(index, np.ascontiguousarray(image[None]))
    for _ in range(5):
        interpreter.invoke()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"batch": 1, "median_ms": statistics.median(times), "runs": max(1, runs),
            "runtime": "ai-edge-litert Interpreter", "threads": 1}


def macro_f1(labels: np.ndarray, scores: np.ndarray, num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, scores.argmax(1), labels=list(range(num_classes)),
                          average="macro", zero_division=0))


def describe(path: str, **measured: Any) -> dict[str, Any]:
    """An artifact's entry in the model card: file name, sha256, size, and what was measured."""
    from fer.io import file_digest

    return {"file": os.path.basename(path), "sha256": file_digest(Path(path)).hex(),
            "bytes": os.path.getsize(path), **measured}


def export_tflite(module: torch.nn.Module, out_dir: str, images: np.ndarray, labels: np.ndarray | None,
                  reference: np.ndarray, calib_images: np.ndarray, options: TFLiteOptions,
                  latency_runs: int = 50) -> dict[str, Any]:
    """Convert, check parity, quantize as `options` ask; returns the card's "tflite" section.

    `reference` are PyTorch's scores for `images`, `calib_images` real training images for
    full INT8. Every quantized file is measured against fp32 on the same images.
    """
    import torch

    from fer.export.deploy import PARITY_TOLERANCE, parity as parity_of  # the ONNX export's rule too

    require_extra()
    fp32_path = convert(module, torch.from_numpy(images[:1].copy()), os.path.join(out_dir, "model.tflite"))
    fp32_scores = run_tflite(fp32_path, images)
    parity = parity_of(fp32_scores, reference)
    fp32 = describe(fp32_path, quantization="none (fp32)", parity=parity,
                    latency=measure_latency(fp32_path, images[0], latency_runs))
    num_classes = reference.shape[1]
    if labels is not None:
        fp32["macro_f1"] = macro_f1(labels, fp32_scores, num_classes)
    print(f"tflite fp32 (LiteRT vs PyTorch, {parity['images']} images): max |score diff| "
          f"{parity['max_abs_score_diff']:.2e} (tolerance {PARITY_TOLERANCE:g}), top-1 agreement "
          f"{parity['top1_agreement']:.3f} -> {'PASSED' if parity['passed'] else 'FAILED'}; wrote {fp32_path}")
    section: dict[str, Any] = {"converter": _versions(), "batch": 1, "models": {"fp32": fp32},
                               "batch_note": "fixed batch 1: litert-torch cannot export this graph with a "
                                             "dynamic batch axis; feed one image per invoke"}
    measure = _Measure(images, labels, reference, fp32_scores, num_classes, latency_runs, fp32.get("macro_f1"))
    for mode in options.quant:
        path = os.path.join(out_dir, f"model.{mode}.tflite")
        quantize(fp32_path, path, mode, calib_images)
        entry, line = measure(path, mode)
        if mode == "int8":
            entry = _gate_int8(path, fp32_path, entry, options, num_classes)
        if not entry.get("refused"):
            print(f"{line}; wrote {path}")
        section["models"][mode] = entry
    return section


@dataclass
class _Measure:
    """Size, parity with PyTorch, agreement and macro-F1 against fp32 of a quantized file."""

    images: np.ndarray
    labels: np.ndarray | None
    reference: np.ndarray
    fp32_scores: np.ndarray
    num_classes: int
    latency_runs: int
    fp32_macro_f1: float | None  # the fp32 file's, on `labels` (None without them)

    def __call__(self, path: str, mode: str) -> tuple[dict[str, Any], str]:
        from fer.export.deploy import compare

        scores = run_tflite(path, self.images)
        fp32 = compare(scores, self.fp32_scores)
        entry = describe(path, quantization=QUANT_NOTES[mode], parity=compare(scores, self.reference),
                         top1_agreement_with_fp32=fp32["top1_agreement"],
                         latency=measure_latency(path, self.images[0], self.latency_runs))
        line = f"tflite {mode}: {entry['bytes'] / 2**20:.2f} MB, top-1 agreement with fp32 {fp32['top1_agreement']:.3f}"
        if self.labels is not None:
            entry["macro_f1"] = macro_f1(self.labels, scores, self.num_classes)
            entry["macro_f1_change"] = entry["macro_f1"] - self.fp32_macro_f1
            line += f", macro-F1 change {entry['macro_f1_change']:+.4f}"
        return entry, line


QUANT_NOTES: dict[str, str] = {
    "fp16": "fp16 weights (weight-only float casting), fp32 compute",
    "dynamic-int8": "int8 per-channel weights, activations quantized on the fly (dynamic range)",
    "int8": "int8 weights and activations (static, MinMax calibration on real training images), "
            "uint8 input, int8 output dequantized with its scale and zero point",
}
assert set(QUANT_NOTES) == set(QUANT_MODES)


def _gate_int8(path: str, fp32_path: str, entry: dict[str, Any], options: TFLiteOptions,
               num_classes: int) -> dict[str, Any]:
    """Keep full INT8 only when validation macro-F1 falls by at most options.max_f1_drop;
    otherwise delete the file and record why, with the measured drop."""
    images, labels = options.check_images, options.check_labels
    if images is None:  # the export's own labelled images were measured already
        drop = -entry["macro_f1_change"] if "macro_f1_change" in entry else None
    elif labels is not None:
        drop = macro_f1(labels, run_tflite(fp32_path, images), num_classes) - \
            macro_f1(labels, run_tflite(path, images), num_classes)
    else:
        drop = None
    entry.update(validation_macro_f1_drop=drop, max_f1_drop=options.max_f1_drop)
    if drop is not None and drop <= options.max_f1_drop:
        return entry
    reason = ("no labelled images to check its macro-F1" if drop is None else
              f"validation macro-F1 falls by {drop:.4f} against fp32, more than the {options.max_f1_drop:g} "
              f"allowed (--tflite-max-f1-drop)")
    os.unlink(path)
    print(f"tflite int8: REFUSED, {reason}; {os.path.basename(path)} not written")
    return {"refused": True, "reason": reason, "validation_macro_f1_drop": drop,
            "max_f1_drop": options.max_f1_drop, "quantization": entry["quantization"]}


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert"))


def passed(section: dict[str, Any]) -> bool:
    """fp32 parity held and no requested variant was refused."""
    models = section["models"]
    return models["fp32"]["parity"]["passed"] and not any(m.get("refused") for m in models.values())


def artifacts(section: dict[str, Any], input_spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The section's written files for the card's artifact list, with their input contract."""
    shape = [1, *input_spec["shape"][1:]]
    return [dict(entry, format="tflite", input=dict(input_spec, shape=shape))
            for entry in section["models"].values() if not entry.get("refused")]
