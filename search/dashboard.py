"""optuna-dashboard next to a search: `python -m search.run ... --dashboard`.

The study lives in `<experiment>/optuna.db` and Optuna's RDB storage commits every
`ask`, every intermediate value and every `tell` as it happens, so the dashboard shows
trials, per-epoch curves, parallel coordinates and importances while the search runs.
It is a separate process (optuna-dashboard's own CLI) bound to 127.0.0.1; a dashboard that
cannot start is one warning line and the search runs without it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_PORT = 8080  # optuna-dashboard's own default
HOST = "127.0.0.1"  # this machine only: the dashboard has no authentication
READY_TRIES = 120  # x READY_WAIT_S: optuna-dashboard took 4-5 s to answer on a busy 2-core machine
READY_WAIT_S = 0.25
LOG_FILE = "optuna-dashboard.log"  # next to the study: the server's own messages


@dataclass
class Dashboard:
    """A running optuna-dashboard: its process, its URL and where its messages go."""

    process: subprocess.Popen
    url: str
    log: Path
    made_for: Path | None = None  # the study path, when start_dashboard created its folder


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server binds (http.server's allow_reuse_address): a port that only holds
        # closed connections (TIME_WAIT, for a minute after a server stops) is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(preferred: int = DEFAULT_PORT, host: str = HOST) -> tuple[int, str | None]:
    """`preferred` when free, else one the OS hands out; the second value says so, or is None."""
    if port_is_free(preferred, host):
        return preferred, None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return port, f"port {preferred} is taken; using {port}"


def dashboard_command(storage_url: str, host: str, port: int) -> list[str]:
    """optuna-dashboard's CLI from this interpreter's environment (the venv's script)."""
    script = Path(sys.executable).parent / "optuna-dashboard"
    found = str(script) if script.exists() else shutil.which("optuna-dashboard")
    if found is None:
        raise FileNotFoundError("optuna-dashboard is not installed (pip install optuna-dashboard)")
    return [found, storage_url, "--host", host, "--port", str(port), "--quiet"]


def wait_until_ready(process: subprocess.Popen, url: str, tries: int = READY_TRIES) -> bool:
    """Poll `url` until it answers, the process exits, or `tries` polls have failed."""
    for _ in range(tries):
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(READY_WAIT_S)
    return False


def start_dashboard(study_path: Path, port: int = DEFAULT_PORT, host: str = HOST) -> Dashboard | None:
    """Serve the study at `study_path` on `host`; prints its URL, or one warning line and None."""
    study_path = Path(study_path)
    url_of_storage = f"sqlite:///{study_path}"
    log = study_path.parent / LOG_FILE
    made_for = None if study_path.parent.exists() else study_path
    try:
        import optuna

        study_path.parent.mkdir(parents=True, exist_ok=True)
        # Create the schema here, once: the search and the dashboard creating it at the
        # same moment race on SQLite ("table ... already exists").
        optuna.storages.RDBStorage(url_of_storage)
        port, note = choose_port(port, host)
        if note:
            print(note)
        with open(log, "ab") as out:
            process = subprocess.Popen(dashboard_command(url_of_storage, host, port), stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except Exception as err:  # noqa: BLE001 - a view must never stop the search
        print(f"warning: optuna-dashboard did not start ({type(err).__name__}: {err}); the search runs without it",
              file=sys.stderr)
        remove_if_only_ours(made_for)
        return None
    dashboard = Dashboard(process, f"http://{host}:{port}/dashboard", log, made_for)
    if not wait_until_ready(process, dashboard.url):
        stop_dashboard(replace(dashboard, made_for=None))  # stopped first: it may still be writing its log
        why = last_line(log)
        remove_if_only_ours(made_for)
        print(f"warning: optuna-dashboard did not answer on {dashboard.url} ({why}); the search runs without it",
              file=sys.stderr)
        return None
    print(f"Optuna dashboard: {dashboard.url}  (trials, per-epoch values, parallel coordinates, importances; "
          "live, stopped when the search ends)")
    return dashboard


def stop_dashboard(dashboard: Dashboard | None, timeout_s: float = 10.0) -> None:
    """Terminate the server and wait for it (kill when it will not go); None is a no-op."""
    if dashboard is None:
        return
    if dashboard.process.poll() is None:
        dashboard.process.terminate()
        try:
            dashboard.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            dashboard.process.kill()
            dashboard.process.wait()
    remove_if_only_ours(dashboard.made_for)


def remove_if_only_ours(study_path: Path | None) -> None:
    """Remove the folder start_dashboard created for `study_path` when the search wrote nothing
    into it (it failed before starting): a leftover would make the next run ask for --resume."""
    if study_path is None or not study_path.parent.is_dir():
        return
    ours = {study_path.name, f"{study_path.name}-journal", LOG_FILE}
    if {p.name for p in study_path.parent.iterdir()} <= ours:
        shutil.rmtree(study_path.parent, ignore_errors=True)


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip()[:200] if lines else "no output"
