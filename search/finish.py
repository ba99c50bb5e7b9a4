"""The end of a search: reports, the winner's one look at the test split, its export, a summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from search.confirm import (
    BASELINE,
    CONFIRM_SPEC,
    collect_confirmation,
    confirm_seeds,
    describe,
    dropped,
    format_candidate,
    pick_confirmed,
    plot_seed_spread,
    race_over,
    run_confirmation,
)
from search.baseline import PLAIN_METRIC
from search.export import export_trial, load_trial
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
CONFIRM_PNG = "confirmation.png"  # the seed spread of each confirmed configuration
REPORT_FILES = (TRIALS_CSV, BEST_CONFIG, IMPORTANCE_CSV, CURVES_PNG, CONFIRM_PNG, SUMMARY_JSON, CONFIRM_SPEC,
                "test_metrics.json", "test_confusion.png", "test_baseline_metrics.json",
                "test_baseline_confusion.png", "search_spec.json", "optuna.db")


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


def read_test(record: TrialRecord, dataset: Any, loaded: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's one read of the test split: its final checkpoint's predictions (with its
    own post-hoc offsets, none for the plain baseline) and their metrics. `loaded` is the
    run's (path, checkpoint) from `search.export.load_trial`."""
    from fer.evaluate.evaluate import predict_checkpoint

    path, ckpt = loaded
    test = dataset.splits["test"]
    metrics, preds, _ = predict_checkpoint(ckpt, test.images, test.labels, device="cpu")
    metrics.update(split="test", checkpoint=path, trial_id=record.trial_id)
    return {"metrics": metrics, "preds": preds}


def evaluate_on_test(winner: TrialRecord, baseline: TrialRecord | None, dataset: Any, metric: str, mode: str,
                     out_dir: Path, winner_loaded: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The only reads of the test split in a search: the winner, and the plain baseline when
    there is one to compare with, once each; the paired bootstrap interval of the difference
    in macro-F1 over the same test images, and F1 of the two rarest classes for both.
    `winner_loaded` is the winner's (path, checkpoint) when the caller loaded it already."""
    from fer.evaluate.evaluate import bootstrap_macro_f1, paired_bootstrap_macro_f1, write_report

    classes, labels = list(dataset.classes), dataset.splits["test"].labels
    rare = [classes[i] for i in dataset.class_counts("train").argsort(kind="stable")[:2]]
    reads = {"winner": read_test(winner, dataset, winner_loaded or load_trial(winner, metric, mode))}
    if baseline is not None:  # the plain baseline decides by argmax, also when its run is the search's,
        # from the epoch a user without this tool would keep: the best by argmax val macro-F1
        path, ckpt = load_trial(baseline, PLAIN_METRIC, "max")
        reads["baseline"] = read_test(baseline, dataset, (path, {**ckpt, "posthoc_offsets": None}))
    result: dict[str, Any] = {"reads": len(reads), "rare_classes": rare}
    for role, read in reads.items():
        metrics = read["metrics"]
        metrics["macro_f1_ci95"] = list(bootstrap_macro_f1(labels, read["preds"], len(classes)))
        write_report(metrics, classes, str(out_dir), "test" if role == "winner" else "test_baseline")
        result[role] = {key: metrics[key] for key in ("trial_id", "macro_f1", "macro_f1_ci95", "accuracy",
                                                      "checkpoint")}
        result[role]["rare_f1"] = {name: metrics["per_class"][name]["f1"] for name in rare}
    if baseline is not None:
        diff, low, high = paired_bootstrap_macro_f1(labels, reads["winner"]["preds"], reads["baseline"]["preds"],
                                                    len(classes))
        result["difference"] = {"macro_f1": diff, "ci95": [low, high], "excludes_zero": low > 0 or high < 0,
                                "bootstrap_samples": 1000}
    return result


def write_reports(plan: Any, records: list[TrialRecord], winner: TrialRecord | None) -> str:
    space, out = plan.space, plan.local_dir
    write_trials_csv(records, [p.name for p in space.parameters], space.metric, space.mode, out / TRIALS_CSV)
    if winner is not None:
        write_best_config(winner, plan.data_path, space.metric, space.mode, out / BEST_CONFIG)
    plot_curves(records, winner, space.metric, int(space.fixed.get("epochs", 0)), space.max_t, out / CURVES_PNG)
    return write_importance(plan.study_path, plan.name, out / IMPORTANCE_CSV)


def continue_hint(plan: Any) -> str:
    return f"continue with: python -m search.run --resume --name {plan.name} --storage {plan.storage}"


def finish(plan: Any, wall_s: float) -> int:
    """Reports of the search; then the confirmation stage (when on), the test reads, the
    export and the summary. `wall_s` is the search's own wall time."""
    space = plan.space
    experiment = sync_down(plan)
    # the plain baseline's run is scored as it is tested, by argmax (search/confirm.py)
    records = collect_trials(experiment, space.metric, space.time_attr, space.max_t, space.baseline_point(),
                             also=(PLAIN_METRIC,))
    winner = pick_winner(records, space.mode)
    print_search(records, wall_s, write_reports(plan, records, winner))
    unfinished = [r for r in records if r.status in UNFINISHED]
    if unfinished or len(records) < plan.num_samples:
        return interrupted(plan, f"search interrupted ({len(records)}/{plan.num_samples} trials started, "
                                 f"{len(unfinished)} unfinished)")
    if winner is None:
        print("no trial reported a validation metric; nothing to export")
        return 1
    search_baseline = next((r for r in records if r.baseline), None)
    confirmation, tested, compared = None, winner, None
    if plan.confirm_top and plan.confirm_seeds:
        code, confirmation, tested, compared = confirm_winner(plan, records, wall_s)
        if code is not None:
            return code
    loaded = load_trial(tested, space.metric, space.mode)  # one load for the test read and the export
    test = evaluate_on_test(tested, compared, plan.dataset, space.metric, space.mode, plan.local_dir, loaded)
    why = (f"the confirmed winner {confirmation['winner']}'s seed {confirmation['exported_seed']} run: the best "
           f"{space.metric} of its {confirmation['winner_fresh_runs']} fresh seed(s)" if confirmation else
           f"the search's best trial by {space.metric} (no confirmation stage)")
    card = export_trial(tested, plan.export_dir, plan.dataset, space.metric, space.mode, why=why, loaded=loaded)
    summary = summarize(plan, records, winner, search_baseline, confirmation, tested, test, card, wall_s)
    summary["pool"] = run_pool_summary(tested.path)
    (plan.local_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=str))
    sync_up(plan)
    leave_ray(plan)
    print_summary(summary)
    return 0


