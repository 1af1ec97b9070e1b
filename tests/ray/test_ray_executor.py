"""The Ray executor (attention + expert actors, gloo all-to-all) against the local executor."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace

import pytest
import ray

from dsray import LLM, SamplingParams
from dsray.async_llm import AsyncLLM
from dsray.engine_config import EngineConfig
from dsray.make_model import make_model
from dsray.protocol import SeqStep, StepInput
from dsray.ray_executor import RayExecutor
from dsray.testing import make_hf_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 47)), [100, 200], list(range(300, 321))]
# Every worker of the lifecycle tests takes one of these: a leaked placement group blocks the next instance.
SLOT = {"CPU": 1, "dsray_test_slot": 1}


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


@pytest.fixture(scope="module")
def slots_cluster(fresh_ray):
    ray.init(address="local", num_cpus=8, resources={"dsray_test_slot": 2}, include_dashboard=False)
    yield
    ray.shutdown()


def _ep_llm(path, A: int, E: int, **kw) -> LLM:
    """A float32 Ray-executor ``LLM`` with A attention and E expert workers."""
    return LLM(path, dtype="float32", executor="ray", num_attention_workers=A, num_expert_workers=E, **kw)


@pytest.mark.parametrize("model", ["v3", "v2"])
@pytest.mark.parametrize(("A", "E", "redundant"), [(1, 1, 0), (1, 2, 0), (2, 2, 0), (1, 3, 0), (1, 2, 4), (2, 3, 5)])
def test_ray_executor_matches_local(slots_cluster, models, local_outputs, model, A, E, redundant):
    with _ep_llm(models[model], A, E, num_redundant_experts=redundant) as llm:
        executor = llm.engine.executor
        if (E, redundant) == (3, 0):
            assert executor.map.ranges == [(0, 6), (6, 11), (11, 16)]  # uneven shards
        assert executor.map.num_redundant == redundant
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs[model]
        # One request on two attention ranks: the idle rank still takes part in every exchange.
        assert llm.generate(PROMPTS[1], GREEDY)[0].token_ids == local_outputs[model][1]
        load = executor.expert_load()
        assert len(load) == len(llm.engine.args.moe_layer_ids) and len(load[0]) == llm.engine.args.n_routed_experts
        # Every routed token counted once per layer: tokens run × experts per token.
        assert sum(load[0]) % llm.engine.args.num_experts_per_tok == 0 and sum(load[0]) > 0
        rows = sum(t["rows"] for t in executor.timings()["expert"])
        assert rows == sum(map(sum, load))  # every routed pair computed once, on some replica


@pytest.mark.parametrize(
    ("model", "A", "E", "share", "micro_batches"), [("v3", 1, 1, 0.5, True), ("v2", 2, 2, 0.25, False)]
)
def test_attention_workers_with_local_experts_match_local(
    slots_cluster, models, local_outputs, model, A, E, share, micro_batches
):
    """Attention workers that also hold a share of the experts compute those pairs themselves: the same
    tokens, and every routed pair computed once, on an attention or an expert worker."""
    with _ep_llm(
        models[model], A, E, local_expert_share=share, micro_batch_overlap=micro_batches, micro_batch_min_tokens=2
    ) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS * 2, GREEDY)] == local_outputs[model] * 2
        timings = llm.engine.executor.timings()
        local_rows = sum(t["local_rows"] for t in timings["attention"])
        expert_rows = sum(t["rows"] for t in timings["expert"])
        assert local_rows > 0 and expert_rows > 0
        assert local_rows + expert_rows == sum(map(sum, llm.engine.executor.expert_load()))


@pytest.mark.parametrize(("model", "A", "redundant"), [("v3", 1, 0), ("v2", 2, 0), ("v3", 2, 3), ("v3", 3, 0)])
def test_attention_workers_holding_the_experts_match_local(slots_cluster, models, local_outputs, model, A, redundant):
    """num_expert_workers=0: the attention workers are the expert ranks, each serving the others' rows.
    The same tokens; every routed pair computed once; an idle attention worker still serves its slots."""
    with _ep_llm(models[model], A, 0, num_redundant_experts=redundant) as llm:
        executor = llm.engine.executor
        assert (executor.map.first_rank, executor.map.num_ranks, executor.map.num_redundant) == (0, A, redundant)
        assert executor.experts == [] and len(executor.workers) == A
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs[model]
        served = [t["rows_served"] for t in executor.timings()["attention"]]
        assert sum(served) == sum(map(sum, executor.expert_load()))
        assert llm.generate(PROMPTS[1], GREEDY)[0].token_ids == local_outputs[model][1]  # one rank busy, all serve
        after = [t["rows_served"] for t in executor.timings()["attention"]]
        assert all(b > a for a, b in zip(served, after))
        # Experts on every rank: a second micro-batch would read them again, so a step runs one round per layer.
        seqs = [SeqStep(str(i), 16, 0, [], True) for i in range(4)]
        assert executor._num_micro_batches([StepInput(seqs=seqs)]) == 1


def test_micro_batches_by_default_only_where_attention_workers_hold_no_experts():
    """The rule alone (no workers): two rounds for a big enough step, unless attention workers compute routed
    experts themselves (a second round would read them again); an explicit setting wins over the default."""
    big = [StepInput(seqs=[SeqStep(str(i), 16, 0, [], True) for i in range(4)])]
    small = [StepInput(seqs=[SeqStep("0", 1, 5, [], True)])]

    def rounds(steps, experts_on_attention=False, **config) -> int:
        config = EngineConfig.model_construct(model="m", executor="ray", **config)  # the fields the rule reads
        executor = SimpleNamespace(config=config, experts_on_attention=experts_on_attention)
        return RayExecutor._num_micro_batches(executor, steps)

    assert rounds(big) == 2 and rounds(small) == 1
    assert rounds(big, local_expert_share=0.5) == 1
    assert rounds(big, local_expert_share=0.5, micro_batch_overlap=True) == 2
    assert rounds(big, micro_batch_overlap=False) == 1
    assert rounds(big, experts_on_attention=True, micro_batch_overlap=True) == 1


def test_overlap_on_and_off_give_identical_outputs(slots_cluster, models, local_outputs):
    """Shared experts during the exchange and two micro-batches per step (each one's logits as soon as it is
    done) change the schedule, not the result."""
    rounds = {}
    for overlap in (False, True):
        with LLM(
            models["v3"],
            dtype="float32",
            executor="ray",
            num_attention_workers=2,
            num_expert_workers=2,
            num_redundant_experts=2,
            overlap_shared_experts=overlap,
            micro_batch_overlap=overlap,
            micro_batch_min_tokens=2,  # split even the 2-sequence decode steps of this small test
        ) as llm:
            prompts = PROMPTS * 2
            assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == local_outputs["v3"] * 2
            rounds[overlap] = sum(t["rounds"] for t in llm.engine.executor.timings()["expert"])
    assert rounds[True] > rounds[False]  # the micro-batches really ran as extra exchange rounds


def test_a_placement_that_cannot_work_is_refused_before_anything_starts(slots_cluster, models):
    with pytest.raises(ValueError, match=r"expert_placement: .*experts \[15\] have no slot"):
        LLM(models["v3"], executor="ray", num_expert_workers=2, expert_placement=[list(range(8)), list(range(8, 15))])
    with pytest.raises(ValueError, match="num_redundant_experts: .*does not fit"):
        LLM(models["v3"], executor="ray", num_expert_workers=2, num_redundant_experts=17)
    with pytest.raises(ValueError, match="need executor='ray'"):
        LLM(models["v3"], num_redundant_experts=2)
    with pytest.raises(ValueError, match="local_expert_share .* needs executor='ray'"):
        LLM(models["v3"], local_expert_share=0.5)
    with pytest.raises(ValueError, match="local_expert_share"):
        LLM(models["v3"], executor="ray", local_expert_share=1.5)
    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
    )


def test_user_placement_with_replicas_matches_local(slots_cluster, models, local_outputs):
    placement = [[15, 3, 0, 7, 1, 2, 4, 5], [6, 8, 9, 10, 11, 12, 13, 14, 0, 3]]
    with LLM(models["v3"], dtype="float32", executor="ray", num_expert_workers=2, expert_placement=placement) as llm:
        assert llm.engine.executor.map.rank_slots(1)[0] == placement[1]
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs["v3"]


def _ray_llm(models, **kw):
    return LLM(
        models["v3"],
        dtype="float32",
        executor="ray",
        attention_worker_resources=SLOT,
        expert_worker_resources=SLOT,
        placement_timeout_s=15,
        **kw,
    )


def test_lifecycle_releases_workers_for_the_next_instance(slots_cluster, models, local_outputs):
    """``with``, ``shutdown()`` and garbage collection each free the cluster: the next instance starts at once."""
    with _ray_llm(models) as llm:
        assert llm.generate(PROMPTS[0], GREEDY)[0].token_ids == local_outputs["v3"][0]
    llm = _ray_llm(models)
    llm.shutdown()
    llm.shutdown()  # idempotent
    llm = _ray_llm(models)
    assert llm.generate(PROMPTS[2], GREEDY)[0].token_ids == local_outputs["v3"][2]
    del llm
    gc.collect()
    llm = _ray_llm(models)  # would wait placement_timeout_s and fail if the dropped one held its bundles
    assert llm.generate(PROMPTS[3], GREEDY)[0].token_ids == local_outputs["v3"][3]
    llm.shutdown()


def _collect(llm: AsyncLLM, prompts) -> list[list[int]]:
    async def one(prompt):
        outs = [out async for out in llm.generate(prompt, GREEDY)]
        return outs[-1].token_ids

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(main())


@pytest.mark.parametrize("engine_process", [False, True])
def test_async_llm_lifecycle_and_engine_process_with_ray(slots_cluster, models, local_outputs, engine_process):
    """The serving engine loop runs in its own process with the Ray executor too; shutdown and GC free the workers."""
    config = EngineConfig(
        model=str(models["v3"]),
        dtype="float32",
        executor="ray",
        attention_worker_resources=SLOT,
        expert_worker_resources=SLOT,
        placement_timeout_s=15,
        engine_process=engine_process,
    )
    with AsyncLLM(config) as llm:
        assert (llm.engine_pid is not None) == engine_process
        assert _collect(llm, PROMPTS) == local_outputs["v3"]
    llm = AsyncLLM(config)
    assert _collect(llm, PROMPTS[:1]) == local_outputs["v3"][:1]
    del llm
    gc.collect()
    llm = AsyncLLM(config)
    assert _collect(llm, PROMPTS[1:2]) == local_outputs["v3"][1:2]
    llm.shutdown()


def test_streams_of_a_running_async_llm_survive_losing_its_only_attention_worker(slots_cluster, models):
    """The serving path (AsyncLLM on its loop thread): the only attention worker dies mid-stream, its
    sequences — and their KV cache — are recomputed on its replacement, and every stream finishes with
    the tokens it would have had (more in tests/ray/test_worker_loss.py)."""
    config = EngineConfig(
        model=str(models["v3"]), dtype="float32", executor="ray", num_expert_workers=2, step_timeout_s=30
    )
    llm = AsyncLLM(config)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def consume(prompt, first):
        token_ids = []
        async for out in llm.generate(prompt, params):
            first.set()
            token_ids = out.token_ids
        return token_ids

    async def main():
        started = [asyncio.Event() for _ in PROMPTS]
        tasks = [asyncio.create_task(consume(p, e)) for p, e in zip(PROMPTS, started)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
        ray.kill(llm.engine.executor.attention[0])
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)

    try:
        outputs = asyncio.run(main())
        want = [o.token_ids for o in LLM(models["v3"], dtype="float32").generate(PROMPTS, params)]
        assert outputs == want
        assert llm.is_healthy and llm.engine.executor.losses["attention_workers_lost"] == 1
    finally:
        llm.shutdown()


def test_unplaceable_workers_fail_fast_with_what_is_missing(slots_cluster, models):
    with pytest.raises(RuntimeError, match="could not place"):
        LLM(
            models["v3"],
            dtype="float32",
            executor="ray",
            expert_worker_resources={"CPU": 1, "dsray_expert": 1},
            placement_timeout_s=2,
        )
