"""What a finished (or interrupted) search leaves behind, read back from its folder.

`collect_trials` reads the experiment folder through Ray's `ExperimentAnalysis` (no
running cluster needed), so `search.run` at the end and `search.export` later see the
same table. `write_reports` writes trials.csv, best_config.yaml, importance.csv and
curves.png next to the trials.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer.train.config import SHARED_TEACHER_KEY, TrialConfig, apply_overrides
from search.asha import STATE_FILE
from search.baseline import holds

SPEC_FILE = "search_spec.json"  # what the search was started with; --resume and search.export read it
STUDY_FILE = "optuna.db"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
IMPORTANCE_CSV = "importance.csv"
CURVES_PNG = "curves.png"
SUMMARY_JSON = "summary.json"
# fANOVA fits a random forest to (params -> value); with fewer complete trials than this
# the importances only restate which values the first trials happened to draw.
MIN_IMPORTANCE_TRIALS = 4


@dataclass
class TrialRecord:
    """One trial as the reports see it."""

    trial_id: str
    path: str
    status: str  # TERMINATED, ERROR, or PENDING/RUNNING/PAUSED when the search was interrupted
    config: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (global epoch, metric)
    stopped_early: bool = False
    error: str = ""
    baseline: bool = False
    stage: str = "search"  # or "confirm": a seed-repeated run of search/confirm.py
    candidate: str = ""  # confirm runs: the configuration (rank1, ..., baseline)
    shared_epochs: int = 0  # teacher epochs replayed from a teacher an earlier run trained (fer.ssl.teachers)
    # metric -> its curve, for the metrics collect_trials read besides `curve`'s (its `also`)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def epochs_run(self) -> int:
        return max((e for e, _ in self.curve), default=0)

    @property
    def epochs_trained(self) -> int:
        """Epochs this run trained itself: those run, less a shared teacher's."""
        return self.epochs_run - self.shared_epochs

    def best(self, mode: str = "max") -> tuple[int | None, float | None]:
        """(epoch, value) of the best reported epoch; ties go to the earlier epoch."""
        finite = [(e, v) for e, v in self.curve if math.isfinite(v)]
        if not finite:
            return None, None
        sign = 1.0 if mode == "max" else -1.0
        return max(finite, key=lambda ev: (sign * ev[1], -ev[0]))

    def scored_by(self, metric: str) -> TrialRecord:
        """The same run with `curve` read from another reported metric (one collect_trials
        read `also`); where it holds no such curve (the metric is `curve`'s own, or the record
        was built by hand) it keeps its own."""
        if metric not in self.curves:
            return self
        return dataclasses.replace(self, curve=self.curves[metric])


def read_spec(experiment: str | os.PathLike) -> dict[str, Any]:
    path = Path(experiment, SPEC_FILE)
    if not path.is_file():
        raise ValueError(f"{experiment}: not a search.run experiment folder (no {SPEC_FILE})")
    return json.loads(path.read_text())


def write_spec(experiment: str | os.PathLike, spec: dict[str, Any]) -> None:
    Path(experiment).mkdir(parents=True, exist_ok=True)
    Path(experiment, SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))


def _read_error(trial: Any) -> str:
    for name in ("error.txt",):
        path = Path(trial.path, name)
        if path.is_file():
            lines = [line for line in path.read_text(errors="replace").strip().splitlines() if line.strip()]
            return lines[-1][:500] if lines else "error"
    return "error" if trial.status == "ERROR" else ""


