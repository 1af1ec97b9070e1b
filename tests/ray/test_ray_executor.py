"""The Ray executor (attention + expert actors, gloo all-to-all) against the local executor."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from dsray import LLM, SamplingParams
from dsray.async_llm import AsyncLLM
from dsray.engine_config import EngineConfig
from dsray.make_model import make_model
from dsray.testing import make_hf_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 47)), [100, 200], list(range(300, 321))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    v2 = root / "v2"
    make_hf_checkpoint("v2", v2)  # softmax, group_limited_greedy
    return {"v3": make_model("tiny", root / "v3", dtype="float32"), "v2": v2}  # v3: sigmoid, noaux_tc


@pytest.fixture(scope="module")
def local_outputs(models):
    return {
        name: [o.token_ids for o in LLM(path, dtype="float32").generate(PROMPTS, GREEDY)]
        for name, path in models.items()
    }


@pytest.mark.parametrize("model", ["v3", "v2"])
@pytest.mark.parametrize(("A", "E"), [(1, 1), (1, 2), (2, 2), (1, 3)])
def test_ray_executor_matches_local(ray_cluster, models, local_outputs, model, A, E):
    llm = LLM(models[model], dtype="float32", executor="ray", num_attention_workers=A, num_expert_workers=E)
    try:
        executor = llm.engine.executor
        if E == 3:
            assert executor.map.ranges == [(0, 6), (6, 11), (11, 16)]  # uneven shards
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs[model]
        # One request on two attention ranks: the idle rank still takes part in every exchange.
        assert llm.generate(PROMPTS[1], GREEDY)[0].token_ids == local_outputs[model][1]
        load = executor.expert_load()
        assert len(load) == len(llm.engine.args.moe_layer_ids) and len(load[0]) == llm.engine.args.n_routed_experts
        # Every routed token counted once per layer: tokens run × experts per token.
        assert sum(load[0]) % llm.engine.args.num_experts_per_tok == 0 and sum(load[0]) > 0
    finally:
        llm.engine.executor.shutdown()


def test_killing_an_expert_worker_fails_requests_cleanly(ray_cluster, models):
    config = EngineConfig(
        model=str(models["v3"]), dtype="float32", executor="ray", num_expert_workers=2, step_timeout_s=10
    )
    llm = AsyncLLM(config)
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

    async def consume(prompt):
        try:
            async for _ in llm.generate(prompt, params):
                pass
        except Exception as exc:  # every in-flight request must end with an error, not hang
            return exc
        return None

    async def main():
        tasks = [asyncio.create_task(consume(p)) for p in PROMPTS]
        await asyncio.sleep(1.0)
        ray.kill(llm.engine.executor.experts[1])
        start = time.monotonic()
        errors = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        return errors, time.monotonic() - start

    try:
        errors, elapsed = asyncio.run(main())
        assert all(e is not None for e in errors)
        assert "expert worker 1" in str(errors[0]) or "expert worker 1" in str(llm.error)
        assert not llm.is_healthy and elapsed < 20
    finally:
        llm.shutdown()


def test_unplaceable_workers_fail_fast_with_what_is_missing(ray_cluster, models):
    with pytest.raises(RuntimeError, match="could not place"):
        LLM(
            models["v3"],
            dtype="float32",
            executor="ray",
            expert_worker_resources={"CPU": 1, "dsray_expert": 1},
            placement_timeout_s=2,
        )
