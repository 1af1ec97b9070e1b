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
def three_nodes(fresh_ray):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    # Like cluster.yaml's node types: one node offers the attention role, one the expert role.
    attention = cluster.add_node(num_cpus=2, resources={"dsray_attention": 2})
    expert = cluster.add_node(num_cpus=2, resources={"dsray_expert": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield {"attention": attention.node_id, "expert": expert.node_id, "cluster": cluster}
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


def test_role_resources_pin_workers_to_their_node_type(three_nodes, tmp_path):
    model = make_model("tiny", tmp_path / "tiny", dtype="float32")
    expected = [o.token_ids for o in LLM(model, dtype="float32").generate(PROMPTS, GREEDY)]
    llm = LLM(
        model,
        dtype="float32",
        executor="ray",
        num_attention_workers=2,
        num_expert_workers=2,
        attention_worker_resources={"CPU": 0.5, "dsray_attention": 1},
        expert_worker_resources={"CPU": 0.5, "dsray_expert": 1},
    )
    try:
        locations = llm.engine.executor.locations()
        assert [loc["node_id"] for loc in locations[:2]] == [three_nodes["attention"]] * 2
        assert [loc["node_id"] for loc in locations[2:]] == [three_nodes["expert"]] * 2
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    finally:
        llm.engine.executor.shutdown()


def test_the_expert_pool_grows_onto_an_expert_node_added_while_serving(three_nodes, tmp_path):
    """The expert node's slots are all taken; a third expert worker asked for waits for room, and joins
    on the expert-role node that is added while the instance serves."""
    model = make_model("tiny", tmp_path / "tiny", dtype="float32")
    expected = [o.token_ids for o in LLM(model, dtype="float32").generate(PROMPTS, GREEDY)]
    llm = LLM(
        model,
        dtype="float32",
        executor="ray",
        num_expert_workers=2,
        attention_worker_resources={"CPU": 0.5, "dsray_attention": 1},
        expert_worker_resources={"CPU": 0.5, "dsray_expert": 1},
    )
    try:
        executor = llm.engine.executor
        llm.engine.scale(experts=3)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected  # serves on meanwhile
        executor.admit_workers()
        assert len(executor.experts) == 2 and executor.rebalancing  # no room for the third yet
        added = three_nodes["cluster"].add_node(num_cpus=1, resources={"dsray_expert": 1})
        executor.admit_workers(block=True)
        llm.engine.admit_workers()
        assert len(executor.experts) == 3 and executor.map.num_ranks == 3 and executor.degraded is None
        assert executor.locations()[-1]["node_id"] == added.node_id
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    finally:
        llm.engine.executor.shutdown()
