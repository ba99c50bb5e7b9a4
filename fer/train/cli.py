"""`python -m fer.train`: train one trial's whole pipeline from the command line.

    python -m fer.train [--data PATH] [--config FILE.yaml] [--set key=value ...] --out DIR [--resume]

The CLI runs the whole pipeline of a trial (`fer.ssl.pipeline.run_pipeline`: teacher ->
pseudo-labels -> student -> post-hoc offsets); stage 2 is skipped when the data set has no
unlabeled pool or student_epochs is 0. The training loop itself is `fer.train.fitting.fit`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any

import numpy as np
from torch import nn

from fer.io import to_plain
from fer.ssl.pipeline import PipelineResult, run_pipeline
from fer.train.checkpoint import RESUME_KEY, load_weights_only, resume_from, save_resumable
from fer.train.config import TrialConfig, apply_overrides, load_config_file, parse_set_args
from fer.train.infer import is_main
from fer.train.metrics import pool_verdict
from fer.train.state import PipelineState

DESCRIPTION = "Train one stage of a trial: the plain-PyTorch loop every search trial runs."  # --help's line

def config_from_args(args: argparse.Namespace) -> TrialConfig:
    """Defaults <- --config file <- --data/--epochs <- --set (later wins)."""
    cfg = TrialConfig()
    if args.config:
        cfg = apply_overrides(cfg, load_config_file(args.config), source=args.config)
    shorthand = {}
    if args.data is not None:
        shorthand["data"] = args.data
    if args.epochs is not None:
        shorthand["epochs"] = args.epochs
    if shorthand:
        cfg = apply_overrides(cfg, shorthand, source="command line")
    if args.set:
        cfg = apply_overrides(cfg, parse_set_args(args.set), source="--set")
    return cfg


RESUME_FILE = "resume.pt"  # the last epoch's resumable checkpoint in --out (removed when training ends)


def read_resume_file(out_dir: str, cfg: TrialConfig) -> PipelineState:
    """The pipeline state saved in out_dir/resume.pt by an interrupted `fer.train` run of
    the same config; ValueError naming the file when there is none or it does not fit."""
    path = os.path.join(out_dir, RESUME_FILE)
    saved = load_weights_only(path, missing=f"nothing to resume (no {RESUME_FILE}: the run finished, "
                                            "or never saved an epoch)")
    if not isinstance(saved, dict) or "config" not in saved or RESUME_KEY not in saved:
        raise ValueError(f"{path}: not a fer.train resume file")
    changed = sorted(k for k, v in asdict(cfg).items() if saved["config"].get(k) != v)
    if changed:
        raise ValueError(f"{path}: saved by a run with a different config ({', '.join(changed)}); "
                         f"resume with the same --config/--set, or train into a new --out")
    return resume_from(saved)


def train_main(cfg: TrialConfig, out_dir: str, *, device: str | None = None, progress: bool = True,
               resume: bool = False) -> dict[str, Any]:
    """Load the data, run the pipeline, write best.pt (with post-hoc offsets), metrics.json,
    pseudo_labeled.csv, tb/ and the confusion PNGs; test metrics of both stages.

    Every epoch's resumable checkpoint goes to out_dir/resume.pt (atomically), removed when
    the run ends; `resume=True` continues an interrupted run of the same config from it."""
    from fer.data import load_configured
    from fer.train.budget import describe_budget

    state = read_resume_file(out_dir, cfg) if resume else None
    data = load_configured(cfg.data, asdict(cfg))
    print(describe_budget(cfg, data), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    result = _run_with_resume_file(cfg, data, out_dir, device, progress, state)
    summary = _summarize(cfg, data, result, out_dir, device)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(to_plain(summary), handle, indent=2)
    _print_summary(summary, out_dir)
    return summary


def _run_with_resume_file(cfg: TrialConfig, data: Any, out_dir: str, device: str | None, progress: bool,
                          state: PipelineState | None) -> PipelineResult:
    """run_pipeline with TensorBoard in out_dir/tb and every epoch's resumable checkpoint
    in out_dir/resume.pt (the same format as a Tune trial's), removed once it finished."""
    from torch.utils.tensorboard import SummaryWriter

    resume_path = os.path.join(out_dir, RESUME_FILE)

    def save_state(metrics: dict[str, Any], checkpoint: dict[str, Any], pipeline: PipelineState) -> None:
        if is_main():
            save_resumable(resume_path, checkpoint, pipeline)

    writer = SummaryWriter(os.path.join(out_dir, "tb"))
    try:
        result = run_pipeline(cfg, data, device=device, out_dir=out_dir, writer=writer, progress=progress,
                              report=save_state, resume=state)
    finally:
        writer.close()
    if os.path.exists(resume_path):
        os.remove(resume_path)
    return result


def _summarize(cfg: TrialConfig, data: Any, result: PipelineResult, out_dir: str,
               device: str | None) -> dict[str, Any]:
    """metrics.json's content; writes the val (and test) reports: metrics JSON, confusion PNG."""
    from fer.evaluate.evaluate import evaluate_model, metrics_from_logits, write_report
    from fer.train.infer import predict_logits

    ckpt, stage = result.checkpoint, result.metrics["final_stage"]
    final = {"teacher": result.teacher, "student": result.student, "control": result.control}[stage]
    summary: dict[str, Any] = {"data": data.source, "best_epoch": ckpt["epoch"], "final_stage": stage,
                               "checkpoint": result.checkpoint_path, "config": ckpt["config"],
                               "val": final.best_metrics, "pipeline": result.metrics,
                               "pseudo": result.pseudo, "history": result.history}

    def evaluate(model: nn.Module, split: str, offsets: list[float] | None) -> tuple[dict[str, Any], np.ndarray]:
        part = data.splits[split]
        return evaluate_model(model, part.images, part.labels, data.classes,
                              image_size=cfg.image_size, device=device, offsets=offsets)

    write_report(evaluate(result.model, "val", ckpt["posthoc_offsets"])[0], data.classes, out_dir, "val")
    if "test" in data.splits and data.splits["test"].labels is not None:
        test = data.splits["test"]
        # each stage's best weights read test once; every score below comes from these logits
        logits = {name: predict_logits(fitted.model, test.images, image_size=cfg.image_size, device=device)
                  for name, fitted in (("teacher", result.teacher), ("student", result.student),
                                       ("control", result.control)) if fitted is not None}

        def scored(name: str, offsets: list[float] | None) -> tuple[dict[str, Any], np.ndarray]:
            metrics, _, predicted = metrics_from_logits(logits[name], test.labels, data.classes, offsets)
            return metrics, predicted

        test_metrics = scored(stage, ckpt["posthoc_offsets"])[0]  # the final model: its stage with offsets
        write_report(test_metrics, data.classes, out_dir, "test")
        summary["test"] = {k: test_metrics[k] for k in ("macro_f1", "balanced_accuracy", "accuracy", "kappa")}
        for name in logits:  # plain argmax
            summary[f"{name}_test_macro_f1"] = scored(name, None)[0]["macro_f1"]
        summary["test_without_offsets_macro_f1"] = summary[f"{stage}_test_macro_f1"]
        if "control" in logits:
            offsets = result.metrics["pool_offsets"]  # each model's own, fitted on val
            pool = {name: scored(name, offsets[name]) for name in ("student", "control")}
            summary["pool_test"] = pool_on_test(data, pool["student"][1], pool["control"][1])
            summary["pool_test"].update({f"{name}_macro_f1": pool[name][0]["macro_f1"] for name in pool})
    return summary


def pool_on_test(data: Any, student: np.ndarray, control: np.ndarray) -> dict[str, Any]:
    """Student minus its supervised-only control in test macro-F1 (the predictions given, each
    model's with its own post-hoc offsets), with the paired bootstrap interval of the
    difference: what the pool bought, on the split no choice was made on."""
    from fer.evaluate.evaluate import paired_bootstrap_macro_f1

    diff, low, high = paired_bootstrap_macro_f1(data.splits["test"].labels, student, control, len(data.classes))
    return {"difference": diff, "ci95": [low, high], "excludes_zero": bool(low > 0 or high < 0)}


def _print_summary(summary: dict[str, Any], out_dir: str) -> None:
    pipe = summary["pipeline"]
    for name in ("teacher", "student"):
        if f"{name}_val_macro_f1" in pipe:
            line = (f"{name}: best val macro-F1 {pipe[f'{name}_val_macro_f1']:.4f} "
                    f"(epoch {pipe[f'{name}_best_epoch']})")
            if f"{name}_test_macro_f1" in summary:
                line += f", test macro-F1 {summary[f'{name}_test_macro_f1']:.4f}"
            print(line)
    if summary.get("pseudo"):
        pseudo = summary["pseudo"]
        precision = "" if pseudo.get("precision") is None else f", precision {pseudo['precision']:.3f}"
        print(f"pseudo-labels: kept {pseudo['kept']} of {pseudo.get('pool_size', '?')}{precision}")
    for done in pipe.get("rounds", []):  # student_rounds > 1
        truth = "" if done["pseudo_precision"] is None else \
            f" at precision {done['pseudo_precision']:.3f} (pool labels {done['pseudo_label_accuracy']:.3f} accurate)"
        print(f"round {done['round']}: {done['labeller']} kept {done['pseudo_kept']} pool images{truth}; student best "
              f"val macro-F1 {done['student_val_macro_f1']:.4f} (epoch {done['student_best_epoch']})"
              + (" <- chosen" if done["round"] == pipe["student_round"] else ""))
    if pipe.get("pool_kept_share") is not None:  # an online student's
        precision = "" if pipe.get("pool_kept_precision") is None else \
            f", precision {pipe['pool_kept_precision']:.3f} against the pool's held-out labels"
        print(f"pool online ({pipe['student_mode']}): the best student epoch trained on {pipe['pool_kept_share']:.0%} of its "
              f"pool views{precision}")
    if "pool_gain_val" in pipe:
        print(pool_verdict(pipe))
    if "pool_test" in summary:
        pool = summary["pool_test"]
        low, high = pool["ci95"]
        print(f"pool on test (each with its post-hoc offsets): student {pool['student_macro_f1']:.4f}, control "
              f"{pool['control_macro_f1']:.4f}; student - control {pool['difference']:+.4f}, paired 95% bootstrap "
              f"interval {low:+.4f} to {high:+.4f}"
              + (" (excludes 0)" if pool["excludes_zero"] else " (includes 0)"))
    line = (f"best epoch {summary['best_epoch']}: val macro-F1 {pipe['val_macro_f1_raw']:.4f} "
            f"({summary['final_stage']}; {pipe['val_macro_f1_posthoc']:.4f} with post-hoc {pipe['posthoc']} offsets)")
    if "test" in summary:
        line += (f"; test macro-F1 {summary['test']['macro_f1']:.4f} "
                 f"({summary['test_without_offsets_macro_f1']:.4f} without offsets)")
    print(line)
    print(f"wrote {out_dir}/best.pt, metrics.json, val_confusion.png, tb/"
          + (", pseudo_labeled.csv" if summary.get("pseudo") else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer.train", description=DESCRIPTION)
    parser.add_argument("--data", default=None,
                        help="FER2013 CSV, split folder or DR folder (default: embedded demo data)")
    parser.add_argument("--config", default=None, help="YAML file of TrialConfig overrides")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    parser.add_argument("--epochs", type=int, default=None, help="shorthand for --set epochs=N")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (on a terminal) and no per-epoch line (elsewhere)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue an interrupted run in --out after its last epoch (from --out/{RESUME_FILE}; "
                             "same config)")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        train_main(cfg, args.out, device=args.device, progress=not args.no_progress, resume=args.resume)
    except (ValueError, FloatingPointError, OSError) as err:  # user-causable: bad input, divergence, unwritable --out
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
