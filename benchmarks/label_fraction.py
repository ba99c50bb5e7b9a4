"""Semi-supervised where it matters: few labels and a large pool. What share of the oracle's
gain does the pipeline capture?

A training split is cut into a labelled fraction (stratified, at least two images a class) and
a pool: the rest of the split, its labels withheld from training and kept as held-out truth.
From one teacher (`fer.ssl.pipeline.run_pipeline` with the configuration's defaults and `--set`),
on the same budget:

  control   the supervised-only control: stage 2's recipe on the labelled split alone
            (the pipeline's own `pool_control`);
  pipeline  stage 2 as the defaults run it (the model trained with the pool);
  oracle    the same stage 2, steps and views, with the pool's TRUE labels on every pool view
            (`fer.train.consistency.Consistency(oracle=True)`): the most the pool could buy;
  final     what `fer.train` hands out (its best stage on val);
  peers     LogisticRegression, LabelSpreading and SelfTrainingClassifier (benchmarks/peers.py).

Every network is scored with its own post-hoc offsets fitted on val; test is read once per
model, after every choice was made on val. Reported: test macro-F1 and balanced accuracy,
pipeline - control and oracle - control with their paired 95% bootstrap intervals on test (and
val), and r = (pipeline - control) / (oracle - control), the share of the oracle's gain the
pipeline captures ("performance gap recovered", Burns et al. 2023). Also each stage's wall
time and the per-class precision of the teacher's and the student's labels on the pool.

Sets (`--sets`): `demo`, the demo faces' generator with its labelled and unlabelled training
splits pooled (6,028 faces in FER2013's class mix, 16:1 Happy : Disgust) and val and test at
700 each; `digits`, scikit-learn's bundled handwritten digits 0-6 (nothing downloaded) at
48x48 with a long-tailed training split (10:1, benchmarks/peers.py's classes) and balanced val
(20 a class) and test (30 a class). `--pool prior` keeps the rest of the training split as the
pool (the labelled class mix); `--pool balanced` draws a pool with every class equally often
(the demo generator renders it; digits takes an equal number of the images left of each
class), as USB's mismatched long-tailed tables do.

    python benchmarks/label_fraction.py                                  # the issue's grid
    python benchmarks/label_fraction.py --sets demo --fractions 1/8 --seeds 0
    python benchmarks/label_fraction.py --sets demo --fractions 1/8 --pool balanced
    python benchmarks/label_fraction.py --sets digits --fractions 1/8 --variant ratio3:pool_ratio=3
    python benchmarks/label_fraction.py --report benchmarks/results/label_fraction_*.json   # one table
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import format_table, save_json  # noqa: E402
from peers import classical_peers  # noqa: E402

SETS = ("demo", "digits")
POOLS = ("prior", "balanced")
DEFAULT_FRACTIONS = ("1/16", "1/8", "1/4")
DIGITS_RATIO = 10.0  # largest : smallest class of the digits training split
DIGITS_VAL, DIGITS_TEST = 20, 30
TARGET_R = 0.5  # the floor at 1/8 (aim: 0.7)


def labelled_counts(totals: np.ndarray, fraction: float) -> np.ndarray:
    """Labelled images per class: `fraction` of each class's training images, at least two (a
    class known from one image is no semi-supervised setting, and the peers' calibration folds
    need two)."""
    return np.clip(np.rint(totals * fraction).astype(np.int64), 2, np.maximum(totals - 1, 2))


def cut(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(labelled indices, the rest) of `labels`, counts[k] of class k labelled, at random."""
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:n] for k, n in enumerate(counts)])
    chosen = rng.permutation(chosen)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return chosen, rng.permutation(rest)


