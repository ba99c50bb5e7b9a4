"""The search plan: flags, space, data and folders, all validated before Ray starts.

`make_plan` turns `python -m search.run`'s arguments into a `Plan`, or raises
UsageError / SpaceError / DataError naming what is wrong; `spec_of` is what the plan
writes for `--resume` and `search.export`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.space import SMOKE_BUDGET, Space, load_space

DEFAULT_STORAGE = "runs"
DEFAULT_SPACE = "imbalance"
LOCAL_MIRROR = Path("~/.cache/fer-search/experiments").expanduser()  # reports + study for URI storage


class UsageError(ValueError):
    """Bad command-line, space or data input: reported in one line before Ray starts."""


@dataclass
class Plan:
    """Everything validated, before Ray starts."""

    space: Space
    data_path: str | None
    dataset: Any  # fer.data.Dataset
    name: str
    storage: str  # local absolute folder or a URI
    experiment: str  # storage/name (a path or a URI)
    local_dir: Path  # where optuna.db and the reports live (the experiment folder when local)
    export_dir: Path
    resources: Any  # trainables.TrialResources
    num_samples: int
    max_concurrent: int
    max_failures: int
    address: str | None
    dashboard_host: str
    resume: bool
    smoke: bool
    confirm_top: int = 0  # search/confirm.py; 0 = no confirmation stage
    confirm_seeds: int = 0
    data_ref: Any = None  # how trials get the data set without its test split (search.tuner.trial_data)
    owns_ray: bool = False  # start_ray started or joined the cluster (not a test's): finish leaves it

    @property
    def study_path(self) -> Path:
        from search.report import STUDY_FILE

        return self.local_dir / STUDY_FILE

    @property
    def teachers(self) -> str | None:
        """Where the search's and the confirmation's trials share finished teachers
        (fer.ssl.teachers): the experiment folder's teachers/ when storage is a local (or mounted)
        folder every trial can reach and a trial is one worker; None otherwise (remote storage,
        or DDP trials, whose ranks would all need the file): each trial trains its own."""
        if is_uri(self.storage) or self.resources.workers != 1:
            return None
        return str(Path(self.experiment) / TEACHERS_DIR)

    @property
    def tail(self) -> str | None:
        """Where the search and the confirmation offer idle CPUs to the trials still running
        (search/tail.py): a file in the experiment folder when storage is a local (or mounted)
        folder and a trial is one CPU worker; None otherwise (every trial keeps its request's
        threads)."""
        if is_uri(self.storage) or not self.resources.cpu_threads_only:
            return None
        return str(Path(self.experiment) / TAIL_FILE)


TEACHERS_DIR = "teachers"
LOAD_FIELDS = ("load_size", "load_crop", "load_filter", "skip_bad")  # TrialConfig fields the data load reads
TAIL_FILE = "tail_threads.json"  # {"threads": {trial_id: n}}, search/tail.py


def is_uri(path: str) -> bool:
    return "://" in path


def _experiment_exists(experiment: str) -> bool:
    if is_uri(experiment):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(experiment)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    return Path(experiment).exists()


def resumed_spec(args: argparse.Namespace, storage: str) -> dict[str, Any]:
    """How experiment --name started; --space / --data may only repeat it."""
    from search.report import SPEC_FILE, SUMMARY_JSON, read_spec

    if not args.name:
        raise UsageError("--resume needs --name: the experiment to continue")
    experiment = f"{storage.rstrip('/')}/{args.name}"
    local_dir = Path(experiment) if not is_uri(storage) else LOCAL_MIRROR / args.name
    if not _experiment_exists(experiment) or not (local_dir / SPEC_FILE).is_file():
        raise UsageError(f"--resume: no experiment {args.name!r} under {storage} (looked for {experiment})")
    saved = read_spec(local_dir)
    if (local_dir / SUMMARY_JSON).is_file():  # resuming would read the test split again
        raise UsageError(
            f"--resume: experiment {args.name!r} has finished (see {local_dir / SUMMARY_JSON}); "
            "export other trials with python -m search.export, or start another with --name NEW"
        )
    if args.space and str(load_space(args.space).path) != saved["space_path"]:
        raise UsageError(
            f"--resume: experiment {args.name!r} searched {saved['space_path']}, not {args.space}; "
            "drop --space to continue it"
        )
    if args.data is not None and args.data != saved["data"]:
        raise UsageError(f"--resume: experiment {args.name!r} used --data {saved['data']}, not {args.data}")
    return saved


def load_search_data(data_path: str | None, space: Space) -> tuple[Any, Space]:
    """The data set (fer.data.load_dataset raises DataError naming file and line) and the
    space, with stage 2 switched off when the data has no unlabeled pool."""
    from fer.data import load_configured

    searched = sorted({p.name for p in space.parameters} & set(LOAD_FIELDS))
    if searched:
        raise UsageError(f"{space.path}: {', '.join(searched)} cannot be searched: the data set is loaded once "
                         f"for every trial; give {'it' if len(searched) == 1 else 'them'} under fixed:")
    dataset = load_configured(data_path, space.fixed)
    for split in ("train", "val", "test"):
        if split not in dataset.splits or len(dataset.splits[split].images) == 0:
            raise UsageError(f"{dataset.source}: the search needs a non-empty {split!r} split")
    pool = dataset.splits.get("unlabeled")
    if (pool is None or len(pool.images) == 0) and space.fixed.get("student_epochs", 1) != 0:
        # Without a pool stage 2 is skipped; ASHA's horizon must be stage 1 alone.
        print(f"note: {dataset.source} has no unlabeled pool: stage 2 off, ASHA max_t = epochs")
        space = space.with_budget(student_epochs=0)
    return dataset, space


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate flags, space and data; raises UsageError / SpaceError / DataError before Ray."""
    storage = args.storage if is_uri(args.storage) else str(Path(args.storage).expanduser().resolve())
    saved = resumed_spec(args, storage) if args.resume else {}
    smoke = args.smoke or saved.get("smoke", False)
    space = plan_space(args, saved, smoke)
    name = args.name or (space.name + ("-smoke" if smoke else ""))
    experiment = f"{storage.rstrip('/')}/{name}"
    local_dir = Path(experiment) if not is_uri(storage) else LOCAL_MIRROR / name
    if not args.resume and _experiment_exists(experiment):
        raise UsageError(
            f"experiment {experiment} exists: continue it with --resume --name {name}, "
            "or start another with --name NEW"
        )
    resources = trial_resources(args)
    data_path = saved.get("data", args.data)
    if data_path is not None and not is_uri(data_path):
        data_path = str(Path(data_path).expanduser().resolve())
    dataset, space = load_search_data(data_path, space)
    chosen_export = args.export_dir or saved.get("export_dir")  # a resumed search exports where it said it would
    export_dir = Path(chosen_export).expanduser().resolve() if chosen_export else local_dir / "export"
    check_folders(storage, export_dir)
    return Plan(
        space=space, data_path=data_path, dataset=dataset, name=name, storage=storage, experiment=experiment,
        local_dir=local_dir, export_dir=export_dir, resources=resources,
        # A resumed search keeps the budget it started with (Tuner.restore does too).
        num_samples=saved.get("num_samples") or args.num_samples or space.num_samples,
        max_concurrent=saved.get("max_concurrent") or args.max_concurrent or space.max_concurrent,
        max_failures=args.max_failures,
        confirm_top=_saved_or(saved, "confirm_top", args.confirm_top, space.confirm_top),
        confirm_seeds=_saved_or(saved, "confirm_seeds", args.confirm_seeds, space.confirm_seeds),
        address=args.address, dashboard_host=args.dashboard_host, resume=args.resume, smoke=smoke,
    )


