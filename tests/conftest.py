"""Shared fixtures."""

from __future__ import annotations

import os

import pytest


def start_session_ray() -> None:
    """The session's local cluster (also restarted by tests/test_multinode.py after its own)."""
    import ray

    ray.init(
        num_cpus=max(2, os.cpu_count() or 1),  # a 2-worker trial needs 2 CPUs even on 1 core
        include_dashboard=False,
        object_store_memory=256 * 2**20,  # tests put only tiny arrays
        configure_logging=False,
        log_to_driver=False,  # pytest shows the driver's output only; worker logs stay in /tmp/ray
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local Ray cluster for the whole test session: starting one costs seconds, and
    Ray's placement-group cleaner fails when two local clusters share a machine.
    Yields the cluster's resources (`ray.cluster_resources()`)."""
    import ray

    if ray.is_initialized():  # a test started one already: share it, leave it running
        yield ray.cluster_resources()
        return
    start_session_ray()
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
