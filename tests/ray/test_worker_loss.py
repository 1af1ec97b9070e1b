"""Losing a worker loses no request: SIGKILL an expert or attention worker mid-stream, every request
finishes with the local executor's tokens, and a replacement joins.

Workers are found as an operator would find them: live actors of class ``ExpertWorker`` in Ray's
actor table, and their processes killed with SIGKILL (a crash, the OOM killer).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading

import pytest
import ray

from dsray import LLM, SamplingParams
from dsray.make_model import make_model

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 47)), [100, 200], list(range(300, 321))]


@pytest.fixture(scope="module")
def cluster(fresh_ray):
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny", dtype="float32")


@pytest.fixture(scope="module")
def local_outputs(model):
    return [o.token_ids for o in LLM(model, dtype="float32").generate(PROMPTS, GREEDY)]


def _live(class_name: str) -> dict[str, int]:
    """Live actors of ``class_name``: actor id -> pid (from the GCS actor table)."""
    import ray._private.state

    return {
        actor_id: info["Pid"]
        for actor_id, info in ray._private.state.actors().items()
        if info["ActorClassName"] == class_name and info["State"] == "ALIVE"
    }


def _pid_of(executor, expert: int, role: str = "experts") -> int:
    return ray.get(getattr(executor, role)[expert].location.remote())["pid"]


def _generate(llm: LLM, kills: dict[int, list[int]], mid_step: bool = True) -> list[list[int]]:
    """Run PROMPTS step by step; before step ``n`` in ``kills``, SIGKILL those pids (with ``mid_step``,
    from a thread a moment after the step started, so the kill lands inside its exchanges)."""
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    finished: dict[str, list[int]] = {}
    n = 0
    while engine.has_unfinished():
        for pid in kills.get(n, []):
            if mid_step:
                threading.Timer(0.005, os.kill, (pid, signal.SIGKILL)).start()
            else:
                os.kill(pid, signal.SIGKILL)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.token_ids
        n += 1
    return [finished[i] for i in ids]


@pytest.mark.parametrize(
    ("E", "redundant", "placement"),
    [
        (2, 0, None),  # no replicas: the survivor reads the lost experts from the checkpoint
        (2, None, [list(range(16)), list(range(16))]),  # every expert on both: nothing to load
        (3, 5, None),  # some replicas, some experts reloaded
        (1, 0, None),  # the only expert worker: requests wait for the replacement
    ],
)
def test_an_expert_worker_killed_mid_stream_loses_no_request(cluster, model, local_outputs, E, redundant, placement):
    options = {"expert_placement": placement} if placement else {"num_redundant_experts": redundant}
    with LLM(model, dtype="float32", executor="ray", num_expert_workers=E, step_timeout_s=30, **options) as llm:
        executor = llm.engine.executor
        victim = _pid_of(executor, E - 1)
        before = set(_live("ExpertWorker"))
        assert _generate(llm, {5: [victim]}) == local_outputs
        assert executor.losses["expert_workers_lost"] == 1 and executor.losses["steps_rerun"] >= 1
        assert executor.degraded is None or "expert worker" in executor.degraded
        # The replacement joins at a step boundary; the full placement is back and serves the same tokens.
        executor.admit_workers(block=True)
        assert executor.degraded is None and executor.losses["replacements_joined"] == 1
        assert len(executor.experts) == E and executor.map.placement == executor.full_map.placement
        now = set(_live("ExpertWorker"))
        assert len(now - before) == 1 and len(before - now) == 1  # one new process, the killed one gone
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs


@pytest.mark.parametrize("A", [2, 1])
def test_an_attention_worker_killed_mid_stream_loses_no_request(cluster, model, local_outputs, A):
    """Its sequences are recomputed from their tokens on the surviving attention rank (A=2) or, with no
    survivor, on its replacement (A=1): every stream goes on where it was, nothing repeated or skipped."""
    with LLM(model, dtype="float32", executor="ray", num_attention_workers=A, step_timeout_s=30) as llm:
        executor, engine = llm.engine.executor, llm.engine
        before = set(_live("AttentionWorker"))
        assert _generate(llm, {5: [_pid_of(executor, A - 1, "attention")]}) == local_outputs
        assert executor.losses["attention_workers_lost"] == 1
        assert len(engine.schedulers) == executor.num_attention_ranks == len(executor.attention)
        if A == 2:
            assert executor.num_attention_ranks == 1 and "attention worker 1 lost" in executor.degraded
        engine.executor.admit_workers(block=True)
        engine.step()  # the engine adds a scheduler for the rank that joined
        assert executor.degraded is None and len(engine.schedulers) == executor.num_attention_ranks == A
        assert len(set(_live("AttentionWorker")) - before) == 1
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs
        # Nothing leaked: every rank's KV blocks are free again.
        assert all(s.block_manager.num_free_blocks == s.block_manager.num_total_blocks for s in engine.schedulers)


def test_two_kills_in_a_row(cluster, model, local_outputs):
    with LLM(model, dtype="float32", executor="ray", num_expert_workers=3, step_timeout_s=30) as llm:
        executor = llm.engine.executor
        first, second = _pid_of(executor, 2), _pid_of(executor, 0)
        # The second dies while the first's replacement may still be loading.
        assert _generate(llm, {3: [first], 6: [second]}) == local_outputs
        assert executor.losses["expert_workers_lost"] == 2
        executor.admit_workers(block=True)
        assert executor.degraded is None and len(executor.experts) == 3
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs


def test_a_kill_during_a_rebalance_drops_it_and_serves_on(cluster, model, local_outputs):
    from router.expert_map import ExpertMap

    with LLM(model, dtype="float32", executor="ray", num_expert_workers=2, step_timeout_s=30) as llm:
        executor = llm.engine.executor
        swapped = ExpertMap(16, [list(reversed(ranks)) for ranks in executor.map.placement], executor.map.first_rank)
        executor.rebalance(swapped)  # every expert moves: the workers are loading when one dies
        assert executor.rebalancing
        assert _generate(llm, {1: [_pid_of(executor, 1)]}) == local_outputs
        assert executor.rebalance_stats["failed"] == 1 and "lost" in executor.rebalance_stats["last_error"]
        executor.admit_workers(block=True)
        assert executor.degraded is None
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs


def test_no_expert_worker_left_and_none_can_load_fails_cleanly(cluster, model, tmp_path):
    """Limits: the only expert worker dies and its replacement cannot start (the checkpoint is gone):
    the step waits for it, bounded, then fails with a message that says what happened."""
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    llm = LLM(copy, dtype="float32", executor="ray", num_expert_workers=1, step_timeout_s=15)
    try:
        executor = llm.engine.executor
        victim = _pid_of(executor, 0)
        shutil.rmtree(copy)
        with pytest.raises(RuntimeError, match="nothing left to serve with"):
            _generate(llm, {2: [victim]}, mid_step=False)
        assert executor.dead and "expert worker 0 lost" in executor.dead and "config.json" in executor.dead, (
            executor.dead
        )
    finally:
        llm.shutdown()


@pytest.mark.parametrize("victim", [0, 1])
def test_with_the_experts_on_the_attention_workers_a_killed_worker_loses_no_request(
    cluster, model, local_outputs, victim
):
    """num_expert_workers=0: a lost worker takes its share of the experts and its sequences. The survivor
    takes over both (its new slots read from the checkpoint, the sequences recomputed), the streams go on
    with the local executor's tokens, and the replacement joins with its own share back."""
    with LLM(
        model, dtype="float32", executor="ray", num_attention_workers=2, num_expert_workers=0, step_timeout_s=30
    ) as llm:
        executor, engine = llm.engine.executor, llm.engine
        full = executor.map.placement
        with pytest.raises(ValueError, match="num_expert_workers=0"):
            executor.scale(attention=3)
        assert _generate(llm, {4: [_pid_of(executor, victim, "attention")]}) == local_outputs
        assert executor.losses["attention_workers_lost"] == 1 and executor.losses["steps_rerun"] >= 1
        assert f"attention worker {victim} lost" in executor.degraded
        assert executor.map.num_ranks == 1 and executor.map.first_rank == 0  # the survivor holds every expert
        engine.executor.admit_workers(block=True)
        engine.step()  # the engine adds a scheduler for the rank that joined
        assert executor.degraded is None and len(engine.schedulers) == executor.num_attention_ranks == 2
        # Each worker holds its full-placement share again (the replacement now last in rank order).
        placement = executor.map.placement
        assert [sorted(r) for r in placement[0]] == [sorted(full[0][k]) for k in executor.attention_index]
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == local_outputs
        assert all(s.block_manager.num_free_blocks == s.block_manager.num_total_blocks for s in engine.schedulers)


