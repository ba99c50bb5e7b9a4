"""Every command the README shows runs as written (issue 15).

Each README command is named, in full, by the test that runs it (`readme_argv(...)`, see
tests/readme.py); the first test here fails when the README shows a command that no test
names, or that no test can run here, unless NOT_RUN says why. Commands run from a
temporary folder, so their relative paths are the user's. A search or a training run
gets the smoke budget appended (SMOKE), nothing else changed; commands on the embedded
demo data run on it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from readme import ROOT, readme_argv, readme_commands

# Appended to a README search command: the smoke budget, one trial, no confirmation stage.
SMOKE = ["--smoke", "--num-samples", "1", "--confirm-top", "0"]
# What no test can do on one machine, and why.
NOT_RUN = {
    "scp ~/.ray/auth_token worker1:.ray/auth_token": "copies a file to another machine",
    "python -m search.run --address HEAD_IP:6379 --storage s3://bucket/fer-search":
        "needs an S3 bucket; the same join by HOST:PORT runs in tests/test_cluster.py",
    "python -m pytest": "the test suite itself; .ci/run runs it (checked below)",
}


def named_commands() -> dict[str, list[str]]:
    """README command -> the test files whose code passes it to readme_argv."""
    named: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "readme_argv"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                named.setdefault(node.args[0].value, []).append(path.name)
    return named


def test_every_readme_command_is_run_by_a_test():
    commands = readme_commands()
    assert len(commands) >= 20  # the parser found the blocks
    named = named_commands()
    missing = [c for c in commands if c not in named and c not in NOT_RUN]
    assert not missing, f"README commands no test runs (name them with readme_argv): {missing}"
    assert not set(NOT_RUN) - set(commands), "NOT_RUN names commands the README no longer shows"
    assert not set(NOT_RUN) & set(named)


def test_the_parser_joins_continuations_drops_comments_and_splits_chains():
    text = ("```bash\nA=1 run --x '#not a comment' \\\n   --y 2   # a comment\n"
            "one && two\n# only a comment\n```\n```python\nprint()\n```\n")
    assert readme_commands(text) == ["A=1 run --x '#not a comment' --y 2", "one", "two"]


def test_ci_installs_and_tests_as_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert " ".join(readme_argv("python3 -m venv .venv")) in ci
    assert " ".join(readme_argv(". .venv/bin/activate")) in ci
    assert readme_argv("pip install -e '.[test]'")[-1] == ".[test]"  # the Quickstart's
    assert readme_argv("pip install -e '.[test,tflite]'") == ["pip", "install", "-e", ".[test,tflite]"]
    assert "pip install -e '.[test,tflite]'" in ci  # the README's command, as CI runs it
    assert any(line.startswith("python -m pytest") for line in ci)


def test_the_fast_selection_names_a_registered_marker():
    """`python -m pytest -m "not slow"`: the marker it deselects is registered (pytest
    would otherwise only warn) and marks the Ray end-to-end tests."""
    argv = readme_argv('python -m pytest -m "not slow"')
    assert argv[-2:] == ["-m", "not slow"]
    assert 'markers = ["slow:' in (ROOT / "pyproject.toml").read_text()
    marked = [p.name for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.slow" in p.read_text()]
    assert {"test_cluster.py", "test_search.py", "test_readme.py"} <= set(marked)


def run_as_written(argv: list[str], cwd: Path, *extra: str) -> str:
    """A README `python -m ...` command in `cwd`, with this interpreter; its output."""
    assert argv[:2] == ["python", "-m"]
    done = subprocess.run([sys.executable, *argv[1:], *extra], cwd=cwd, capture_output=True, text=True,
                          timeout=1200, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_the_data_commands(tmp_path):
    out = run_as_written(readme_argv("python -m fer.data.synth --out demo/"), tmp_path)
    assert "wrote demo/fer2013_demo.csv" in out
    (tmp_path / "path" / "to").mkdir(parents=True)
    shutil.copy(tmp_path / "demo" / "fer2013_demo.csv", tmp_path / "path" / "to" / "fer2013.csv")
    out = run_as_written(readme_argv("python -m fer.data path/to/fer2013.csv"), tmp_path)
    assert "source: path/to/fer2013.csv" in out and "Disgust" in out and "3014" in out


@pytest.mark.slow
def test_train_evaluate_and_export_one_configuration(tmp_path):
    """fer.train (one epoch per stage on a fifth of the demo data), then evaluate and
    export its best.pt by the README's relative paths."""
    from fer.data.synth import write_csv

    data = write_csv(str(tmp_path), seed=0, scale=0.2)
    run_as_written(readme_argv("python -m fer.train --out runs/focal --set loss=focal --set class_weights=effective"),
                   tmp_path, "--data", data, "--set", "epochs=1", "--set", "student_epochs=1", "--set", "epoch_images=0",
                   "--no-progress")
    assert (tmp_path / "runs" / "focal" / "best.pt").is_file()
    out = run_as_written(readme_argv("python -m fer.evaluate --checkpoint runs/focal/best.pt --split test --tta"),
                         tmp_path)
    assert "macro" in out.lower()
    run_as_written(readme_argv("python -m fer.export --checkpoint runs/focal/best.pt --out export/ --int8"), tmp_path)
    assert {"model.onnx", "model.int8.onnx", "model_card.json"} <= {p.name for p in (tmp_path / "export").iterdir()}


@pytest.mark.slow
def test_a_search_on_a_csv_given_by_a_relative_path(ray_cluster, tmp_path, monkeypatch, capsys):
    from fer.data.synth import write_csv
    from search import run as search_run

    shutil.move(write_csv(str(tmp_path), seed=0, scale=0.2), tmp_path / "fer2013.csv")
    monkeypatch.chdir(tmp_path)
    argv = readme_argv("python -m search.run --space imbalance.yaml --data fer2013.csv --num-samples 40")
    assert search_run.main(argv[3:] + SMOKE) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert f"data: {tmp_path / 'fer2013.csv'}" in out
    assert (tmp_path / "runs" / "imbalance-smoke" / "export" / "model.onnx").is_file()
