"""Live rebalancing on a Ray cluster: a model whose gate sends most tokens to two experts.

The planner (``router/eplb.py``) places the experts by the load the workers saw; the expert
workers load the new slots in the background and every rank switches at one step boundary.
Greedy outputs stay those of the local executor before, during and after; a load that fails
keeps the old placement and serving goes on.
"""

from __future__ import annotations

import shutil

import pytest

from dsray import LLM, SamplingParams
from dsray.config import ModelArgs
from dsray.testing import make_skewed_model
from router.eplb import plan_placement
from router.expert_map import ExpertMap

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [list(range(10 + 17 * i, 40 + 17 * i)) for i in range(6)]


@pytest.fixture(scope="module")
def ray_cluster(fresh_ray):
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Gates biased towards experts 0 and 1 (the article's "two experts take most tokens" case)."""
    return make_skewed_model(tmp_path_factory.mktemp("skewed") / "tiny")


@pytest.fixture(scope="module")
def expected(skewed):
    with LLM(skewed, dtype="float32") as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _rank_rows(llm: LLM) -> list[int]:
    """Rows each expert rank computed: the expert workers', or the attention workers' (num_expert_workers=0)."""
    timings = llm.engine.executor.timings()
    return [t["rows"] for t in timings["expert"]] or [t["rows_served"] for t in timings["attention"]]


def _imbalance(rows_before: list[int], rows_after: list[int]) -> float:
    work = [a - b for a, b in zip(rows_after, rows_before)]
    return max(work) / (sum(work) / len(work))


@pytest.mark.parametrize(("A", "E"), [(1, 2), (2, 0)])
def test_rebalance_moves_load_off_the_hot_rank_without_changing_outputs(ray_cluster, skewed, expected, A, E):
    """With expert workers, and with the experts on the attention workers (E=0: they load the new slots
    in the background between their own steps)."""
    args = ModelArgs.from_pretrained(skewed)
    with LLM(
        skewed,
        dtype="float32",
        executor="ray",
        num_attention_workers=A,
        num_expert_workers=E,
        num_redundant_experts=2,
    ) as llm:
        executor = llm.engine.executor
        rows = _rank_rows(llm)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected  # before
        before = _imbalance(rows, rows := _rank_rows(llm))
        load = executor.expert_load()
        assert sum(load[0][:2]) > 0.2 * sum(load[0])  # experts 0 and 1 take a big share of every token
        plan = plan_placement(load, num_ranks=2, num_redundant=2, current=executor.map.as_placement())
        old_map = executor.map
        new_map = ExpertMap(args.n_routed_experts, plan.slots, first_rank=old_map.first_rank)
        assert executor.rebalance(new_map) == 1
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected  # during: the switch is mid-run
        assert executor.map_version == 1 and not executor.rebalancing
        # the planned experts per rank, in slots aligned to the old map (held experts did not move)
        assert executor.map.placement == new_map.aligned_to(old_map).placement
        for layer, ranks in enumerate(executor.map.placement):
            assert [sorted(r) for r in ranks] == [sorted(r) for r in new_map.placement[layer]]
        assert executor.rebalance_stats["ok"] == 1 and executor.rebalance_stats["slots_moved"] > 0
        rows = _rank_rows(llm)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected  # after
        after = _imbalance(rows, _rank_rows(llm))
        assert after < before, (before, after)
        assert after < 1.15


def test_a_failed_weight_load_keeps_serving_on_the_old_placement(ray_cluster, skewed, expected, tmp_path):
    args = ModelArgs.from_pretrained(skewed)
    with LLM(skewed, dtype="float32", executor="ray", num_expert_workers=2, num_redundant_experts=2) as llm:
        executor = llm.engine.executor
        old = executor.map
        slots = [list(reversed(rank)) for rank in old.placement[0]]  # same experts in new slots: nothing to read
        a = next(i for i, e in enumerate(slots[0]) if e not in slots[1])
        b = next(i for i, e in enumerate(slots[1]) if e not in slots[0])
        slots[0][a], slots[1][b] = slots[1][b], slots[0][a]  # but two experts change rank: read from the file
        weights = skewed / "model.safetensors"
        hidden = tmp_path / "model.safetensors"
        shutil.move(weights, hidden)  # the checkpoint is gone while the workers try to read it
        try:
            executor.rebalance(ExpertMap.from_rank_slots(args.n_routed_experts, slots, old.num_layers, first_rank=1))
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
        finally:
            shutil.move(hidden, weights)
        assert executor.map is old and executor.map_version == 0 and not executor.rebalancing
        assert executor.rebalance_stats["failed"] == 1
        assert "could not load" in executor.rebalance_stats["last_error"]
        assert [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY)] == expected[:2]


@pytest.mark.parametrize("trigger", ["threshold", "on_demand"])
def test_the_engine_rebalances_on_its_own_when_the_load_is_skewed(ray_cluster, skewed, expected, trigger):
    policy = {"eplb_imbalance_threshold": 1.1} if trigger == "threshold" else {}
    with LLM(
        skewed,
        dtype="float32",
        executor="ray",
        num_expert_workers=2,
        num_redundant_experts=2,
        eplb_window_steps=4,
        **policy,
    ) as llm:
        engine, executor = llm.engine, llm.engine.executor
        if trigger == "on_demand":
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
            assert executor.map_version == 0  # no policy: nothing moves by itself
            assert engine.request_rebalance()
        for _ in range(8):  # the plan runs on a thread; the switch follows at a step boundary
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
            if executor.map_version >= 1:
                break
        eplb = engine.stats()["eplb"]
        assert executor.map_version >= 1 and eplb["ok"] >= 1 and eplb["failed"] == 0, eplb
        assert eplb["imbalance"] is not None
        rows = _rank_rows(llm)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
        assert _imbalance(rows, _rank_rows(llm)) < 1.15


def test_a_placement_for_another_shape_is_refused(ray_cluster, skewed):
    with LLM(skewed, dtype="float32", executor="ray", num_expert_workers=2) as llm:
        n = llm.engine.args.n_routed_experts
        with pytest.raises(ValueError, match="must keep"):
            llm.engine.executor.rebalance(ExpertMap.contiguous(n, 3, llm.engine.executor.map.num_layers, first_rank=1))