def _generate_with(llm: LLM, actions: dict[int, object]) -> list[list[int]]:
    """Run PROMPTS (LONG) step by step, calling ``actions[n]()`` before step ``n``."""
    engine = llm.engine
    ids = [engine.add_request(p, LONG) for p in PROMPTS]
    finished: dict[str, list[int]] = {}
    n = 0
    while engine.has_unfinished():
        if n in actions:
            actions[n]()
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.token_ids
        n += 1
    return [finished[i] for i in ids]


LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def long_outputs(model):
    return [o.token_ids for o in LLM(model, dtype="float32").generate(PROMPTS, LONG)]


def test_scaling_both_pools_up_and_down_under_load_fails_no_request(cluster, model, long_outputs):
    with LLM(model, dtype="float32", executor="ray", num_expert_workers=2, step_timeout_s=30) as llm:
        engine, executor = llm.engine, llm.engine.executor
        joined = {}

        def up():
            engine.scale(attention=2, experts=3)
            assert executor.rebalancing  # new workers are loading: the balancer waits

        def wait_and_down():
            executor.admit_workers(block=True)  # they joined at this step boundary
            engine.admit_workers()
            joined["A"], joined["E"] = executor.num_attention_ranks, len(executor.experts)
            joined["ranks"], joined["schedulers"] = executor.map.num_ranks, len(engine.schedulers)
            engine.scale(attention=1, experts=1)  # rank 1's sequences move; 2 expert workers hand theirs over

        assert _generate_with(llm, {3: up, 30: wait_and_down}) == long_outputs
        assert joined == {"A": 2, "E": 3, "ranks": 3, "schedulers": 2}
        assert executor.num_attention_ranks == len(engine.schedulers) == 1 and len(executor.experts) == 1
        assert executor.map.num_ranks == 1 and sorted(executor.map.placement[0][0]) == list(range(16))
        assert executor.degraded is None and executor.losses["attention_workers_lost"] == 0
        assert len(_live("ExpertWorker")) >= 1 and len(_live("AttentionWorker")) >= 1
        assert all(s.block_manager.num_free_blocks == s.block_manager.num_total_blocks for s in engine.schedulers)
        with pytest.raises(ValueError, match="experts in"):
            engine.scale(experts=17)


