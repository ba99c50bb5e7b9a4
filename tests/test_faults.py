"""Faults a long search meets, injected: storage that cannot be written or is full, corrupt
or hostile checkpoints, a trial whose loss turns NaN, a trial process killed mid-trial
(the driver killed mid-search, twice, is tests/test_search.py's end-to-end test). Each ends in a clear one-line error (exit code 2) or in a
search that goes on and completes.

The fast tests need no Ray. The slow ones share the session's Ray cluster
(tests/conftest.py), so no second local cluster is started on the machine.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fer.data import FER_CLASSES
from fer.evaluate import evaluate as fer_evaluate
from fer.export import export as fer_export
from fer.train.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fer.train.config import TrialConfig
from search import export as search_export
from search import run as search_run
from support import ROOT, live_actor_pids, reported_epochs, watch

# --------------------------------------------------------------------------- helpers


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The stderr of a refused command: no traceback, the last line the error."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (needs root / CAP_SYS_ADMIN; the test is skipped otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def tiny_fer_csv(path: Path, side: int = 8) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for usage, n in (("Training", 28), ("PublicTest", 14), ("PrivateTest", 14)):
        for i in range(n):
            pixels = " ".join(map(str, rng.integers(0, 256, side * side)))
            rows.append(f"{i % 7},{pixels},{usage}")
    path.write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    return path


def tiny_checkpoint(path: Path) -> Path:
    from fer.train.models import build_model

    cfg = TrialConfig(model="mobilenet_v3_small", image_size=32)
    model = build_model(cfg.model, num_classes=7, in_channels=1)
    ckpt = make_checkpoint(model.state_dict(), cfg, FER_CLASSES, [4] * 7, epoch=1, stage="teacher",
                           metrics={"val_macro_f1": 0.1}, in_channels=1)
    return Path(save_checkpoint(ckpt, path))


class Payload:
    """Unpickling this would run code: pickle calls `Path.touch(marker)`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# --------------------------------------------------------------------------- storage (no Ray)


def refused_storage(tmp_path, capsys, monkeypatch, storage: Path, *extra) -> str:
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(search_run, "start_ray", lambda plan: pytest.fail("Ray started"))
    argv = ["--space", "smoke", "--smoke", "--data", tiny_fer_csv(tmp_path / "faces.csv"),
            "--storage", storage, *extra]
    code, _, err = run_main(search_run.main, argv, capsys)
    assert code == 2, err
    return one_error_line(err)


def test_storage_that_is_a_file_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs").write_text("")
    line = refused_storage(tmp_path, capsys, monkeypatch, tmp_path / "runs")
    assert "--storage" in line and "runs is a file, not a folder" in line


def test_unwritable_storage_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    target = tmp_path / "ro"
    if os.geteuid() == 0:  # root ignores permission bits: a read-only mount is the real thing
        guard = tmpfs(target, "ro,size=1m")
    else:
        target.mkdir()
        target.chmod(0o500)
        guard = contextlib.nullcontext()
    with guard:
        line = refused_storage(tmp_path, capsys, monkeypatch, target / "runs")
    assert "--storage" in line and f"cannot write in {target}" in line
    assert "Read-only file system" in line or "Permission denied" in line


def test_full_storage_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    with tmpfs(tmp_path / "small", "size=1m") as small:
        line = refused_storage(tmp_path, capsys, monkeypatch, small / "runs")
        assert not (small / "runs").exists()
    assert "MB free in" in line and "needs at least 64 MB" in line


def test_unwritable_export_dir_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    (tmp_path / "deploy").write_text("")
    line = refused_storage(tmp_path, capsys, monkeypatch, tmp_path / "runs",
                           "--export-dir", tmp_path / "deploy" / "onnx")
    assert "--export-dir" in line and "deploy is a file, not a folder" in line
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- checkpoints (no Ray)


def test_pickled_object_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: refused: the file pickles Python objects \(getattr\), "
                                         r"which could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()  # weights_only=True never called Path.touch


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "empty", "not a dict", "missing keys",
                                    "pickled object", "missing file"])
