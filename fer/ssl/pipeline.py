"""The two-stage pipeline of one trial: teacher -> pseudo-labels -> student -> post-hoc rule.

    stage 1  fit on the labelled train split (stage="teacher", epochs 1..cfg.epochs)
    pseudo   the teacher labels the unlabeled pool (its post-hoc offsets and a temperature
             fitted on val, optional TTA), a selection rule keeps some (fer.ssl.pseudo),
             pseudo_labeled.csv written
    stage 2  fit on train + kept pool images (stage="student", global epochs continue at
             cfg.epochs + 1), pseudo-labelled samples weighted by cfg.pseudo_weight,
             initialised from the teacher or from scratch; online (cfg.student_mode) also
             on the whole pool every step; in cfg.student_rounds rounds sharing its epochs,
             each later round labelled by the previous round's student
    post-hoc per-class logit offsets fitted on val macro-F1 (fer.train.posthoc), stored in the
             final checkpoint

This is self-training in the style of Noisy Student (Xie et al. 2020): the student sees
stronger augmentation (cfg.student_augment) than the teacher did. The final model is the
stage whose best epoch has the highest validation macro-F1 with its post-hoc offsets, of the
teacher, the student and the supervised-only control (`final_stage`; the student on ties), so
a pool that hurts is never handed out over its own control. Under torch.distributed every rank calls
`run_pipeline`; pool and validation predictions are sharded and gathered, so all ranks
take the same decisions.

Resuming: `report(metrics, checkpoint, state)` gets, every epoch, the `fer.train.state.PipelineState`
that `run_pipeline(..., resume=state)` continues from after that epoch: the stage, fit's own
`FitState` (`fer.train.fitting.fit`), and in stage 2 the teacher's result and the pseudo-label
selection, so a resumed trial neither retrains the teacher nor re-selects. A run resumed
from any epoch ends with the same model as the uninterrupted run (CPU; on GPU up to
non-deterministic kernels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from torch import nn

from fer.evaluate.evaluate import paired_bootstrap_macro_f1
from fer.io import to_plain
from fer.names import ONLINE_MODES
from fer.ssl.labelling import predict, pseudo_label, say, write_pseudo
from fer.train.checkpoint import model_from_checkpoint, save_checkpoint
from fer.train.config import TrialConfig
from fer.train.fitting import FitResult, Report, Stage, fit
from fer.train.infer import is_main, resolve_device
from fer.train.posthoc import fit_offsets, macro_f1
from fer.train.state import FitState, PipelineState

# report(metrics, checkpoint, state): fit's report, with the pipeline's state to resume from
PipelineReport = Callable[[dict[str, Any], "dict[str, Any] | None", PipelineState], None]


@dataclass
class PipelineResult:
    model: nn.Module  # the final model (best epoch of the final stage), eval mode
    checkpoint: dict[str, Any]  # its checkpoint dict, with "posthoc_offsets" filled in
    metrics: dict[str, Any]  # summary: per-stage best val macro-F1, post-hoc, pseudo-labels
    teacher: FitResult  # stage 1
    student: FitResult | None = None  # stage 2, None when it was skipped
    pseudo: dict[str, Any] | None = None  # selection summary (kept per class, precision)
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch, both stages
    checkpoint_path: str | None = None  # out_dir/best.pt when out_dir was given (rank 0)
    control: FitResult | None = None  # the student's recipe without the pool (cfg.pool_control)


def student_inputs(cfg: TrialConfig, data: Any, indices: np.ndarray,
                    labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train + kept pool images, their labels, per-sample loss weights and class counts."""
    train, pool = data.splits["train"], data.splits["unlabeled"]
    images = np.concatenate([train.images, pool.images[indices]])
    all_labels = np.concatenate([train.labels, labels]).astype(np.int64)
    weights = np.concatenate([np.ones(len(train.labels), dtype=np.float32),
                              np.full(len(labels), cfg.pseudo_weight, dtype=np.float32)])
    counts = np.bincount(all_labels, minlength=len(data.classes)).astype(np.int64)
    return images, all_labels, weights, counts


