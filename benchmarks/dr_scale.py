"""The DR workload at its real size: decode cost, memory and epoch speed against N.

    python benchmarks/dr_scale.py                          # quick: N = 200
    python benchmarks/dr_scale.py --sizes 1000,4000        # DDR is 12,522 (--sizes 12522)
    python benchmarks/dr_scale.py --sizes 1000 --sides 1024,1024 --epoch-images 512

For each N, a seeded fundus-like DR folder (fer.data.fundus_synth: DDR's grade mix and splits,
JPEGs --sides px wide, 4:3 to 3:2, black border) is generated once, then, each in a fresh
subprocess so its peak memory is its own (VmHWM, and the peak of RssAnon sampled every 20 ms:
RSS also counts the page-cache pages of a memory map the process has touched, which are
shared between processes and dropped under pressure; RssAnon is what the process alone holds):
  decode  load_dataset with an empty cache at --load-size (retina crop): wall time, images/s,
          images/s per core (decode threads = cores), the cache's size on disk
  epoch   open the cache (load_dataset, a cache hit) and train one epoch of fer.train.fitting.fit
          (TrainSource + the fundus augmentation + mobilenet_v3_small at --epoch-size, 224 px) over
          the train split
  epoch_plain  the same without augmentation or gradient clipping: what fit itself adds
  bare    the same epoch as a plain PyTorch loop over the same memory-mapped train split: a
          shuffled batch gathered from the map, resized to --epoch-size, one AdamW step, no augmentation;
          model and batch in channels_last, the faster format on CPU at 224 px and up (the cache is
          NHWC, so a batch gathered from it is channels_last already)
  search  `python -m search.run` on the folder (spaces/dr.yaml cut to one short CPU trial, the
          cache a hit): the peak private memory of the driver and of the largest process it
          starts (the trial's), sampled every 100 ms from /proc
Raw results go to benchmarks/results/dr_scale_<sizes>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, format_table, save_json  # noqa: E402

MODEL = "mobilenet_v3_small"
EPOCH_SIZE = 224
BATCH = 32


# --------------------------------------------------------------------------- one measurement, in a subprocess

def status_fields(path: Path) -> dict[str, str]:
    """A /proc/<pid>/status file as {field: value}."""
    return dict((key, value.strip()) for key, _, value in
                (line.partition(":") for line in path.read_text().splitlines()))


def memory_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in KiB (Linux /proc)."""
    fields = status_fields(Path("/proc/self/status"))
    return {key: int(fields[key].split()[0]) for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


class AnonPeak:
    """The highest RssAnon seen, sampled every 20 ms on a thread."""

    def __init__(self) -> None:
        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, memory_status()["RssAnon"])
            time.sleep(0.02)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, memory_status()["RssAnon"])


def measure_decode(folder: str, cache: str, load_size: int) -> dict[str, Any]:
    from fer.data import load_dataset
    from fer.data.layouts import decode_threads

    peak = AnonPeak()
    started = time.perf_counter()
    data = load_dataset(folder, load_size=load_size, cache_dir=cache)
    seconds = time.perf_counter() - started
    n = sum(len(s) for s in data.splits.values())
    entry = Path(data.origin.entry)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "threads": decode_threads(),
            "images_per_s_per_core": n / seconds / decode_threads(),
            "cache_bytes": sum(p.stat().st_size for p in entry.iterdir()),
            "peak_rss_anon_kib": peak.close(), **memory_status()}


def train_config(images: int, plain: bool = False, size: int = EPOCH_SIZE) -> Any:
    """The epoch's recipe: spaces/dr.yaml's fundus augmentation and fer.train's gradient clipping,
    or (`plain`) neither, the bare loop's work plus what fit adds around it."""
    from fer.train.config import TrialConfig

    return TrialConfig(model=MODEL, image_size=size, batch_size=BATCH, epochs=1, warmup_epochs=0,
                       epoch_images=0, augment="none" if plain else "fundus", grad_clip=0.0 if plain else 5.0,
                       class_cap=0, student_epochs=0, seed=0, patience=0, posthoc="none")


def measure_epoch_plain(folder: str, cache: str, load_size: int, limit: int,
                        size: int = EPOCH_SIZE) -> dict[str, Any]:
    """`measure_epoch` without augmentation or gradient clipping: fit's own overhead."""
    return measure_epoch(folder, cache, load_size, limit, size, plain=True)


def measure_epoch(folder: str, cache: str, load_size: int, limit: int, size: int = EPOCH_SIZE,
                  plain: bool = False) -> dict[str, Any]:
    """One epoch of fer.train.fitting.fit over (the first `limit` of) the mapped train split."""
    import numpy as np
    import torch

    from fer.data import Split, load_dataset
    from fer.train.fitting import Stage, fit

    torch.set_num_threads(os.cpu_count() or 1)
    peak = AnonPeak()
    data = load_dataset(folder, load_size=load_size, cache_dir=cache)
    train = data.splits["train"]
    rows = min(limit or len(train), len(train))
    counts = np.bincount(train.labels[:rows], minlength=data.num_classes)
    cfg = train_config(rows, plain, size)
    val = Split(data.splits["val"].images[:64], data.splits["val"].labels[:64])
    stage = Stage.of(cfg, "teacher", train.images[:rows], train.labels[:rows], counts)
    result = fit(cfg, stage, val, data.classes, device=torch.device("cpu"), progress=False)
    epoch = result.history[-1]
    return {"images": rows, "images_per_s": float(epoch["train_images_per_s"]),
            "seconds": rows / float(epoch["train_images_per_s"]),
            "mapped": isinstance(train.images, np.memmap), "peak_rss_anon_kib": peak.close(), **memory_status()}


