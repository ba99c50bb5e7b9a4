"""The end of a search: reports, the winner's one look at the test split, its export, a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from search.export import export_trial, trial_checkpoint
from search.report import (
    BEST_CONFIG,
    CURVES_PNG,
    IMPORTANCE_CSV,
    SUMMARY_JSON,
    TRIALS_CSV,
    TrialRecord,
    collect_trials,
    pick_winner,
    plot_curves,
    write_best_config,
    write_importance,
    write_trials_csv,
)

UNFINISHED = ("PENDING", "RUNNING", "PAUSED")
REPORT_FILES = (TRIALS_CSV, BEST_CONFIG, IMPORTANCE_CSV, CURVES_PNG, SUMMARY_JSON, "test_metrics.json",
                "test_confusion.png", "search_spec.json", "optuna.db")


def sync_down(plan: Any) -> str:
    """The experiment as a local folder: itself, or for URI storage a copy in plan.local_dir."""
    if "://" not in plan.storage:
        return plan.experiment
    import pyarrow.fs

    pyarrow.fs.copy_files(plan.experiment, str(plan.local_dir), use_threads=True)
    return str(plan.local_dir)


def sync_up(plan: Any) -> None:
    """For URI storage, put the reports next to the trials."""
    if "://" not in plan.storage:
        return
    import pyarrow.fs

    for name in REPORT_FILES:
        local = plan.local_dir / name
        if local.is_file():
            pyarrow.fs.copy_files(str(local), f"{plan.experiment.rstrip('/')}/{name}")


def evaluate_on_test(record: TrialRecord, dataset: Any, metric: str, mode: str, out_dir: Path) -> dict[str, Any]:
    """The only read of the test split in a search: the winner, once, with a bootstrap CI."""
    from fer.checkpoint import load_checkpoint, model_from_checkpoint
    from fer.evaluate import bootstrap_macro_f1, metrics_from_logits, predict_logits, write_report

    path = trial_checkpoint(record, metric, mode)
    ckpt = load_checkpoint(path)
    test = dataset.splits["test"]
    classes = list(ckpt["classes"])
    model = model_from_checkpoint(ckpt, "cpu")
    logits = predict_logits(model, test.images, image_size=int(ckpt["config"]["image_size"]), device="cpu")
    metrics, _, preds = metrics_from_logits(logits, test.labels, classes, ckpt.get("posthoc_offsets"))
    low, high = bootstrap_macro_f1(test.labels, preds, len(classes))
    metrics.update(split="test", checkpoint=path, macro_f1_ci95=[low, high])
    write_report(metrics, classes, str(out_dir), "test")
    return metrics


def write_reports(plan: Any, records: list[TrialRecord], winner: TrialRecord | None) -> str:
    space, out = plan.space, plan.local_dir
    write_trials_csv(records, [p.name for p in space.parameters], space.metric, space.mode, out / TRIALS_CSV)
    if winner is not None:
        write_best_config(winner, plan.data_path, space.metric, space.mode, out / BEST_CONFIG)
    plot_curves(records, winner, space.metric, int(space.fixed.get("epochs", 0)), space.max_t, out / CURVES_PNG)
    return write_importance(plan.study_path, plan.name, out / IMPORTANCE_CSV)


def finish(plan: Any, wall_s: float) -> int:
    space = plan.space
    experiment = sync_down(plan)
    records = collect_trials(experiment, space.metric, space.time_attr, space.max_t, space.baseline_point())
    winner = pick_winner(records, space.mode)
    importance = write_reports(plan, records, winner)
    stopped = sum(r.stopped_early for r in records)
    errored = [r for r in records if r.status == "ERROR"]
    print(f"\n{len(records)} trials in {wall_s / 60:.1f} min: {stopped} stopped early by ASHA, {len(errored)} errored")
    for record in errored:
        print(f"  errored {record.trial_id}: {record.error}")
    print(f"parameter importance ({IMPORTANCE_CSV}):\n{importance}")
    unfinished = [r for r in records if r.status in UNFINISHED]
    if unfinished or len(records) < plan.num_samples:
        print(
            f"search interrupted ({len(records)}/{plan.num_samples} trials started, {len(unfinished)} unfinished); "
            f"results so far in {plan.local_dir}.\ncontinue with: python -m search.run --resume "
            f"--name {plan.name} --storage {plan.storage}"
        )
        sync_up(plan)
        return 130
    if winner is None:
        print("no trial reported a validation metric; nothing to export")
        return 1
    baseline = next((r for r in records if r.baseline), None)
    test = evaluate_on_test(winner, plan.dataset, space.metric, space.mode, plan.local_dir)
    card = export_trial(winner, plan.export_dir, plan.dataset, space.metric, space.mode)
    summary = summarize(plan, records, winner, baseline, test, card, wall_s)
    (plan.local_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=str))
    sync_up(plan)
    print_summary(summary)
    return 0


def summarize(plan, records, winner, baseline, test, card, wall_s) -> dict[str, Any]:
    mode = plan.space.mode
    return {
        "wall_s": round(wall_s, 1),
        "trials": len(records),
        "stopped_early": sum(r.stopped_early for r in records),
        "errored": sum(r.status == "ERROR" for r in records),
        "metric": plan.space.metric,
        "baseline": None if baseline is None else {
            "trial_id": baseline.trial_id, "val": baseline.best(mode)[1],
            "stopped_early": baseline.stopped_early, "epochs_run": baseline.epochs_run},
        "winner": {"trial_id": winner.trial_id, "val": winner.best(mode)[1], "best_epoch": winner.best(mode)[0],
                   "params": {p.name: winner.config.get(p.name) for p in plan.space.parameters
                              if p.name in winner.config}},
        "test": {"macro_f1": test["macro_f1"], "macro_f1_ci95": test["macro_f1_ci95"],
                 "accuracy": test["accuracy"], "checkpoint": test["checkpoint"]},
        "export": {"dir": str(plan.export_dir), "parity_passed": card["parity"]["passed"]},
        "experiment": str(plan.local_dir),
    }


def print_summary(s: dict[str, Any]) -> None:
    metric = s["metric"]
    print("\n=== search summary ===")
    if s["baseline"]:
        b = s["baseline"]
        note = f" (stopped early at epoch {b['epochs_run']})" if b["stopped_early"] else ""
        print(f"baseline {b['trial_id']}: {metric} {b['val']:.4f}{note}")
    w = s["winner"]
    print(f"winner   {w['trial_id']}: {metric} {w['val']:.4f} (epoch {w['best_epoch']})  "
          + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in w["params"].items()))
    low, high = s["test"]["macro_f1_ci95"]
    print(f"winner test macro-F1 {s['test']['macro_f1']:.4f} (95% bootstrap CI {low:.4f}-{high:.4f}), "
          f"read once")
    print(f"{s['trials']} trials, {s['stopped_early']} stopped early, {s['errored']} errored, "
          f"{s['wall_s'] / 60:.1f} min")
    print(f"experiment: {s['experiment']}  ({TRIALS_CSV}, {BEST_CONFIG}, {IMPORTANCE_CSV}, {CURVES_PNG}, "
          f"test_metrics.json, optuna.db)")
    print(f"ONNX model: {s['export']['dir']}/model.onnx (parity {'passed' if s['export']['parity_passed'] else 'FAILED'})")
