"""Where a trial's checkpoints go, how a retried trial resumes from them, and how to find
its best one again.

A trial reports a checkpoint folder every epoch, holding `checkpoint.pt`: the epoch's
model checkpoint (fer.train.checkpoint's contract) plus, under `"resume"`, the state
`fer.ssl.pipeline.run_pipeline(resume=...)` continues from after that epoch (optimizer,
scheduler, best epoch so far, and in stage 2 the teacher and the pseudo-label
selection). One file, because the state's weights are the checkpoint's own tensors and
`torch.save` stores a shared tensor once. Every folder has its own model because storage
keeps the best folder by score, and among equal scores Ray keeps the later one. Storage
keeps the best-scoring folder and the latest (`checkpoint_config`), so a trial killed
mid-run and retried by Tune, or left RUNNING by a killed driver and continued by
`--resume`, starts from its last epoch instead of epoch 1 (`resume_state`). Two ways the folders land in storage, and `best_checkpoint_path` reads both from the trial's own results
(`result.json`, one line per reported epoch), so it works for trials ASHA stopped midway:

- single-worker trials report through `ray.tune.report`: Tune copies the checkpoint to
  `<trial dir>/checkpoint_000NNN` and writes its name as `checkpoint_dir_name`;
- multi-worker trials report through a nested Ray Train run, named `train-<trial id>`
  under the experiment folder. Tune never sees those checkpoints (`Result.checkpoint` is
  None); Ray's `TuneReportCallback` adds their storage path as `checkpoint_path`, and
  the folders are named by global epoch: `<experiment>/train-<trial id>/checkpoint_epoch_0003`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable

import fer.train.checkpoint
from fer.train.checkpoint import load_weights_only, resume_from, save_resumable
from fer.train.state import PipelineState

CHECKPOINT_FILE = "checkpoint.pt"  # the epoch's model checkpoint dict, in every epoch's folder
RESUME_KEY = fer.train.checkpoint.RESUME_KEY  # the pipeline's resume state inside it (fer.train --resume's too)
# Checkpoint folders storage keeps per trial: this many best-scoring ones, plus always the
# latest (Ray never deletes the latest). A folder holds the weights 3 times (the epoch's,
# AdamW's two moments), 4 when the stage's best epoch is an earlier one: 18.5-25 MB for
# MobileNetV3-small (24.8 MB when the resume state was a file of its own), so keeping
# every epoch would cost GBs per search.
KEEP_BEST = 1
RESULTS_FILE = "result.json"  # Tune's per-trial log of reported metrics (JsonLoggerCallback)
# The final checkpoint fer.ssl.pipeline.run_pipeline writes into the trial folder when the whole
# pipeline finished: the better stage's best epoch, with the post-hoc offsets filled in.
FINAL_CHECKPOINT = "best.pt"


def train_run_name(trial_id: str) -> str:
    """Name of a trial's Ray Train run: the trial id, never a timestamp. Ray's default name
    has one-second resolution, and reusing a name silently restores the old run."""
    return f"train-{trial_id}"


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch_{int(epoch):04d}"


def report_with_checkpoint(send: Callable[..., None], make: Callable[[str], Any], metrics: dict[str, Any],
                           checkpoint: dict[str, Any], state: PipelineState, **kwargs: Any) -> None:
    """Save the model checkpoint with the resume state (`fer.train.checkpoint.save_resumable`, the
    format `fer.train --resume` uses too) to a temporary folder and report it; both Tune and
    Train copy the folder to storage before `send` returns, so the folder can go right after."""
    with tempfile.TemporaryDirectory(prefix="fer-ckpt-") as tmp:
        save_resumable(os.path.join(tmp, CHECKPOINT_FILE), checkpoint, state)
        send(metrics, checkpoint=make(tmp), **kwargs)


def resume_state(checkpoint: Any) -> PipelineState | None:
    """The resume state in a reported checkpoint (`tune.get_checkpoint()` or
    `ray.train.get_checkpoint()`), or None when there is none to resume from."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            return None
        return resume_from(load_weights_only(path))