def measure_bare(folder: str, cache: str, load_size: int, limit: int, size: int = EPOCH_SIZE) -> dict[str, Any]:
    """The same epoch as a plain loop: gather a shuffled batch from the map, resize, step."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fer.data import load_dataset
    from fer.train.models import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    peak = AnonPeak()
    data = load_dataset(folder, load_size=load_size, cache_dir=cache)
    train = data.splits["train"]
    rows = min(limit or len(train), len(train))
    model = build_model(MODEL, num_classes=data.num_classes, in_channels=3, image_size=size)
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = np.random.default_rng(0).permutation(rows)
    labels = torch.from_numpy(np.asarray(train.labels))
    model.train()
    started = time.perf_counter()
    for start in range(0, rows, BATCH):
        index = np.sort(order[start:start + BATCH])
        x = torch.from_numpy(train.images[index]).permute(0, 3, 1, 2).float().div_(255)
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return {"images": rows, "images_per_s": rows / seconds, "seconds": seconds,
            "peak_rss_anon_kib": peak.close(), **memory_status()}


def search_space(work: Path, load_size: int) -> Path:
    """spaces/dr.yaml as shipped (metric, remedies, load options, fundus augmentation) cut to one
    CPU trial of one short epoch: mobilenet_v3_small at 224 px from scratch, at most 64 images a
    grade per epoch (class_cap), whatever N is, so the trial's memory, not its training, is measured."""
    import yaml

    from search.space import SPACES_DIR

    space = yaml.safe_load((SPACES_DIR / "dr.yaml").read_text())
    space["fixed"].update({"model": MODEL, "pretrained": None, "load_size": load_size, "epochs": 1, "class_cap": 64,
                           "batch_size": BATCH})
    space["parameters"]["image_size"] = {"choice": [EPOCH_SIZE]}
    space["searcher"]["baseline"]["image_size"] = EPOCH_SIZE
    space["scheduler"]["grace_period"] = 1
    path = work / "dr_scale_space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, RssAnon KiB, command line) of every process readable in /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = status_fields(entry / "status")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended meanwhile
            continue
        anon = int(fields.get("RssAnon", "0 kB").split()[0])  # kernel threads have none
        table[int(entry.name)] = (int(fields["PPid"]), anon, command)
    return table


def descendants(root: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (parent, _, _) in table.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def measure_search(folder: str, cache: str, load_size: int, work: str) -> dict[str, Any]:
    """`python -m search.run --space <the cut dr space>` on the folder, one trial, its cache
    already built (a hit): the peak private memory (RssAnon, sampled every 100 ms from /proc)
    of the driver and of every process it starts (Ray's workers, the trial's among them)."""
    storage = Path(work) / f"runs-{Path(folder).name}"
    shutil.rmtree(storage, ignore_errors=True)
    argv = [sys.executable, "-m", "search.run", "--space", str(search_space(Path(work), load_size)), "--data", folder,
            "--num-samples", "1", "--confirm-top", "0", "--max-concurrent", "1", "--storage", str(storage),
            "--name", "dr"]
    started = time.perf_counter()
    with open(Path(work) / f"search-{Path(folder).name}.log", "w") as log:
        driver = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "FER_CACHE_DIR": cache})
        peaks: dict[int, tuple[int, str]] = {}
        while driver.poll() is None:
            table = process_table()
            for pid in descendants(driver.pid, table):
                _, anon, command = table[pid]
                if anon >= peaks.get(pid, (0, ""))[0]:
                    peaks[pid] = (anon, command[:120])
            time.sleep(0.1)
    seconds = time.perf_counter() - started
    if driver.returncode != 0:
        raise RuntimeError(f"search on {folder} failed: see {log.name}")
    summary = json.loads((storage / "dr" / "summary.json").read_text())
    others = sorted(((anon, command) for pid, (anon, command) in peaks.items() if pid != driver.pid), reverse=True)
    return {"seconds": seconds, "driver_peak_rss_anon_kib": peaks.get(driver.pid, (0, ""))[0],
            "largest_peak_rss_anon_kib": others[0][0] if others else 0,
            "largest": others[0][1] if others else "", "top5": [[a, c] for a, c in others[:5]],
            "processes": len(peaks), "winner_val": summary["winner"]["val"]}


MEASURES = {"decode": measure_decode, "epoch": measure_epoch, "epoch_plain": measure_epoch_plain, "bare": measure_bare,
            "search": measure_search}