def run_pipeline(cfg: TrialConfig, data: Any, *, device: Any = None, report: PipelineReport | None = None,
                 out_dir: str | None = None, writer: Any = None, progress: bool = True,
                 resume: PipelineState | None = None, teacher: FitResult | None = None) -> PipelineResult:
    """Run stage 1, pseudo-labelling, stage 2 and the post-hoc rule; see the module docstring.

    `report(metrics, checkpoint, state)` goes to both fits, so its "epoch" runs 1..epochs
    and then epochs+1..epochs+student_epochs; `state` is the `PipelineState` that `resume`
    takes to continue after that epoch. With out_dir, rank 0 writes pseudo_labeled.csv,
    pseudo_summary.json and best.pt (the final checkpoint, offsets included). `teacher`: a
    stage 1 already trained with cfg's teacher knobs (benchmarks compare stage-2 recipes from
    one teacher, as fer.ssl.teachers shares one between trials); stage 1 is then not trained.
    """
    if resume is not None and resume.stage == "student" and cfg.student_epochs == 0:
        raise ValueError("resume state is in stage 2 but student_epochs is 0")
    if resume is not None and resume.round > cfg.student_rounds:
        raise ValueError(f"resume state is in stage 2's round {resume.round} but student_rounds is "
                         f"{cfg.student_rounds}")
    common = dict(device=device, writer=writer, progress=progress)
    if resume is not None and resume.stage == "student":
        teacher = _teacher_from_state(resume.teacher, device)
    elif teacher is None:
        teacher = fit(cfg, Stage.teacher(cfg, data), data.splits["val"], data.classes,
                      report=_stage_report(report, "teacher"), resume=_fit_state(resume, "teacher"), **common)
    metrics: dict[str, Any] = {"teacher_val_macro_f1": teacher.best_metrics["val_macro_f1"],
                               "teacher_best_epoch": teacher.best_epoch}
    student, summary = _run_student(cfg, data, teacher, metrics, report, resume, out_dir, common)
    control = _run_control(cfg, data, teacher, student, metrics, common) \
        if student is not None and cfg.pool_control else None
    result = _finish(cfg, data, teacher, student, control, summary, metrics, device, out_dir)
    result.control = control
    return result


def _run_student(cfg: TrialConfig, data: Any, teacher: FitResult, metrics: dict[str, Any],
                 report: PipelineReport | None, resume: PipelineState | None, out_dir: str | None,
                 common: dict[str, Any]) -> tuple[FitResult | None, dict[str, Any] | None]:
    """Stage 2's cfg.student_rounds rounds (`_run_round`), from the resumed round on; None when
    stage 2 is skipped. Round 1's labeller is the teacher, each later round's the previous
    round's student. The result is the round whose best epoch has the best val macro-F1 (the
    later on ties), with every round's epochs as its history. Adds the teacher's selection's and
    the student's numbers to `metrics`, and with several rounds each round's."""
    skip = _stage2_skip_reason(cfg, data)
    if skip is not None:
        say(f"{skip}: stage 2 skipped")
        return None, None
    resumed = resume if resume is not None and resume.stage == "student" else None
    finished = list(resumed.rounds or []) if resumed is not None else []  # plain, as the resume state keeps them
    students = [_teacher_from_state(done, common["device"]) for done in finished]
    summaries = [done["pseudo_summary"] for done in finished]
    for round in range(len(finished) + 1, cfg.student_rounds + 1):
        labeller = students[-1] if students else teacher
        student, summary = _run_round(cfg, data, teacher, labeller, round, list(finished), report, resumed,
                                      out_dir, common)
        resumed = None  # only the first round run here continues a saved one
        summaries.append(summary)
        if student is None:
            break
        students.append(student)
        finished.append({**_teacher_state(student), "pseudo_summary": to_plain(summary)})
    first = summaries[0]
    metrics.update(pseudo_kept=first["kept"], pseudo_precision=first.get("precision"), pseudo_graph=first.get("graph"),
                   pseudo_label_accuracy=first.get("pool_label_accuracy"))
    if not students:
        return None, first
    best = max(range(len(students)), key=lambda i: (students[i].best_metrics["val_macro_f1"], i))
    student = replace(students[best], history=[m for fitted in students for m in fitted.history])
    metrics.update(student_val_macro_f1=student.best_metrics["val_macro_f1"], student_best_epoch=student.best_epoch,
                   student_mode=cfg.student_mode)
    if cfg.student_mode in ONLINE_MODES:  # what the best student epoch trained on, of the pool's views
        metrics.update({k: student.best_metrics.get(k) for k in ("pool_kept_share", "pool_kept_precision")})
    if cfg.student_rounds > 1:
        metrics.update(student_round=best + 1, rounds=[
            {"round": i + 1, "labeller": "teacher" if i == 0 else f"round {i} student", "pseudo_kept": done["kept"],
             "pseudo_precision": done.get("precision"), "pseudo_label_accuracy": done.get("pool_label_accuracy"),
             "student_val_macro_f1": fitted.best_metrics["val_macro_f1"], "student_best_epoch": fitted.best_epoch}
            for i, (done, fitted) in enumerate(zip(summaries, students))])
    return student, summaries[best]