def checkpoint_config(make: Callable[..., Any], metric: str, mode: str) -> Any:
    """`make(num_to_keep, checkpoint_score_attribute, checkpoint_score_order)`: Tune's or
    Train's CheckpointConfig keeping the best folder by the search metric and the latest."""
    return make(num_to_keep=KEEP_BEST, checkpoint_score_attribute=metric, checkpoint_score_order=mode)


def best_checkpoint_path(result_or_trial_dir: Any, metric: str = "val_macro_f1", mode: str = "max",
                         *, final: bool = True) -> str:
    """Path of the trial's best checkpoint file (loadable with fer.train.checkpoint.load_checkpoint).

    Accepts a `ray.tune.Result` or a trial folder (the one holding `result.json`). With
    `final`, a finished pipeline's `best.pt` (post-hoc offsets and the pipeline's numbers
    included) wins when its epoch scores the best reported `metric` (always for the
    pipeline's own criterion, val_macro_f1, max; for another metric when the two pick the
    same epoch); otherwise, e.g. for a trial ASHA stopped, the best reported epoch that has
    a checkpoint, ties going to the later epoch (the student, as fer.ssl.pipeline decides); its
    checkpoint carries that epoch's own post-hoc offsets. Raises ValueError naming the
    trial folder if there is none.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    trial_dir, rows = _reported_rows(result_or_trial_dir)
    final_path = os.path.join(trial_dir, FINAL_CHECKPOINT)
    if final and mode == "max" and os.path.isfile(final_path) and (
            metric == "val_macro_f1" or _final_scores_best(final_path, rows, metric)):
        return final_path
    best_path, best_value = None, None
    for row in rows:
        path = _row_checkpoint(row, trial_dir)
        value = row.get(metric)
        if path is None or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        better = best_value is None or (value >= best_value if mode == "max" else value <= best_value)
        if better and os.path.isfile(path):
            best_path, best_value = path, value
    if best_path is None:
        raise ValueError(
            f"{trial_dir}: no reported epoch with metric {metric!r} has a checkpoint on disk "
            f"(looked at {len(rows)} reported results in {RESULTS_FILE})")
    return best_path


def _final_scores_best(path: str, rows: list[dict[str, Any]], metric: str) -> bool:
    """Whether the finished pipeline's best.pt is an epoch with the best reported `metric` (max)."""
    from fer.train.checkpoint import load_checkpoint

    values = [row[metric] for row in rows if isinstance(row.get(metric), (int, float)) and not math.isnan(row[metric])]
    own = (load_checkpoint(path).get("metrics") or {}).get(metric)
    return bool(values) and isinstance(own, (int, float)) and own >= max(values)


def _reported_rows(source: Any) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(source, (str, os.PathLike)):
        trial_dir = os.fspath(source)
        results = os.path.join(trial_dir, RESULTS_FILE)
        if not os.path.isfile(results):
            raise ValueError(f"{trial_dir}: not a Tune trial folder (no {RESULTS_FILE})")
        with open(results, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        return trial_dir, rows
    frame = getattr(source, "metrics_dataframe", None)
    if frame is None or not hasattr(source, "path"):
        raise ValueError(f"expected a ray.tune.Result or a trial folder, got {type(source).__name__}")
    rows = [{k: v for k, v in row.items() if not _is_missing(v)} for row in frame.to_dict("records")]
    return source.path, rows


def _row_checkpoint(row: dict[str, Any], trial_dir: str) -> str | None:
    if row.get("checkpoint_path"):  # nested Ray Train run (TuneReportCallback)
        return os.path.join(row["checkpoint_path"], CHECKPOINT_FILE)
    if row.get("checkpoint_dir_name"):  # ray.tune.report in the trial's own process
        return os.path.join(trial_dir, row["checkpoint_dir_name"], CHECKPOINT_FILE)
    return None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
