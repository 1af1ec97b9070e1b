"""``expert_mode="triton"`` on the Ray executor: expert workers resolve the mode at load and run their
slots' rows (``ExpertShard.run_sorted``, fed by the exchange) in the fused Triton MoE; the greedy
tokens are those of the local grouped path. CPU workers run the kernels in Triton's interpreter:
the cluster is started with ``TRITON_INTERPRET=1`` in its environment, which the workers inherit."""

from __future__ import annotations

import pytest
import ray

from dsray import LLM, SamplingParams
from dsray.testing import make_hf_checkpoint

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def interpreted_cluster(fresh_ray):
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")  # before the cluster starts: its workers inherit it
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()
    mp.undo()


@pytest.mark.slow  # a Ray cluster and three workers, interpreted kernels
def test_triton_experts_on_expert_workers_give_the_local_grouped_tokens(interpreted_cluster, tmp_path):
    make_hf_checkpoint("v3", tmp_path)
    params = SamplingParams(temperature=0, max_tokens=8)
    with LLM(str(tmp_path), dtype="float32", device="cpu", expert_mode="grouped") as llm:
        expected = [out.token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]
    config = dict(executor="ray", num_expert_workers=2, device="cpu", expert_mode="triton")
    with LLM(str(tmp_path), dtype="float32", **config) as llm:
        assert [out.token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)] == expected
