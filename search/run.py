"""Search a YAML space with Ray Tune, Optuna TPE and ASHA; evaluate and export the winner.

    python -m search.run --space imbalance.yaml
    python -m search.run --space smoke --smoke                 # CI's tiny budget
    python -m search.run --resume --name imbalance             # continue after Ctrl-C
    python -m search.run --address auto --storage s3://bucket/fer --workers-per-trial 2

Everything the user can get wrong (flags, the space file, the data) is checked before
Ray starts. The experiment folder `<storage>/<name>` then holds the trials (TensorBoard
logs inside), the Optuna study (optuna.db), ASHA's rungs, and at the end trials.csv,
best_config.yaml, importance.csv and curves.png. A confirmation stage (search/confirm.py)
then retrains the best configurations and the plain baseline with fresh seeds; the
winner (best mean val) and the baseline are each evaluated once on the test split, with
the paired interval of their difference, and the winner is exported to ONNX
(`fer.export`) into --export-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.space import SMOKE_BUDGET, Space, SpaceError, load_space

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
    data_ref: Any = None  # the data set without its test split, in Ray's object store (trial_data)

    @property
    def study_path(self) -> Path:
        from search.report import STUDY_FILE

        return self.local_dir / STUDY_FILE


# --------------------------------------------------------------------------- CLI


def _number(parse: type, low: float, inclusive: bool, what: str):
    """An argparse type: `parse(text)` at or above `low` (above, when not `inclusive`)."""
    bound = f">= {low}" if inclusive else f"> {low}"

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        # `not value > low` also refuses NaN
        if value is None or (value < low if inclusive else not value > low):
            raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text!r}")
        return value

    return check


_positive_int = _number(int, 1, True, "a whole number")
_nonneg_int = _number(int, 0, True, "a whole number")
_positive_float = _number(float, 0, False, "a number")


def _gpu_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0, a fraction like 0.25, or a whole number, got {text!r}") from None
    if value < 0 or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected 0, a fraction in (0, 1] or a whole number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m search.run",
        description="Hyperparameter search over a YAML space: Ray Tune runs the trials, Optuna TPE "
        "proposes them (the space's baseline first), ASHA stops weak ones early; the best "
        "configurations and the plain baseline are retrained with fresh seeds, the winner by mean "
        "validation score; winner and baseline are each evaluated once on the test split, and the "
        "winner is exported to ONNX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # '--num-sample 3' must be an error, not a silent '--num-samples'
        epilog=__doc__.split("\n\n")[1],
    )
    add = parser.add_argument
    add("--space", default=None, metavar="NAME_OR_PATH",
        help=f"search space: a YAML file, or a name in spaces/ (default: {DEFAULT_SPACE}; "
        "with --resume, the one the experiment started with)")
    add("--data", default=None, metavar="PATH",
        help="FER2013 CSV, split folder or DR folder (default: the embedded demo data)")
    add("--num-samples", type=_positive_int, default=None, metavar="N",
        help="number of trials (default: the space's run.num_samples)")
    add("--max-concurrent", type=_positive_int, default=None, metavar="N",
        help="most trials at once (default: the space's run.max_concurrent, lowered to what the cluster fits)")
    add("--workers-per-trial", type=_positive_int, default=1, metavar="N",
        help="data-parallel workers per trial; 1 trains in the trial's own process, more start a "
        "Ray Train worker group (DDP) per trial (default: 1)")
    add("--cpus-per-worker", type=_positive_float, default=1.0, metavar="C",
        help="CPUs each worker reserves, also its torch thread count (default: 1)")
    add("--gpus-per-worker", type=_gpu_fraction, default=0.0, metavar="G",
        help="GPUs each worker reserves; fractions share a GPU, e.g. 0.25 = four workers per GPU (default: 0)")
    add("--address", default=None, metavar="ADDR",
        help="join an existing Ray cluster ('auto' or host:port), sending this machine's Ray auth token; "
        "default: always start a local one of our own")
    add("--storage", default=DEFAULT_STORAGE, metavar="DIR_OR_URI",
        help=f"where experiments live: a local folder or a URI such as s3://bucket/path; on a "
        f"multi-node cluster it must be storage every node reaches (default: ./{DEFAULT_STORAGE})")
    add("--name", default=None,
        help="experiment name, the folder under --storage (default: the space's name, +'-smoke' with --smoke)")
    add("--resume", action="store_true",
        help="continue the experiment --name after an interruption: finished trials are kept, "
        "unfinished ones continue from their last checkpoint, errored ones stay errored")
    add("--seed", type=_nonneg_int, default=None,
        help="seed of the searcher (TPE) and of every trial's training (default: the space's searcher.seed)")
    add("--smoke", action="store_true",
        help=f"tiny budget for CI: {', '.join(f'{k}={v}' for k, v in SMOKE_BUDGET.items())}")
    add("--export-dir", default=None, metavar="DIR",
        help="where the winner's ONNX model goes (default: <experiment>/export)")
    add("--max-failures", type=_nonneg_int, default=1, metavar="N",
        help="retries of a trial whose process or worker dies, from its last checkpoint (default: 1)")
    add("--confirm-top", type=_nonneg_int, default=None, metavar="K",
        help="after the search, retrain the K best configurations and the plain baseline with "
        "fresh seeds; the winner is the best mean validation score (default: the space's "
        "run.confirm_top, 3; 0 = off: the best single trial wins)")
    add("--confirm-seeds", type=_nonneg_int, default=None, metavar="R",
        help="seeds per confirmed configuration (default: the space's run.confirm_seeds, 3; 0 = off)")
    add("--dashboard-host", default="127.0.0.1", metavar="HOST",
        help="interface the Ray dashboard binds to on a local cluster (default: 127.0.0.1, this machine only)")
    return parser


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
    from fer.data import load_dataset

    dataset = load_dataset(data_path, load_size=int(space.fixed.get("load_size", 128)))
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
    from search.preflight import folder_problem
    from trainables import TrialResources

    storage = args.storage if is_uri(args.storage) else str(Path(args.storage).expanduser().resolve())
    saved = resumed_spec(args, storage) if args.resume else {}
    space = load_space(saved.get("space_path") or args.space or DEFAULT_SPACE)
    smoke = args.smoke or saved.get("smoke", False)
    if smoke:
        space = space.with_budget(**SMOKE_BUDGET)
    seed = args.seed if args.seed is not None else saved.get("seed")
    if seed is not None:
        space = dataclasses.replace(space, seed=seed)
        if not any(p.name == "seed" for p in space.parameters):
            space.fixed = {**space.fixed, "seed": seed}

    name = args.name or (space.name + ("-smoke" if smoke else ""))
    experiment = f"{storage.rstrip('/')}/{name}"
    local_dir = Path(experiment) if not is_uri(storage) else LOCAL_MIRROR / name
    if not args.resume and _experiment_exists(experiment):
        raise UsageError(
            f"experiment {experiment} exists: continue it with --resume --name {name}, "
            "or start another with --name NEW"
        )
    try:
        resources = TrialResources(
            workers=args.workers_per_trial,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None

    data_path = saved.get("data", args.data)
    if data_path is not None and not is_uri(data_path):
        data_path = str(Path(data_path).expanduser().resolve())
    dataset, space = load_search_data(data_path, space)

    chosen_export = args.export_dir or saved.get("export_dir")  # a resumed search exports where it said it would
    export_dir = Path(chosen_export).expanduser().resolve() if chosen_export else local_dir / "export"
    for flag, folder in (("--storage", storage), ("--export-dir", str(export_dir))):
        problem = None if is_uri(folder) else folder_problem(folder)
        if problem:  # unwritable, a file, or a nearly full disk: refuse before Ray starts
            raise UsageError(f"{flag} {folder}: {problem}")
    return Plan(
        space=space,
        data_path=data_path,
        dataset=dataset,
        name=name,
        storage=storage,
        experiment=experiment,
        local_dir=local_dir,
        export_dir=export_dir,
        resources=resources,
        # A resumed search keeps the budget it started with (Tuner.restore does too).
        num_samples=saved.get("num_samples") or args.num_samples or space.num_samples,
        max_concurrent=saved.get("max_concurrent") or args.max_concurrent or space.max_concurrent,
        max_failures=args.max_failures,
        confirm_top=_saved_or(saved, "confirm_top", args.confirm_top, space.confirm_top),
        confirm_seeds=_saved_or(saved, "confirm_seeds", args.confirm_seeds, space.confirm_seeds),
        address=args.address,
        dashboard_host=args.dashboard_host,
        resume=args.resume,
        smoke=smoke,
    )


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


# --------------------------------------------------------------------------- Ray


def start_ray(plan: Plan) -> str | None:
    """Start (or join) the cluster; returns the dashboard URL when there is one."""
    import ray

    # Ray hides Train runs from the dashboard's Train view unless this is set.
    env = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
    os.environ.update(env)
    if ray.is_initialized():  # e.g. a test session's cluster
        return None
    if plan.address:
        context = join_cluster(plan.address, env)
    else:
        # "local": always a cluster of our own. Without it ray.init() joins the cluster a
        # `ray start` recorded in /tmp/ray, and when that one died uncleanly it retries its
        # dead GCS for minutes instead of starting one (issue 17, measured > 80 s).
        context = ray.init(
            address="local", include_dashboard=True, dashboard_host=plan.dashboard_host,
            runtime_env={"env_vars": env},
        )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


TOKEN_HELP = ("RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token "
              "(`ray get-auth-token` on the head node prints it)")


def enable_token_auth() -> bool:
    """Send this machine's Ray auth token, when it has one, to whatever cluster we join.

    Ray does this itself for 'auto' but not for an explicit HOST:PORT, and the switch must
    also refresh Ray's already-loaded config, so an environment variable set here is not
    enough: Ray's own helper does both (private API, Ray 2.60; the fallback leaves it to
    the user's RAY_AUTH_MODE=token)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def join_cluster(address: str, env: dict[str, str]) -> Any:
    """Join the cluster at `address` ('auto' or HOST:PORT); a failure is one UsageError line.

    Ray 2.60 turns token authentication on for clusters by default, but ray.init only
    sends a token to an explicit HOST:PORT when RAY_AUTH_MODE=token is set (for 'auto' it
    enables it itself when a token exists); without it the driver retries for ~20 s and
    ends in a 20-line traceback (issue 17). So: token mode whenever a token is there."""
    import ray

    token = enable_token_auth()
    try:
        context = ray.init(address=address, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as err:
        cause = " ".join(str(err).split())[:300] or type(err).__name__
        sent = "this machine's auth token was sent" if token else "no auth token was found on this machine"
        raise UsageError(
            f"--address {address}: could not join the Ray cluster ({type(err).__name__}: {cause}); {sent}. "
            f"Check that a cluster runs there (`ray status --address {address}`) and that this machine has "
            f"its token: {TOKEN_HELP}"
        ) from None
    return context


def build_tuner(plan: Plan, trainable: Any, max_concurrent: int) -> Any:
    from ray import tune

    from search.asha import PersistentASHA
    from search.optuna_bridge import PruningOptunaSearch, open_study_storage
    from search.tuning import run_config, tune_config

    space = plan.space
    scheduler = PersistentASHA(
        time_attr=space.time_attr,
        max_t=space.max_t,
        grace_period=space.grace_period,
        reduction_factor=space.reduction_factor,
    )
    searcher = PruningOptunaSearch(
        space=space,
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=[space.baseline_point()],
        sampler=space.build_sampler(),
        storage=open_study_storage(str(plan.study_path)),
        study_name=plan.name,
        max_t=space.max_t,
        time_attr=space.time_attr,
        scheduler=scheduler,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune_config(
            plan,
            max_concurrent,
            search_alg=searcher,  # Tune wraps it in a ConcurrencyLimiter(max_concurrent_trials)
            scheduler=scheduler,
            num_samples=plan.num_samples,
        ),
        run_config=run_config(plan, plan.name, plan.storage),
    )


def run_search(plan: Plan) -> None:
    """Start or resume the Tuner and wait for it; Ctrl-C returns with the state saved."""
    from ray import tune

    from search.report import write_spec
    from search.tuning import fit_concurrency, trial_data
    from trainables import make_trainable

    max_concurrent = fit_concurrency(plan)
    trainable = make_trainable(trial_data(plan), plan.resources, plan.space.metric, plan.space.mode)
    if plan.resume:
        tuner = tune.Tuner.restore(
            plan.experiment, trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
    else:
        plan.local_dir.mkdir(parents=True, exist_ok=True)
        write_spec(plan.local_dir, spec_of(plan))
        tuner = build_tuner(plan, trainable, max_concurrent)
    tuner.fit()


# --------------------------------------------------------------------------- main


def print_start(plan: Plan, dashboard: str | None) -> None:
    from fer.budget import describe_budget

    print(plan.space.summary())
    print(
        f"data: {plan.dataset.source} ({', '.join(f'{k} {len(v.images)}' for k, v in plan.dataset.splits.items())})"
    )
    print(describe_budget(plan.space.trial_config({}), plan.dataset))  # the fixed values; searched ones vary
    print(f"experiment: {plan.experiment}  ({plan.num_samples} trials, up to {plan.max_concurrent} at once)")
    if plan.confirm_top and plan.confirm_seeds:
        print(f"then confirmation: the {plan.confirm_top} best configurations and the plain baseline, "
              f"{plan.confirm_seeds} fresh seeds each, at the full budget (--confirm-top 0 skips it)")
    else:
        print("no confirmation stage: the search's best single trial wins and is not compared with the baseline")
    if dashboard:
        print(f"Ray dashboard: {dashboard}  (cluster, actors, jobs, logs; it has no Tune or Train page)")
    print(f"TensorBoard:   tensorboard --logdir {plan.experiment}")
    print(f"Optuna study:  optuna-dashboard sqlite:///{plan.study_path}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fer.data import DataError
    from search.preflight import storage_failure

    try:
        plan = make_plan(args)
    except (UsageError, SpaceError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.time()
    try:
        dashboard = start_ray(plan)
    except UsageError as err:  # a cluster that cannot be joined: before any work starts
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_start(plan, dashboard)
    try:
        run_search(plan)
    except ValueError as err:  # e.g. a trial that can never fit on this cluster
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, EOFError, pickle.UnpicklingError) as err:  # storage full mid-search: Tune reads back
        # the truncated files it wrote (tests/test_faults.py)
        print(f"error: {storage_failure(plan.experiment, err)}", file=sys.stderr)
        return 2
    from search.finish import finish

    try:
        return finish(plan, wall_s=time.time() - started)  # the search's wall time; confirmation's is its own
    except OSError as err:  # the reports or the export could not be written
        print(f"error: {storage_failure(plan.experiment, err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