def _run_round(cfg: TrialConfig, data: Any, teacher: FitResult, labeller: FitResult, round: int,
               finished: list[dict[str, Any]], report: PipelineReport | None, resume: PipelineState | None,
               out_dir: str | None, common: dict[str, Any]) -> tuple[FitResult | None, dict[str, Any]]:
    """One round of stage 2: `labeller` pseudo-labels the pool (or the resumed round's selection
    is taken), and a student from cfg.student_init's weights (the teacher's) trains on train +
    the kept images for cfg.round_epochs; online (cfg.student_mode fixmatch, flexmatch) also on
    the whole pool every step (fer.train.consistency). (None, selection) when offline and nothing was
    kept."""
    online = cfg.student_mode in ONLINE_MODES
    who = "teacher" if round == 1 else f"round {round - 1} student"
    if cfg.student_rounds > 1:
        say(f"stage 2 round {round} of {cfg.student_rounds} ({cfg.round_epochs} epochs): the {who} labels the pool")
    indices, labels, confidences, summary, probs = _selection(cfg, data, labeller, resume, out_dir, common["device"],
                                                              who)
    if len(indices) == 0 and not online:
        what = "stage 2" if round == 1 else f"round {round} and after"
        say(f"no pool image reached the pseudo-label threshold {cfg.pseudo_threshold}: {what} skipped")
        return None, summary
    if online and not cfg.pool_picks:  # the labelled split alone, and the pool only online (FixMatch)
        picked, picked_labels = indices[:0], labels[:0]
    else:
        picked, picked_labels = indices, labels
    images, all_labels, weights, counts = student_inputs(cfg, data, picked, picked_labels)
    init = teacher.model.state_dict() if cfg.student_init == "teacher" else None
    stage = Stage.student(cfg, images, all_labels, weights, counts, init, round)
    mixed = False  # whether stage 2 reads the labeller's distribution (Consistency decides)
    if online:
        stage = stage.online(cfg, data.splits["unlabeled"], data.splits["val"],
                             labeller=_second_labeller(summary, probs))
        mixed = stage.consistency.labeller is not None
        pool_size = len(data.splits["unlabeled"].images)
        say(_online_line(cfg, len(data.splits["train"].labels), len(picked), pool_size, who, mixed))
    pseudo = {"indices": indices.tolist(), "labels": labels.tolist(),
              "confidences": np.asarray(confidences, dtype=np.float64).tolist(), "summary": to_plain(summary)}
    if mixed:  # kept in the resume state only where stage 2 reads it
        pseudo["probs"] = probs.tolist()  # float32 -> Python floats -> float32 on resume: exact
    student = fit(cfg, stage, data.splits["val"], data.classes,
                  report=_stage_report(report, "student", _teacher_state(teacher), pseudo, finished),
                  resume=_fit_state(resume, "student"), **common)
    return student, summary


def _second_labeller(summary: dict[str, Any], probs: np.ndarray | None) -> np.ndarray | None:
    """The labeller's distribution over the pool, as a second labeller of the online student's
    weak views, where it is one: where its labels include the label-spreading graph
    (cfg.pseudo_graph chose one on val). The teacher's labels alone are the student's own
    starting point, not a labeller that errs differently (BENCHMARKS.md: the demo faces' labeller
    is the teacher alone, and mixing it in moved val by -0.006 to +0.007)."""
    return probs if summary.get("graph", "none") != "none" else None


def _online_line(cfg: TrialConfig, labelled: int, picks: int, pool: int, who: str, mixed: bool) -> str:
    per_class = " per class" if cfg.student_mode == "flexmatch" else ""
    picked = f"{picks} {who} picks" if cfg.pool_picks else f"none of the {who}'s picks (pool_picks false)"
    labeller = ""
    if cfg.pool_labeller_weight > 0:
        labeller = (f", the {who}'s graph-helped labels mixed in at {cfg.pool_labeller_weight:g}" if mixed else
                    f", the {who}'s labels not mixed in (no graph: the {who} alone)")
    return (f"stage 2 online ({cfg.student_mode}): {labelled} labelled images and {picked}, and all "
            f"{pool} pool images every step: threshold {cfg.pseudo_threshold}{per_class}, alignment "
            f"{'on' if cfg.pool_align else 'off'}, debiasing {'on' if cfg.pool_debias else 'off'}, {cfg.pool_targets} targets, pool weight {cfg.pseudo_weight}, {cfg.pool_ratio} pool image(s) "
            f"per labelled one{labeller}")