def test_export_or_evaluation_of_a_bad_checkpoint_is_one_line_exit_2(damage, tmp_path, capsys):
    path = tmp_path / "best.pt"
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        data = tiny_checkpoint(tmp_path / "good.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not a dict":
        torch.save([torch.zeros(2)], path)
    elif damage == "missing keys":
        torch.save({"model": {}}, path)
    elif damage == "pickled object":
        torch.save({"model": Payload(tmp_path / "pwned")}, path)
    expected = {"missing file": "checkpoint file not found", "not a dict": "expected a dict",
                "missing keys": "missing keys: config, classes",
                "pickled object": "refused: the file pickles Python objects"}.get(damage, "not a readable checkpoint")
    for main in (fer_export.main, fer_evaluate.main):
        code, _, err = run_main(main, ["--checkpoint", path, "--out", tmp_path / "out"], capsys)
        assert code == 2
        line = one_error_line(err)
        assert str(path) in line and expected in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("main", [fer_export.main, fer_evaluate.main], ids=["export", "evaluate"])
def test_export_or_evaluation_into_an_unwritable_folder_is_one_line_exit_2(main, tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "good.pt")
    (tmp_path / "deploy").write_text("")  # a file where the output folder should go
    argv = ["--checkpoint", checkpoint, "--out", tmp_path / "deploy" / "onnx",
            "--data", tiny_fer_csv(tmp_path / "faces.csv")]
    code, _, err = run_main(main, argv, capsys)
    assert code == 2
    assert "deploy" in one_error_line(err)


def test_training_into_an_unwritable_folder_is_one_line_exit_2(tmp_path, capsys):
    from fer.train import cli as fer_train

    (tmp_path / "runs").write_text("")
    argv = ["--data", tiny_fer_csv(tmp_path / "faces.csv"), "--out", tmp_path / "runs" / "x", "--no-progress"]
    code, _, err = run_main(fer_train.main, argv, capsys)
    assert code == 2 and "Not a directory" in one_error_line(err)


def test_search_export_of_a_folder_that_is_no_experiment(tmp_path, capsys):
    code, _, err = run_main(search_export.main, ["--experiment", tmp_path], capsys)
    assert code == 2
    assert "not a search.run experiment folder (no search_spec.json)" in one_error_line(err)


# --------------------------------------------------------------------------- security (no Ray)


def test_dashboard_binds_to_localhost_unless_asked(tmp_path):
    parser = search_run.build_parser()
    assert parser.parse_args([]).dashboard_host == "127.0.0.1"
    assert parser.parse_args(["--dashboard-host", "0.0.0.0"]).dashboard_host == "0.0.0.0"


def test_start_ray_passes_the_dashboard_host(monkeypatch):
    import ray

    seen = {}

    class Context:
        dashboard_url = "127.0.0.1:8265"

    def fake_init(**kwargs):
        seen.update(kwargs)
        return Context()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    plan = type("P", (), {"address": None, "dashboard_host": "127.0.0.1"})()
    assert search_run.start_ray(plan) == "http://127.0.0.1:8265"
    assert seen["dashboard_host"] == "127.0.0.1"
    assert seen["address"] == "local"  # never the cluster a `ray start` left behind, alive or dead


def test_joining_a_cluster_sends_the_token_and_fails_in_one_line(monkeypatch, tmp_path, capsys):
    """Ray 2.60 sends no auth token to an explicit HOST:PORT unless token mode is on; a
    cluster that cannot be joined is one line naming the address and where the token lives,
    before any work starts (the real cluster case was run by hand: issue 17's closing note)."""
    import ray

    calls = []
    monkeypatch.setattr(search_run, "enable_token_auth", lambda: calls.append("token") or True)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refused(**kwargs):
        calls.append(kwargs["address"])
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.9:6390")

    monkeypatch.setattr(ray, "init", refused)
    code, _, err = run_main(search_run.main, ["--space", "smoke", "--smoke", "--storage", tmp_path / "runs",
                                              "--address", "10.0.0.9:6390"], capsys)
    assert code == 2 and calls == ["token", "10.0.0.9:6390"]
    line = one_error_line(err)
    assert line.startswith("error: --address 10.0.0.9:6390: could not join the Ray cluster (ConnectionError: ")
    assert "auth token was sent" in line and "~/.ray/auth_token" in line and "ray get-auth-token" in line
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- unsafe loads (ast)

# Read by parsing, not by grepping lines: `from yaml import load` and `import yaml as y` are
# seen, and a `torch.load(` call whose `weights_only=True` sits on a later line is not flagged.
SCANNED = ("fer", "search", "trainables", "benchmarks", "spaces")
YAML_UNSAFE = {f"yaml.{name}" for name in ("load", "load_all", "unsafe_load", "unsafe_load_all", "full_load",
                                           "full_load_all", "Loader", "UnsafeLoader", "FullLoader", "CLoader",
                                           "CUnsafeLoader", "CFullLoader")}
PICKLE_UNSAFE = {f"{module}.{name}" for module in ("pickle", "_pickle", "cloudpickle", "dill")
                 for name in ("load", "loads", "Unpickler")}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def _import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for (`import yaml as y`: y -> yaml;
    `from torch import load`: load -> torch.load). File-wide: scopes are not told apart."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`y.load` -> 'yaml.load' when y is yaml; None for anything not rooted in an import."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _weights_only(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<snippet>") -> list[tuple[str, str]]:
    """(kind, 'file:line: what') for every unsafe YAML read, unpickling, or torch.load
    without a literal weights_only=True in `source`; kind is yaml, pickle or torch."""
    tree = ast.parse(source, filename)
    aliases = _import_aliases(tree)
    safe_torch_loads = {id(node.func) for node in ast.walk(tree)
                        if isinstance(node, ast.Call) and _weights_only(node)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, (ast.Name, ast.Attribute)):
            names = [_dotted(node, aliases)]
        for name in names:
            if name in YAML_UNSAFE:
                found.append(("yaml", f"{filename}:{node.lineno}: {name} (use yaml.safe_load)"))
            elif name in PICKLE_UNSAFE:
                found.append(("pickle", f"{filename}:{node.lineno}: {name} (unpickling runs code)"))
            elif name in TORCH_LOADS and isinstance(node, (ast.Name, ast.Attribute)) \
                    and id(node) not in safe_torch_loads:
                found.append(("torch", f"{filename}:{node.lineno}: {name} without weights_only=True"))
    return found


def product_unsafe_loads(kind: str) -> list[str]:
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            found += [where for k, where in unsafe_loads(path.read_text(), rel) if k == kind]
    return found


CHECKER_CASES = {
    "yaml.load": ("import yaml\nyaml.load(text)\n", ["yaml:2"]),
    "yaml.load with a safe Loader": ("import yaml\nyaml.load(text, Loader=yaml.SafeLoader)\n", ["yaml:2"]),
    "from yaml import load": ("from yaml import load\nload(x)\n", ["yaml:1", "yaml:2"]),
    "aliased module": ("import yaml as y\ny.unsafe_load(x)\n", ["yaml:2"]),
    "unsafe Loader passed to safe-looking code": ("import yaml\nyaml.add_constructor('!x', f, Loader=yaml.Loader)\n",
                                                  ["yaml:2"]),
    "from yaml import FullLoader": ("from yaml import FullLoader, safe_load\n", ["yaml:1"]),
    "yaml.load_all": ("import yaml\nlist(yaml.load_all(s))\n", ["yaml:2"]),
    "libyaml's unsafe loader": ("import yaml\nyaml.compose(s, Loader=yaml.CUnsafeLoader)\n", ["yaml:2"]),
    "safe_load": ("import yaml\nyaml.safe_load(s)\nyaml.safe_dump(d)\nyaml.compose(s)\n", []),
    "a method named load elsewhere": ("import json\njson.load(f)\nnp.load(p)\nself.yaml.load(x)\n", []),
    "multi-line torch.load with weights_only": ("import torch\nstate = torch.load(\n    path,\n"
                                                "    map_location='cpu',\n    weights_only=True,\n)\n", []),
    "multi-line torch.load without weights_only": ("import torch\nstate = torch.load(\n    path,\n"
                                                   "    map_location='cpu',\n)\n", ["torch:2"]),
    "weights_only=False": ("import torch\ntorch.load(p, weights_only=False)\n", ["torch:2"]),
    "weights_only from a variable": ("import torch\ntorch.load(p, weights_only=flag)\n", ["torch:2"]),
    "weights_only hidden in **kwargs": ("import torch\ntorch.load(p, **kw)\n", ["torch:2"]),
    "from torch import load": ("from torch import load\nload(p)\nload(p, weights_only=True)\n", ["torch:2"]),
    "torch.load passed around": ("import torch\nloader = torch.load\n", ["torch:2"]),
    "a comment or string is not a call": ("# torch.load(p)\ns = 'yaml.load(x)'\n", []),
    "pickle.load": ("import pickle\npickle.load(f)\npickle.dump(x, f)\n", ["pickle:2"]),
    "from pickle import loads": ("from pickle import loads as l\nl(b)\n", ["pickle:1", "pickle:2"]),
}


@pytest.mark.parametrize("case", sorted(CHECKER_CASES))
def test_unsafe_load_checker(case):
    """The checker itself, on snippets: what it must flag (kind:line) and what it must let pass."""
    source, expected = CHECKER_CASES[case]
    found = unsafe_loads(source)
    assert sorted(f"{kind}:{where.split(':')[1]}" for kind, where in found) == sorted(expected), found


def test_yaml_readers_use_safe_load_only():
    """No yaml.load / unsafe Loader anywhere in the product: YAML is data (STYLE.md)."""
    offenders = product_unsafe_loads("yaml")
    assert not offenders, "unsafe YAML reads:\n" + "\n".join(offenders)


def test_checkpoint_loads_are_weights_only():
    """Every torch.load in the product passes a literal weights_only=True."""
    offenders = product_unsafe_loads("torch")
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


def test_nothing_is_unpickled():
    """Nothing in the product unpickles (pickle.load/loads run code); checkpoints are weights_only."""
    offenders = product_unsafe_loads("pickle")
    assert not offenders, "unpickling:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- in a search (Ray)

# One healthy trial (the baseline, lr 0.002) and one that diverges: SGD at lr 10 with weight
# decay 1 multiplies the weights by about -10 a step, so the loss is NaN within the first
# epoch. The random sampler's first draw (seed 0) after the baseline is lr 10.
FAULTY_SPACE = """\
fixed: {model: mobilenet_v3_small, epoch_images: 0, epochs: 2, student_epochs: 0, image_size: 32, batch_size: 128,
        optimizer: sgd, weight_decay: 1.0, grad_clip: 0.0, warmup_epochs: 0}
parameters:
  lr: {choice: [0.002, 10.0]}
searcher: {sampler: random, seed: 0, baseline: {lr: 0.002}}
scheduler: {grace_period: 2}
run: {num_samples: 2, max_concurrent: 1, confirm_top: 0}
"""


@pytest.mark.slow
def test_killed_trial_process_is_retried_and_nan_trial_is_recorded(ray_cluster, tmp_path, capsys, monkeypatch):
    from ray.tune import ExperimentAnalysis

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")  # keep Tune's state fresh for the retry
    space = tmp_path / "faulty.yaml"
    space.write_text(FAULTY_SPACE)
    storage = tmp_path / "runs"
    experiment = storage / "faulty"
    killed: list[int] = []

    def checkpointed_unfinished() -> bool:
        # Tune has taken the baseline's epoch 1 with its checkpoint: the result is in the
        # trial's result.json in storage (synced every second here). A checkpoint folder
        # that is on disk but not yet taken is not resumed from.
        return any(list(p.glob("checkpoint_*/checkpoint.pt")) and taken(p) and not (p / "best.pt").exists()
                   for p in experiment.glob("trial_*"))

    def taken(trial_dir: Path) -> bool:
        try:
            return bool(reported_epochs(trial_dir))
        except (OSError, ValueError):  # not synced yet, or caught mid-write
            return False

    def kill_trial_process() -> None:
        pids = live_actor_pids("ImplicitFunc")  # Tune's function-trainable processes
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    watch(checkpointed_unfinished, kill_trial_process)
    code, out, err = run_main(search_run.main, ["--space", space, "--storage", storage, "--max-failures", "1",
                                                "--export-dir", tmp_path / "deploy"], capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    assert killed, "the trial process was never killed"

    frame = pd.read_csv(experiment / "trials.csv")
    assert len(frame) == 2
    healthy = frame[frame["baseline"]].iloc[0]
    diverged = frame[~frame["baseline"]].iloc[0]
    assert healthy["status"] == "TERMINATED" and healthy["epochs_run"] == 2
    assert diverged["status"] == "ERROR" and diverged["lr"] == 10.0
    assert "training loss became NaN" in diverged["error"]  # recorded with its message
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["winner"]["trial_id"] == healthy["trial_id"] and summary["errored"] == 1

    trials = {t.trial_id: t for t in ExperimentAnalysis(str(experiment)).trials}
    assert trials[healthy["trial_id"]].num_failures == 1  # died once, retried, finished
    # Killed after epoch 1's checkpoint, the retry resumed there: epoch 1 was not trained
    # or reported again (the trial process may have reported epoch 2 before it died).
    healthy_dir = Path(trials[healthy["trial_id"]].path)
    assert reported_epochs(healthy_dir) == [1, 2]
    timing = json.loads((healthy_dir / "trial_timing.json").read_text())
    assert timing["resumed_after_epoch"] in (1, 2)
    # Tune retries every error up to max_failures, a deterministic NaN too; the retry fails
    # at once on the trial's diverged.txt instead of training into the same NaN again.
    assert trials[diverged["trial_id"]].num_failures == 2
    assert "diverged on an earlier attempt; not retried" in diverged["error"]

    # A corrupt final checkpoint given to search.export: one line, exit 2.
    best = healthy_dir / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    code, _, err = run_main(search_export.main, ["--experiment", experiment, "--out", tmp_path / "again"], capsys)
    assert code == 2 and "best.pt: not a readable checkpoint" in one_error_line(err)


FAST_SPACE = """\
fixed: {model: mobilenet_v3_small, epoch_images: 0, epochs: 1, student_epochs: 0, image_size: 32, batch_size: 128}
parameters:
  lr: {loguniform: [1.0e-3, 5.0e-3]}
searcher: {seed: 0, n_startup_trials: 1, baseline: {lr: 0.002}}
scheduler: {grace_period: 1}
run: {num_samples: 3, max_concurrent: 1, confirm_top: 0}
"""


ONE_TRIAL_SPACE = FAST_SPACE.replace("num_samples: 3", "num_samples: 1")


@pytest.mark.slow
def test_checkpoint_folder_filling_up_mid_search_errors_the_trial_not_the_search(ray_cluster, tmp_path, capsys,
                                                                                monkeypatch):
    """Room for the experiment's small files, none for a 6 MB checkpoint (the start check waved through)."""
    from search import preflight

    monkeypatch.setattr(preflight, "MIN_FREE_BYTES", 0)
    space = tmp_path / "one.yaml"
    space.write_text(ONE_TRIAL_SPACE)
    with tmpfs(tmp_path / "small", "size=3m") as small:
        code, out, err = run_main(search_run.main, ["--space", space, "--storage", small / "runs",
                                                    "--max-failures", "0"], capsys)
    assert code == 2, out[-3000:] + err[-3000:]
    line = [line for line in err.strip().splitlines() if line.strip()][-1]
    assert line.startswith(f"error: the search stopped on a storage error in {small / 'runs' / 'one'}: "), err[-3000:]
    assert "MB free in" in line and line.endswith("fix the storage, then continue with --resume")


def test_an_empty_searcher_state_is_refused_in_one_line_not_resumed_forever(tmp_path):
    """Tune writes searcher-state-*.pkl in place; a driver killed mid-write leaves it empty
    and Tuner.restore would then wait forever: --resume refuses it, naming the file."""
    from search.tuner import check_resumable

    (tmp_path / "searcher-state-2026-11-30_14-40-26.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"searcher-state-2026-11-30_14-40-26\.pkl is empty .* new --name"):
        check_resumable(tmp_path)
    (tmp_path / "searcher-state-2026-11-30_14-40-49.pkl").write_bytes(b"state")  # a newer, whole one
    check_resumable(tmp_path)
