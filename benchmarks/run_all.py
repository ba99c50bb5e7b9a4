"""Every benchmark, one after the other, with one budget; one table at the end.

    python benchmarks/run_all.py                      # --budget small: ~30 min on 2 busy cores
    python benchmarks/run_all.py --budget full        # the real sizes (hours on 2 cores)
    python benchmarks/run_all.py --only data_decode,train_throughput
    python benchmarks/run_all.py --reuse search_efficiency   # read its saved JSON instead of rerunning

Each benchmark runs as its own process (a clean torch/Ray state each, as a user runs
them). The three older scripts print text, parsed here; the search benchmarks write
JSON (benchmarks/results/<name>_<budget>.json), read here. The Ray-using ones
(trial_overhead, search_efficiency, vs_optuna_loop) run first, while run_all holds
/tmp/ray.lock once for all three (run alone, the search scripts take it themselves).
Raw results: the JSON of each plus benchmarks/results/run_all_<budget>.json with every output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LOCK_HELD_ENV, RAY_LOCK, RESULTS_DIR, format_table, machine, ray_lock, save_json  # noqa: E402

HERE = Path(__file__).resolve().parent
NUMBER = r"([-+]?\d+(?:\.\d+)?)"

Row = list  # [benchmark, measure, value]


# --------------------------------------------------------------------------- text parsers


def parse_data_decode(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        m = re.match(rf"^(.+?):\s+{NUMBER} s", line)
        if m and not line.startswith("CSV"):
            out.append((re.sub(r" \(.*", "", m.group(1)).strip(), f"{float(m.group(2)):.3f} s"))
        m = re.search(rf"speed-up of the decoder over the naive parse: {NUMBER}x.*same pixels: (\w+)", line)
        if m:
            out.append(("decoder speed-up over naive parse", f"{m.group(1)}x (same pixels: {m.group(2)})"))
    return out


def parse_train_throughput(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        m = re.match(rf"^(bare loop|fer\.fit)\s*:\s*{NUMBER} images/s", line)
        if m:
            out.append((f"{m.group(1)} images/s", m.group(2)))
        m = re.match(rf"^ratio fit/bare: {NUMBER}", line)
        if m:
            out.append(("fit / bare loop", m.group(1)))
    return out


def parse_trial_overhead(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        m = re.search(rf"PyTorch loop {NUMBER} images/s; fer pipeline {NUMBER} s", line)
        if m:
            out.append(("bare pipeline (no Ray)", f"{m.group(2)} s, loop {m.group(1)} images/s"))
        m = re.match(rf"^(\d) workers?: fixed overhead per trial {NUMBER} s", line)
        if m:
            out.append((f"{m.group(1)} worker(s): fixed overhead per trial", f"{m.group(2)} s"))
        m = re.search(rf"throughput in trial {NUMBER} images/s = {NUMBER} x bare loop", line)
        if m:
            out.append(("  throughput in trial / bare loop", f"{m.group(2)} ({m.group(1)} images/s)"))
        m = re.search(rf"local mode .* takes {NUMBER} s", line)
        if m:
            out.append(("Ray Train local mode, empty fit", f"{m.group(1)} s"))
    return out


# --------------------------------------------------------------------------- JSON readers


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def rows_search_efficiency(payload: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for run in payload["runs"]:
        winner = run.get("winner") or {}
        reach = run.get("epochs_to_target")
        out.append((run["label"], f"{run['total_epochs']} epochs, {run['wall_s']:.0f} s, best val "
                    f"{_f(winner.get('best_val'))}, winner test {_f(winner.get('test_macro_f1'))}, "
                    f"{'not reached' if reach is None else reach} epochs to 98% of best"))
    return out


def rows_vs_optuna_loop(payload: dict[str, Any]) -> list[tuple[str, str]]:
    r = payload["ratios"]
    ray, loop = payload["ray"], payload["optuna_loop"]
    return [("wall time Ray / plain Optuna loop", f"{r['wall_ratio_ray_over_loop']:.2f}x "
             f"({ray['wall_s'] + ray['cluster_s']:.0f} s vs {loop['wall_s']:.0f} s)"),
            ("time per epoch Ray / loop", f"{r['per_epoch_ratio_ray_over_loop']:.2f}x "
             f"({ray['total_epochs']} vs {loop['total_epochs']} epochs)"),
            ("Ray cluster start + stop", f"{r['ray_cluster_start_stop_s']:.1f} s")]


def rows_imbalance(payload: dict[str, Any]) -> list[tuple[str, str]]:
    rare = payload["rarest"]
    out = []
    for label, r in payload["results"].items():
        per_class = ", ".join(f"{n} {r[f'test_f1_{n}']:.3f}" for n in rare)
        out.append((label, f"val {r['val_macro_f1']:.3f}, test {r['test_macro_f1']:.3f}; test F1 {per_class}"))
    return out


def rows_gpu_sharing(payload: dict[str, Any]) -> list[tuple[str, str]]:
    if payload.get("skipped"):
        return [("SKIPPED", f"no GPU ({payload.get('reason', '')})")]
    return [(f"share {r['share']:g} x {r['trials']} trials, AMP {'on' if r['amp'] else 'off'}",
             f"{_f(sum(r['per_trial_images_per_s']) / max(len(r['per_trial_images_per_s']), 1), 0)} images/s "
             f"per trial, {_f(r['total_images_per_s'], 0)} total") for r in payload["runs"]]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Bench:
    script: str
    args: dict[str, list[str]]  # per budget
    parse_text: Callable[[str], list[tuple[str, str]]] | None = None
    read_json: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None
    ray: bool = False  # starts a Ray cluster: runs while run_all holds /tmp/ray.lock


BENCHMARKS: dict[str, Bench] = {
    "data_decode": Bench("data_decode.py", {"small": ["--rows", "3000", "--repeat", "1"], "full": []},
                         parse_text=parse_data_decode),
    "train_throughput": Bench("train_throughput.py",
                              {"small": ["--n", "256", "--epochs", "2", "--repeats", "2", "--threads", "1"],
                               "full": []},
                              parse_text=parse_train_throughput),
    "trial_overhead": Bench("trial_overhead.py",
                            {"small": ["--n", "128", "--epochs", "1", "--image-size", "32"], "full": []},
                            parse_text=parse_trial_overhead, ray=True),
    "search_efficiency": Bench("search_efficiency.py", {}, read_json=rows_search_efficiency, ray=True),
    "vs_optuna_loop": Bench("vs_optuna_loop.py", {}, read_json=rows_vs_optuna_loop, ray=True),
    "imbalance": Bench("imbalance.py", {}, read_json=rows_imbalance),  # after search_efficiency: its winner
    "gpu_sharing": Bench("gpu_sharing.py", {}, read_json=rows_gpu_sharing),
}


def get_benchmark(name: str) -> Bench:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def json_path(name: str, budget: str) -> Path:
    return RESULTS_DIR / f"{name}_{budget}.json"


def command(name: str, budget: str) -> list[str]:
    bench = get_benchmark(name)
    cmd = [sys.executable, str(HERE / bench.script)]
    cmd += bench.args.get(budget, []) if bench.read_json is None else ["--budget", budget, "--json",
                                                                        str(json_path(name, budget))]
    return cmd


def rows_for(name: str, stdout: str, payload: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The table rows of one benchmark, from its JSON (search benchmarks) or its printed text."""
    bench = get_benchmark(name)
    if bench.read_json is not None:
        return bench.read_json(payload) if payload else []
    return bench.parse_text(stdout)


