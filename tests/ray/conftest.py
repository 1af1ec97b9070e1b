"""Ray sessions for the executor tests: each module starts its own and shuts it down."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def fresh_ray():
    """End a Ray session an earlier test directory left up (tests/deploy keeps one per session)."""
    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(fresh_ray):
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()
