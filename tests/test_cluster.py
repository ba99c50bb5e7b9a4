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

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and `python` for the job's entrypoint
# What `ray job submit --working-dir .` must not upload (README, "On a cluster"). .gitignore
# already keeps most of it out; the list says it for a checkout without one.
EXCLUDES = ["runs/", "experiments/", ".venv/", ".cache/", "*.egg-info/", ".pytest_cache/"]


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
    group: int  # the process group of every process of the cluster


def start_head(folder: Path) -> HeadNode:
    token_file = folder / "auth_token"
    token_file.write_text(secrets.token_hex(16))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_TMPDIR": str(folder),
           "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    port, dashboard_port = free_port(), free_port()
    command = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard_port}",
               "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}"]
    # start_new_session: the daemons ray start leaves behind keep this process group
    starter = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    out, _ = starter.communicate()
    if starter.returncode != 0:
        stop_group(starter.pid)
        pytest.fail(f"ray start failed:\n{out[-3000:]}")
    joined = re.search(r"ray start --address='([^']+)'", out)
    assert joined, out[-2000:]
    return HeadNode(folder=folder, env=env, gcs=joined.group(1), dashboard=f"http://127.0.0.1:{dashboard_port}",
                    group=starter.pid)


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


def test_a_job_submitted_to_the_cluster_joins_it_by_host_and_port_and_finishes_the_search(head):
    """The README's job form: `RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m
    search.run --address HOST:PORT ...`; the search joins with the token and finishes."""
    storage = head.folder / "runs"
    env = {**head.env, "RAY_AUTH_MODE": "token"}
    done = run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".",
                "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
                "python", "-m", "search.run", "--space", "smoke", "--smoke", "--confirm-top", "0",
                "--address", head.gcs, "--storage", str(storage), "--name", "job",
                "--export-dir", str(head.folder / "export")], env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log), log[-2000:]
    summary = json.loads((storage / "job" / "summary.json").read_text())
    assert summary["winner"]["trial_id"] and (head.folder / "export" / "model.onnx").is_file()


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
