"""The one flat configuration of a trial: every knob of the two-stage pipeline.

Everything a trial does is decided by a `TrialConfig`. The YAML search spaces
(`search/space.py`), `python -m fer.train --config/--set` and checkpoints all speak
in its field names, so a checkpoint carries `asdict(cfg)` and export needs no flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from fer import names


@dataclass
class TrialConfig:
    # --- data -----------------------------------------------------------------
    data: str | None = None  # FER2013 CSV, split folder or DR folder; None = embedded demo data
    image_size: int = 48  # model input side; images are resized on the fly (96/112 upsample)
    load_size: int = 128  # DR folders only: images are resized to this once, at load time
    # DR folders only (fer.data.fundus): "retina" crops the photograph's black border and pads
    # to a square, so the retina stays round; "squash" resizes the whole photograph
    load_crop: str = "retina"
    # DR folders only: "graham" subtracts the local average colour (Ben Graham, Kaggle DR 2015)
    load_filter: str = "none"
    skip_bad: bool = False  # leave unreadable, missing or unlisted images out (counted) instead of stopping

    # --- model ----------------------------------------------------------------
    # fer.train.models.MODELS, any timm name, or a torchvision name. resnet10t (timm) by measurement
    # (BENCHMARKS.md, Quality): on the 48 px demo data its teacher reached test macro-F1 0.68
    # in 10 epochs where mobilenet_v3_small's reached 0.54 in 20, at 0.36-0.6x its images/s.
    model: str = "resnet10t"
    stem: str = "standard"  # see fer.train.models.STEMS: small = stride-1 stem conv, no stem max-pool
    pretrained: str | None = None  # None, "imagenet" (downloads) or a local .pth/.safetensors file
    dropout: float = 0.2  # before the classifier

    # --- loss and class weighting --------------------------------------------
    loss: str = "ce"  # see fer.train.losses.LOSSES: ce, focal, logit_adjusted, balanced_softmax
    focal_gamma: float = 2.0  # focal only (Lin et al. 2017); 0 gives cross-entropy
    label_smoothing: float = 0.0  # ce and logit_adjusted
    la_tau: float = 1.0  # logit_adjusted: tau * log prior added to logits (Menon et al. 2021)
    class_weights: str = "none"  # see fer.train.losses.WEIGHT_SCHEMES: none, inverse, sqrt_inverse, effective
    cb_beta: float = 0.999  # effective number of samples (Cui et al. 2019); only for "effective"

    # --- sampling and augmentation -------------------------------------------
    sampler: str = "uniform"  # see fer.train.samplers.SAMPLERS: uniform, sqrt, balanced
    class_cap: int = 0  # at most this many images of each class per epoch; 0 = no cap
    augment: str = "weak"  # see fer.train.transforms.AUGMENTS: none, weak, strong

    # --- optimisation (stage 1, and stage 2 unless overridden below) ----------
    optimizer: str = "adamw"  # adamw or sgd
    lr: float = 2e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    batch_size: int = 128  # per data-parallel rank
    epochs: int = 10  # stage 1 (teacher) epochs
    # An epoch draws at least this many training images: a smaller split is repeated (each
    # pass reshuffled, fer.train.samplers), so a few hundred images still get enough optimizer
    # steps per epoch; a split this large or larger is one pass. 0 = always one pass.
    epoch_images: int = 3000  # about the demo data's training split
    warmup_epochs: int = 1  # linear warmup, then cosine decay to zero
    grad_clip: float = 5.0  # max gradient norm; 0 = off
    patience: int = 0  # stop a stage after this many epochs without a better val macro-F1; 0 = off
    amp: bool = True  # mixed precision; only ever used on CUDA
    channels_last: bool = True  # channels_last on CUDA, and on CPU where it pays (fer.train.infer.memory_format)
    seed: int = 0

    # --- semi-supervised stage 2 ---------------------------------------------
    # 0 = no stage 2. 8 by measurement (benchmarks/stage2_recipes.py, val, one teacher each): the
    # pool's gain over the control at the same budget grew from +0.013 to +0.018 at 1/8 of the demo
    # data and from +0.007 to +0.021 on the digits set, going from 4 epochs to 8.
    student_epochs: int = 8
    pseudo_threshold: float = 0.9  # keep pool images whose teacher confidence is at least this
    pseudo_selection: str = "threshold"  # see fer.ssl.pseudo.SELECTIONS: threshold, crest, flexmatch, aligned
    crest_alpha: float = 0.5  # crest: keep rate of class k is (N_{K+1-k}/N_1)^alpha (Wei et al. 2021)
    pseudo_tta: bool = False  # average the teacher's predictions over the TTA views
    pseudo_temperature: bool = True  # fit temperature scaling on val before thresholding
    # Label the pool with the teacher's post-hoc offsets (cfg.posthoc, fitted on val) added to its
    # logits, so pseudo-labels carry the rebalanced decision rule rather than the teacher's bias to
    # the head classes (logit adjustment of pseudo-labels, as DebiasPL, Wang et al. 2022). On the
    # digits set (benchmarks/quality.py, seed 0) the threshold's picks of the rarest class went
    # from 20 to 88 (all correct), of all classes from 498 at precision 0.994 to 532 at 0.996;
    # no effect with posthoc none.
    pseudo_debias: bool = True
    # Average the teacher's pool probabilities with label spreading over a kNN graph of train,
    # pool and val images (fer.ssl.propagate): "pixels" (PCA of the images), "features" (the
    # teacher's penultimate features), "none", or "auto": whichever of the three labels val best
    # (val images sit in the graph unlabelled). On the digits set the pixel graph lifted the
    # pool's label accuracy from 0.957 to 0.982 (benchmarks/quality.py, seed 0).
    pseudo_graph: str = "auto"
    pseudo_weight: float = 1.0  # loss weight of pseudo-labelled samples
    student_init: str = "teacher"  # teacher (start from the teacher's weights) or scratch
    # Stage 2's peak learning rate (and its control's) as a fraction of lr, for a student fine-tuned
    # from its teacher's weights. 1.0 by measurement (benchmarks/pool_ceiling.py --student-lr-scales,
    # val): 0.3 moved the pool's gain over the control from +0.018/+0.021/+0.010 to +0.020/+0.014/
    # +0.005 on demo/8, digits and the demo data, and no scale made the search's 1-epoch student
    # beat its teacher.
    student_lr_scale: float = 1.0
    # Decay of an exponential moving average of stage 2's weights, updated every step (the
    # student's, and its control's and oracle's alike: the stage's recipe). The average, with
    # its own BatchNorm statistics, is what each epoch validates, keeps as the best and hands
    # out; the live weights train on and label the pool (FixMatch's evaluation model; Mean
    # Teacher, Tarvainen & Valpola 2017). 0 = off: the live weights are validated
    student_ema: float = 0.0
    # Stage 2's learning rate after its warmup (fer.names.SCHEDULES): "cosine" decays to zero as
    # stage 1 does; "constant" stays at the peak, as USB and DASO train imbalanced FixMatch runs
    # (the pool's labels keep improving, and a decayed rate stops learning from them). Constant by
    # measurement on val (benchmarks/label_fraction.py, 1/8 of the labels, pool 7x, one teacher each):
    # the student's share r of the oracle's gain went from -0.33 to 0.51 (demo faces, seed 1) and
    # from -0.40 to -0.14 (digits, seed 0), and stayed at -0.55 / -0.58 (digits, seed 1), where the
    # constant rate's control rose from 0.883 to 0.902 (BENCHMARKS.md, "Few labels, a large pool").
    student_schedule: str = "constant"
    student_augment: str = "strong"  # augmentation for stage 2
    # How stage 2 uses the pool (fer.names.STUDENT_MODES): "offline" trains on the teacher's
    # selected pseudo-labels (above); "fixmatch" trains the student on the labelled split while
    # its own confident predictions on weakly augmented pool images label strongly augmented
    # views of them, every step (fer.train.consistency, Sohn et al. 2020); "flexmatch" does so with
    # per-class thresholds (Zhang et al. 2021). Online, pseudo_threshold is the confidence a weak
    # view needs and pseudo_weight weighs the pool's loss; the other pseudo_* knobs are the
    # offline mode's; the teacher's confident picks (the offline selection) join the labelled
    # images. flexmatch by measurement (benchmarks/pool_ceiling.py, val, one teacher each): student -
    # control at 1/8 of the demo data +0.040 online alone, +0.013 with the picks (13 of them, so the
    # two differ by run-to-run noise), offline -0.008, the pool's true labels +0.043; on the digits
    # set +0.007 with the picks (565 at 0.996 precision), -0.007 online alone, -0.014 offline.
    student_mode: str = "flexmatch"
    pool_ratio: int = 1  # fixmatch/flexmatch: pool images per labelled image in a step (FixMatch's mu)
    # Self-training rounds that share stage 2's student_epochs (so the budget and the control do not
    # change): round 1's student learns from the teacher's picks; each later round's labeller is the
    # previous round's student (its own calibration, offsets and graph on val, as the teacher's), and
    # its student starts again from student_init's weights, not the previous student's (Noisy Student,
    # Xie et al. 2020; re-initialised each round, Cascante-Bonilla et al. 2021). student_epochs must be
    # a multiple of it; every round has its own warmup and cosine schedule.
    student_rounds: int = 1
    # fixmatch/flexmatch: align the weak views' class distribution to the labelled prior
    # (ReMixMatch's distribution alignment, Berthelot et al. 2020). Off by measurement: it cost
    # 0.014 at 1/8 and 0.023 at full size of the demo data, and collapsed the digits student
    # (pool labels 0.975 -> 0.588 accurate), where post-hoc offsets rebalance anyway.
    pool_align: bool = False
    # fixmatch/flexmatch: the weak views are labelled with the student's own post-hoc decision rule
    # of the moment (cfg.posthoc's offsets, fitted on val at each epoch's start, as the teacher's
    # picks get them with pseudo_debias), so a rare-class pool image is not labelled with the head
    # class its raw argmax leans to (adaptive debiasing, DebiasPL, Wang et al. 2022; ACR's logit
    # adjustment, Wei & Gan 2023). Estimated from the student, not the labelled prior: a pool whose
    # mix differs is not forced into it, as pool_align forces it.
    pool_debias: bool = False
    # fixmatch/flexmatch: the labeller's confident picks (pseudo_selection) join the labelled
    # stream with their hard labels, as offline; false: the labelled split alone, and the pool only
    # online (FixMatch as published). False by measurement on val (benchmarks/label_fraction.py, 1/8
    # of the labels, pool 7x, constant rate): the student's share r of the oracle's gain, against the
    # earlier defaults (picks, cosine), rose in all 4 runs: demo faces 0.32 -> 0.68 and -0.33 -> 0.38,
    # digits -0.40 -> -0.32 and -0.55 -> -0.30 (BENCHMARKS.md, "Few labels, a large pool").
    pool_picks: bool = False
    # fixmatch/flexmatch: what a kept weak view teaches its strong view: its argmax ("hard", FixMatch)
    # or its distribution sharpened at temperature 0.5 ("soft", UDA/MixMatch), which lets an
    # uncertain wrong label pull less
    pool_targets: str = "hard"
    # fixmatch/flexmatch: weight of the stage-2 labeller's distribution over each pool image (the
    # teacher's calibrated, debiased probabilities averaged with the label-spreading graph) in the
    # weak views' targets: (1 - w) * the student's weak-view probabilities + w * the labeller's.
    # Mixed in only where pseudo_graph chose a graph on val (fer.ssl.pipeline._second_labeller): a
    # graph over pixels or features errs differently from the student's network; the teacher alone
    # is the student's own start. 0 = the student's predictions alone (FixMatch as published).
    # 0.8 by measurement on val (benchmarks/label_fraction.py, 1/8 of the labels, pool 7x): on the
    # digits set (teacher + pixel graph) student - control on val went from -0.043 to +0.038 and
    # from -0.028 to -0.004 (test r -0.23 -> 0.21, -0.63 -> -0.20); on the demo faces the labeller
    # is the teacher alone, where mixing it in moved val by -0.006 to +0.007 (BENCHMARKS.md)
    pool_labeller_weight: float = 0.8
    # After stage 2, fit the student's recipe (same start, epochs, augmentation, at least as
    # many images per epoch) on the labelled split alone: the supervised-only control that
    # says what the pool bought (metrics "control_val_macro_f1", "pool_gain_val"). Costs
    # student_epochs more epochs, only in runs that finish stage 2.
    pool_control: bool = True

    # --- post-hoc decision rule ----------------------------------------------
    posthoc: str = "tau"  # see fer.train.posthoc.POSTHOC: none, tau (tau * log prior), bias (per-class)

    @property
    def round_epochs(self) -> int:
        """Epochs of each stage-2 round (student_rounds of them make student_epochs)."""
        return self.student_epochs // self.student_rounds


# Fields stage 1 (the teacher) never reads: runs that differ only in these train the same
# teacher, which fer.ssl.teachers shares between them (tests/test_teachers.py trains two teachers
# whose configurations differ in every one of these and compares their weights).
STAGE2_FIELDS = (
    "student_epochs", "pseudo_threshold", "pseudo_selection", "crest_alpha", "pseudo_tta", "pseudo_temperature",
    "pseudo_debias", "pseudo_graph", "pseudo_weight", "student_init", "student_lr_scale", "student_ema",
    "student_augment",
    "student_schedule", "pool_control", "posthoc", "student_mode", "pool_ratio", "pool_align", "student_rounds",
    "pool_debias", "pool_picks", "pool_targets", "pool_labeller_weight",
)

# Set on the epochs a run reports from a shared teacher (replayed, not trained again).
SHARED_TEACHER_KEY = "teacher_shared"


def config_field_names() -> list[str]:
    return [f.name for f in fields(TrialConfig)]


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert `value` to the field's declared type, or raise naming the key."""
    field_type = next(f.type for f in fields(TrialConfig) if f.name == name)
    optional = "None" in str(field_type)
    kind = str(field_type).split("|")[0].strip()
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ValueError(f"{source}: key {name!r} may not be null (expected {kind})")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{source}: key {name!r} expects {kind}, got {value!r}"
        ) from None


