"""trainables/: trial resources, finding the best checkpoint, and whole trials inside a Tuner.

The Ray tests (marked slow) share one local cluster (tests/conftest.py `ray_cluster`).
A 2-worker trial starts a Ray Train worker group, about 20 s on a 2-core machine, so
there is exactly one of them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fer.data import Dataset, Split
from trainables import (
    CHECKPOINT_FILE,
    TrialResources,
    best_checkpoint_path,
    check_fits,
    make_trainable,
    max_concurrent_trials,
    process_group_backend,
    put_dataset,
    scaling_config,
    train_run_name,
    trial_resources,
)
from trainables.checkpoints import FINAL_CHECKPOINT, checkpoint_dir_name
from trainables.resources import DRIVER_MEMORY

CLASSES = ["Angry", "Happy", "Sad"]
TINY = dict(model="mobilenet_v3_small", epoch_images=0, image_size=24, batch_size=64, epochs=1, student_epochs=1,
            augment="none",
            student_augment="none", amp=False, warmup_epochs=0, lr=3e-3, pseudo_threshold=0.0,
            pseudo_temperature=False)


def make_split(n: int, seed: int, size: int = 24) -> Split:
    """Noise images with a bright bar whose row band encodes the class (learnable in an epoch)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n).astype(np.int64)
    images = rng.integers(0, 80, (n, size, size, 1)).astype(np.uint8)
    band = size // len(CLASSES)
    for i, label in enumerate(labels):
        images[i, label * band:(label + 1) * band, 2:size - 2] = 230
    return Split(images, labels)


def tiny_dataset() -> Dataset:
    splits = {"train": make_split(240, 1), "val": make_split(60, 2), "test": make_split(30, 3),
              "unlabeled": make_split(120, 4)}
    return Dataset(classes=list(CLASSES), splits=splits, source="tests/test_trainables.py")


# --- resources ------------------------------------------------------------------------


def test_single_worker_trial_holds_its_worker_resources():
    pgf = trial_resources(TrialResources(workers=1, cpus_per_worker=2, gpus_per_worker=0.25))
    assert pgf.bundles == [{"CPU": 2.0, "GPU": 0.25}]


def test_multi_worker_trial_leaves_cpus_to_its_worker_group():
    pgf = trial_resources(TrialResources(workers=2, cpus_per_worker=1))
    assert pgf.bundles == [{"memory": float(DRIVER_MEMORY)}]
    assert pgf.required_resources.get("CPU", 0) == 0


def test_scaling_config_allows_fractional_gpus():
    sc = scaling_config(TrialResources(workers=4, cpus_per_worker=1, gpus_per_worker=0.25))
    assert sc.num_workers == 4 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 1.0, "GPU": 0.25}
    assert not scaling_config(TrialResources(workers=2)).use_gpu


@pytest.mark.parametrize("gpus, backend", [(0, "gloo"), (0.25, "gloo"), (1, "nccl"), (2, "nccl")])
def test_nccl_only_when_each_rank_has_whole_gpus(gpus, backend):
    # ranks sharing one GPU make NCCL fail with "Duplicate GPU detected" (ray-project/ray#48012)
    assert process_group_backend(TrialResources(workers=2, gpus_per_worker=gpus)) == backend


@pytest.mark.parametrize("kwargs, message", [
    (dict(workers=0), "workers per trial must be an integer >= 1, got 0"),
    (dict(workers=1.5), "workers per trial must be an integer >= 1, got 1.5"),
    (dict(cpus_per_worker=0), "cpus per worker must be > 0, got 0"),
    (dict(gpus_per_worker=-1), "gpus per worker must be 0, a fraction in (0, 1] or a whole number, got -1"),
    (dict(gpus_per_worker=1.5), "gpus per worker must be 0, a fraction in (0, 1] or a whole number, got 1.5"),
])
def test_bad_resources_are_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        TrialResources(**kwargs)
    assert str(err.value) == message


def test_a_trial_that_can_never_fit_is_refused_before_it_waits_forever():
    with pytest.raises(ValueError, match=r"one trial needs 1 GPU \(4 workers x 0.25\) but the Ray cluster has 0"):
        check_fits(TrialResources(workers=4, gpus_per_worker=0.25), {"CPU": 8.0})
    assert max_concurrent_trials(TrialResources(workers=2), {"CPU": 5.0}) == 2
    assert max_concurrent_trials(TrialResources(workers=1, gpus_per_worker=0.25), {"CPU": 16.0, "GPU": 1.0}) == 4