def leave_ray(plan: Any) -> None:
    """Disconnect from Ray (our own local cluster stops) once nothing needs it: Ray's log
    monitor forwards the trials' output (pseudo-label tables) with a delay, and would print
    it after the closing message instead of before. A cluster that was running before
    search.run started (a test session's) is left as it is."""
    if getattr(plan, "owns_ray", False):
        import ray

        ray.shutdown()


def print_search(records: list[TrialRecord], wall_s: float, importance: str) -> None:
    stopped = sum(r.stopped_early for r in records)
    errored = [r for r in records if r.status == "ERROR"]
    print(f"\n{len(records)} trials in {wall_s / 60:.1f} min: {stopped} stopped early by ASHA, {len(errored)} errored")
    print(shared_line(records))
    for record in errored:
        print(f"  errored {record.trial_id}: {record.error}")
    print(f"parameter importance ({IMPORTANCE_CSV}):\n{importance}")


def shared_line(records: list[TrialRecord]) -> str:
    """How many epochs the runs trained, and how many they took from teachers earlier runs trained."""
    shared = [r for r in records if r.shared_epochs]
    trained = sum(r.epochs_trained for r in records)
    line = f"epochs trained: {trained}"
    if shared:
        line += (f"; {len(shared)} run(s) started at stage 2 from a teacher an earlier run had trained "
                 f"(fer.ssl.teachers), {sum(r.shared_epochs for r in shared)} teacher epochs not trained again")
    return line


def interrupted(plan: Any, what: str) -> int:
    """Say what is unfinished and how to continue; the reports so far go to storage."""
    leave_ray(plan)
    print(f"{what}; results so far in {plan.local_dir}.\n{continue_hint(plan)}")
    sync_up(plan)
    return 130