def _run_control(cfg: TrialConfig, data: Any, teacher: FitResult, student: FitResult, metrics: dict[str, Any],
                 common: dict[str, Any]) -> FitResult:
    """The supervised-only control of stage 2: the student's recipe on the labelled split
    alone, from the same start, for the same epochs with at least as many images per epoch
    as the student's (the pool's images are the only difference). Adds its val macro-F1 and
    the pool's gain to `metrics`: student - control in val macro-F1, each with its own
    cfg.posthoc offsets fitted on val (a student on head-heavy pseudo-labels is more biased
    before offsets, and both are handed out after them); reports nothing to a search."""
    train = data.splits["train"]
    # images the student saw per epoch (a resume state saved before this key existed has none)
    student_epoch = max((int(m.get("train_images", 0)) for m in student.history), default=0)
    control_cfg = replace(cfg, epoch_images=max(cfg.epoch_images, student_epoch))
    init = teacher.model.state_dict() if cfg.student_init == "teacher" else None
    # stage 2 as Stage.of has it (epochs, augmentation, epoch numbers, learning rate) on the labels alone
    stage = replace(Stage.of(cfg, "student", train.images, train.labels, data.class_counts("train"), init_state=init),
                    name="control")
    control = fit(control_cfg, stage, data.splits["val"], data.classes, **common)
    val = data.splits["val"]
    # each with its own post-hoc offsets, as the final model gets them: what a user would be handed
    (student_f1, student_offsets, student_logits), (control_f1, control_offsets, control_logits) = (
        _posthoc_fit(cfg, fitted, val, common["device"]) for fitted in (student, control))
    _, low, high = paired_bootstrap_macro_f1(val.labels, (student_logits + student_offsets).argmax(axis=1),
                                             (control_logits + control_offsets).argmax(axis=1), len(data.classes))
    # "helped" only when the paired interval excludes 0: a +0.001 on a few hundred val images is noise
    metrics.update(control_val_macro_f1=control.best_metrics["val_macro_f1"], labelled_images=len(train.labels),
                   pool_images=len(data.splits["unlabeled"].images),
                   student_val_macro_f1_posthoc=student_f1, control_val_macro_f1_posthoc=control_f1,
                   pool_gain_val=student_f1 - control_f1, pool_gain_val_ci95=[low, high], pool_helped=bool(low > 0),
                   pool_offsets={"student": [float(v) for v in student_offsets],
                                 "control": [float(v) for v in control_offsets]})
    return control


def _selection(cfg: TrialConfig, data: Any, teacher: FitResult, resume: PipelineState | None, out_dir: str | None,
               device: Any, labeller: str = "teacher"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any], np.ndarray | None]:
    """(kept pool indices, labels, confidences, summary, the labeller's distribution over the
    pool): the `labeller`'s (the teacher, or a round's student), or the resumed stage 2's (whose
    state keeps the distribution only where cfg.pool_labeller_weight reads it)."""
    if resume is None or resume.stage != "student":
        indices, labels, summary, confidences, probs = pseudo_label(cfg, teacher.model, data, device=device,
                                                                    out_dir=out_dir, labeller=labeller)
        return indices, labels, confidences, summary, probs
    pseudo = resume.pseudo
    indices, labels, confidences = (np.asarray(pseudo[k], dtype=dtype) for k, dtype in
                                    (("indices", np.int64), ("labels", np.int64), ("confidences", np.float32)))
    probs = np.asarray(pseudo["probs"], dtype=np.float32) if "probs" in pseudo else None
    write_pseudo(out_dir, indices, labels, confidences, pseudo["summary"], data.classes)
    return indices, labels, confidences, pseudo["summary"], probs


def final_stage(stages: dict[str, FitResult | None]) -> str:
    """The stage handed out: the best val macro-F1 of the teacher, the student and the
    supervised-only control, each best epoch scored as it is handed out, with its own post-hoc
    offsets (`val_macro_f1_posthoc`; ties: the student, then the control, then the teacher). A
    student that the pool made worse is not handed out when its own control scored better; nor
    is a control whose argmax beats a student that the offsets make better (demo faces at 1/8 of
    the labels: 0.619 against 0.634 on val with offsets, 0.581 against 0.642 on test)."""
    order = [name for name in ("teacher", "control", "student") if stages.get(name) is not None]

    def score(name: str) -> float:
        best = stages[name].best_metrics
        return best.get("val_macro_f1_posthoc", best["val_macro_f1"])

    return max(order, key=lambda name: (score(name), order.index(name)))


