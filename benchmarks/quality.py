"""Do the models this tool hands out beat a linear model on raw pixels? One run, side by side.

For the demo data at full size (the embedded data set) and at 1/8 scale (a few hundred
training images, the same generator), test macro-F1 of:

  (a) scikit-learn LogisticRegression(class_weight="balanced") on raw pixels / 255;
  (b) `python -m fer.train` with every default (as a user types it);
  (c) the Quickstart search's winner: `python -m search.run --space imbalance.yaml`
      (its summary.json: after the search's confirmation stage, the winner and the plain
      baseline each read test once, with the paired interval of their difference).

Targets (issue "Models that learn"): (b) >= (a) + 0.10 at both sizes, (c) >= 0.65 at
full size. Also the training images/s of the default model against MobileNetV3-small at
the same input size, measured in this process, one torch thread each (a trial's share).

    python benchmarks/quality.py                          # (a) and (b) at both sizes
    python benchmarks/quality.py --search full            # plus (c) at full size (~15 min more)
    python benchmarks/quality.py --scales 0.125 --search none
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import format_table, ray_lock, save_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL, EIGHTH = 1.0, 0.125
TARGET_OVER_LINEAR, TARGET_SEARCH = 0.10, 0.65


def write_data(scale: float, folder: Path) -> str | None:
    """None (the embedded data, as the Quickstart uses it) at full size, else a FER2013 CSV."""
    from fer import synth
    from fer.data import EMBEDDED_SEED

    return None if scale == FULL else synth.write_csv(str(folder), seed=EMBEDDED_SEED, scale=scale)


def linear_baseline(data_path: str | None) -> dict[str, Any]:
    """(a): multinomial logistic regression on the flattened pixels, classes balanced."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from fer.data import load_dataset

    data = load_dataset(data_path)
    train, test = data.splits["train"], data.splits["test"]
    flat = lambda images: images.reshape(len(images), -1).astype(np.float32) / 255.0  # noqa: E731
    start = time.time()
    clf = LogisticRegression(class_weight="balanced", max_iter=1000).fit(flat(train.images), train.labels)
    f1 = f1_score(test.labels, clf.predict(flat(test.images)), average="macro")
    return {"test_macro_f1": float(f1), "seconds": time.time() - start, "train_images": len(train.labels)}


def _run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return time.time() - start


def default_train(data_path: str | None, out: Path) -> dict[str, Any]:
    """(b): `python -m fer.train --out OUT [--data CSV]` with every default."""
    cmd = [sys.executable, "-m", "fer.train", "--out", str(out), "--no-progress"]
    seconds = _run(cmd + (["--data", data_path] if data_path else []), out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"test_macro_f1": metrics["test"]["macro_f1"], "val_macro_f1": metrics["pipeline"]["val_macro_f1_posthoc"],
            "final_stage": metrics["final_stage"], "seconds": seconds, "model": metrics["config"]["model"],
            "test_without_offsets": metrics.get("test_without_offsets_macro_f1")}


def quickstart_search(data_path: str | None, storage: Path) -> dict[str, Any]:
    """(c): the Quickstart search, as the README runs it, in its own experiment folder."""
    cmd = [sys.executable, "-m", "search.run", "--space", "imbalance.yaml", "--storage", str(storage),
           "--name", "quality"]
    storage.mkdir(parents=True, exist_ok=True)
    with ray_lock():
        seconds = _run(cmd + (["--data", data_path] if data_path else []), storage / "search.log")
    summary = json.loads((storage / "quality" / "summary.json").read_text())
    test, confirmation = summary["test"], summary.get("confirmation") or {}
    return {"test_macro_f1": test["winner"]["macro_f1"], "test_ci95": test["winner"]["macro_f1_ci95"],
            "val_macro_f1": summary["winner"]["val"], "params": summary["winner"]["params"],
            "baseline_test_macro_f1": (test.get("baseline") or {}).get("macro_f1"),
            "difference": test.get("difference"), "confirmation": confirmation, "seconds": seconds}