def confirm_winner(plan: Any, records: list[TrialRecord], wall_s: float) -> tuple[int | None, dict[str, Any] | None,
                                                                                   TrialRecord | None,
                                                                                   TrialRecord | None]:
    """The confirmation stage: (exit code when it cannot go on, else None; the summary's
    confirmation; the winner's run to test and export; the plain baseline's run)."""
    space = plan.space
    started = time.time()
    candidates = run_confirmation(plan, records)
    confirm_s = time.time() - started
    sync_down(plan)
    candidates = collect_confirmation(plan.local_dir, candidates, space.metric, space.time_attr, space.max_t)
    runs = [r for c in candidates for r in c.runs if r.stage == "confirm"]  # the baseline's search run is a search row
    write_trials_csv(records + runs, [p.name for p in space.parameters], space.metric, space.mode,
                     plan.local_dir / TRIALS_CSV)
    seeds = confirm_seeds(space, plan.confirm_seeds)
    if not race_over(candidates, seeds, space.mode):
        finished = sum(r.status in ("TERMINATED", "ERROR") for r in runs)
        return interrupted(plan, f"confirmation interrupted ({finished} runs finished, the race not over)"), \
            None, None, None
    chosen = pick_confirmed(candidates, space.mode)
    if chosen is None:
        print("no confirmation run of a searched configuration finished; nothing to export")
        sync_up(plan)
        return 1, None, None, None
    plain = next(c for c in candidates if c.name == BASELINE)
    tested, compared = chosen.best_run(space.mode), plain.best_run(space.mode)
    plot_seed_spread(candidates, chosen, space.metric, space.mode, plan.local_dir / CONFIRM_PNG)
    write_best_config(tested, plan.data_path, space.metric, space.mode, plan.local_dir / BEST_CONFIG)
    why = dropped(candidates, seeds, space.mode)
    confirmation = {
        "top": plan.confirm_top, "seeds": seeds,
        "runs": len(runs), "grid_runs": len(candidates) * len(seeds),  # what R seeds for everyone would cost
        "wall_s": round(confirm_s, 1), "wall_fraction_of_search": round(confirm_s / max(wall_s, 1e-9), 2),
        "winner": chosen.name, "exported_run": tested.trial_id,
        "exported_seed": chosen.seeds[tested.trial_id], "winner_fresh_runs": len(chosen.fresh(space.mode)),
        "candidates": [describe(c, space.mode, why.get(c.name)) for c in candidates],
        # the baseline is the reference, not a contender: whether it scored higher is said, not acted on
        "baseline_scored_higher": baseline_scored_higher(chosen, plain, space.mode),
    }
    return None, confirmation, tested, compared


def baseline_scored_higher(winner: Any, plain: Any, mode: str) -> bool:
    """Whether the plain baseline's mean score (argmax, as it is tested) beats the confirmed
    winner's on val."""
    ours, theirs = winner.mean(mode), plain.mean(mode)
    if ours is None or theirs is None:
        return False
    return theirs > ours if mode == "max" else theirs < ours


def summarize(plan, records, search_winner, search_baseline, confirmation, tested, test, card,
              wall_s) -> dict[str, Any]:
    mode = plan.space.mode
    params = [p.name for p in plan.space.parameters]
    return {
        "wall_s": round(wall_s, 1),
        "trials": len(records),
        "stopped_early": sum(r.stopped_early for r in records),
        "errored": sum(r.status == "ERROR" for r in records),
        "epochs_trained": sum(r.epochs_trained for r in records),
        "teacher_shared": {"runs": sum(bool(r.shared_epochs) for r in records),
                           "epochs": sum(r.shared_epochs for r in records)},
        "metric": plan.space.metric,
        "search_baseline": None if search_baseline is None else {
            "trial_id": search_baseline.trial_id, "val": search_baseline.best(mode)[1],
            "stopped_early": search_baseline.stopped_early, "epochs_run": search_baseline.epochs_run},
        "search_winner": {"trial_id": search_winner.trial_id, "val": search_winner.best(mode)[1],
                          "best_epoch": search_winner.best(mode)[0]},
        "confirmation": confirmation,
        # The model handed to the user: the confirmed winner's best-val seed run, or without
        # confirmation the search's best trial.
        "winner": {"trial_id": tested.trial_id, "val": tested.best(mode)[1], "best_epoch": tested.best(mode)[0],
                   "configuration": confirmation["winner"] if confirmation else "search best trial",
                   "params": {name: tested.config.get(name) for name in params if name in tested.config}},
        "test": test,
        "export": {"dir": str(plan.export_dir), "trial_id": tested.trial_id,
                   "parity_passed": card["parity"]["passed"]},
        "experiment": str(plan.local_dir),
    }


POOL_KEYS = ("teacher_val_macro_f1", "student_val_macro_f1", "control_val_macro_f1",
             "student_val_macro_f1_posthoc", "control_val_macro_f1_posthoc", "pool_gain_val",
             "pool_gain_val_ci95", "pool_helped", "pseudo_kept", "pseudo_precision", "labelled_images", "pool_images")