# --- finding the best checkpoint -------------------------------------------------------


def _write_checkpoint(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CHECKPOINT_FILE)
    with open(path, "wb") as handle:
        handle.write(b"weights")
    return path


def test_best_checkpoint_is_found_from_tune_and_from_train_rows(tmp_path):
    trial_dir = tmp_path / "exp" / "pipeline_trial_abc_00000"
    train_dir = tmp_path / "exp" / train_run_name("abc_00000")
    trial_dir.mkdir(parents=True)
    tune_ckpt = _write_checkpoint(str(trial_dir / "checkpoint_000000"))
    train_ckpt = _write_checkpoint(str(train_dir / checkpoint_dir_name(3)))
    rows = [
        {"epoch": 1, "val_macro_f1": 0.4, "checkpoint_dir_name": "checkpoint_000000"},
        {"epoch": 2, "val_macro_f1": 0.3},
        {"epoch": 3, "val_macro_f1": 0.6, "checkpoint_path": str(train_dir / checkpoint_dir_name(3))},
        {"epoch": 4, "val_macro_f1": 0.6, "checkpoint_path": str(train_dir / checkpoint_dir_name(4))},  # deleted
        {"epoch": 5, "val_macro_f1": 0.9},  # better, but no checkpoint
    ]
    (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert best_checkpoint_path(str(trial_dir)) == train_ckpt
    assert best_checkpoint_path(str(trial_dir), metric="epoch", mode="min") == tune_ckpt
    # A finished pipeline's final checkpoint (post-hoc offsets included) wins.
    (trial_dir / FINAL_CHECKPOINT).write_bytes(b"final")
    assert best_checkpoint_path(str(trial_dir)) == str(trial_dir / FINAL_CHECKPOINT)
    assert best_checkpoint_path(str(trial_dir), final=False) == train_ckpt


def test_for_the_post_hoc_metric_best_pt_wins_only_when_its_epoch_scores_best(tmp_path):
    """A search on val_macro_f1_posthoc exports the finished pipeline's best.pt (its numbers,
    the pool's ablation) when the pipeline picked the epoch that metric ranks first; else
    that epoch's own checkpoint, which carries the epoch's offsets."""
    import torch

    from fer.train.checkpoint import CHECKPOINT_KEYS

    trial_dir = tmp_path / "pipeline_trial_def_00000"
    trial_dir.mkdir()
    epoch_ckpt = _write_checkpoint(str(trial_dir / "checkpoint_000001"))
    rows = [{"epoch": 1, "val_macro_f1": 0.4, "val_macro_f1_posthoc": 0.45},
            {"epoch": 2, "val_macro_f1": 0.5, "val_macro_f1_posthoc": 0.55, "checkpoint_dir_name": "checkpoint_000001"}]
    (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = str(trial_dir / FINAL_CHECKPOINT)

    def write_final(score: float) -> None:
        torch.save({**{key: None for key in CHECKPOINT_KEYS}, "metrics": {"val_macro_f1_posthoc": score}}, final)

    write_final(0.55)  # the pipeline's epoch is the metric's best
    assert best_checkpoint_path(str(trial_dir), metric="val_macro_f1_posthoc") == final
    write_final(0.45)  # the pipeline kept another epoch than the metric ranks first
    assert best_checkpoint_path(str(trial_dir), metric="val_macro_f1_posthoc") == epoch_ckpt
    assert best_checkpoint_path(str(trial_dir)) == final  # the pipeline's own criterion: always best.pt


def test_missing_checkpoint_names_the_trial_folder(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"epoch": 1, "val_macro_f1": 0.5}) + "\n")
    with pytest.raises(ValueError, match=r"no reported epoch with metric 'val_macro_f1' has a checkpoint"):
        best_checkpoint_path(str(tmp_path))
    with pytest.raises(ValueError, match=r"not a Tune trial folder \(no result.json\)"):
        best_checkpoint_path(str(tmp_path / "nowhere"))


# --- Ray: object store and whole trials -------------------------------------------------


@pytest.mark.slow
def test_workers_map_the_dataset_read_only_from_the_object_store(ray_cluster):
    data = tiny_dataset()
    got = put_dataset(data).get()
    images = got.splits["train"].images
    assert not images.flags.writeable and not images.flags.owndata  # a view of the shared buffer
    np.testing.assert_array_equal(images, data.splits["train"].images)


