"""search.run / search.export: bad input fails before Ray; a --smoke search end to end; resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fer.train.config import TrialConfig, apply_overrides, load_config_file
from search import export as search_export
from search import run as search_run
from readme import readme_argv
from support import fifth_of_the_demo_data, reported_epochs, sigkill_search_driver


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
    "unknown space": (["--space", "imbalanse"], ["imbalanse", "Available spaces: dr, imbalance, smoke"]),
    "zero workers": (["--workers-per-trial", "0"], ["--workers-per-trial", "expected a whole number >= 1"]),
    "negative cpus": (["--cpus-per-worker", "-1"], ["--cpus-per-worker", "expected a number > 0"]),
    "gpu 1.5": (["--gpus-per-worker", "1.5"], ["--gpus-per-worker", "a fraction in (0, 1] or a whole number"]),
    "zero samples": (["--num-samples", "0"], ["--num-samples", ">= 1"]),
    "missing data": (["--data", "{tmp}/nope.csv"], ["nope.csv", "no such file"]),
    "malformed data": (["--data", "{csv}"], ["faces.csv"]),
    "resume without name": (["--resume"], ["--resume needs --name"]),
    "resume of nothing": (["--resume", "--name", "ghost"], ["no experiment 'ghost'"]),
    "negative confirm-top": (["--confirm-top", "-1"], ["--confirm-top", "expected a whole number >= 0"]),
    "fractional seeds": (["--confirm-seeds", "1.5"], ["--confirm-seeds", "expected a whole number >= 0"]),
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
                 "--resume", "--seed", "--smoke", "--export-dir", "--confirm-top", "--confirm-seeds"):
        assert flag in text


def test_smoke_budget_applies_to_any_space(tmp_path):
    args = search_run.build_parser().parse_args(["--space", "imbalance", "--smoke", "--storage", str(tmp_path)])
    plan = search_run.make_plan(args)
    assert plan.space.max_t == 2 and plan.num_samples == 2 and plan.name == "imbalance-smoke"
    assert plan.space.fixed["epochs"] == 1 and plan.space.fixed["student_epochs"] == 1
    assert (plan.confirm_top, plan.confirm_seeds) == (1, 2)  # the best configuration and the baseline, 2 seeds


def test_confirmation_comes_from_the_space_unless_a_flag_says_otherwise(tmp_path):
    def plan_of(*argv):
        return search_run.make_plan(search_run.build_parser().parse_args(["--storage", str(tmp_path), *argv]))

    assert (plan_of("--space", "imbalance").confirm_top, plan_of("--space", "imbalance").confirm_seeds) == (2, 2)
    plan = plan_of("--space", "imbalance", "--confirm-top", "0", "--confirm-seeds", "5")
    assert (plan.confirm_top, plan.confirm_seeds) == (0, 5)
    assert search_run.spec_of(plan)["confirm_top"] == 0  # what --resume keeps


def test_a_finished_experiment_is_not_resumed(tmp_path, capsys):
    """Resuming would read the test split again; the message says what to do instead."""
    experiment = tmp_path / "runs" / "done"
    experiment.mkdir(parents=True)
    (experiment / "search_spec.json").write_text(json.dumps({"space_path": "x", "data": None}))
    (experiment / "summary.json").write_text("{}")
    code, _, err = run_cli(["--resume", "--name", "done", "--storage", tmp_path / "runs"], capsys)
    assert code == 2 and "experiment 'done' has finished" in err and "python -m search.export" in err


def test_seed_reaches_searcher_and_trials(tmp_path):
    args = search_run.build_parser().parse_args(["--space", "smoke", "--seed", "7", "--storage", str(tmp_path)])
    plan = search_run.make_plan(args)
    assert plan.space.seed == 7 and plan.space.fixed["seed"] == 7


# --------------------------------------------------------------------------- what the user sees


@pytest.mark.parametrize("auth", ["token", "disabled"])
def test_banner_points_to_the_actors_page_and_claims_no_train_view(tmp_path, capsys, monkeypatch, auth):
    monkeypatch.setenv("RAY_AUTH_MODE", auth)  # what ray.init sets for a new local cluster (Ray 2.60: token)
    plan = search_run.make_plan(search_run.build_parser().parse_args(["--space", "smoke", "--storage", str(tmp_path)]))
    search_run.print_start(plan, "http://127.0.0.1:8265")
    out = capsys.readouterr().out
    assert "Actors page" in out and "pipeline_trial" in out and "RayTrainWorker" in out and "loc" in out
    assert not any(claim in out for claim in ("Train view", "Train page", "Tune page", "Tune view"))
    assert ("`ray get-auth-token` prints it" in out) == (auth == "token")
    assert out.count("tensorboard --logdir") == 1


class Steps:
    """search.finish's collaborators replaced by recorders: what happens, in order."""

    def __init__(self, monkeypatch, tmp_path):
        import ray

        import search.finish as finish_module

        self.events = []
        record = SimpleNamespace(status="TERMINATED", baseline=False, path=str(tmp_path))  # a run without best.pt
        fakes = {
            "sync_down": lambda plan: str(tmp_path), "collect_trials": lambda *a, **k: [record],
            "pick_winner": lambda records, mode: record, "write_reports": lambda *a: "",
            "print_search": lambda *a: None, "load_trial": lambda *a: ("p", {}),
            "evaluate_on_test": lambda *a: {}, "export_trial": lambda *a, **k: {},
            "summarize": lambda *a: {"summary": 1}, "sync_up": lambda plan: None,
            "print_summary": lambda summary: self.events.append("summary"),
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(finish_module, name, fake)
        monkeypatch.setattr(ray, "shutdown", lambda: self.events.append("ray.shutdown"))
        self.finish = finish_module.finish


def test_an_interrupted_search_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """Ctrl-C (Tune stops, unfinished trials stay RUNNING): exit 130, the reports so far,
    and the command that continues it. The resume itself is the SIGKILL test's
    (tests/test_faults.py), which runs the README's commands."""
    steps = Steps(monkeypatch, tmp_path)
    unfinished = SimpleNamespace(status="RUNNING", baseline=False)
    monkeypatch.setattr("search.finish.collect_trials", lambda *a, **k: [unfinished])
    monkeypatch.setattr("search.finish.sync_up", lambda plan: steps.events.append("sync_up"))
    plan = search_run.make_plan(search_run.build_parser().parse_args(
        ["--space", "smoke", "--smoke", "--storage", str(tmp_path), "--name", "resumable"]))
    assert steps.finish(plan, 1.0) == 130
    out = capsys.readouterr().out
    assert "search interrupted (1/2 trials started, 1 unfinished)" in out
    assert f"continue with: python -m search.run --resume --name resumable --storage {tmp_path}" in out
    assert steps.events[-1] == "sync_up"  # the reports so far reach storage


@pytest.mark.parametrize("owns_ray", [True, False])
def test_summary_is_printed_after_ray_is_shut_down(tmp_path, monkeypatch, owns_ray):
    """Ray's log monitor forwards trial output late; once Ray is shut down nothing follows
    the summary. A cluster search.run did not start (a test session's) is left running."""
    steps = Steps(monkeypatch, tmp_path)
    space = SimpleNamespace(metric="val_macro_f1", mode="max", time_attr="epoch", max_t=2, baseline_point=dict)
    plan = SimpleNamespace(space=space, num_samples=1, confirm_top=0, confirm_seeds=0, local_dir=tmp_path,
                        export_dir=tmp_path, dataset=None, owns_ray=owns_ray)
    assert steps.finish(plan, wall_s=1.0) == 0
    assert steps.events == (["ray.shutdown", "summary"] if owns_ray else ["summary"])


# --------------------------------------------------------------------------- end to end


def check_outputs(experiment: Path, trials: int, params=("loss", "lr"), confirm_runs: int = 0):
    frame = pd.read_csv(experiment / "trials.csv")
    assert len(frame) == trials + confirm_runs
    assert set(frame["status"]) <= {"TERMINATED", "ERROR"}
    search = frame[frame["stage"] == "search"]
    assert len(search) == trials and search["baseline"].sum() == 1
    summary = json.loads((experiment / "summary.json").read_text())
    # the best value of the search's metric per trial, named after it
    assert {*params, f"best_{summary['metric']}", "epochs_run", "stopped_early", "error", "seed"} <= set(frame.columns)
    best = load_config_file(str(experiment / "best_config.yaml"))
    assert isinstance(apply_overrides(TrialConfig(), best, "best_config.yaml"), TrialConfig)
    assert (experiment / "curves.png").stat().st_size > 0
    assert (experiment / "importance.csv").is_file()
    winner = summary["test"]["winner"]
    low, high = winner["macro_f1_ci95"]
    assert low <= winner["macro_f1"] <= high
    return frame, summary


def check_onnx(model: Path, dataset):
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    images = dataset.splits["val"].images[:4]
    (scores,) = session.run(None, {session.get_inputs()[0].name: images})
    assert scores.shape == (4, 7) and np.isfinite(scores).all()


def stored_states(experiment: Path, name: str):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{experiment / 'optuna.db'}")
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def search_trial_recorded(experiment: Path) -> bool:
    """A search trial wrote its final checkpoint, Tune's experiment state says TERMINATED,
    and every searcher state file has content. Tune writes its searcher state in place, not
    atomically: a kill while it is empty leaves a search that cannot be resumed
    (search.tuner refuses it in one line), so the kill waits for a moment when it is whole."""
    done = [p for p in experiment.glob("trial_*") if (p / "best.pt").is_file()]
    states = list(experiment.glob("experiment_state-*.json"))
    searchers = list(experiment.glob("searcher-state-*.pkl"))
    return bool(done) and any("TERMINATED" in p.read_text(errors="replace") for p in states) and \
        bool(searchers) and all(p.stat().st_size > 0 for p in searchers)


def confirm_run_checkpointed(experiment: Path) -> bool:
    """A confirmation run is in the middle: it has reported an epoch with a checkpoint, has
    not finished (no final checkpoint), and Tune's saved state and the race's searcher state
    both know it, so a resumed driver continues it after that checkpoint."""
    folder = experiment / "confirm"
    states = list(folder.glob("experiment_state-*.json"))
    searchers = list(folder.glob("searcher-state-*.pkl"))
    if not states or not searchers or not all(p.stat().st_size > 0 for p in searchers):
        return False
    saved = " ".join(p.read_text(errors="replace") for p in states)
    for trial_dir in folder.glob("trial_*"):
        try:
            started = bool(reported_epochs(trial_dir))
        except (OSError, ValueError):  # not synced yet, or caught mid-write
            continue
        trial_id = trial_dir.name.split("_")[1]
        checkpoints = [p.parent.name for p in trial_dir.glob("checkpoint_*/checkpoint.pt")]
        # Tune's saved state has the trial running and its checkpoint registered: a state saved
        # between the report and the registration would restart the run from epoch 1
        if started and checkpoints and not (trial_dir / "best.pt").exists() and trial_id in saved \
                and "RUNNING" in saved and any(name in saved for name in checkpoints):
            return True
    return False


def count_test_reads(monkeypatch, test_images: np.ndarray) -> list[int]:
    """Spy on every prediction this process makes; record the ones on the test images."""
    from fer.evaluate import evaluate as fer_evaluate

    real, reads = fer_evaluate.predict_logits, []

    def spy(model, images, *args, **kwargs):
        if images.shape == test_images.shape and np.array_equal(images, test_images):
            reads.append(len(images))
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(fer_evaluate, "predict_logits", spy)
    return reads


@pytest.mark.slow
def test_smoke_search_killed_twice_and_resumed_as_the_readme_says(ray_cluster, tmp_path, capsys, monkeypatch):
    """The Quickstart's search at the --smoke budget end to end, typed as the README writes
    it, from the folder the user is in: 2 trials (the second a fork of the baseline's
    teacher), the baseline's run to the full budget (it is the plain baseline's run), then
    the confirmation: the best configuration's one fresh seed (with one contender there
    is nothing to race). One run at a time. The driver is SIGKILLed twice (no handler runs:
    nothing saved on the way out): once a search trial has finished, and, after `--resume
    --name imbalance`, in the middle of the confirmation run; the finished trial is not
    trained again and the confirmation run goes on after its last checkpoint. The last resume
    reads test exactly twice (winner, baseline) and exports the winner; `search.export
    --experiment runs/imbalance --top-k 3` repeats the export from the folder alone."""
    from fer.data import load_dataset

    data = fifth_of_the_demo_data(tmp_path / "data")
    dataset = load_dataset(data)
    export_dir = tmp_path / "deploy"
    experiment = tmp_path / "runs" / "imbalance"
    argv = readme_argv("python -m search.run --space imbalance.yaml")[3:]
    resume = readme_argv("python -m search.run --resume --name imbalance")[3:]
    sigkill_search_driver([*argv, "--smoke", "--data", data, "--export-dir", export_dir, "--max-concurrent", "1",
                           "--name", "imbalance"],
                          tmp_path / "driver.log", lambda: search_trial_recorded(experiment), cwd=tmp_path)
    searched = {p.name: (p / "result.json").read_text()
                for p in experiment.glob("trial_*") if (p / "best.pt").is_file()}
    assert len(searched) == 1 and not (experiment / "trials.csv").exists()

    sigkill_search_driver(resume, tmp_path / "resumed.log", lambda: confirm_run_checkpointed(experiment),
                          cwd=tmp_path)
    assert not (experiment / "summary.json").exists()  # killed before any read of test
    for name, results in searched.items():  # finished before the first kill: kept, not run again
        assert (experiment / name / "result.json").read_text() == results
    assert not list((experiment / "confirm").glob("trial_*/best.pt"))  # killed mid-run

    test_images = dataset.splits["test"].images
    reads = count_test_reads(monkeypatch, test_images)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(resume, capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    for name, results in searched.items():
        assert (experiment / name / "result.json").read_text() == results

    frame, summary = check_outputs(experiment, trials=2, confirm_runs=1)
    search, confirm = frame[frame["stage"] == "search"], frame[frame["stage"] == "confirm"]
    assert confirm["candidate"].tolist() == ["rank1"] and confirm["seed"].tolist() == [1]  # a fresh seed
    assert set(confirm["status"]) == {"TERMINATED"}
    (run_dir,) = (experiment / "confirm").glob("trial_*")
    epochs = reported_epochs(run_dir)  # [1, 2], or [1] when no pool image passed the threshold
    assert epochs == sorted(set(epochs)) and epochs[0] == 1  # resumed after its checkpoint: no epoch twice
    timing = json.loads((run_dir / "trial_timing.json").read_text())
    assert timing["resumed_after_epoch"] in (1, 2)
    assert timing["threads"] == 1  # --max-concurrent 1: the search's one CPU, nothing to widen
    baseline = search[search["baseline"]].iloc[0]
    assert not baseline["stopped_early"]  # ASHA let it run to the end (stage 2 may have kept no pool image)

    confirmation, test = summary["confirmation"], summary["test"]
    assert confirmation["winner"] == "rank1" and len(confirmation["candidates"]) == 2
    assert (confirmation["runs"], confirmation["grid_runs"]) == (1, 4)
    for candidate in confirmation["candidates"]:
        values = [run["val"] for run in candidate["runs"]]
        if candidate["search_run_counted"]:  # rank1's search trial ran the full budget: one more value
            values.append(candidate["search_val"])
        assert candidate["val_mean"] == pytest.approx(np.mean(values))
        assert candidate["val_sd"] == (pytest.approx(np.std(values, ddof=1)) if len(values) > 1 else None)
    plain = next(c for c in confirmation["candidates"] if c["name"] == "baseline")
    assert [(r["trial_id"], r["seed"], r["search_run"]) for r in plain["runs"]] == [(baseline["trial_id"], 0, True)]
    assert "(its search run)" in out
    # scored as it is tested, by argmax, though the search scored the same run with its offsets
    reported = [json.loads(line) for line in
                (experiment / f"trial_{baseline['trial_id']}" / "result.json").read_text().splitlines()]
    assert plain["runs"][0]["val"] == max(r["val_macro_f1"] for r in reported)
    assert baseline["best_val_macro_f1_posthoc"] == max(r["val_macro_f1_posthoc"] for r in reported)
    # the exported model is the winner's best-val seed run; the baseline's run is its search run
    best_run = confirm["trial_id"].iloc[0]
    assert summary["export"]["trial_id"] == best_run == confirmation["exported_run"] == test["winner"]["trial_id"]
    assert test["baseline"]["trial_id"] == baseline["trial_id"]
    card = json.loads((export_dir / "model_card.json").read_text())
    assert card["source"]["trial_id"] == best_run
    assert f"best {summary['metric']} of its 1 fresh seed(s)" in card["source"]["why"]
    assert summary["metric"] == "val_macro_f1_posthoc"  # the space ranks models as they are handed out

    assert reads == [len(test_images)] * 2 and test["reads"] == 2  # winner and baseline, once each
    diff = test["difference"]
    assert diff["macro_f1"] == pytest.approx(test["winner"]["macro_f1"] - test["baseline"]["macro_f1"])
    assert diff["ci95"][0] <= diff["macro_f1"] <= diff["ci95"][1]
    assert diff["excludes_zero"] == (diff["ci95"][0] > 0 or diff["ci95"][1] < 0)
    rarest = {dataset.classes[i] for i in np.argsort(dataset.class_counts("train"), kind="stable")[:2]}
    assert set(test["winner"]["rare_f1"]) == set(test["baseline"]["rare_f1"]) == set(test["rare_classes"]) == rarest
    assert "winner - baseline:" in out and "test split read 2 time(s)" in out
    # the exported epoch decides with its own offsets; the plain baseline by argmax, from its best.pt
    assert torch_load(test["winner"]["checkpoint"])["posthoc_offsets"] is not None
    assert test["baseline"]["checkpoint"].endswith("best.pt")
    # what the pool bought the exported run: its stage-2 control, from the run's final checkpoint
    pipeline = torch_load(str(run_dir / "best.pt"))["metrics"]["pipeline"]
    assert ("student_val_macro_f1" in pipeline) == (summary["pool"] is not None)
    if summary["pool"] is not None:
        assert summary["pool"]["pool_gain_val"] == pytest.approx(
            pipeline["student_val_macro_f1_posthoc"] - pipeline["control_val_macro_f1_posthoc"])
        assert "winner's pool (" in out and "labelled images, a pool of" in out  # the label fraction it was bought at
    assert (experiment / "confirmation.png").stat().st_size > 0
    assert (experiment / "test_baseline_metrics.json").is_file()
    check_onnx(export_dir / "model.onnx", dataset)
    states = stored_states(experiment, "imbalance")
    assert len(states) == 2 and states.count("PRUNED") == int(search["stopped_early"].sum())

    # a finished experiment is not resumed again: that would read test a third time
    code, _, err = run_cli(resume, capsys)
    assert code == 2 and "has finished" in err and len(reads) == 2
    # the plain baseline's search run was tested as the plain baseline decides: by argmax
    from fer.evaluate.evaluate import predict_checkpoint

    baseline_ckpt = torch_load(test["baseline"]["checkpoint"])
    assert baseline_ckpt["config"]["posthoc"] != "none"  # the search's baseline fits offsets; the read ignores them
    argmax, _, _ = predict_checkpoint({**baseline_ckpt, "posthoc_offsets": None}, test_images,
                                      dataset.splits["test"].labels, device="cpu")
    assert json.loads((experiment / "test_baseline_metrics.json").read_text())["macro_f1"] == \
        pytest.approx(argmax["macro_f1"])

    # search.export repeats an export from the folder alone, given as the README writes it:
    # a path relative to where search.run ran (Ray's ExperimentAnalysis takes URIs only).
    # It ranks the confirmed configurations as search.run did: one here, its best seed's run.
    code, out, err = run_main_export(readme_argv("python -m search.export --experiment runs/imbalance --top-k 3")[3:],
                                     capsys)
    assert code == 0 and "note: 1 ranked run(s) to export, not 3" in out, out[-3000:] + err[-3000:]
    exported = experiment / "export"
    assert [p.name for p in exported.iterdir() if p.is_dir()] == [f"rank1-{best_run}"]
    assert (exported / f"rank1-{best_run}" / "model.onnx").is_file()


def run_main_export(argv, capsys):
    code = search_export.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def torch_load(path):
    from fer.train.checkpoint import load_checkpoint

    return load_checkpoint(str(path))


def test_the_summary_says_what_the_pool_bought_the_exported_run(capsys):
    from search.finish import pool_summary

    pipeline = {"teacher_val_macro_f1": 0.5, "student_val_macro_f1": 0.56, "control_val_macro_f1": 0.52,
                "student_val_macro_f1_posthoc": 0.58, "control_val_macro_f1_posthoc": 0.54, "pool_gain_val": 0.04, "pool_gain_val_ci95": [0.01, 0.07], "pool_helped": True, "pseudo_kept": 10,
                "val_macro_f1_raw": 0.56}
    pool = pool_summary({"metrics": {"pipeline": pipeline}})
    assert pool == {k: v for k, v in pipeline.items() if k != "val_macro_f1_raw"}
    assert pool_summary({"metrics": {"pipeline": {"teacher_val_macro_f1": 0.5}}}) is None  # no stage 2
    from fer.train.metrics import pool_verdict

    assert pool_verdict(pool) == ("pool: student val macro-F1 0.5800 vs supervised-only at the same budget "
                                  "0.5400 (each with its post-hoc offsets): +0.0400, paired 95% interval +0.0100 to +0.0700: the pool helped "
                                  "(the interval excludes 0)")
    assert pool_verdict(dict(pool, pool_gain_val_ci95=[-0.01, 0.07])).endswith(
        "no measurable gain from the pool (the interval includes 0)")
    assert pool_verdict(dict(pool, pool_gain_val=-0.04, pool_gain_val_ci95=[-0.07, -0.01])).endswith(
        "the pool hurt (the interval excludes 0)")
    # the label fraction the gain was measured at, where the run recorded it
    assert pool_verdict(dict(pool, labelled_images=400, pool_images=3000)).startswith(
        "pool (400 labelled images, a pool of 3000, 7.5x): student val macro-F1 0.5800")


def test_the_pool_verdict_of_a_run_comes_from_its_best_pt_whichever_epoch_is_exported(tmp_path):
    """A search on val_macro_f1_posthoc may export another epoch than the pipeline kept; what
    the pool bought is the run's (student against control), read from its best.pt."""
    import torch

    from fer.train.checkpoint import CHECKPOINT_KEYS
    from search.finish import run_pool_summary

    assert run_pool_summary(str(tmp_path)) is None  # a run ASHA stopped has no best.pt
    pipeline = {"student_val_macro_f1_posthoc": 0.58, "control_val_macro_f1_posthoc": 0.54, "pool_gain_val": 0.04,
                "pool_gain_val_ci95": [0.01, 0.07], "pool_helped": True}
    torch.save({**{key: None for key in CHECKPOINT_KEYS}, "metrics": {"pipeline": pipeline}}, tmp_path / "best.pt")
    assert run_pool_summary(str(tmp_path)) == pipeline


FAILING_SPACE = """\
fixed: {model: mobilenet_v3_small, epoch_images: 0, epochs: 5, student_epochs: 0, image_size: 32, batch_size: 128}
parameters:
  pretrained: {choice: [null, /nonexistent/weights.pth]}  # the second trial draws the missing file
searcher: {seed: 0, n_startup_trials: 2, baseline: {pretrained: null}}
scheduler: {grace_period: 1}
run: {num_samples: 2, max_concurrent: 2, confirm_top: 0}
"""


@pytest.mark.slow
def test_trial_that_raises_is_recorded_and_the_search_goes_on(ray_cluster, tmp_path, capsys):
    """Two trials at once; one fails at its start, and the other, alone with nothing left to
    start, takes the failed one's CPU for its remaining epochs (search/tail.py)."""
    space = tmp_path / "failing.yaml"
    space.write_text(FAILING_SPACE)
    code, out, err = run_cli(
        ["--space", space, "--storage", tmp_path / "runs", "--max-failures", "0",
         "--data", fifth_of_the_demo_data(tmp_path / "data")], capsys
    )
    assert code == 0, out[-3000:] + err[-3000:]
    frame, summary = check_outputs(tmp_path / "runs" / "failing", trials=2, params=("pretrained",))
    failed = frame[frame["status"] == "ERROR"]
    assert len(failed) == 1 and "no such file" in failed["error"].iloc[0]
    assert summary["winner"]["trial_id"] == frame[frame["baseline"]]["trial_id"].iloc[0]
    assert sorted(stored_states(tmp_path / "runs" / "failing", "failing")) == ["COMPLETE", "FAIL"]
    healthy = frame[frame["status"] != "ERROR"]["trial_id"].iloc[0]
    timing = json.loads(next((tmp_path / "runs" / "failing").glob(f"trial_{healthy}*/trial_timing.json")).read_text())
    assert timing["threads"] == 1
    # widened once it had reported (its node is then known) and the driver's 2 s hold had passed,
    # before its last epoch (5), which trained on 2 threads; the cluster has >= 2 CPUs
    assert timing["thread_changes"][0][0] < 5 and timing["thread_changes"][0][1] == 2


@pytest.mark.slow
def test_a_stage_aware_search_forks_a_finished_teacher_into_a_stage_two_trial(ray_cluster, tmp_path, capsys):
    """The README's smoke search (student_forks 1) with 3 trials one at a time: the
    baseline's teacher finishes, so the second trial takes its teacher knobs (Optuna samples
    only pseudo_weight), finds the teacher in the experiment's store and trains stage 2
    alone, its teacher epoch reported as the baseline's; the third draws a teacher of its own."""
    import optuna

    storage = tmp_path / "runs"
    argv = readme_argv("python -m search.run --space smoke --smoke")[3:]
    code, out, err = run_cli([*argv, "--num-samples", "3", "--max-concurrent", "1", "--confirm-top", "0",
                              "--name", "forked", "--storage", storage,
                              "--data", fifth_of_the_demo_data(tmp_path / "data")], capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    experiment = storage / "forked"
    frame, summary = check_outputs(experiment, trials=3, params=("loss", "lr", "pseudo_weight"))
    assert frame["teacher_shared"].tolist() == [False, True, False]
    baseline, fork, fresh = (frame.iloc[i] for i in range(3))
    assert frame["epochs_run"].tolist()[:2] == [2, 2]  # the third: 1 or 2, as ASHA decides
    assert frame["epochs_trained"].tolist() == [2, 1, fresh["epochs_run"]]
    assert (fork["loss"], fork["lr"]) == (baseline["loss"], baseline["lr"]) and fresh["lr"] != baseline["lr"]
    assert fork["pseudo_weight"] != baseline["pseudo_weight"]
    folders = {row["trial_id"]: next(experiment.glob(f"trial_{row['trial_id']}*")) for _, row in frame.iterrows()}
    curves = {trial: [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
              for trial, folder in folders.items()}
    baseline_rows, fork_rows = curves[baseline["trial_id"]], curves[fork["trial_id"]]
    assert fork_rows[0]["val_macro_f1"] == baseline_rows[0]["val_macro_f1"] and fork_rows[0]["teacher_shared"]
    assert "teacher_shared" not in fork_rows[1] and fork_rows[1]["stage"] == "student"
    assert len(list((experiment / "teachers").glob("teacher-*.pt"))) == 2  # the baseline's and the third's
    final = torch_load(folders[fork["trial_id"]] / "best.pt")
    assert final["config"]["pseudo_weight"] == pytest.approx(fork["pseudo_weight"])  # its own stage-2 knobs
    study = optuna.load_study(study_name="forked", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert [t.user_attrs.get("teacher_of_trial") for t in study.get_trials(deepcopy=False)] == [None, 0, None]
    assert summary["teacher_shared"] == {"runs": 1, "epochs": 1}
    assert summary["epochs_trained"] == 3 + fresh["epochs_run"]
    assert "1 run(s) started at stage 2 from a teacher an earlier run had trained" in out


# --------------------------------------------------------------------------- the DR space

def dr_smoke_space(tmp_path: Path, **fixed) -> Path:
    """spaces/dr.yaml as shipped (metric, remedies, fundus augmentation, load options), at a
    size CI can train: 32 px, a small model, no weights file."""
    import yaml

    from search.space import SPACES_DIR

    space = yaml.safe_load((SPACES_DIR / "dr.yaml").read_text())
    space["fixed"].update({"model": "mobilenet_v3_small", "pretrained": None, "load_size": 32, "batch_size": 16,
                           **fixed})
    space["parameters"]["image_size"] = {"choice": [32, 40]}
    space["searcher"]["baseline"]["image_size"] = 32
    path = tmp_path / "dr_smoke.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))  # a condition follows its parent
    return path


def test_dr_space_refuses_a_missing_weights_file_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/fer-search/weights here
    code, _, err = run_cli(["--space", "dr", "--storage", tmp_path / "runs"], capsys)
    assert code == 2 and "dr.yaml: fixed.pretrained='~/.cache/fer-search/weights/efficientnet_b3" in err
    assert "no such file" in err and "pretrained: null" in err and not (tmp_path / "runs").exists()


def test_a_searched_load_option_is_refused(tmp_path, capsys):
    space = dr_smoke_space(tmp_path)
    text = space.read_text().replace("  load_size: 32\n", "").replace("parameters:\n", "parameters:\n  load_size:\n    choice: [64, 128]\n", 1)
    space.write_text(text)
    code, _, err = run_cli(["--space", space, "--storage", tmp_path / "runs"], capsys)
    assert code == 2 and "load_size cannot be searched: the data set is loaded once" in err


@pytest.mark.slow
def test_dr_space_smoke_search_on_a_generated_fundus_folder(ray_cluster, tmp_path, capsys, monkeypatch):
    """The DR space end to end on 60 generated fundus photographs: decoded once into the
    memory-mapped cache (retina cropped), trials mapping it themselves, val_kappa searched,
    the winner tested and exported."""
    from fer.data.fundus_synth import write_fundus_folder

    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    data = write_fundus_folder(tmp_path / "fundus", 60, seed=0, sides=(96, 160))
    code, out, err = run_cli(["--space", dr_smoke_space(tmp_path), "--smoke", "--confirm-top", "0",
                              "--max-concurrent", "1", "--name", "dr", "--storage", tmp_path / "runs",
                              "--data", data], capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    frame, summary = check_outputs(tmp_path / "runs" / "dr", trials=2, params=("loss", "lr", "image_size"))
    assert summary["metric"] == "val_kappa" and "best_val_kappa" in frame.columns
    assert set(frame["status"]) == {"TERMINATED"}
    best = load_config_file(str(tmp_path / "runs" / "dr" / "best_config.yaml"))
    assert best["augment"] == "fundus" and best["load_crop"] == "retina" and best["load_size"] == 32
    assert list((tmp_path / "runs" / "dr" / "export").glob("*.onnx"))