def pool_summary(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """What the unlabeled pool bought the exported run (fer.ssl.pipeline's stage-2 control, on
    val), from its final checkpoint; None when stage 2 or its control did not run."""
    pipeline = (checkpoint.get("metrics") or {}).get("pipeline") or {}
    if "pool_gain_val" not in pipeline:
        return None
    return {key: pipeline[key] for key in POOL_KEYS if key in pipeline}


def run_pool_summary(trial_dir: str) -> dict[str, Any] | None:
    """`pool_summary` of a run's finished pipeline (its best.pt): what the pool bought is the
    run's (student against control), whichever of its epochs is exported; None when the run
    has no best.pt."""
    from fer.train.checkpoint import load_checkpoint
    from trainables.checkpoints import FINAL_CHECKPOINT

    path = Path(trial_dir) / FINAL_CHECKPOINT
    return pool_summary(load_checkpoint(path)) if path.is_file() else None


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def print_summary(s: dict[str, Any]) -> None:
    metric, test, confirmation = s["metric"], s["test"], s["confirmation"]
    print("\n=== search summary ===")
    w = s["search_winner"]
    print(f"search: {s['trials']} trials, {s['stopped_early']} stopped early, {s['errored']} errored, "
          f"{s['wall_s'] / 60:.1f} min; best trial {w['trial_id']} {metric} {w['val']:.4f} (epoch {w['best_epoch']})")
    if s["search_baseline"]:
        b = s["search_baseline"]
        note = f" (stopped early at epoch {b['epochs_run']})" if b["stopped_early"] else ""
        print(f"search baseline {b['trial_id']}: {metric} {b['val']:.4f}{note}")
    if confirmation:
        print(f"confirmation: {len(confirmation['candidates'])} configurations raced over up to "
              f"{len(confirmation['seeds'])} fresh seeds, {confirmation['runs']} runs of the "
              f"{confirmation['grid_runs']} that every seed for every configuration would take, in "
              f"{confirmation['wall_s'] / 60:.1f} min ({confirmation['wall_fraction_of_search']:.2f} x the "
              f"search); mean ± sd of the best {metric} per run:")
        for candidate in confirmation["candidates"]:
            print(format_candidate(candidate, metric) + ("  <- winner" if candidate["name"] == confirmation["winner"]
                                                         else ""))
        if confirmation.get("baseline_scored_higher"):
            print("note: the plain baseline scored better on val than the winner; it is the reference, not a "
                  "contender, and the test comparison below says whether the winner is better as handed out")
        print(f"exported: run {confirmation['exported_run']} (seed {confirmation['exported_seed']}), the winner's "
              f"fresh seed with the best {metric}; the baseline's tested run is its best by {PLAIN_METRIC} (argmax)")
    else:
        print("no confirmation stage (--confirm-top 0): the winner is the search's best single trial, which "
              "is partly the luckiest; the plain baseline is not compared on test")
    print(f"winner {s['winner']['trial_id']} ({s['winner']['configuration']}): {_params(s['winner']['params'])}")
    from fer.train.metrics import pool_verdict

    if s.get("pool"):
        print(f"winner's {pool_verdict(s['pool'])}")
    else:
        print("winner's pool: not measured (stage 2 skipped or pool_control=false)")
    rare = test["rare_classes"]
    for role in ("winner", "baseline"):
        if role in test:
            t = test[role]
            low, high = t["macro_f1_ci95"]
            rare_f1 = ", ".join(f"{name} {t['rare_f1'][name]:.3f}" for name in rare)
            print(f"{role + ' test':<14} macro-F1 {t['macro_f1']:.4f} (95% CI {low:.4f}-{high:.4f}); "
                  f"F1 of the rarest classes: {rare_f1}")
    if "difference" in test:
        d = test["difference"]
        low, high = d["ci95"]
        verdict = ("excludes 0: the winner is better on test" if low > 0 else
                   "excludes 0: the plain baseline is better on test" if high < 0 else
                   "includes 0: the test split cannot tell the winner from the plain baseline")
        print(f"winner - baseline: {d['macro_f1']:+.4f} macro-F1, paired 95% bootstrap interval "
              f"{low:+.4f} to {high:+.4f}, which {verdict}")
    print(f"test split read {test['reads']} time(s), once per model above")
    print(f"experiment: {s['experiment']}  ({TRIALS_CSV}, {BEST_CONFIG}, {IMPORTANCE_CSV}, {CURVES_PNG}"
          + (f", {CONFIRM_PNG}" if confirmation else "") + ", test_metrics.json, optuna.db)")
    print(f"ONNX model: {s['export']['dir']}/model.onnx, run {s['export']['trial_id']} "
          f"(parity {'passed' if s['export']['parity_passed'] else 'FAILED'})")
