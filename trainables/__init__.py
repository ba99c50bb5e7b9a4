"""Ray at the edge: the Tune trial that runs the fer pipeline, and the resources it asks for."""

from trainables.checkpoints import (
    CHECKPOINT_FILE,
    RESUME_KEY,
    best_checkpoint_path,
    checkpoint_config,
    resume_state,
    train_run_name,
)
from trainables.resources import (
    TrialResources,
    check_fits,
    max_concurrent_trials,
    process_group_backend,
    scaling_config,
    trial_resources,
)
from trainables.trial import (
    candidate_trial,
    make_trainable,
    pipeline_trial,
    put_dataset,
    run_worker_group,
    share_dataset,
)
from trainables.worker import DataRef, MappedRef, detect_device

__all__ = [
    "CHECKPOINT_FILE",
    "RESUME_KEY",
    "DataRef",
    "MappedRef",
    "TrialResources",
    "best_checkpoint_path",
    "candidate_trial",
    "check_fits",
    "checkpoint_config",
    "detect_device",
    "make_trainable",
    "max_concurrent_trials",
    "pipeline_trial",
    "process_group_backend",
    "put_dataset",
    "resume_state",
    "run_worker_group",
    "scaling_config",
    "share_dataset",
    "train_run_name",
    "trial_resources",
]