def plan_space(args: argparse.Namespace, saved: dict[str, Any], smoke: bool) -> Space:
    """The space to search: --space (or the resumed one), its models resolved, with the
    smoke budget and the seed applied."""
    space = load_space(saved.get("space_path") or args.space or DEFAULT_SPACE)
    space.check_models()  # model names need timm; still before Ray starts
    check_pretrained(space)
    if smoke:
        space = space.with_budget(**SMOKE_BUDGET)
    seed = args.seed if args.seed is not None else saved.get("seed")
    if seed is not None:
        space = dataclasses.replace(space, seed=seed)
        if not any(p.name == "seed" for p in space.parameters):
            space.fixed = {**space.fixed, "seed": seed}
    return space


def check_pretrained(space: Space) -> None:
    """A fixed local weights file must exist before Ray starts, not fail every trial."""
    pretrained = space.fixed.get("pretrained")
    if pretrained in (None, "imagenet") or Path(str(pretrained)).expanduser().is_file():
        return
    raise UsageError(f"{space.path}: fixed.pretrained={pretrained!r}: no such file; put the weights there "
                     "(a .safetensors / .pth state dict, e.g. timm's from huggingface.co/timm) or set "
                     "pretrained: null to train from scratch")


def trial_resources(args: argparse.Namespace) -> Any:
    """What each trial reserves (trainables.TrialResources); a bad combination is a UsageError."""
    from trainables import TrialResources

    try:
        return TrialResources(
            workers=args.workers_per_trial,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_folders(storage: str, export_dir: Path) -> None:
    """Unwritable, a file, or a nearly full disk: refuse --storage / --export-dir before Ray starts."""
    from search.preflight import folder_problem

    for flag, folder in (("--storage", storage), ("--export-dir", str(export_dir))):
        problem = None if is_uri(folder) else folder_problem(folder)
        if problem:
            raise UsageError(f"{flag} {folder}: {problem}")


def _saved_or(saved: dict[str, Any], key: str, flag: int | None, default: int) -> int:
    """A resumed search keeps what it started with; else the flag, else the space's value."""
    if key in saved:
        return int(saved[key])
    return flag if flag is not None else default


def spec_of(plan: Plan) -> dict[str, Any]:
    """What --resume and search.export need to know about how the search started."""
    return {
        "space_path": str(plan.space.path),
        "data": plan.data_path,
        "smoke": plan.smoke,
        "seed": plan.space.seed,
        "num_samples": plan.num_samples,
        "max_concurrent": plan.max_concurrent,
        "confirm_top": plan.confirm_top,
        "confirm_seeds": plan.confirm_seeds,
        "export_dir": str(plan.export_dir),
        "metric": plan.space.metric,
        "mode": plan.space.mode,
        "time_attr": plan.space.time_attr,
        "max_t": plan.space.max_t,
        "stage1_epochs": int(plan.space.fixed.get("epochs", 0)),
        "baseline": plan.space.baseline_point(),
        "params": [p.name for p in plan.space.parameters],
        "study_name": plan.name,
        "experiment": plan.experiment,
        "resources": dataclasses.asdict(plan.resources),
    }