def _run_trial(workers: int, storage: str, param_space: dict):
    from ray import tune

    data = tiny_dataset()
    ref = put_dataset(data)
    tuner = tune.Tuner(
        make_trainable(ref, TrialResources(workers=workers, cpus_per_worker=1)),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_macro_f1", mode="max"),
        run_config=tune.RunConfig(storage_path=storage, name=f"w{workers}", verbose=0),
    )
    grid = tuner.fit()
    for split in ("train", "unlabeled"):  # nothing wrote into the shared arrays
        np.testing.assert_array_equal(ref.get().splits[split].images, data.splits[split].images)
    return data, grid


def _check_full_trial(result, data: Dataset) -> dict:
    from fer.train.checkpoint import load_checkpoint

    assert result.error is None, result.error
    frame = result.metrics_dataframe
    epochs = frame["epoch"].tolist()
    assert epochs == [1, 2] and list(frame["stage"]) == ["teacher", "student"]
    assert all(b > a for a, b in zip(epochs, epochs[1:]))
    final = load_checkpoint(best_checkpoint_path(result))  # the finished pipeline's best.pt
    assert final["posthoc_offsets"] is not None and len(final["posthoc_offsets"]) == len(data.classes)
    ckpt = load_checkpoint(best_checkpoint_path(result, final=False))  # the best reported epoch
    assert ckpt["classes"] == data.classes and ckpt["config"]["image_size"] == 24
    if final["stage"] == "control":  # handed out as the best on val with offsets (fer.ssl.pipeline.final_stage)
        assert final["metrics"]["val_macro_f1_posthoc"] >= ckpt["metrics"]["val_macro_f1_posthoc"]
    else:
        assert (ckpt["epoch"], ckpt["stage"]) == (final["epoch"], final["stage"])
    best_row = frame.loc[frame["epoch"] == ckpt["epoch"]].iloc[0]
    assert ckpt["metrics"]["val_macro_f1"] == pytest.approx(best_row["val_macro_f1"])
    assert best_row["val_macro_f1"] == pytest.approx(frame["val_macro_f1"].max())
    events = os.listdir(os.path.join(result.path, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    return ckpt


@pytest.mark.slow
def test_single_worker_trial_runs_both_stages_in_a_tuner(ray_cluster, tmp_path):
    from ray import tune

    space = {**TINY, "lr": tune.grid_search([3e-3, -1.0])}  # the second trial is invalid
    data, grid = _run_trial(1, str(tmp_path), space)
    good = next(r for r in grid if r.config["lr"] > 0)
    bad = next(r for r in grid if r.config["lr"] < 0)
    _check_full_trial(good, data)
    assert good.checkpoint is not None  # reported straight to Tune
    assert "lr=-1.0 is outside the allowed range" in str(bad.error)


@pytest.mark.slow
def test_storage_keeps_the_best_and_the_latest_checkpoint_folder_of_a_trial(ray_cluster, tmp_path):
    """Every epoch reports a folder (checkpoint.pt: the epoch's model and its resume state),
    and storage keeps two: the best by the metric, which export reads, and the latest."""
    import torch
    from ray import tune

    from fer.train.checkpoint import load_checkpoint
    from trainables import RESUME_KEY, checkpoint_config

    tuner = tune.Tuner(
        make_trainable(put_dataset(tiny_dataset()), TrialResources(workers=1, cpus_per_worker=1)),
        param_space={**TINY, "epochs": 3, "student_epochs": 2},
        tune_config=tune.TuneConfig(metric="val_macro_f1", mode="max"),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="keep", verbose=0,
                                  checkpoint_config=checkpoint_config(tune.CheckpointConfig, "val_macro_f1", "max")),
    )
    result = tuner.fit()[0]
    assert result.error is None, result.error
    frame = result.metrics_dataframe
    assert frame["epoch"].tolist() == [1, 2, 3, 4, 5] and frame["checkpoint_dir_name"].notna().all()
    folders = sorted(p for p in os.listdir(result.path) if p.startswith("checkpoint_"))
    assert 1 <= len(folders) <= 2
    assert folders[-1] == frame["checkpoint_dir_name"].iloc[-1]  # the latest is kept
    kept = [load_checkpoint(os.path.join(result.path, f, CHECKPOINT_FILE)) for f in folders]
    assert all(set(k[RESUME_KEY]) >= {"stage", "fit"} for k in kept)  # every kept folder can be resumed from
    # the resume state's weights are the checkpoint's own: stored once in the file
    assert all(torch.equal(k["model"][n], k[RESUME_KEY]["fit"]["model"][n]) for k in kept for n in k["model"])
    best = best_checkpoint_path(result, final=False)
    assert load_checkpoint(best)["metrics"]["val_macro_f1"] == pytest.approx(frame["val_macro_f1"].max())


@pytest.mark.slow
def test_two_worker_trial_runs_the_pipeline_in_one_worker_group(ray_cluster, tmp_path):
    import torch

    from fer.train.checkpoint import model_from_checkpoint
    from fer.train.infer import predict_logits
    from fer.train.metrics import compute_metrics

    data, grid = _run_trial(2, str(tmp_path), dict(TINY))
    result = grid[0]
    ckpt = _check_full_trial(result, data)
    trial_id = result.metrics["trial_id"]
    train_dir = os.path.join(str(tmp_path), "w2", train_run_name(trial_id))
    assert best_checkpoint_path(result, final=False).startswith(train_dir + os.sep)  # named by trial id
    # The reported validation F1 (all-reduced over both ranks' shards) is the full split's.
    model = model_from_checkpoint(ckpt)
    val = data.splits["val"]
    with torch.no_grad():
        logits = predict_logits(model, val.images, image_size=24, amp=False)
    full = compute_metrics(val.labels, logits.argmax(1).numpy(), data.classes)
    assert ckpt["metrics"]["val_macro_f1"] == pytest.approx(full["macro_f1"], abs=1e-9)


@pytest.mark.slow
def test_a_stopped_trials_placement_group_is_released(ray_cluster, tmp_path):
    """What release_on_stop does when ASHA stops a multi-worker trial: the id the Train
    controller recorded is removed, so the next trial's workers can be placed."""
    from types import SimpleNamespace

    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from trainables.release import record_placement_group, remove_recorded

    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    path = str(tmp_path / "pg")
    state = SimpleNamespace(placement_group_handle=SimpleNamespace(placement_group=pg))
    record_placement_group(path).after_worker_group_start(SimpleNamespace(get_worker_group_state=lambda: state))
    assert remove_recorded(path) and not os.path.exists(path)
    assert placement_group_table(pg)["state"] == "REMOVED"
    assert not remove_recorded(path)  # nothing recorded any more: a no-op


@pytest.mark.slow
def test_a_trial_whose_ddp_worker_is_killed_resumes_after_its_last_epoch(ray_cluster, tmp_path):
    """Tune retries the trial; its new Train run, named after the trial, is restored by Ray
    Train and both ranks continue from the latest checkpoint's resume state, not epoch 1."""
    import signal

    from ray import tune

    from support import live_actor_pids, watch
    from trainables import checkpoint_config
    from trainables.worker import TIMING_FILE

    killed: list[int] = []

    def first_checkpoint_registered() -> bool:
        # Ray Train writes this snapshot once it has registered a reported checkpoint; a
        # folder that is uploaded but not yet registered is not resumed from (a worker
        # killed then restarts the run at epoch 1, which is right, but not this test).
        return any(checkpoint_dir_name(1) in path.read_text()
                   for path in tmp_path.glob("kill/train-*/checkpoint_manager_snapshot.json"))

    def kill_a_worker() -> None:
        pids = live_actor_pids("RayTrainWorker")
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    watch(first_checkpoint_registered, kill_a_worker, timeout_s=300, poll_s=0.05)
    tuner = tune.Tuner(
        make_trainable(put_dataset(tiny_dataset()), TrialResources(workers=2, cpus_per_worker=1)),
        param_space={**TINY, "epochs": 3, "student_epochs": 3},
        tune_config=tune.TuneConfig(metric="val_macro_f1", mode="max"),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="kill", verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  checkpoint_config=checkpoint_config(tune.CheckpointConfig, "val_macro_f1", "max")),
    )
    result = tuner.fit()[0]
    assert killed, "no Train worker was killed"
    assert result.error is None, result.error
    epochs = result.metrics_dataframe["epoch"].tolist()
    assert epochs == [1, 2, 3, 4, 5, 6]  # each epoch trained and reported once
    with open(os.path.join(result.path, TIMING_FILE)) as handle:
        assert json.load(handle)["resumed_after_epoch"] >= 1
    assert os.path.isfile(os.path.join(result.path, FINAL_CHECKPOINT))
    # storage kept the best checkpoint folder and the latest, not one per epoch
    train_dir = tmp_path / "kill" / train_run_name(result.metrics["trial_id"])
    assert 1 <= len(list(train_dir.glob("checkpoint_epoch_*"))) <= 2
