"""search.run / search.export: bad input fails before Ray; a --smoke search end to end; resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fer.config import TrialConfig, apply_overrides, load_config_file
from search import export as search_export
from search import run as search_run
from support import watch


def run_cli(argv, capsys):
    try:
        code = search_run.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- bad input


def bad_csv(tmp_path):
    path = tmp_path / "faces.csv"
    path.write_text("emotion,pixels,Usage\n3,1 2 3,Training\n")
    return path


BAD_CLI = {
    "unknown space": (["--space", "imbalanse"], ["imbalanse", "Available spaces: imbalance, smoke"]),
    "zero workers": (["--workers-per-trial", "0"], ["--workers-per-trial", "expected a whole number >= 1"]),
    "negative cpus": (["--cpus-per-worker", "-1"], ["--cpus-per-worker", "expected a number > 0"]),
    "gpu 1.5": (["--gpus-per-worker", "1.5"], ["--gpus-per-worker", "a fraction in (0, 1] or a whole number"]),
    "zero samples": (["--num-samples", "0"], ["--num-samples", ">= 1"]),
    "missing data": (["--data", "{tmp}/nope.csv"], ["nope.csv", "no such file"]),
    "malformed data": (["--data", "{csv}"], ["faces.csv"]),
    "resume without name": (["--resume"], ["--resume needs --name"]),
    "resume of nothing": (["--resume", "--name", "ghost"], ["no experiment 'ghost'"]),
    "bad space file": (["--space", "{badspace}"], ["bad.yaml:1", "unknown key 'bogus'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CLI))
def test_bad_cli_input_fails_before_ray_with_a_message(tmp_path, capsys, monkeypatch, case):
    argv, expected = BAD_CLI[case]
    (tmp_path / "bad.yaml").write_text("bogus: 1\n")
    fill = {"tmp": tmp_path, "csv": bad_csv(tmp_path), "badspace": tmp_path / "bad.yaml"}
    argv = [a.format(**fill) for a in argv] + ["--storage", str(tmp_path / "runs")]

    def no_ray(plan):
        raise AssertionError("Ray started on bad input")

    monkeypatch.setattr(search_run, "start_ray", no_ray)
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    for part in expected:
        assert part in err, err
    assert not (tmp_path / "runs").exists()


def test_existing_experiment_needs_resume_or_a_new_name(tmp_path, capsys):
    (tmp_path / "runs" / "smoke-smoke").mkdir(parents=True)
    code, _, err = run_cli(["--space", "smoke", "--smoke", "--storage", tmp_path / "runs"], capsys)
    assert code == 2
    assert "exists: continue it with --resume --name smoke-smoke" in err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        search_run.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--space", "--data", "--num-samples", "--max-concurrent", "--workers-per-trial",
                 "--cpus-per-worker", "--gpus-per-worker", "--address", "--storage", "--name",
                 "--resume", "--seed", "--smoke", "--export-dir"):
        assert flag in text


def test_smoke_budget_applies_to_any_space(tmp_path):
    args = search_run.build_parser().parse_args(["--space", "imbalance", "--smoke", "--storage", str(tmp_path)])
    plan = search_run.make_plan(args)
    assert plan.space.max_t == 2 and plan.num_samples == 2 and plan.name == "imbalance-smoke"
    assert plan.space.fixed["epochs"] == 1 and plan.space.fixed["student_epochs"] == 1


def test_seed_reaches_searcher_and_trials(tmp_path):
    args = search_run.build_parser().parse_args(["--space", "smoke", "--seed", "7", "--storage", str(tmp_path)])
    plan = search_run.make_plan(args)
    assert plan.space.seed == 7 and plan.space.fixed["seed"] == 7


# --------------------------------------------------------------------------- end to end


def check_outputs(experiment: Path, trials: int, params=("loss", "lr")):
    frame = pd.read_csv(experiment / "trials.csv")
    assert len(frame) == trials
    assert set(frame["status"]) <= {"TERMINATED", "ERROR"}
    assert frame["baseline"].sum() == 1
    assert {*params, "best_val_macro_f1", "epochs_run", "stopped_early", "error"} <= set(frame.columns)
    best = load_config_file(str(experiment / "best_config.yaml"))
    assert isinstance(apply_overrides(TrialConfig(), best, "best_config.yaml"), TrialConfig)
    assert (experiment / "curves.png").stat().st_size > 0
    assert (experiment / "importance.csv").is_file()
    summary = json.loads((experiment / "summary.json").read_text())
    low, high = summary["test"]["macro_f1_ci95"]
    assert low <= summary["test"]["macro_f1"] <= high
    return frame, summary


def check_onnx(model: Path):
    import onnxruntime as ort

    from fer.data import load_dataset

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    images = load_dataset(None).splits["val"].images[:4]
    (scores,) = session.run(None, {session.get_inputs()[0].name: images})
    assert scores.shape == (4, 7) and np.isfinite(scores).all()


def stored_states(experiment: Path, name: str):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{experiment / 'optuna.db'}")
    return [t.state.name for t in study.get_trials(deepcopy=False)]


@pytest.mark.slow
def test_smoke_search_end_to_end(ray_cluster, tmp_path, capsys, monkeypatch):
    export_dir = tmp_path / "deploy"
    code, out, err = run_cli(
        ["--space", "smoke", "--smoke", "--storage", tmp_path / "runs", "--export-dir", export_dir], capsys
    )
    assert code == 0, out[-3000:] + err[-3000:]
    experiment = tmp_path / "runs" / "smoke-smoke"
    frame, summary = check_outputs(experiment, trials=2)
    assert "winner test macro-F1" in out and "baseline" in out
    check_onnx(export_dir / "model.onnx")
    states = stored_states(experiment, "smoke-smoke")
    assert len(states) == 2 and set(states) <= {"COMPLETE", "PRUNED"}
    assert states.count("PRUNED") == int(frame["stopped_early"].sum())

    # search.export repeats the export from the folder alone, given as the README writes it:
    # a path relative to where search.run ran (Ray's ExperimentAnalysis takes URIs only)
    monkeypatch.chdir(tmp_path)
    assert search_export.main(["--experiment", "runs/smoke-smoke", "--top-k", "2", "--out", "top"]) == 0
    exported = sorted(p.name for p in (tmp_path / "top").iterdir())
    assert len(exported) == 2 and all((tmp_path / "top" / p / "model.onnx").is_file() for p in exported)


def interrupt_when(condition, timeout_s: float = 300.0):
    """Send this process SIGUSR1 (Tune's graceful stop, like Ctrl-C) once `condition()` holds."""
    return watch(condition, lambda: os.kill(os.getpid(), signal.SIGUSR1), timeout_s, poll_s=0.5)


def finished_trials(experiment: Path) -> list[Path]:
    """Trial folders whose pipeline wrote its final checkpoint."""
    return [p for p in experiment.glob("trial_*") if (p / "best.pt").is_file()]


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path, capsys):
    storage = tmp_path / "runs"
    experiment = storage / "resumed"
    argv = ["--space", "smoke", "--smoke", "--num-samples", "3", "--max-concurrent", "1",
            "--storage", storage, "--name", "resumed"]
    interrupt_when(lambda: len(finished_trials(experiment)) >= 1)
    code, out, _ = run_cli(argv, capsys)
    assert code == 130, out[-3000:]
    assert "continue with: python -m search.run --resume --name resumed" in out
    done = {p.name: (p / "result.json").read_text() for p in finished_trials(experiment)}
    assert done

    code, out, err = run_cli(["--resume", "--name", "resumed", "--storage", storage], capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    check_outputs(experiment, trials=3)
    for name, results in done.items():  # finished before the interruption: not run again
        assert (experiment / name / "result.json").read_text() == results
    assert len(stored_states(experiment, "resumed")) == 3


FAILING_SPACE = """\
fixed: {model: mobilenet_v3_small, epoch_images: 0, epochs: 1, student_epochs: 0, image_size: 32, batch_size: 128}
parameters:
  pretrained: {choice: [null, /nonexistent/weights.pth]}  # the second trial draws the missing file
searcher: {seed: 0, n_startup_trials: 2, baseline: {pretrained: null}}
scheduler: {grace_period: 1}
run: {num_samples: 2, max_concurrent: 2}
"""


@pytest.mark.slow
def test_trial_that_raises_is_recorded_and_the_search_goes_on(ray_cluster, tmp_path, capsys):
    space = tmp_path / "failing.yaml"
    space.write_text(FAILING_SPACE)
    code, out, err = run_cli(
        ["--space", space, "--storage", tmp_path / "runs", "--max-failures", "0"], capsys
    )
    assert code == 0, out[-3000:] + err[-3000:]
    frame, summary = check_outputs(tmp_path / "runs" / "failing", trials=2, params=("pretrained",))
    failed = frame[frame["status"] == "ERROR"]
    assert len(failed) == 1 and "no such file" in failed["error"].iloc[0]
    assert summary["winner"]["trial_id"] == frame[frame["baseline"]]["trial_id"].iloc[0]
    assert sorted(stored_states(tmp_path / "runs" / "failing", "failing")) == ["COMPLETE", "FAIL"]
