"""Helpers shared by several test modules (pytest puts tests/ on sys.path: `from support import ...`)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
TIMED_KEYS = ("train_seconds", "train_images_per_s")  # the only reported values that vary run to run


def watch(condition: Callable[[], bool], action: Callable[[], None], timeout_s: float = 600.0,
          poll_s: float = 0.2) -> threading.Thread:
    """Run `action()` once, in a daemon thread, as soon as `condition()` holds."""

    def loop() -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if condition():
                action()
                return
            time.sleep(poll_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def live_actor_pids(class_name: str) -> list[int]:
    """Pids of the live Ray actors of a class: "ImplicitFunc" for Tune function trials,
    "RayTrainWorker" for Ray Train workers."""
    from ray._private import state

    return [info["Pid"] for info in state.actors().values()
            if info["ActorClassName"] == class_name and info["State"] == "ALIVE" and info["Pid"]]


def saved_and_loaded(state: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run reads: the state through torch.save and a weights_only load."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def untimed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reported epochs without their wall-clock measurements."""
    return [{k: v for k, v in m.items() if k not in TIMED_KEYS} for m in history]


def sigkill_search_driver(argv: list[str], log_path: Path, condition: Callable[[], bool],
                          timeout_s: float = 900.0, cwd: Path = ROOT) -> None:
    """Run `python -m search.run ARGV` as a subprocess on the session's cluster and SIGKILL it
    (no handler runs: nothing saved on the way out) as soon as `condition()` holds. The
    driver joins the session's cluster: a second local cluster on one machine confuses
    Ray's address lookup ("Found multiple active Ray instances"). `cwd`: where the user
    typed the command (relative paths in `argv` are from there)."""
    import ray

    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONPATH": str(ROOT)}
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "search.run", *map(str, argv), "--address", ray.get_runtime_context().gcs_address],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout_s
            while not condition():
                assert driver.poll() is None, f"the driver ended first:\n{log_path.read_text()[-3000:]}"
                assert time.time() < deadline, f"condition not met in {timeout_s} s"
                time.sleep(0.2)
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()


def fifth_of_the_demo_data(folder: Path) -> str:
    """A FER2013 CSV of the demo generator at scale 0.2 (about 600 training images): the same
    classes and imbalance as the embedded data, for end-to-end searches whose point is not
    the data; a trial on it takes about a fifth of the minutes."""
    from fer.data.synth import write_csv

    return write_csv(str(folder), seed=0, scale=0.2)


def reported_epochs(trial_dir: Path) -> list[int]:
    """The epochs a Tune trial reported, in order, from its result.json."""
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    return [int(row["epoch"]) for row in rows if "epoch" in row]
