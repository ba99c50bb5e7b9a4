"""The searcher's Optuna samplers, by the name a space's `searcher.sampler` gives, and a dry
run of a space with an in-memory study. Optuna is imported only when a sampler is built."""

from __future__ import annotations

import warnings
from typing import Any, Callable


def _sampler_tpe(seed: int, n_startup_trials: int):
    import optuna

    # multivariate + group: TPE models the joint density within each group of
    # parameters that appear together, which is what a conditional space needs
    # (Falkner et al. 2018, BOHB; Optuna's `group` option).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=True
        )


def _sampler_random(seed: int, n_startup_trials: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SEARCH_SAMPLERS: dict[str, Callable[[int, int], Any]] = {
    "tpe": _sampler_tpe,
    "random": _sampler_random,
}


def sample_configs(space: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Draw `n` configs of `space` (a search.space.Space) with an in-memory Optuna study
    (random sampler): a dry run of the space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed),
                                direction="maximize" if space.mode == "max" else "minimize")
    configs = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)
        configs.append({**trial.params, **constants})
        study.tell(trial, 0.0)
    return configs
