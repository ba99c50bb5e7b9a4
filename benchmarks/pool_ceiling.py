"""How much could the unlabeled pool buy at most? Its true labels against the pipeline's
pseudo-labels and the supervised-only control, from one shared teacher. Val only.

The demo data and the digits set keep the pool's true labels as held-out truth (the
pipeline never trains on them). From one teacher (`fer.train`'s defaults), stage 2's
recipe (student_epochs, student_augment, from the teacher's weights) on:

  control   the labelled split alone (the pipeline's supervised-only control);
  oracle    labelled + the whole pool with its true labels: the ceiling of any pseudo-labels;
  pipeline  labelled + the pseudo-labels the defaults keep (pseudo_debias on, pseudo_graph auto);
  no graph  the same with pseudo_graph none (the debiased teacher alone labels the pool);
  plain     the same with pseudo_debias off too (the teacher's own argmax and confidences);
  aligned 0.5  as many as a 0.5 threshold keeps, shared out by the labelled class prior;
  whole pool   every pool image with the pipeline's label (threshold 0);
  fixmatch, flexmatch, ...  stage 2 online (student_mode): the pool trained every step on the
               student's own weak-view labels (fer.train.consistency), from the labelled split alone, or
               with the pipeline's picks ("+ picks", today's default);

all at the same images per epoch (the largest of the inputs), scored on val raw and
with each model's own post-hoc offsets (fitted on val, as the final model's are), with
each minus the control and its paired bootstrap interval. Test is never read here: this
is where defaults are chosen.

    python benchmarks/pool_ceiling.py                     # demo, demo/8 and digits
    python benchmarks/pool_ceiling.py --sets digits
    python benchmarks/pool_ceiling.py --variants "flexmatch + picks" --student-lr-scales 1 0.3
    python benchmarks/pool_ceiling.py --sets demo --variants oracle "flexmatch + picks" --student-epochs 8 16
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import format_table, save_json  # noqa: E402
from quality import SETS, each_set  # noqa: E402


# the pipeline's pseudo-labels as the defaults make them, and with its two helpers taken away
VARIANTS = {"pipeline": {}, "no graph": {"pseudo_graph": "none"},
            "plain": {"pseudo_graph": "none", "pseudo_debias": False},
            # a teacher too unsure for 0.9 (few labels): more of the pool, at lower precision
            "aligned 0.5": {"pseudo_selection": "aligned", "pseudo_threshold": 0.5},
            "whole pool": {"pseudo_threshold": 0.0}}
# stage 2 online (student_mode fixmatch): the student labels the pool itself, every step
FIXMATCH, FLEXMATCH = {"student_mode": "fixmatch"}, {"student_mode": "flexmatch"}
ONLINE = {"fixmatch": FIXMATCH, "flexmatch": FLEXMATCH,
          "fixmatch 0.95": {**FIXMATCH, "pseudo_threshold": 0.95},  # the paper's threshold
          "flexmatch 0.95": {**FLEXMATCH, "pseudo_threshold": 0.95},
          "flexmatch 0.7": {**FLEXMATCH, "pseudo_threshold": 0.7},
          "flexmatch ratio 2": {**FLEXMATCH, "pool_ratio": 2},
          "flexmatch aligned": {**FLEXMATCH, "pool_align": True},
          "flexmatch + picks": FLEXMATCH, "fixmatch + picks": FIXMATCH,
          "fixmatch 0.95 + picks": {**FIXMATCH, "pseudo_threshold": 0.95}}


def stage_two_inputs(cfg: Any, data: Any, teacher: Any, wanted: list[str]) -> dict[str, tuple[Any, ...]]:
    """{variant: (images, labels, weights, counts, label precision on the pool)} of the
    offline inputs in `wanted` (the control always)."""
    from fer.ssl.labelling import pseudo_label
    from fer.ssl.pipeline import student_inputs

    train, pool = data.splits["train"], data.splits["unlabeled"]
    inputs = {"control": (train.images, train.labels.astype(np.int64), None, data.class_counts("train"), None)}
    if "oracle" in wanted:
        inputs["oracle"] = (*student_inputs(cfg, data, np.arange(len(pool.labels)), pool.labels), 1.0)
    picks = any(variant.endswith("+ picks") for variant in wanted)  # online on top of the pipeline's picks
    for name, changes in VARIANTS.items():
        if name in wanted or (name == "pipeline" and picks):
            indices, labels, summary, *_ = pseudo_label(replace(cfg, **changes), teacher.model, data)
            inputs[name] = (*student_inputs(cfg, data, indices, labels), summary.get("precision"))
    return inputs


def stage_two(cfg: Any, data: Any, teacher: Any, wanted: list[str], lr_scales: tuple[float, ...] = (1.0,),
              student_epochs: tuple[int, ...] = ()) -> Iterator[tuple[str, str, Any, Any, Any]]:
    """(variant, its control's name, its stage-2 Stage, the config to fit it with, label
    precision) of every wanted variant and the control at each of `student_epochs` (" N
    epochs" appended to the names; empty: cfg's own, no suffix) and each of `lr_scales`
    (student_lr_scale; " lr xS" appended where S is not 1): offline ones at the same images
    per epoch (the largest of their inputs), then the online ones. The inputs (pseudo-labels)
    are made once: they depend on neither the budget nor the learning rate."""
    from fer.train.fitting import Stage

    inputs = stage_two_inputs(cfg, data, teacher, wanted)
    per_epoch = max(cfg.epoch_images, *(len(images) for images, *_ in inputs.values()))
    budgets = [(epochs, f" {epochs} epochs") for epochs in student_epochs] or [(cfg.student_epochs, "")]
    for (epochs, budget_tag), scale in itertools.product(budgets, lr_scales):
        tag = budget_tag + ("" if scale == 1.0 else f" lr x{scale:g}")
        stage_cfg = replace(cfg, epoch_images=per_epoch, student_lr_scale=scale, student_epochs=epochs)
        for variant, (images, labels, weights, counts, precision) in inputs.items():
            if variant != "control" and variant not in wanted:
                continue
            yield variant + tag, f"control{tag}", \
                Stage.student(stage_cfg, images, labels, weights, counts, teacher.model.state_dict()), \
                stage_cfg, precision
        for variant, changes in ONLINE.items():
            if variant in wanted:  # "+ picks": on top of the teacher's offline picks (the pipeline's input)
                online_cfg = replace(stage_cfg, **changes)
                base = inputs["pipeline"] if variant.endswith("+ picks") else inputs["control"]
                stage = Stage.student(online_cfg, *base[:4], teacher.model.state_dict())
                yield variant + tag, f"control{tag}", stage.online(online_cfg, data.splits["unlabeled"]), \
                    online_cfg, None


def scored(cfg: Any, fitted: Any, val: Any) -> tuple[float, float, np.ndarray]:
    """(val macro-F1 raw, with the model's own post-hoc offsets, val predictions with them)."""
    from fer.train.infer import predict_logits
    from fer.train.posthoc import fit_offsets, macro_f1

    logits = predict_logits(fitted.model, val.images, image_size=cfg.image_size).numpy()
    offsets = fit_offsets(logits, val.labels, np.asarray(fitted.checkpoint["class_counts"]), cfg.posthoc)
    return macro_f1(val.labels, logits), macro_f1(val.labels, logits, offsets), (logits + offsets).argmax(axis=1)


def measure(name: str, data_path: str | None, wanted: list[str], lr_scales: tuple[float, ...] = (1.0,),
            student_epochs: tuple[int, ...] = ()) -> dict[str, Any]:
    """Teacher once, then every stage-2 variant at each of `lr_scales` (student_lr_scale)
    and each of `student_epochs` (" N epochs" appended to the names; empty: the default
    only); their val scores against the control at the same scale and epochs."""
    from fer.data import load_dataset
    from fer.evaluate.evaluate import paired_bootstrap_macro_f1
    from fer.train.config import TrialConfig
    from fer.train.fitting import Stage, fit

    data = load_dataset(data_path)
    cfg, val = TrialConfig(data=data_path), data.splits["val"]
    start = time.time()
    teacher = fit(cfg, Stage.teacher(cfg, data), val, data.classes, progress=False)
    result: dict[str, Any] = {"teacher_val": teacher.best_metrics["val_macro_f1"], "teacher_s": time.time() - start,
                              "variants": {}}
    predictions = {}
    for variant, control, stage, stage_cfg, precision in stage_two(cfg, data, teacher, wanted, lr_scales,
                                                                   student_epochs):
        start = time.time()
        fitted = fit(stage_cfg, stage, val, data.classes, progress=False)
        raw, posthoc, predictions[variant] = scored(cfg, fitted, val)
        last = fitted.history[-1]
        if stage.consistency is not None:  # what the online student trained on in its last epoch
            precision = last.get("pool_kept_precision")
        images = len(stage.labels) + (len(stage.consistency.images) if stage.consistency is not None else 0)
        result["variants"][variant] = {"images": images, "precision": precision, "val_raw": raw,
                                       "val_posthoc": posthoc, "seconds": time.time() - start, "control": control,
                                       **{k: v for k, v in last.items() if k.startswith("pool_")}}
        print(f"{name} {variant}: {result['variants'][variant]}", flush=True)
    result["images_per_epoch"] = stage_cfg.epoch_images
    for variant, entry in result["variants"].items():
        control = entry["control"]
        if variant != control:
            _, low, high = paired_bootstrap_macro_f1(val.labels, predictions[variant], predictions[control],
                                                     len(data.classes))
            entry.update(minus_control=entry["val_posthoc"] - result["variants"][control]["val_posthoc"],
                         ci95=[low, high])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--variants", nargs="+", choices=["oracle", *VARIANTS, *ONLINE],
                        default=["oracle", *VARIANTS, *ONLINE], help="stage-2 inputs besides the control")
    parser.add_argument("--student-lr-scales", nargs="+", type=float, default=[1.0], metavar="S",
                        help="run every variant and the control at each student_lr_scale (default: 1)")
    parser.add_argument("--student-epochs", nargs="+", type=int, default=[], metavar="N",
                        help="run every variant and the control with each number of stage-2 epochs "
                             "(default: fer.train's)")
    parser.add_argument("--json", default=None, help="where the raw results go")
    args = parser.parse_args(argv)
    if any(epochs < 1 for epochs in args.student_epochs):
        parser.error(f"--student-epochs must each be at least 1, got {args.student_epochs}")
    rows, results = [], {}
    for name, _, data_path in each_set(args.sets, "fer-ceiling-"):
        results[name] = measure(name, data_path, args.variants, tuple(args.student_lr_scales),
                                tuple(args.student_epochs))
        for variant, entry in results[name]["variants"].items():
            gain = "-" if variant == entry["control"] else \
                f"{entry['minus_control']:+.3f} ({entry['ci95'][0]:+.3f} to {entry['ci95'][1]:+.3f})"
            rows.append([name, variant, entry["images"], entry["precision"], entry["val_raw"],
                         entry["val_posthoc"], gain, round(entry["seconds"])])
    print("\n=== val macro-F1 of stage 2 from one teacher: the pool's true labels, the pipeline's pseudo-labels, none ===")
    print(format_table(["set", "stage 2 on", "images", "label precision", "val raw", "val post-hoc",
                        "- control, post-hoc (95% CI)", "s"], rows))
    for name, result in results.items():
        if not {"oracle", "pipeline"} <= set(result["variants"]):
            continue
        oracle = result["variants"]["oracle"]["minus_control"]
        pipeline = result["variants"]["pipeline"]["minus_control"]
        share = "-" if oracle <= 0 else f"{pipeline / oracle:.2f}"
        print(f"{name}: teacher val {result['teacher_val']:.4f}; the pool's true labels would buy {oracle:+.3f} "
              f"over the control, the pipeline's pseudo-labels buy {pipeline:+.3f} (share of the ceiling {share})")
    path = save_json("pool_ceiling", "default", {"results": results}, args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