def coerce_field(name: str, value: Any, source: str = "config") -> Any:
    """One field's value converted to its type and checked on its own (apply_overrides also
    checks the fields against each other)."""
    valid = config_field_names()
    if name not in valid:
        raise ValueError(f"{source}: unknown config key {name!r}. Valid keys: {', '.join(valid)}")
    value = _coerce(name, value, source)
    check_value(name, value, source)
    return value


def apply_overrides(cfg: TrialConfig, overrides: dict[str, Any], source: str = "config", *,
                    models: bool = True) -> TrialConfig:
    """Return a copy of `cfg` with `overrides` applied; unknown keys and bad types raise.

    `source` names where the values came from (a YAML file, `--set`, a search space) so
    the error can point there.
    """
    updates = {key: coerce_field(key, value, source) for key, value in overrides.items()}
    new = dataclasses.replace(cfg, **updates)
    validate_config(new, source, models=models)
    return new


# Ranges a trial accepts, checked once at the edge. Choice-valued fields are checked
# against fer.names, whose tuples each registry checks itself against.
_RANGES: dict[str, tuple[float, float]] = {
    "image_size": (16, 1024),
    "load_size": (16, 4096),
    "dropout": (0.0, 0.99),
    "focal_gamma": (0.0, 10.0),
    "label_smoothing": (0.0, 0.5),
    "la_tau": (0.0, 5.0),
    "cb_beta": (0.0, 0.99999),
    "class_cap": (0, 10**9),
    "lr": (1e-7, 10.0),
    "weight_decay": (0.0, 1.0),
    "momentum": (0.0, 0.999),
    "batch_size": (1, 65536),
    "epochs": (1, 100000),
    "epoch_images": (0, 10**9),
    "warmup_epochs": (0, 100000),
    "grad_clip": (0.0, 1e6),
    "patience": (0, 100000),
    "student_epochs": (0, 100000),
    "pseudo_threshold": (0.0, 1.0),
    "crest_alpha": (0.0, 10.0),
    "pseudo_weight": (0.0, 100.0),
    "student_lr_scale": (1e-4, 10.0),
    "student_ema": (0.0, 0.9999),
    "pool_ratio": (1, 64),
    "pool_labeller_weight": (0.0, 1.0),
    "student_rounds": (1, 16),
}


