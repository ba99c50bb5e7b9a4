"""search.run against a real `ray start --head` cluster with token authentication, the
way the README's "On a cluster" section tells a user to run it: joined by an explicit
HOST:PORT, submitted as a Ray job, refused in one line with a wrong token, and the
default path not held up by the record a dead cluster leaves behind.

The cluster is this module's own: started with `ray start` in a new process session, in a
temporary Ray folder (RAY_TMPDIR, so nothing is recorded in /tmp/ray) with a token file of
its own (RAY_AUTH_TOKEN_PATH), on free ports, and stopped by signalling that process group
alone, so no other Ray process on the machine is touched. Two clusters on one machine
confuse Ray's placement-group cleaner, so the session's cluster is stopped first and
started again afterwards (as tests/test_multinode.py does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import CHROMIUM, NO_CHROMIUM, DevToolsPage
from readme import readme_argv, split_env
from support import fifth_of_the_demo_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and `python` for the job's entrypoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class HeadNode:
    folder: Path  # RAY_TMPDIR and the token file
    env: dict[str, str]  # what a client on this machine needs: PATH, RAY_TMPDIR, RAY_AUTH_TOKEN_PATH
    gcs: str  # HOST:PORT
    dashboard: str  # http://127.0.0.1:PORT
    group: int  # the process group of the head node's processes


def node_ports() -> list[str]:
    """Free ports for what a node listens on, so a second node on this machine can join."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--disable-usage-stats"]


