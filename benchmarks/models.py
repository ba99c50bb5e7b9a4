"""Which model should be the default? Candidates side by side on the demo data, in one run.

Each candidate trains stage 1 alone (`fer.ssl.pipeline.run_pipeline` with student_epochs=0,
so the post-hoc offsets are fitted on val as in a trial) for the same number of epochs on
the embedded demo data at its native 48 px, with every other TrialConfig default. Reported:
val macro-F1 (post-hoc), test macro-F1 (raw argmax and with the offsets), wall time, and
training images/s with one torch thread (a trial's share of a 2-core machine).

    python benchmarks/models.py                               # the default candidates, 6 epochs (~15 min)
    python benchmarks/models.py --epochs 6 --candidates resnet10t mobilenet_v3_small/small
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import format_table, save_json  # noqa: E402
from quality import throughput  # noqa: E402

# NAME or NAME/STEM
CANDIDATES = ["mobilenet_v3_small", "mobilenet_v3_small/small", "resnet10t", "resnet18"]


def train_candidate(spec: str, epochs: int, threads: int) -> dict[str, Any]:
    import torch
    from sklearn.metrics import f1_score

    from fer.data import load_dataset
    from fer.ssl.pipeline import run_pipeline
    from fer.train.config import TrialConfig
    from fer.train.infer import predict_logits

    name, _, stem = spec.partition("/")
    torch.set_num_threads(threads)
    cfg = TrialConfig(model=name, stem=stem or "standard", epochs=epochs, student_epochs=0)
    data = load_dataset(None)
    start = time.time()
    result = run_pipeline(cfg, data, progress=False)
    seconds = time.time() - start
    test = data.splits["test"]
    logits = predict_logits(result.model, test.images, image_size=cfg.image_size, device="cpu").numpy()
    offsets = np.asarray(result.checkpoint["posthoc_offsets"])
    return {"val_macro_f1": result.metrics["val_macro_f1_posthoc"],
            "test_raw": float(f1_score(test.labels, logits.argmax(1), average="macro")),
            "test_posthoc": float(f1_score(test.labels, (logits + offsets).argmax(1), average="macro")),
            "seconds": seconds, "curve": [round(h["val_macro_f1"], 4) for h in result.history],
            "images_per_s_1_thread": throughput(name, cfg.image_size, stem or "standard")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES, metavar="NAME[/STEM]")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="torch threads while training (default: 2)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results, rows = {}, []
    header = ["model", "val F1", "test F1 raw", "test F1 post-hoc", "train s", "img/s (1 thread)"]
    for spec in args.candidates:
        r = results[spec] = train_candidate(spec, args.epochs, args.threads)
        rows.append([spec, r["val_macro_f1"], r["test_raw"], r["test_posthoc"], round(r["seconds"]),
                     round(r["images_per_s_1_thread"])])
        print(format_table(header, rows[-1:]), flush=True)
    print(f"\n=== {args.epochs} teacher epochs on the demo data, 48 px, {args.threads} threads ===")
    print(format_table(header, rows))
    path = save_json("models", f"{args.epochs}ep", {"results": results, "epochs": args.epochs}, args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
