"""Evaluation of a trained model: metrics on a split, bootstrap intervals, the report files.

    evaluate.py   evaluate_model, predict_checkpoint, (paired) bootstrap macro-F1 intervals,
                  the metrics JSON / confusion PNG / CSV row, and `main`:
                  python -m fer.evaluate --checkpoint best.pt [--split val|test] [--tta]

The metrics themselves (`fer.train.metrics`) and the post-hoc decision rule
(`fer.train.posthoc`) live in `fer.train`, because the training loop scores every epoch
with them. Names are re-exported lazily (`fer.lazy`).
"""

from __future__ import annotations

from fer.lazy import lazy_exports

# public name -> the module that owns it
_EXPORTS: dict[str, str] = {
    "evaluate_model": "fer.evaluate.evaluate",
    "metrics_from_logits": "fer.evaluate.evaluate",
    "bootstrap_macro_f1": "fer.evaluate.evaluate",
    "paired_bootstrap_macro_f1": "fer.evaluate.evaluate",
    "write_report": "fer.evaluate.evaluate",
    "predict_checkpoint": "fer.evaluate.evaluate",
    "evaluate_checkpoint": "fer.evaluate.evaluate",
    "main": "fer.evaluate.evaluate",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