def start_node(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`[VAR=value ...] ray start ...` in a process group of its own (the daemons it leaves
    behind keep it)."""
    variables, command = split_env(command)
    starter = subprocess.Popen([str(BIN / "ray"), *command[1:]], env={**env, **variables}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, _ = starter.communicate()
    if starter.returncode != 0:
        stop_group(starter.pid)
        pytest.fail(f"{' '.join(command)} failed:\n{out[-3000:]}")
    return starter.pid, out


def start_head(folder: Path) -> HeadNode:
    """The README's first steps on one machine: a token made by `ray get-auth-token
    --generate` (its home here is `folder`, so the user's ~/.ray is not touched), then
    `ray start --head`."""
    made = run([str(BIN / "ray"), *readme_argv("ray get-auth-token --generate")[1:]], {**os.environ, "HOME": str(folder)})
    token_file = folder / ".ray" / "auth_token"
    assert made.returncode == 0 and token_file.read_text().strip() in made.stdout, made.stderr[-2000:]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_TMPDIR": str(folder),
           "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    port, dashboard_port = free_port(), free_port()
    group, out = start_node(readme_argv("ray start --head") + [
        f"--port={port}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
        "--include-dashboard=true", f"--ray-client-server-port={free_port()}", *node_ports()], env)
    joined = re.search(r"ray start --address='([^']+)'", out)
    assert joined, out[-2000:]
    return HeadNode(folder=folder, env=env, gcs=joined.group(1), dashboard=f"http://127.0.0.1:{dashboard_port}",
                    group=group)


@contextlib.contextmanager
def second_node(head: HeadNode):
    """`RAY_AUTH_MODE=token ray start --address HEAD_IP:6379`, as on another machine (without
    the variable a joining node sends no token and the head refuses it), stopped afterwards.
    Only for the test that needs it: on one machine the two nodes share the session folder,
    and the second node's clean-up of a job's working directory removes the head's too."""
    group, _ = start_node(readme_argv("RAY_AUTH_MODE=token ray start --address HEAD_IP:6379",
                                      {"HEAD_IP:6379": head.gcs}) + ["--num-cpus=1", *node_ports()], head.env)
    try:
        yield
    finally:
        stop_group(group)


def stop_group(group: int) -> None:
    """SIGTERM the cluster's process group, then SIGKILL what is left (as `ray stop` does)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head():
    import ray

    from conftest import start_session_ray

    session_was_up = ray.is_initialized()
    if session_was_up:
        ray.shutdown()
    # short: Ray's socket paths live under it and must stay under 107 characters
    folder = Path(tempfile.mkdtemp(prefix="fer-rc-", dir="/tmp"))
    node = None
    try:
        node = start_head(folder)
        yield node
    finally:
        if node is not None:
            stop_group(node.group)
        shutil.rmtree(folder, ignore_errors=True)
        if session_was_up:
            start_session_ray()


def run(command: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_a_job_submitted_to_the_cluster_joins_it_by_host_and_port_and_finishes_the_search(head, tmp_path):
    """The README's job form: `RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m
    search.run --address HOST:PORT ...`; the search joins with the token and finishes. Then
    the dashboard, opened as the job's banner says, shows the trials' actors."""
    storage = head.folder / "runs"
    words = readme_argv(
        "RAY_AUTH_MODE=token ray job submit --address http://HEAD_IP:8265 --working-dir . --runtime-env-json "
        """'{"excludes": ["runs/", "experiments/", ".venv/", ".cache/", "*.egg-info/"]}' -- python -m """
        "search.run --address HEAD_IP:6379 --storage /shared/fer-search",
        {"http://HEAD_IP:8265": head.dashboard, "HEAD_IP:6379": head.gcs, "/shared/fer-search": str(storage)})
    variables, words = split_env(words)
    assert variables == {"RAY_AUTH_MODE": "token"} and words[0] == "ray"
    # the list: experiments, the virtual environment and caches are never uploaded
    assert {"runs/", ".venv/", ".cache/"} <= set(json.loads(words[words.index("--runtime-env-json") + 1])["excludes"])
    env = {**head.env, **variables}
    # a fifth of the demo data: the job's point is joining the cluster, and the embedded data
    # set made this the suite's slowest test
    done = run([str(BIN / "ray"), *words[1:], "--space", "smoke", "--smoke", "--num-samples", "1", "--confirm-top", "0",
                "--name", "job", "--export-dir", str(head.folder / "export"),
                "--data", fifth_of_the_demo_data(head.folder / "data")], env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log), log[-2000:]
    summary = json.loads((storage / "job" / "summary.json").read_text())
    assert summary["winner"]["trial_id"] and (head.folder / "export" / "model.onnx").is_file()
    if CHROMIUM is None:
        pytest.skip(f"the job ran; the dashboard check needs Chromium: {NO_CHROMIUM}")
    open_dashboard_as_the_banner_says(head, log, tmp_path)


def open_dashboard_as_the_banner_says(head: HeadNode, log: str, tmp_path: Path) -> None:
    """Headless Chromium follows the job's banner: its `Ray dashboard:` URL, the token that
    `ray get-auth-token` prints pasted into the dashboard's token form, then the Actors page,
    which lists each trial's actor as `pipeline_trial <trial name>` with the PID of the
    table's loc column."""
    banner = re.search(r"Ray dashboard: (\S+)  \(Actors page", log)
    assert banner and "`ray get-auth-token` prints it" in log, log[:4000]
    rows = set(re.findall(r"\| (trial_\w+) +\| \w+ +\| [\d.]+:(\d+) ", log))
    assert rows, log[-4000:]  # the live table named each trial and its process
    # each trial's actor: its repr names the trial, and its PID is the table's
    expected = [f"pipeline_trial {name}" for name, _ in rows] + [pid for _, pid in rows]
    token = run([str(BIN / "ray"), "get-auth-token"], head.env).stdout.strip()
    png = tmp_path / "ray-dashboard-actors.png"

    async def browse() -> str:
        async with DevToolsPage() as page:
            await page.goto(banner.group(1))
            await page.wait_for_text("Authentication Token Required")
            await page.type_into('input[placeholder="Enter your authentication token"]', token)
            await page.click_button("Submit")
            await page.wait_for_text("Authentication Token Required", absent=True)
            await page.goto(banner.group(1).rstrip("/") + "/#/actors")
            text = await page.wait_for_text(*expected)
            await page.screenshot(png)
            return text

    text = asyncio.run(browse())
    assert "Authentication Token Required" not in text and "Unauthorized" not in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_on_the_head_address_auto_joins_and_runs_two_workers_per_trial(head, tmp_path):
    """A second node joins as the README says; then the README's command on the head:
    `--address auto` finds the running cluster (in RAY_TMPDIR, as on a real head), sends
    the token, and the trial's two DDP workers run as RayTrainWorker actors."""
    argv = readme_argv("python -m search.run --address auto --storage /shared/fer-search --workers-per-trial 2",
                       {"/shared/fer-search": str(tmp_path / "runs")})
    with second_node(head):
        done = run([sys.executable, *argv[1:], "--space", "smoke", "--smoke", "--num-samples", "1",
                    "--confirm-top", "0", "--data", fifth_of_the_demo_data(tmp_path / "data")], head.env, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Ray dashboard: " in done.stdout and head.dashboard.split("//")[1] in done.stdout
    summary = json.loads((tmp_path / "runs" / "smoke-smoke" / "summary.json").read_text())
    assert summary["winner"]["trial_id"]
    # the state API is the dashboard's: like `ray job submit`, it sends the token only in token mode
    workers = run([str(BIN / "ray"), "list", "actors", "--filter", "class_name=RayTrainWorker", "--format", "json",
                   "--address", head.dashboard], {**head.env, "RAY_AUTH_MODE": "token"})
    assert len(json.loads(workers.stdout)) >= 2, workers.stdout[-2000:] + workers.stderr[-2000:]


def test_a_wrong_token_is_one_error_line_before_any_work(head, tmp_path):
    env = {**head.env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # RAY_AUTH_TOKEN wins over the token file
    done = run([sys.executable, "-m", "search.run", "--space", "smoke", "--smoke", "--address", head.gcs,
                "--storage", str(tmp_path / "runs")], env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --address {head.gcs}: could not join"), done.stderr
    assert "auth token was sent and the cluster refused it (wrong token)" in lines[0]
    assert "ray get-auth-token" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no work started


def test_a_dead_clusters_record_does_not_hold_up_the_default_path(head):
    """After the cluster dies uncleanly (SIGKILL), its address stays recorded in
    RAY_TMPDIR/ray/ray_current_cluster; search.run's own start-up (no --address) starts a
    cluster of its own instead of retrying the dead one."""
    record = head.folder / "ray" / "ray_current_cluster"
    assert record.read_text().strip() == head.gcs
    os.killpg(head.group, signal.SIGKILL)
    stop_group(head.group)  # waits until the group is gone
    assert record.is_file()  # the stale record stays behind
    script = ("import types, ray; from search.run import start_ray; "
              "start_ray(types.SimpleNamespace(address=None, dashboard_host='127.0.0.1')); "
              "print('own cluster', ray.get_runtime_context().gcs_address); ray.shutdown()")
    done = run([sys.executable, "-c", script], head.env)
    assert done.returncode == 0, done.stdout + done.stderr
    own = re.search(r"own cluster (\S+)", done.stdout)
    assert own and own.group(1) != head.gcs, done.stdout
