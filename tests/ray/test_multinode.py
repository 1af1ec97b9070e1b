"""Workers spread over a simulated 3-node Ray cluster (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from dsray import LLM, SamplingParams
from dsray.make_model import make_model

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 40)), [100, 200]]


@pytest.fixture(scope="module")
def three_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_workers_on_distinct_nodes_and_outputs_identical(three_nodes, tmp_path):
    model = make_model("tiny", tmp_path / "tiny", dtype="float32")
    expected = [o.token_ids for o in LLM(model, dtype="float32").generate(PROMPTS, GREEDY)]
    llm = LLM(model, dtype="float32", executor="ray", num_expert_workers=2, placement_strategy="STRICT_SPREAD")
    try:
        nodes = {loc["node_id"] for loc in llm.engine.executor.locations()}
        assert len(nodes) == 3
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    finally:
        llm.engine.executor.shutdown()
