"""A search on a two-node Ray cluster (`ray.cluster_utils.Cluster`): trials run on both
nodes, the data reaches them only through the object store, checkpoints land in the one
storage folder.

Two local clusters on one machine confuse Ray ("Found multiple active Ray instances"),
so the fixture stops the session's cluster first and starts it again afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from search import run as search_run
from trainables import best_checkpoint_path

SPACE = """\
fixed: {model: mobilenet_v3_small, epoch_images: 0, epochs: 1, student_epochs: 0, image_size: 32, batch_size: 64}
parameters:
  lr: {loguniform: [1.0e-3, 5.0e-3]}
searcher: {seed: 0, n_startup_trials: 1, baseline: {lr: 0.002}}
scheduler: {grace_period: 1}
run: {num_samples: 2, max_concurrent: 2, confirm_top: 0}
"""
NODE_MEMORY = 128 * 2**20  # object store per node: the tiny data set is well under 10 MB


@pytest.fixture
def two_nodes():
    """Head and worker node with one CPU each, so two concurrent trials must use both."""
    import ray
    from ray.cluster_utils import Cluster

    from conftest import start_session_ray

    session_was_up = ray.is_initialized()
    if session_was_up:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 1}, "object_store_memory": NODE_MEMORY,
        "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=NODE_MEMORY)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if session_was_up:
            start_session_ray()


def trial_nodes(trial_dirs: list[Path]) -> dict[str, str]:
    """Trial folder -> id of the node its process ran on (result.json's pid in the GCS actor table)."""
    from ray._private import state

    node_of_pid = {info["Pid"]: info["Address"]["NodeID"] for info in state.actors().values()
                   if info["ActorClassName"] == "ImplicitFunc"}
    out = {}
    for trial in trial_dirs:
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
        out[trial.name] = node_of_pid[rows[-1]["pid"]]
    return out


@pytest.mark.slow
def test_search_runs_trials_on_both_nodes_with_data_from_the_object_store(two_nodes, tmp_path, capsys,
                                                                           monkeypatch):
    from fer.data.synth import write_csv

    cache = tmp_path / "cache"
    monkeypatch.setenv("FER_CACHE_DIR", str(cache))
    data = Path(write_csv(tmp_path / "data", seed=0, scale=0.1))
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = tmp_path / "shared"

    real_run_search = search_run.run_search

    def run_without_data_files(plan):
        # From here on the data exists only in the driver's memory and the object store.
        data.unlink()
        shutil.rmtree(cache, ignore_errors=True)
        return real_run_search(plan)

    monkeypatch.setattr(search_run, "run_search", run_without_data_files)
    code = search_run.main(["--space", str(tmp_path / "space.yaml"), "--data", str(data),
                            "--storage", str(storage), "--name", "two-nodes", "--address", two_nodes.address])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    assert not data.exists()

    experiment = storage / "two-nodes"
    frame = pd.read_csv(experiment / "trials.csv")
    assert len(frame) == 2 and set(frame["status"]) == {"TERMINATED"}
    trials = sorted(experiment.glob("trial_*"))
    nodes = trial_nodes(trials)
    expected = {two_nodes.head_node.node_id, *(node.node_id for node in two_nodes.worker_nodes)}
    assert set(nodes.values()) == expected, nodes  # one trial on each node
    for trial in trials:  # every node wrote its checkpoints into the one storage folder
        assert list(trial.glob("checkpoint_*/checkpoint.pt"))
        best = Path(best_checkpoint_path(trial))  # what search.export reads
        # the pipeline's final checkpoint: with one epoch, ASHA's only rung is at max_t,
        # and the weaker trial used to be stopped there before writing it (search/asha.py)
        assert best == trial / "best.pt" and best.is_file()
    assert (experiment / "export" / "model.onnx").is_file()