def test_the_expert_pool_autoscales_on_its_compute_share(cluster, model, long_outputs):
    """With experts_busy_high at 0 any expert compute counts as busy: the pool grows to experts_max while
    requests run, and their tokens do not change."""
    autoscaling = {"experts_min": 1, "experts_max": 2, "interval_s": 0.5, "cooldown_s": 0, "experts_busy_high": 0.0}
    with LLM(model, dtype="float32", executor="ray", num_expert_workers=1, autoscaling=autoscaling) as llm:
        engine, executor = llm.engine, llm.engine.executor
        assert _generate_with(llm, {}) == long_outputs
        assert [d[1:] for d in engine.autoscaler.decisions] == [("experts", 2)]
        executor.admit_workers(block=True)  # the new worker joins once it has loaded
        engine.admit_workers()
        assert len(executor.experts) == 2 and executor.map.num_ranks == 2 and executor.degraded is None


def _slot_bytes(model) -> int:
    from dsray.config import ModelArgs

    args = ModelArgs.from_pretrained(model)
    return 3 * args.hidden_size * args.moe_intermediate_size * 4 * len(args.moe_layer_ids)  # float32, per expert


def test_survivors_without_room_for_the_lost_experts_wait_for_the_replacement(cluster, model, local_outputs):
    """expert_worker_memory_gb holds a worker's own 8 experts, not 16: the lost worker's experts cannot go to
    the survivor, so the step waits for the replacement — and the requests still finish unchanged."""
    cap = 10 * _slot_bytes(model) / 2**30
    with LLM(
        model, dtype="float32", executor="ray", num_expert_workers=2, step_timeout_s=60, expert_worker_memory_gb=cap
    ) as llm:
        executor = llm.engine.executor
        assert _generate(llm, {5: [_pid_of(executor, 1)]}) == local_outputs
        assert executor.losses["expert_workers_lost"] == 1 and executor.losses["replacements_joined"] == 1
        assert executor.degraded is None and executor.map.placement == executor.full_map.placement
        with pytest.raises(ValueError, match="cannot hold the removed ones' experts.*expert_worker_memory_gb"):
            llm.engine.scale(experts=1)  # 16 experts do not fit on one worker either
        assert len(executor.experts) == 2