def config_choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of every choice-valued field (fer.names: plain tuples, no torch)."""
    return {
        "stem": names.STEMS, "loss": names.LOSSES, "class_weights": names.WEIGHT_SCHEMES,
        "sampler": names.SAMPLERS, "augment": names.AUGMENTS, "student_augment": names.AUGMENTS,
        "pseudo_selection": names.SELECTIONS, "pseudo_graph": names.PSEUDO_GRAPHS, "posthoc": names.POSTHOC,
        "optimizer": names.OPTIMIZERS,
        "student_init": names.STUDENT_INITS, "student_mode": names.STUDENT_MODES,
        "student_schedule": names.SCHEDULES, "pool_targets": names.POOL_TARGETS,
        "load_crop": names.LOAD_CROPS, "load_filter": names.LOAD_FILTERS,
    }


def config_ranges() -> dict[str, tuple[float, float]]:
    return dict(_RANGES)


def check_value(name: str, value: Any, source: str = "config") -> None:
    """Raise if `value` is outside what a trial accepts for field `name`. The model name
    is only checked to be a name here: `check_model` resolves it (that needs timm)."""
    if name == "model":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: model={value!r}: expected a model name")
        return
    choices = config_choices()
    if name in choices and value not in choices[name]:
        raise ValueError(
            f"{source}: {name}={value!r} is not allowed. Choose one of: {', '.join(choices[name])}"
        )
    if name in _RANGES and value is not None:
        low, high = _RANGES[name]
        if not (low <= value <= high):
            raise ValueError(f"{source}: {name}={value!r} is outside the allowed range [{low}, {high}]")


def check_model(value: str, source: str = "config") -> None:
    """Raise naming `source` if no zoo has model `value` (imports fer.train.models: torch, timm)."""
    from fer.train.models import resolve_model

    try:
        resolve_model(value)
    except ValueError as err:
        raise ValueError(f"{source}: model={value!r}: {err}") from None


def validate_config(cfg: TrialConfig, source: str = "config", *, models: bool = True) -> None:
    """Check every field; `models=False` leaves the model name to a later `check_model`
    (a YAML space is validated without importing torch)."""
    for name in config_field_names():
        check_value(name, getattr(cfg, name), source)
    check_rounds(cfg, source)
    if models:
        check_model(cfg.model, source)


def check_rounds(cfg: TrialConfig, source: str = "config") -> None:
    """Raise unless cfg.student_rounds splits cfg.student_epochs into equal rounds."""
    if cfg.student_epochs % cfg.student_rounds:
        raise ValueError(f"{source}: student_epochs={cfg.student_epochs} is not a multiple of "
                         f"student_rounds={cfg.student_rounds} (the rounds share stage 2's epochs equally)")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a flat YAML mapping of config overrides (yaml.safe_load only)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys to values, got {type(data).__name__}")
    return data


def yaml_problem(err: Any) -> str:
    """PyYAML's multi-line message (caret drawing, '<unicode string>') as one line."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None and start is not mark:
        problem += f" ({context} from line {start.line + 1}, column {start.column + 1})"
    if "constructor for the tag" in problem:
        # safe_load builds only plain data; a python/object tag would run code (CVE-2017-18342).
        problem += " (YAML files here are plain data read with yaml.safe_load; Python tags are refused)"
    return f"not valid YAML: {where}{problem}"


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """Parse `--set key=value` items; values are YAML scalars (so 0.1, true, null work)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out
