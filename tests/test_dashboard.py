"""search/dashboard.py: optuna-dashboard next to a search (`search.run --dashboard`)."""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest

import search.run as search_run
from browser import CHROMIUM, NO_CHROMIUM, chromium
from readme import readme_argv
from search import dashboard as dash
from support import fifth_of_the_demo_data



def small_study(path: Path, name: str = "demo", trials: int = 3) -> None:
    """A study as the search writes it: per-epoch intermediate values, then COMPLETE or PRUNED."""
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize")
    for number in range(trials):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)})
        for epoch in (1, 2):
            trial.report(0.1 * number + 0.05 * epoch, epoch)
        state = optuna.trial.TrialState.PRUNED if number == 1 else optuna.trial.TrialState.COMPLETE
        study.tell(trial, None if number == 1 else 0.1 * number + 0.1, state=state)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def api(dashboard: dash.Dashboard) -> str:
    return dashboard.url.removesuffix("/dashboard") + "/api/studies"


def test_dashboard_serves_the_study_then_stops_and_frees_its_port(tmp_path, capsys):
    db = tmp_path / "optuna.db"
    small_study(db)
    dashboard = dash.start_dashboard(db)
    assert dashboard is not None, capsys.readouterr().err
    try:
        port = int(dashboard.url.split(":")[2].split("/")[0])
        assert dashboard.url.startswith("http://127.0.0.1:")
        assert f"Optuna dashboard: {dashboard.url}" in capsys.readouterr().out
        studies = get_json(api(dashboard))["study_summaries"]
        assert [s["study_name"] for s in studies] == ["demo"]
        detail = get_json(f"{api(dashboard)}/{studies[0]['study_id']}")
        assert [t["number"] for t in detail["trials"]] == [0, 1, 2]
        assert [t["state"] for t in detail["trials"]] == ["Complete", "Pruned", "Complete"]
        assert detail["has_intermediate_values"]
    finally:
        dash.stop_dashboard(dashboard)
    assert dashboard.process.poll() is not None
    assert dash.port_is_free(port)
    dash.stop_dashboard(dashboard)  # stopping twice is harmless


def test_a_taken_port_is_named_and_another_one_used(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((dash.HOST, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port, note = dash.choose_port(busy)
        assert port != busy and dash.port_is_free(port)
        assert note == f"port {busy} is taken; using {port}"
    assert dash.choose_port(port) == (port, None)


def test_a_dashboard_that_cannot_start_is_one_warning_and_no_server(tmp_path, capsys, monkeypatch):
    fails = [sys.executable, "-c", "import sys; print('address in use, say'); sys.exit(3)"]
    monkeypatch.setattr(dash, "dashboard_command", lambda *args: fails)
    assert dash.start_dashboard(tmp_path / "runs" / "exp" / "optuna.db") is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "warning: optuna-dashboard did not answer" in err and "address in use, say" in err
    assert "the search runs without it" in err
    # the experiment folder it made is gone: a leftover would make the next run ask for --resume
    assert not (tmp_path / "runs" / "exp").exists()


def test_a_folder_the_dashboard_made_stays_only_when_the_search_wrote_into_it(tmp_path):
    for wrote in (False, True):
        study = tmp_path / str(wrote) / "optuna.db"
        dashboard = dash.start_dashboard(study)
        assert dashboard is not None and dashboard.made_for == study
        if wrote:
            (study.parent / "search_spec.json").write_text("{}")
        dash.stop_dashboard(dashboard)
        assert study.parent.exists() == wrote
    small_study(tmp_path / "optuna.db")
    dash.remove_if_only_ours(None)
    assert (tmp_path / "optuna.db").exists()  # a folder it did not make is never removed


def fake_search(monkeypatch, calls: list, search_raises: BaseException | None = None) -> None:
    """main with no Ray: start_ray, run_search and finish replaced, the dashboard recorded."""
    def run_search(plan):
        calls.append("search")
        if search_raises is not None:
            raise search_raises

    monkeypatch.setattr(search_run, "start_ray", lambda plan: None)
    monkeypatch.setattr(search_run, "run_search", run_search)
    monkeypatch.setattr("search.finish.finish", lambda plan, wall_s: calls.append("finish") or 0)
    monkeypatch.setattr(search_run, "start_dashboard", lambda path: calls.append(("start", Path(path))) or "view")
    monkeypatch.setattr(search_run, "stop_dashboard", lambda view: calls.append(("stop", view)))


@pytest.mark.parametrize("raises", [None, KeyboardInterrupt(), RuntimeError("boom")], ids=["ends", "ctrl-c", "error"])
def test_main_starts_the_dashboard_on_the_study_and_always_stops_it(tmp_path, monkeypatch, capsys, raises):
    calls: list = []
    fake_search(monkeypatch, calls, raises)
    argv = ["--space", "smoke", "--smoke", "--storage", str(tmp_path), "--dashboard"]
    if raises is None:
        assert search_run.main(argv) == 0
    else:
        with pytest.raises(type(raises)):
            search_run.main(argv)
    study = tmp_path / "smoke-smoke" / "optuna.db"
    ran = ["search", "finish"] if raises is None else ["search"]
    assert calls == [("start", study), *ran, ("stop", "view")]


def test_main_without_the_flag_starts_no_dashboard(tmp_path, monkeypatch, capsys):
    calls: list = []
    fake_search(monkeypatch, calls)
    assert search_run.main(["--space", "smoke", "--smoke", "--storage", str(tmp_path)]) == 0
    assert calls == ["search", "finish", ("stop", None)]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_screenshot_of_the_dashboard_after_a_smoke_search(ray_cluster, tmp_path, capsys, monkeypatch):
    """The README's search with --dashboard (at the smoke budget), then its study served
    and rendered by headless Chromium: the page lists the study's trials, and the PNG is a
    real screenshot. On a fifth of the demo data: the page is the point, not the model."""
    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "runs"
    argv = readme_argv("python -m search.run --space imbalance.yaml --dashboard")[3:] + [
        "--smoke", "--num-samples", "1", "--confirm-top", "0", "--data", fifth_of_the_demo_data(tmp_path / "data")]
    assert search_run.main(argv) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "Optuna dashboard: http://127.0.0.1:" in out
    url = out.split("Optuna dashboard: ")[1].split()[0]
    with pytest.raises(OSError):  # stopped when the search ended
        urllib.request.urlopen(url, timeout=5)
    dashboard = dash.start_dashboard(storage / "imbalance-smoke" / "optuna.db")
    assert dashboard is not None, capsys.readouterr().err
    try:
        studies = get_json(api(dashboard))["study_summaries"]
        assert [s["study_name"] for s in studies] == ["imbalance-smoke"]
        trials = get_json(f"{api(dashboard)}/{studies[0]['study_id']}")["trials"]
        assert len(trials) == 1 and all(t["intermediate_values"] for t in trials)
        page = f"{dashboard.url}/studies/{studies[0]['study_id']}"
        assert "History" in chromium(page, "--dump-dom").stdout  # the study page's first chart
        listed = chromium(f"{page}/trials", "--dump-dom").stdout  # the trial list
        for number in range(len(trials)):
            assert f"Trial {number}" in listed, listed[-2000:]
        png = tmp_path / "dashboard.png"
        chromium(page, f"--screenshot={png}")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    finally:
        dash.stop_dashboard(dashboard)