def throughput(model: str, image_size: int, stem: str, seconds: float = 4.0, batch: int = 128) -> float:
    """Training images/s of one model, one thread, random 1-channel input, AdamW."""
    import torch

    from fer.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_model(model, 7, in_channels=1, image_size=image_size, stem=stem).train()
    optimizer = torch.optim.AdamW(net.parameters(), fused=True)
    x, y = torch.randn(batch, 1, image_size, image_size), torch.randint(0, 7, (batch,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

    step(), step()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        images += batch
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[FULL, EIGHTH])
    parser.add_argument("--search", choices=["none", "full", "all"], default="none",
                        help="run the Quickstart search (c) at full size, at every scale, or not")
    parser.add_argument("--json", default=None, help="where the raw results go")
    args = parser.parse_args(argv)

    from fer.config import TrialConfig

    cfg = TrialConfig()
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="fer-quality-") as tmp:
        os.environ.setdefault("FER_CACHE_DIR", str(Path(tmp) / "cache"))
        for scale in args.scales:
            folder = Path(tmp) / f"scale-{scale}"
            folder.mkdir()
            data_path = write_data(scale, folder)
            result = {"linear": linear_baseline(data_path)}
            print(f"scale {scale}: (a) {result['linear']}", flush=True)
            result["default"] = default_train(data_path, folder / "train")
            print(f"scale {scale}: (b) {result['default']}", flush=True)
            if args.search == "all" or (args.search == "full" and scale == FULL):
                result["search"] = quickstart_search(data_path, folder / "runs")
            results[str(scale)] = result
            a, b = result["linear"]["test_macro_f1"], result["default"]["test_macro_f1"]
            c = result.get("search", {}).get("test_macro_f1")
            rows.append([scale, result["linear"]["train_images"], a, b, b - a, c, None if c is None else c - a,
                         round(result["default"]["seconds"]), result.get("search", {}).get("seconds")])
            print(format_table(["scale", "train", "(a) linear", "(b) fer.train", "b-a", "(c) search", "c-a",
                                "(b) s", "(c) s"], rows[-1:]), flush=True)
    speed = {name: throughput(name, cfg.image_size, stem) for name, stem in
             ((cfg.model, cfg.stem), ("mobilenet_v3_small", "standard"))}
    print("\n=== test macro-F1: linear model (a), fer.train defaults (b), Quickstart search winner (c) ===")
    print(format_table(["scale", "train", "(a) linear", "(b) fer.train", "b-a", "(c) search", "c-a",
                        "(b) s", "(c) s"], rows))
    for scale, result in results.items():
        margin = result["default"]["test_macro_f1"] - result["linear"]["test_macro_f1"]
        verdict = "met" if margin >= TARGET_OVER_LINEAR else f"MISSED by {TARGET_OVER_LINEAR - margin:.3f}"
        print(f"scale {scale}: (b) - (a) = {margin:+.3f} (target >= +{TARGET_OVER_LINEAR}): {verdict}")
        if "search" in result and float(scale) == FULL:
            c = result["search"]["test_macro_f1"]
            verdict = "met" if c >= TARGET_SEARCH else f"MISSED by {TARGET_SEARCH - c:.3f}"
            print(f"scale {scale}: (c) = {c:.3f} (target >= {TARGET_SEARCH}): {verdict}")
    default_name = f"{cfg.model} (stem {cfg.stem})"
    print(f"\ntraining images/s at {cfg.image_size} px, 1 thread: {default_name} {speed[cfg.model]:.0f}, "
          f"mobilenet_v3_small {speed['mobilenet_v3_small']:.0f} "
          f"(ratio {speed[cfg.model] / speed['mobilenet_v3_small']:.2f})")
    path = save_json("quality", "default", {"results": results, "images_per_s": speed,
                                            "default_model": default_name, "image_size": cfg.image_size},
                     args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