def run_child(kind: str, folder: Path, cache: Path, load_size: int, limit: int,
              size: int = EPOCH_SIZE) -> dict[str, Any]:
    """One measurement in a fresh interpreter (its own peak memory); its JSON on the last line."""
    extra = {"decode": [], "search": [str(folder.parent)]}.get(kind, [limit, size])
    args = [str(folder), str(cache), load_size] + extra
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            f"from benchmarks.dr_scale import MEASURES; "
            f"print(json.dumps(MEASURES[{kind!r}](*{args!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} at {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver

def measure_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from fer.data.fundus_synth import write_fundus_folder

    folder = work / f"fundus-{n}-seed{args.seed}-{args.sides[0]}-{args.sides[1]}px"
    started = time.perf_counter()
    if not (folder / "test.txt").is_file():  # written last: a complete folder from an earlier run
        write_fundus_folder(folder, n, seed=args.seed, sides=tuple(args.sides))
    generated = time.perf_counter() - started
    cache = work / f"cache-{n}"
    shutil.rmtree(cache, ignore_errors=True)  # the decode measure starts from an empty cache
    row: dict[str, Any] = {"n": n, "generate_seconds": generated, "epoch_size": args.epoch_size,
                           "source_bytes": sum(p.stat().st_size for p in folder.rglob("*.jpg"))}
    for kind in ["decode"] + [m for m in ("epoch", "epoch_plain", "bare", "search") if m in args.measures]:
        row[kind] = run_child(kind, folder, cache, args.load_size, args.epoch_images, args.epoch_size)
        print(f"N={n} {kind}: {json.dumps(row[kind])}", flush=True)
    for kind in ("epoch", "epoch_plain"):
        if kind in row and "bare" in row:
            row[f"{kind}_vs_bare"] = row[kind]["images_per_s"] / row["bare"]["images_per_s"]
    shutil.rmtree(cache, ignore_errors=True)
    return row


def report(rows: list[dict[str, Any]]) -> str:
    mib = lambda kib: kib / 1024  # noqa: E731
    missing = {"images": None, "images_per_s": None, "VmHWM": 0, "peak_rss_anon_kib": 0}
    no_search = {"driver_peak_rss_anon_kib": 0, "largest_peak_rss_anon_kib": 0}
    rows = [{"epoch": missing, "bare": missing, "epoch_vs_bare": None, "epoch_plain_vs_bare": None, "search": no_search,
             "epoch_size": EPOCH_SIZE, **r} for r in rows]
    header = ["N", "decode s", "img/s", "img/s/core", "cache MiB", "decode HWM MiB", "decode anon MiB",
              "epoch imgs", "epoch px", "epoch img/s", "bare img/s", "epoch/bare", "plain/bare", "epoch HWM MiB",
              "epoch anon MiB", "bare anon MiB", "search driver anon MiB", "search trial anon MiB"]
    table = [[r["n"], r["decode"]["seconds"], r["decode"]["images_per_s"], r["decode"]["images_per_s_per_core"],
              r["decode"]["cache_bytes"] / 2**20, mib(r["decode"]["VmHWM"]), mib(r["decode"]["peak_rss_anon_kib"]),
              r["epoch"]["images"], r["epoch_size"], r["epoch"]["images_per_s"], r["bare"]["images_per_s"],
              r["epoch_vs_bare"], r["epoch_plain_vs_bare"],
              mib(r["epoch"]["VmHWM"]) or None, mib(r["epoch"]["peak_rss_anon_kib"]) or None,
              mib(r["bare"]["peak_rss_anon_kib"]) or None, mib(r["search"]["driver_peak_rss_anon_kib"]) or None,
              mib(r["search"]["largest_peak_rss_anon_kib"]) or None]
             for r in rows]
    return format_table(header, table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200", help="comma-separated N (DDR: 12522); default 200, a quick run")
    parser.add_argument("--sides", default="1024,2048", help="min,max width of the generated JPEGs, px")
    parser.add_argument("--load-size", type=int, default=512, help="side of the cached images (spaces/dr.yaml: 512)")
    parser.add_argument("--epoch-size", type=int, default=EPOCH_SIZE,
                        help="the side the epoch measures train at (224; 384 for the issue's second size)")
    parser.add_argument("--epoch-images", type=int, default=0,
                        help="train on at most this many images in the epoch measures (0: the whole train split)")
    parser.add_argument("--measures", default="decode,epoch,bare",
                        help="which to run: decode always (it builds the cache), epoch, epoch_plain, bare and "
                             "search (a one-trial search.run on spaces/dr.yaml cut to one short CPU epoch) when listed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None,
                        help="keep the generated folders here and reuse them in later runs (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/dr_scale_<sizes>.json")
    args = parser.parse_args(argv)
    args.sides = [int(v) for v in args.sides.split(",")]
    args.measures = args.measures.split(",")
    sizes = [int(v) for v in args.sizes.split(",")]
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="dr-scale-")))
        rows = [measure_size(n, args, work) for n in sizes]
    print(report(rows))
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "work")}
    path = save_json("dr_scale", "_".join(map(str, sizes)), {"settings": settings, "rows": rows}, args.json)
    print(f"raw results: {path.relative_to(RESULTS_DIR.parent.parent) if path.is_relative_to(RESULTS_DIR) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
