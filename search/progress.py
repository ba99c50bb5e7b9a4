"""What the terminal shows while a search runs: one live table of the trials.

Ray 2.60's default output engine ignores `RunConfig(progress_reporter=...)` and picks its
columns itself (the first numeric metrics, no searched parameters: our Optuna space is
define-by-run, so there is no param_space to read them from). `RAY_AIR_NEW_OUTPUT=0`,
read when the RunConfig is built and again in `Tuner.fit()`, switches to Tune's older
engine, which prints our `CLIReporter`: trial, status, `loc` (ip:pid, the process the
Ray dashboard's Actors page lists), the searched parameters under short names, stage,
global epoch, the epoch's and the trial's best val_macro_f1; finished trials sorted by
the metric. `quiet_driver` sets that and the other driver-side switch; every path that
builds or restores a Tuner calls it first (search.tuner).
"""

from __future__ import annotations

import os
from typing import Any

from search import internals
from trainables.worker import BEST_KEY

# Short column names for the searched parameters; any other name is shown as it is.
SHORT_NAMES = {
    "loss": "loss",
    "focal_gamma": "gamma",
    "class_weights": "weights",
    "cb_beta": "beta",
    "class_cap": "cap",
    "sampler": "sampler",
    "pseudo_threshold": "thr",
    "pseudo_selection": "select",
    "pseudo_temperature": "temp",
    "pseudo_weight": "p_weight",
    "student_mode": "s_mode",
    "pool_ratio": "mu",
    "pool_align": "align",
    "pool_debias": "debias",
    "pool_picks": "picks",
    "pool_targets": "targets",
    "student_rounds": "rounds",
    "label_smoothing": "smooth",
    "weight_decay": "wd",
    "dropout": "drop",
    "batch_size": "batch",
    "student_epochs": "s_epochs",
}
# What the confirmation stage's trials are (trainables.candidate_trial's config).
CONFIRM_COLUMNS = {"candidate": "candidate", "seed": "seed"}
REPORT_EVERY_S = 30  # the table's period; a trial's end or error prints it at once
MAX_ROWS = 30  # a whole default search; more are summarized by status


def short_name(name: str) -> str:
    return SHORT_NAMES.get(name, name)


def quiet_driver() -> None:
    """The driver's environment for a readable search, set before a RunConfig is built:
    Tune's table engine (module docstring), and no "Experiment state snapshotting has been
    triggered multiple times" warning, which with checkpoint num_to_keep=1 fires on every
    epoch by design (each kept checkpoint forces a snapshot; trainables/checkpoints.py)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"


def metric_columns(metric: str) -> dict[str, str]:
    """The metric columns, in order: stage, global epoch, the search metric, and the trial's
    best val_macro_f1 so far (with val_macro_f1 itself when the metric is another)."""
    short = {"val_macro_f1": "f1", "val_macro_f1_posthoc": "f1 offsets"}  # with its post-hoc offsets
    columns = {"stage": "stage", "epoch": "epoch", metric: short.get(metric, metric)}
    columns.setdefault("val_macro_f1", "f1")
    columns[BEST_KEY] = "best f1"
    return columns


# Tune's CLIReporter with guards that reach its private state: built by the door.
SearchReporter = internals.guarded_cli_reporter()


def progress_reporter(metric: str, parameters: dict[str, str]) -> SearchReporter:
    """The live table: `parameters` maps config keys to column names. Tune passes the
    metric and mode from TuneConfig (passing them here too raises)."""
    return SearchReporter(
        metric_columns=metric_columns(metric),
        parameter_columns=parameters,
        sort_by_metric=True,
        print_intermediate_tables=True,  # below verbose=3 the live table is otherwise never printed
        max_report_frequency=REPORT_EVERY_S,
        max_progress_rows=MAX_ROWS,
    )


def search_columns(space: Any) -> dict[str, str]:
    """The space's searched parameters under their short names."""
    return {param.name: short_name(param.name) for param in space.parameters}
