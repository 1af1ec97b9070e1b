"""A real local Ray cluster for the executor tests, shut down when the module is done."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()