def _finish(cfg: TrialConfig, data: Any, teacher: FitResult, student: FitResult | None, control: FitResult | None,
            summary: dict[str, Any] | None, metrics: dict[str, Any], device: Any,
            out_dir: str | None) -> PipelineResult:
    """Pick the final stage (`final_stage`), fit its post-hoc offsets, write best.pt (rank 0)."""
    stages = {"teacher": teacher, "student": student, "control": control}
    metrics["final_stage"] = final_stage(stages)
    final = stages[metrics["final_stage"]]
    checkpoint, posthoc = _apply_posthoc(cfg, final, data.splits["val"], device)
    metrics.update(posthoc)
    checkpoint["metrics"].update(pipeline=dict(metrics), pseudo=summary)
    path = None
    if out_dir is not None and is_main():
        path = save_checkpoint(checkpoint, os.path.join(out_dir, "best.pt"))
    history = teacher.history + (student.history if student is not None else [])
    return PipelineResult(model=final.model, checkpoint=checkpoint, metrics=metrics, teacher=teacher,
                          student=student, pseudo=summary, history=history, checkpoint_path=path)


def _fit_state(resume: PipelineState | None, stage: str) -> FitState | None:
    """The fit state to resume `stage` from (None: that stage starts from scratch)."""
    return resume.fit if resume is not None and resume.stage == stage else None


def _stage_report(report: PipelineReport | None, stage: str, teacher: dict[str, Any] | None = None,
                  pseudo: dict[str, Any] | None = None, rounds: list[dict[str, Any]] | None = None) -> Report | None:
    """fit's report, with the fit state wrapped in the pipeline's own state."""
    if report is None:
        return None
    return lambda metrics, checkpoint, state: report(metrics, checkpoint,
                                                     PipelineState(stage, state, teacher, pseudo, rounds))


def _teacher_state(teacher: Any) -> dict[str, Any]:
    """What stage 2 keeps of stage 1 to resume without retraining the teacher."""
    return {"checkpoint": teacher.checkpoint, "best_epoch": teacher.best_epoch,
            "best_metrics": teacher.best_metrics, "history": teacher.history,
            "best_confusion": np.asarray(teacher.best_confusion).tolist()}


def _teacher_from_state(state: dict[str, Any], device: Any) -> FitResult:
    model = model_from_checkpoint(state["checkpoint"], resolve_device(device))
    return FitResult(model=model, best_metrics=dict(state["best_metrics"]), best_epoch=int(state["best_epoch"]),
                     history=[dict(m) for m in state["history"]], checkpoint=state["checkpoint"],
                     best_confusion=np.asarray(state["best_confusion"], dtype=np.int64))


def _stage2_skip_reason(cfg: TrialConfig, data: Any) -> str | None:
    pool = data.splits.get("unlabeled")
    if pool is None or len(pool.images) == 0:
        return "no unlabeled pool"
    if cfg.student_epochs == 0:
        return "student_epochs=0"
    return None


def _posthoc_fit(cfg: TrialConfig, fitted: FitResult, val: Any, device: Any) -> tuple[float, np.ndarray, np.ndarray]:
    """(val macro-F1 with offsets, cfg.posthoc offsets fitted on val, val logits) of a fitted stage."""
    logits = predict(cfg, fitted.model, val.images, device, tta=False)
    offsets = fit_offsets(logits, val.labels, np.asarray(fitted.checkpoint["class_counts"]), cfg.posthoc)
    return macro_f1(val.labels, logits, offsets), offsets, logits


def _apply_posthoc(cfg: TrialConfig, final: Any, val: Any, device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit cfg.posthoc offsets on the final model's val logits; checkpoint copy with them set."""
    f1, offsets, logits = _posthoc_fit(cfg, final, val, device)
    checkpoint = dict(final.checkpoint, metrics=dict(final.checkpoint["metrics"]),
                      posthoc_offsets=[float(v) for v in offsets])
    summary = {
        "posthoc": cfg.posthoc,
        "posthoc_offsets": checkpoint["posthoc_offsets"],
        "val_macro_f1_raw": macro_f1(val.labels, logits),
        "val_macro_f1_posthoc": f1,
    }
    return checkpoint, summary
