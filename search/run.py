"""Search a YAML space with Ray Tune, Optuna TPE and ASHA; evaluate and export the winner.

    python -m search.run --space imbalance.yaml
    python -m search.run --space smoke --smoke                 # CI's tiny budget
    python -m search.run --resume --name imbalance             # continue after Ctrl-C
    python -m search.run --address auto --storage s3://bucket/fer --workers-per-trial 2

Everything the user can get wrong (flags, the space file, the data) is checked before
Ray starts. The experiment folder `<storage>/<name>` then holds the trials (TensorBoard
logs inside), the Optuna study (optuna.db), ASHA's rungs, and at the end trials.csv,
best_config.yaml, importance.csv and curves.png. A confirmation stage (search/confirm.py)
then retrains the best configurations with fresh seeds (the plain baseline too, unless
its full-budget search trial serves: search/baseline.py); the
winner (best mean val) and the baseline are each evaluated once on the test split, with
the paired interval of their difference, and the winner is exported to ONNX
(`fer.export`) into --export-dir.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from typing import Any

from search.dashboard import start_dashboard, stop_dashboard  # main calls them by this name (tests replace them)
from search.plan import DEFAULT_SPACE, DEFAULT_STORAGE, Plan, UsageError, make_plan, spec_of
from search.space import SMOKE_BUDGET, SpaceError
from search.tuner import run_search  # main calls it by this module's name (tests replace it)

# The CLI's API: main and its steps, which tests call or replace one by one.
__all__ = ["Plan", "UsageError", "build_parser", "join_cluster", "main", "make_plan", "run_search", "search_and_finish",
           "spec_of", "start_dashboard", "start_ray", "stop_dashboard"]


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


DESCRIPTION = (
    "Hyperparameter search over a YAML space: Ray Tune runs the trials, Optuna TPE proposes them (the "
    "space's baseline first), ASHA stops weak ones early; the best configurations are retrained with fresh "
    "seeds (the plain baseline too, or its full-budget search trial serves), the winner by mean validation "
    "score; winner and baseline are each evaluated once on the test split, and the winner is exported to ONNX."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m search.run",
        description=DESCRIPTION,
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
        help="CPUs each worker reserves, also its torch thread count; a single-worker CPU trial takes "
        "more threads while CPUs that ended trials left sit idle (default: 1)")
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
        help="after the search, race the K best configurations over fresh seeds, against the plain "
        "baseline's one full-budget run; the winner is the best mean validation score (default: the space's run.confirm_top, "
        "else 3; 0 = off: the best single trial wins)")
    add("--confirm-seeds", type=_nonneg_int, default=None, metavar="R",
        help="at most R fresh seeds per configuration (default: run.confirm_seeds, else 3; 0 = off)")
    add("--dashboard-host", default="127.0.0.1", metavar="HOST",
        help="interface the Ray dashboard binds to on a local cluster (default: 127.0.0.1, this machine only)")
    add("--dashboard", action="store_true",
        help="also serve the Optuna study live with optuna-dashboard on 127.0.0.1 (port 8080, or a free one "
        "when it is taken): trials, per-epoch values, parallel coordinates, importances; stopped at the end")
    return parser


# --------------------------------------------------------------------------- Ray


def start_ray(plan: Plan) -> str | None:
    """Start (or join) the cluster; returns the dashboard URL when there is one."""
    import ray

    # Ray Train records its runs (train-<trial id>, each worker's actor id and PID) in the
    # dashboard's JSON API (/api/train/v2/runs) only when this is set; the open-source
    # dashboard has no page for them (ray-project/ray#26325).
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
    plan.owns_ray = True  # search.finish shuts it down before the closing summary
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


TOKEN_HELP = ("RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token "
              "(`ray get-auth-token` on the head node prints it)")


def enable_token_auth() -> bool:
    """Send this machine's Ray auth token, when it has one, to the cluster we join: Ray's
    private helper, through search/internals.py (the one door to Ray's internals)."""
    from search.internals import enable_token_auth as enable

    return enable()


def join_cluster(address: str, env: dict[str, str]) -> Any:
    """Join the cluster at `address` ('auto' or HOST:PORT); a failure is one UsageError line.

    Ray 2.60 turns token authentication on for clusters by default, but ray.init only
    sends a token to an explicit HOST:PORT when RAY_AUTH_MODE=token is set (for 'auto' it
    enables it itself when a token exists); without it the driver retries for ~20 s and
    ends in a 20-line traceback (issue 17). So: token mode whenever a token is there."""
    import ray

    from search.preflight import held_stderr

    token = False
    try:
        with held_stderr() as held:  # a failed join logs a line a second for 20 s; ours is the one line
            token = enable_token_auth()
            context = ray.init(address=address, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as err:
        cause = " ".join(str(err).split())[:300] or type(err).__name__
        sent = "this machine's auth token was sent" if token else "no auth token was found on this machine"
        if "InvalidAuthToken" in held.text:  # what Ray's GCS client logged while it retried
            sent += " and the cluster refused it (wrong token)" if token else " and the cluster asks for one"
        raise UsageError(
            f"--address {address}: could not join the Ray cluster ({type(err).__name__}: {cause}); {sent}. "
            f"Check that a cluster runs there (`ray status --address {address}`) and that this machine has "
            f"its token: {TOKEN_HELP}"
        ) from None
    return context


# --------------------------------------------------------------------------- main


def print_start(plan: Plan, dashboard: str | None) -> None:
    from fer.train.budget import describe_budget

    print(plan.space.summary())
    print(
        f"data: {plan.dataset.source} ({', '.join(f'{k} {len(v.images)}' for k, v in plan.dataset.splits.items())})"
    )
    print(describe_budget(plan.space.trial_config({}), plan.dataset))  # the fixed values; searched ones vary
    print(f"experiment: {plan.experiment}  ({plan.num_samples} trials, up to {plan.max_concurrent} at once)")
    if plan.confirm_top and plan.confirm_seeds:
        from search.baseline import search_baseline_is_plain
        from search.tuner import finish_from

        baseline = ("the plain baseline's run is its search trial, which ASHA lets run the full budget"
                    if search_baseline_is_plain(plan.space) else "the plain baseline gets one fresh seed")
        finish = finish_from(plan.space, confirming=True)
        counted = "a full-budget search run counted" + (
            f": ASHA stops no trial that reaches epoch {finish}, the teacher's last" if finish else "")
        print(f"then confirmation: the {plan.confirm_top} best configurations raced at the full budget, one "
              f"fresh seed each and up to {plan.confirm_seeds} values ({counted}) while "
              f"they cannot be told apart; {baseline} (--confirm-top 0 skips it)")
    else:
        print("no confirmation stage: the search's best single trial wins and is not compared with the baseline")
    if dashboard:
        # A trial is an actor, Tune's function trial (repr `pipeline_trial trial_<id>`, see
        # trainables.internals.TrialNamedActor), with several workers also its RayTrainWorker
        # actors; the Actors page lists them with their PIDs and logs.
        print(f"Ray dashboard: {dashboard}  (Actors page: each trial's actor, `pipeline_trial <trial name>` or, "
              "when confirming, `candidate_trial <trial name>`, with the PID of the table's loc column, its "
              "RayTrainWorkers, and their logs)")
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":  # ray.init's default for a new cluster
            # Ray's dashboard takes the token only through its own form (no URL form): it sets
            # an HttpOnly cookie for 30 days, per host, and every local cluster shares
            # ~/.ray/auth_token, so a browser asks once, not once per search.
            print("               it asks once per browser for the cluster's auth token (kept 30 days): "
                  "`ray get-auth-token` prints it")
    print(f"TensorBoard:   tensorboard --logdir {plan.experiment}")
    print(f"Optuna study:  optuna-dashboard sqlite:///{plan.study_path}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fer.data import DataError
    from trainables.internals import VersionError  # Ray or Optuna outside the tested range

    try:
        plan = make_plan(args)
    except (UsageError, SpaceError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.time()
    try:
        dashboard = start_ray(plan)
    except (UsageError, VersionError) as err:  # a cluster that cannot be joined: before any work starts
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_start(plan, dashboard)
    study_view = start_dashboard(plan.study_path) if args.dashboard else None
    try:
        return search_and_finish(plan, started)
    finally:  # also on Ctrl-C and errors: the server is ours to stop
        stop_dashboard(study_view)


def search_and_finish(plan: Plan, started: float) -> int:
    """run_search, then finish; a failure a user can act on is one error line and 2."""
    from search.finish import finish
    from search.preflight import storage_failure
    from trainables.internals import VersionError

    try:
        run_search(plan)
    except (ValueError, VersionError) as err:  # e.g. a trial that can never fit on this cluster
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, EOFError, pickle.UnpicklingError) as err:  # storage full mid-search: Tune reads back
        # the truncated files it wrote (tests/test_faults.py)
        print(f"error: {storage_failure(plan.experiment, err)}", file=sys.stderr)
        return 2
    try:
        return finish(plan, wall_s=time.time() - started)  # the search's wall time; confirmation's is its own
    except OSError as err:  # the reports or the export could not be written
        print(f"error: {storage_failure(plan.experiment, err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
