"""Semi-supervised stage 2 and the pipeline that chains the stages of one trial.

The teacher (a `fer.train.fit` stage) labels the unlabeled pool; a selection rule keeps
some labels; the student trains on them (or online, `fer.train.consistency`) beside a
supervised-only control; the final model is the better stage on val, with its post-hoc
offsets. Names are re-exported lazily (`fer.lazy`).

    pseudo.py     pool predictions, temperature, the selection rules (threshold, CReST, ...)
    propagate.py  label propagation on a pixel or feature graph (pseudo_graph)
    labelling.py  a labeller (the teacher, or a round's student) -> calibrated, selected labels
    teachers.py   finished teachers shared between runs with the same stage-1 knobs
    pipeline.py   run_pipeline(): teacher -> pseudo-labels -> student, control -> final model
"""

from __future__ import annotations

from fer.lazy import lazy_exports

# public name -> the module that owns it
_EXPORTS: dict[str, str] = {
    "SELECTIONS": "fer.ssl.pseudo",
    "select_pseudo_labels": "fer.ssl.pseudo",
    "predict_pool": "fer.ssl.pseudo",
    "fit_temperature": "fer.ssl.pseudo",
    "summarize_selection": "fer.ssl.pseudo",
    "graph_pseudo_probs": "fer.ssl.propagate",
    "pseudo_label": "fer.ssl.labelling",
    "TeacherStore": "fer.ssl.teachers",
    "teacher_key": "fer.ssl.teachers",
    "teacher_finished": "fer.ssl.teachers",
    "run_pipeline": "fer.ssl.pipeline",
    "PipelineResult": "fer.ssl.pipeline",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