def collect_trials(
    experiment: str | os.PathLike, metric: str, time_attr: str, max_t: int, baseline: dict[str, Any],
    also: tuple[str, ...] = (),
) -> list[TrialRecord]:
    """Every trial of the experiment with its reported curve of `metric`, in creation order;
    the curves of the metrics in `also` are kept beside it (TrialRecord.scored_by)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment))
    frames = analysis.trial_dataframes
    asha_path = Path(experiment, STATE_FILE)
    asha_stopped = set(json.loads(asha_path.read_text())["stopped"]) if asha_path.is_file() else None
    records = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        shared = 0
        if frame is not None and not frame.empty and SHARED_TEACHER_KEY in frame:
            shared = int(frame[SHARED_TEACHER_KEY].fillna(False).astype(bool).sum())
        record = TrialRecord(
            trial_id=trial.trial_id,
            path=str(trial.path),
            status=str(trial.status),
            config=dict(trial.config),
            curve=_curve(frame, metric, time_attr),
            error=_read_error(trial),
            shared_epochs=shared,
            curves={name: _curve(frame, name, time_attr) for name in also if name != metric},
        )
        if asha_stopped is not None:
            record.stopped_early = trial.trial_id in asha_stopped
        else:
            record.stopped_early = record.status == "TERMINATED" and record.epochs_run < max_t
        record.baseline = holds(record.config, baseline)
        records.append(record)
    first_baseline = next((r for r in records if r.baseline), None)
    for record in records:  # only the first matching trial is "the" baseline
        record.baseline = record is first_baseline
    return records


def _curve(frame: Any, metric: str, time_attr: str) -> list[tuple[int, float]]:
    """(epoch, value) of one reported metric, the last report of an epoch kept (a resumed
    trial reports its last epoch again)."""
    if frame is None or frame.empty or metric not in frame or time_attr not in frame:
        return []
    seen: dict[int, float] = {}
    for epoch, value in zip(frame[time_attr], frame[metric]):
        if epoch is not None and not (isinstance(epoch, float) and math.isnan(epoch)):
            seen[int(epoch)] = float(value) if value is not None else float("nan")
    return sorted(seen.items())


def pick_winner(records: list[TrialRecord], mode: str = "max") -> TrialRecord | None:
    """The trial with the best epoch of all, errored trials excluded."""
    sign = 1.0 if mode == "max" else -1.0
    usable = [r for r in records if r.status != "ERROR" and r.best(mode)[1] is not None]
    return max(usable, key=lambda r: sign * r.best(mode)[1], default=None)


def rank_trials(records: list[TrialRecord], mode: str = "max") -> list[TrialRecord]:
    sign = 1.0 if mode == "max" else -1.0
    usable = [r for r in records if r.status != "ERROR" and r.best(mode)[1] is not None]
    return sorted(usable, key=lambda r: -sign * r.best(mode)[1])


def write_trials_csv(records: list[TrialRecord], params: list[str], metric: str, mode: str, path: Path) -> None:
    import pandas as pd

    rows = []
    for record in records:
        epoch, value = record.best(mode)
        row = {"trial_id": record.trial_id, "stage": record.stage, "candidate": record.candidate,
               "seed": record.config.get("seed", TrialConfig.seed), "baseline": record.baseline}
        row.update({name: record.config.get(name, "") for name in params})
        row.update(
            {
                f"best_{metric}": value,
                "best_epoch": epoch,
                "epochs_run": record.epochs_run,
                "teacher_shared": record.shared_epochs > 0,
                "epochs_trained": record.epochs_trained,
                "stopped_early": record.stopped_early,
                "status": record.status,
                "error": record.error,
            }
        )
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)


def best_config(record: TrialRecord, data: str | None) -> TrialConfig:
    """The winner's full TrialConfig (defaults filled in), re-validated."""
    known = {f.name for f in dataclasses.fields(TrialConfig)}
    overrides = {k: v for k, v in record.config.items() if k in known}
    overrides["data"] = data
    return apply_overrides(TrialConfig(), overrides, source=f"trial {record.trial_id} config")


def write_best_config(record: TrialRecord, data: str | None, metric: str, mode: str, path: Path) -> None:
    epoch, value = record.best(mode)
    header = (
        f"# Winner of the search: trial {record.trial_id}, best {metric} {value:.4f} at epoch {epoch}.\n"
        f"# A flat TrialConfig: python -m fer.train --config {path.name} --out DIR\n"
    )
    body = yaml.safe_dump(dataclasses.asdict(best_config(record, data)), sort_keys=False)
    path.write_text(header + body)


def write_importance(study_path: Path, study_name: str, path: Path) -> str:
    """Optuna's fANOVA importances over the complete trials; a note when there are too few."""
    import optuna
    import pandas as pd

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{study_path}")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        note = (
            f"not computed: {len(complete)} complete trial(s), importance needs at least "
            f"{MIN_IMPORTANCE_TRIALS} (trials ASHA stopped are pruned, not complete)"
        )
        pd.DataFrame([{"parameter": "", "importance": "", "note": note}]).to_csv(path, index=False)
        return note
    try:
        # fANOVA (Hutter et al. 2014) needs at least two complete trials that differ.
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (ValueError, RuntimeError) as err:
        note = f"not computed: {len(complete)} complete trial(s) ({err})"
        pd.DataFrame([{"parameter": "", "importance": "", "note": note}]).to_csv(path, index=False)
        return note
    if not importances:
        note = f"not computed: {len(complete)} complete trial(s) share no varying parameter"
        pd.DataFrame([{"parameter": "", "importance": "", "note": note}]).to_csv(path, index=False)
        return note
    frame = pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})
    frame["note"] = f"fANOVA over {len(complete)} complete trials (pruned trials excluded)"
    frame.to_csv(path, index=False)
    return "\n".join(f"  {name:20s} {value:.3f}" for name, value in importances.items())


def plot_curves(
    records: list[TrialRecord], winner: TrialRecord | None, metric: str, stage_end: int, max_t: int, path: Path
) -> None:
    """Metric against global epoch for every trial; the winner bold, the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    for record in records:
        if not record.curve:
            continue
        epochs, values = zip(*record.curve)
        if record is winner:
            label = f"winner {record.trial_id}" + (" (the baseline)" if record.baseline else "")
            style = dict(color="tab:red", linewidth=2.8, zorder=5, label=label)
        elif record.baseline:
            style = dict(color="black", linestyle="--", linewidth=1.6, zorder=4, label="baseline")
        else:
            style = dict(color="tab:blue" if not record.stopped_early else "tab:gray", alpha=0.6, linewidth=1)
        ax.plot(epochs, values, marker="o", markersize=3, **style)
        if record.stopped_early:
            ax.plot(epochs[-1], values[-1], marker="x", color="tab:gray", markersize=7)
    if 0 < stage_end < max_t:
        ax.axvline(stage_end + 0.5, color="0.7", linestyle=":", label="teacher -> student")
    ax.set_xlim(0.5, max_t + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("global epoch (both stages)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (x: stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