def build_table(results: list[dict[str, Any]]) -> str:
    """One table: benchmark, measure, value; a failed benchmark gets one FAILED row."""
    rows: list[Row] = []
    for r in results:
        label = f"{r['name']} ({r['seconds']:.0f} s)" if r.get("seconds") is not None else r["name"]
        if r["rc"] != 0:
            last = (r.get("output") or "").strip().splitlines()[-1:] or [""]
            rows.append([label, f"FAILED (exit {r['rc']})", last[0][:100]])
            continue
        if not r["rows"]:
            rows.append([label, "no numbers found in its output", "-"])
        for i, (measure, value) in enumerate(r["rows"]):
            rows.append([label if i == 0 else "", measure, value])
    return format_table(["benchmark", "measure", "value"], rows)


def run_one(name: str, budget: str, reuse: bool) -> dict[str, Any]:
    bench = get_benchmark(name)
    if reuse:
        if bench.read_json is None or not json_path(name, budget).is_file():
            raise SystemExit(f"--reuse {name}: no saved results at {json_path(name, budget)}")
        payload = json.loads(json_path(name, budget).read_text())
        return {"name": name, "rc": 0, "seconds": None, "reused": str(json_path(name, budget)),
                "output": "", "rows": rows_for(name, "", payload)}
    cmd = command(name, budget)
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    started = time.time()
    env = dict(os.environ, **({LOCK_HELD_ENV: RAY_LOCK} if bench.ray else {}))
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
    seconds = time.time() - started
    output = proc.stdout + (f"\n[stderr]\n{proc.stderr[-3000:]}" if proc.returncode else "")
    print(proc.stdout.rstrip(), flush=True)
    if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
    payload = None
    if bench.read_json is not None and proc.returncode == 0 and json_path(name, budget).is_file():
        payload = json.loads(json_path(name, budget).read_text())
    return {"name": name, "rc": proc.returncode, "seconds": seconds, "output": output,
            "rows": rows_for(name, proc.stdout, payload) if proc.returncode == 0 else []}


def split_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get_benchmark(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=("small", "full"), default="small")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated from {', '.join(BENCHMARKS)}")
    parser.add_argument("--reuse", default="", help="search benchmarks whose saved JSON to read instead of running")
    args = parser.parse_args(argv)
    try:
        names, reuse = split_names(args.only), set(split_names(args.reuse))
    except ValueError as err:
        parser.error(str(err))
    started = time.time()
    # The Ray benchmarks first, under one hold of the machine's Ray lock (the lock is
    # contended; queueing once instead of three times), then the rest, in registry order
    # (imbalance reads search_efficiency's winner).
    ray_names = [n for n in names if get_benchmark(n).ray and n not in reuse]
    results = {}
    if ray_names:
        with ray_lock():
            results.update({name: run_one(name, args.budget, False) for name in ray_names})
    results.update({name: run_one(name, args.budget, name in reuse) for name in names if name not in results})
    results = [results[name] for name in names]
    table = build_table(results)
    print(f"\n=== benchmarks, budget {args.budget}, {time.time() - started:.0f} s, {machine()['cpus']} cores, "
          f"load {machine()['load_avg_1_5_15']} ===\n{table}")
    path = save_json("run_all", args.budget, {"results": results, "table": table})
    print(f"raw results: {path}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
