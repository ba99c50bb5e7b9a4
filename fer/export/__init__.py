"""Deployment: a checkpoint becomes an ONNX file (and optionally TFLite) that takes raw
uint8 images, with parity checks against PyTorch and a model card.

    deploy.py   DeployModel: resize, normalise, the network and its post-hoc offsets in one graph
    export.py   ONNX export, parity, int8 quantization, latency, `export_checkpoint`, and `main`:
                python -m fer.export --checkpoint best.pt [--int8] [--tflite]
    tflite.py   the optional LiteRT conversion and its own parity gates (`.[tflite]` extra)

Names are re-exported lazily (`fer.lazy`).
"""

from __future__ import annotations

from fer.lazy import lazy_exports

# public name -> the module that owns it
_EXPORTS: dict[str, str] = {
    "DeployModel": "fer.export.deploy",
    "build_deploy_model": "fer.export.deploy",
    "export_onnx": "fer.export.export",
    "export_checkpoint": "fer.export.export",
    "export_tflite": "fer.export.tflite",
    "main": "fer.export.export",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