def demo_set(fraction: float, pool: str, seed: int = 0) -> Any:
    """The demo faces: train + unlabeled of the embedded generator as one training split."""
    from fer.data import synth
    from fer.data.types import FER_CLASSES, Dataset, Split

    arrays = synth.generate_arrays(seed, scale=1.0, eval_scale=1.0)
    labels = np.concatenate([arrays["train"][0], arrays["unlabeled"][0]])
    images = np.concatenate([arrays["train"][1], arrays["unlabeled"][1]])[..., None]
    rng = np.random.default_rng((seed, 8191))
    labelled, rest = cut(labels, labelled_counts(np.bincount(labels, minlength=7), fraction), rng)
    pool_labels, pool_images = labels[rest], images[rest]
    if pool == "balanced":  # as many faces as the rest, every class equally often, rendered anew
        per_class = np.full(7, len(rest) // 7, dtype=np.int64)
        pool_labels, faces = synth.make_split(per_class, np.random.Generator(np.random.PCG64((seed, 65537))))
        pool_images = faces[..., None]
    splits = {"train": Split(images[labelled], labels[labelled]),
              "val": Split(arrays["val"][1][..., None], arrays["val"][0]),
              "test": Split(arrays["test"][1][..., None], arrays["test"][0]),
              "unlabeled": Split(pool_images, pool_labels)}
    return Dataset(list(FER_CLASSES), splits, f"demo faces, {fraction} labelled, {pool} pool")


def digits_set(fraction: float, pool: str, seed: int = 0) -> Any:
    """scikit-learn's digits 0-6: balanced val and test, a long-tailed training split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from fer.data.types import Dataset, Split

    digits = load_digits()
    keep = digits.target < 7
    labels = digits.target[keep].astype(np.int64)
    small = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(x).resize((48, 48), Image.BILINEAR)) for x in small])[..., None]
    rng = np.random.default_rng((seed, 4099))
    by_class = [rng.permutation(np.flatnonzero(labels == k)) for k in range(7)]
    val = np.concatenate([idx[:DIGITS_VAL] for idx in by_class])
    test = np.concatenate([idx[DIGITS_VAL:DIGITS_VAL + DIGITS_TEST] for idx in by_class])
    left = [idx[DIGITS_VAL + DIGITS_TEST:] for idx in by_class]
    head = min(len(idx) for idx in left)
    ranks = rng.permutation(7)
    totals = np.round(head * DIGITS_RATIO ** (-ranks / 6)).astype(np.int64)
    train_all = [idx[:n] for idx, n in zip(left, totals)]
    counts = labelled_counts(totals, fraction)
    labelled = np.concatenate([idx[:n] for idx, n in zip(train_all, counts)])
    if pool == "prior":
        rest = np.concatenate([idx[n:] for idx, n in zip(train_all, counts)])
    else:  # every class equally often, from all that is left of it (the tail has most left)
        spare = [idx[n:] for idx, n in zip(left, counts)]
        even = min(len(idx) for idx in spare)
        rest = np.concatenate([idx[:even] for idx in spare])
    labelled, rest = rng.permutation(labelled), rng.permutation(rest)
    splits = {name: Split(images[idx], labels[idx]) for name, idx in
              (("train", labelled), ("val", val), ("test", test), ("unlabeled", rest))}
    return Dataset([str(k) for k in range(7)], splits, f"digits 0-6, {fraction} labelled, {pool} pool")


BUILDERS = {"demo": demo_set, "digits": digits_set}


def oracle_stage(cfg: Any, data: Any, teacher: Any, epoch_images: int) -> Any:
    """Stage 2's online recipe with the pool's true labels: labelled split + every pool view."""
    from fer.train.fitting import Stage

    train = data.splits["train"]
    stage = Stage.of(cfg, "student", train.images, train.labels, data.class_counts("train"),
                     init_state=teacher.model.state_dict() if cfg.student_init == "teacher" else None)
    stage = stage.online(replace(cfg, student_mode="fixmatch"), data.splits["unlabeled"])
    return replace(stage, name="oracle", consistency=replace(stage.consistency, oracle=True)), \
        replace(cfg, epoch_images=epoch_images)


def scores(cfg: Any, fitted: Any, data: Any) -> dict[str, Any]:
    """Val and test predictions of one fitted stage with its own post-hoc offsets, fitted on val
    with the class counts it trained on (its checkpoint's, as fer.ssl.pipeline fits them)."""
    from sklearn.metrics import balanced_accuracy_score

    from fer.train.infer import predict_logits
    from fer.train.posthoc import fit_offsets, macro_f1

    out: dict[str, Any] = {}
    val = data.splits["val"]
    logits = {name: predict_logits(fitted.model, data.splits[name].images, image_size=cfg.image_size).numpy()
              for name in ("val", "test", "unlabeled")}
    offsets = fit_offsets(logits["val"], val.labels, np.asarray(fitted.checkpoint["class_counts"]), cfg.posthoc)
    for name in ("val", "test"):
        predicted = (logits[name] + offsets).argmax(axis=1)
        truth = data.splits[name].labels
        out[name] = {"macro_f1": macro_f1(truth, logits[name], offsets),
                     "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)), "pred": predicted}
    pool = data.splits["unlabeled"]
    out["pool_precision"] = per_class_precision(pool.labels, (logits["unlabeled"] + offsets).argmax(axis=1),
                                                len(data.classes))
    return out


def per_class_precision(truth: np.ndarray, predicted: np.ndarray, k: int) -> list[float | None]:
    """Share of the pool images labelled class c that are class c, per class (None: none labelled c)."""
    return [float(np.mean(truth[predicted == c] == c)) if np.any(predicted == c) else None for c in range(k)]


def stage_seconds(fitted: Any) -> float:
    return float(sum(m.get("train_seconds", 0.0) for m in fitted.history))


# what the supervised-only control's recipe reads: a variant that changes none of them shares
# the defaults' control (fer.ssl.pipeline._run_control trains stage 2's recipe on the labels alone)
CONTROL_KNOBS = ("student_epochs", "student_lr_scale", "student_augment", "student_init", "student_schedule",
                 "student_ema", "epoch_images", "posthoc")


# what the oracle's recipe reads (oracle_stage: stage 2 on the labelled split and the pool's true
# labels): variants that agree on these, and on the epoch's images, share one oracle
ORACLE_KNOBS = CONTROL_KNOBS + ("pool_ratio", "pseudo_weight")


def measure(data: Any, cfg: Any, variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One teacher (the defaults' run_pipeline), then each stage-2 variant from it: its
    student and control (run_pipeline(teacher=...)) and its oracle, each scored on val and test."""
    from fer.ssl.pipeline import run_pipeline

    start = time.time()
    base = run_pipeline(cfg, data, progress=True)
    seconds = time.time() - start
    out: dict[str, Any] = {"teacher": {"seconds": stage_seconds(base.teacher)}, "variants": {}}
    teacher_scores = scores(cfg, base.teacher, data)
    out["teacher"].update({split: {k: v for k, v in teacher_scores[split].items() if k != "pred"}
                           for split in ("val", "test")}, pool_precision=teacher_scores["pool_precision"])
    oracles: dict[tuple, Any] = {}
    for name, changes in variants.items():
        vcfg = replace(cfg, **changes)
        shared = not any(getattr(vcfg, knob) != getattr(cfg, knob) for knob in CONTROL_KNOBS)
        if changes:
            start = time.time()
            result = run_pipeline(replace(vcfg, pool_control=not shared), data, progress=True,
                                  teacher=base.teacher)
            seconds = time.time() - start
            if shared:
                result.control = base.control
        else:
            result = base
        out["variants"][name] = measure_variant(data, vcfg, result, seconds, teacher_scores, oracles)
    return out


def measure_variant(data: Any, cfg: Any, result: Any, seconds: float, teacher_scores: dict[str, Any],
                    oracles: dict[tuple, Any]) -> dict[str, Any]:
    """A variant's student, control, oracle and final model: scores, differences, r. `oracles`
    holds the oracles fitted so far (with their seconds), by what their recipe reads."""
    from fer.evaluate.evaluate import paired_bootstrap_macro_f1
    from fer.ssl.pipeline import final_stage
    from fer.train.fitting import fit

    if result.student is None or result.control is None:
        raise SystemExit(f"{data.source}: stage 2 did not run (student_epochs={cfg.student_epochs}); nothing to measure")
    student_images = max(int(m.get("train_images", 0)) for m in result.student.history)
    epoch_images = max(cfg.epoch_images, student_images)
    key = (epoch_images, *(getattr(cfg, knob) for knob in ORACLE_KNOBS))
    if key not in oracles:
        stage, oracle_cfg = oracle_stage(cfg, data, result.teacher, epoch_images)
        start = time.time()
        oracles[key] = fit(oracle_cfg, stage, data.splits["val"], data.classes, progress=True), time.time() - start
    oracle, oracle_s = oracles[key]
    scored = {"teacher": teacher_scores, **{name: scores(cfg, fitted, data) for name, fitted in
                                            (("control", result.control), ("pipeline", result.student),
                                             ("oracle", oracle))}}
    final = final_stage({"teacher": result.teacher, "student": result.student, "control": result.control})
    scored["final"] = scored["pipeline" if final == "student" else final]
    out: dict[str, Any] = {"final_stage": final, "pseudo_kept": result.metrics.get("pseudo_kept"),
                           "pseudo_precision": result.metrics.get("pseudo_precision"),
                           "pool_kept_precision": result.metrics.get("pool_kept_precision"),
                           "seconds": {"pipeline": stage_seconds(result.student),
                                       "control": stage_seconds(result.control), "oracle": stage_seconds(oracle),
                                       "run_pipeline": seconds, "oracle_fit": oracle_s}}
    for name, entry in scored.items():
        out[name] = {split: {k: v for k, v in entry[split].items() if k != "pred"} for split in ("val", "test")}
        out[name]["pool_precision"] = entry["pool_precision"]
    for split in ("val", "test"):
        truth = data.splits[split].labels
        for name in ("pipeline", "oracle", "final"):
            diff, low, high = paired_bootstrap_macro_f1(truth, scored[name][split]["pred"],
                                                        scored["control"][split]["pred"], len(data.classes))
            out[name][split].update(minus_control=diff, ci95=[low, high])
        gap = out["oracle"][split]["minus_control"]
        out[f"r_{split}"] = out["pipeline"][split]["minus_control"] / gap if gap > 0 else None
    return out


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME:KEY=VALUE,KEY=VALUE` -> (NAME, overrides); only stage-2 knobs (one teacher serves all)."""
    from fer.train.config import STAGE2_FIELDS, TrialConfig, apply_overrides, parse_set_args

    name, _, body = text.partition(":")
    if not name or not body:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    try:
        changes = parse_set_args(body.split(","))
        apply_overrides(TrialConfig(), changes, source=f"--variant {name}", models=False)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    teacher = sorted(set(changes) - set(STAGE2_FIELDS))
    if teacher:
        raise argparse.ArgumentTypeError(f"--variant {name}: {', '.join(teacher)} change(s) the teacher; a variant "
                                         f"may set only stage-2 knobs ({', '.join(STAGE2_FIELDS)})")
    return name, changes


def parse_fraction(text: str) -> float:
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--fractions: {text!r} is not a fraction like 1/8 or 0.125") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--fractions: {text} must lie strictly between 0 and 1")
    return value


HEADER = ["set", "pool", "labelled", "pool n", "seed", "variant", "LR", "LS", "ST", "teacher", "control", "pipeline",
          "oracle", "final", "pipe-ctrl (95% CI)", "oracle-ctrl (95% CI)", "r test", "r val", "pipe-ctrl val",
          "bal acc pipe", "s"]


def row(run: dict[str, Any], variant: str) -> list[Any]:
    peers, entry = run["peers"], run["variants"][variant]

    def test(model: str) -> float:
        return (run["teacher"] if model == "teacher" else entry[model])["test"]["macro_f1"]

    def gain(model: str) -> str:
        score = entry[model]["test"]
        return f"{score['minus_control']:+.3f} ({score['ci95'][0]:+.3f} to {score['ci95'][1]:+.3f})"

    return [run["set"], run["pool"], run["labelled"], run["pool_images"], run["seed"], label(run, variant),
            peers["linear"]["test_macro_f1"], peers["label_spreading"]["test_macro_f1"],
            peers["self_training"]["test_macro_f1"], test("teacher"), test("control"), test("pipeline"),
            test("oracle"), test("final"), gain("pipeline"), gain("oracle"), entry["r_test"], entry["r_val"],
            entry["pipeline"]["val"]["minus_control"], entry["pipeline"]["test"]["balanced_accuracy"],
            round(entry["seconds"]["run_pipeline"] + entry["seconds"]["oracle_fit"])]


def label(run: dict[str, Any], variant: str) -> str:
    """The variant's name, with the run's --set overrides that every variant of it shares."""
    shared = run.get("overrides") or []
    return f"{variant} [{', '.join(shared)}]" if shared else variant


def verdict(run: dict[str, Any], variant: str) -> str:
    entry = run["variants"][variant]
    peers = max(run["peers"][k]["test_macro_f1"] for k in ("linear", "label_spreading", "self_training"))
    r, pipe = entry["r_test"], entry["pipeline"]["test"]
    r_text = "-" if r is None else f"{r:.2f}"
    met = r is not None and r >= TARGET_R and pipe["ci95"][0] > 0
    return (f"{run['set']} {run['fraction_text']} {run['pool']} pool seed {run['seed']} {label(run, variant)}: "
            f"r = {r_text} "
            f"(floor {TARGET_R}, with pipeline - control excluding 0: {'met' if met else 'MISSED'}); "
            f"final - best classical peer {entry['final']['test']['macro_f1'] - peers:+.3f}")


def report(paths: list[str]) -> int:
    """The table and verdicts of the runs saved in `paths`, in the order given."""
    import json

    runs = []
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            runs.extend({"overrides": saved.get("overrides") or [], **run} for run in saved["runs"])
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"--report {path}: not a label_fraction results file ({err})") from None
    rows = [row(run, variant) for run in runs for variant in run["variants"]]
    print("=== test macro-F1 (each network with its own post-hoc offsets); r = share of the oracle's gain ===")
    print(format_table(HEADER, rows))
    for run in runs:
        for variant in run["variants"]:
            print(verdict(run, variant))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--fractions", nargs="+", type=parse_fraction, default=None, metavar="F",
                        help=f"labelled fractions of the training split (default: {' '.join(DEFAULT_FRACTIONS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds (default: 0 and 1 at 1/8, 0 elsewhere, as the issue asks)")
    parser.add_argument("--pool", nargs="+", choices=POOLS, default=["prior"],
                        help="the pool's class mix: the rest of the split, or every class equally often")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrialConfig override for every run (a candidate stage 2, chosen on val)")
    parser.add_argument("--variant", dest="variants", action="append", type=parse_variant, default=[],
                        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="a stage-2 recipe measured from the same teacher beside the defaults (repeatable)")
    parser.add_argument("--report", nargs="+", default=None, metavar="JSON",
                        help="print the table and verdicts of earlier runs' raw results (one per process) and train nothing")
    parser.add_argument("--json", default=None, help="where the raw results go")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)

    from fer.train.config import TrialConfig, apply_overrides, parse_set_args

    try:  # a bad --set fails here, in one line, before any data is built
        base = apply_overrides(TrialConfig(), parse_set_args(args.overrides), source="--set")
    except ValueError as err:
        parser.error(str(err))
    fractions = args.fractions or [float(Fraction(f)) for f in DEFAULT_FRACTIONS]
    runs, rows = [], []
    for name in args.sets:
        for fraction in fractions:
            for pool in args.pool:
                data = BUILDERS[name](fraction, pool)
                peers = classical_peers(data)
                seeds = args.seeds or ([0, 1] if fraction == 0.125 else [0])
                for seed in seeds:
                    run = measure(data, replace(base, seed=seed), {"defaults": {}, **dict(args.variants)})
                    run.update(overrides=args.overrides, set=name, fraction=fraction, fraction_text=str(Fraction(fraction).limit_denominator()),
                               pool=pool, seed=seed, peers=peers, labelled=len(data.splits["train"].labels),
                               pool_images=len(data.splits["unlabeled"].labels),
                               labelled_counts=data.class_counts("train").tolist(),
                               pool_counts=np.bincount(data.splits["unlabeled"].labels,
                                                       minlength=len(data.classes)).tolist())
                    runs.append(run)
                    for variant in run["variants"]:
                        rows.append(row(run, variant))
                        print(format_table(HEADER, [rows[-1]]), flush=True)
                        print(verdict(run, variant), flush=True)
    print("\n=== test macro-F1 (each network with its own post-hoc offsets); r = share of the oracle's gain ===")
    print(format_table(HEADER, rows))
    for run in runs:
        for variant in run["variants"]:
            print(verdict(run, variant))
    path = save_json("label_fraction", "default", {"runs": runs, "overrides": args.overrides}, args.json)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
