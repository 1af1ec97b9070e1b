"""Deadlines and priorities: admission and preemption order, refusal before the first token, the
deadline cut of a started request, invalid values. Scheduler tests pass ``now`` to ``schedule``
and give sequences their arrival time, so no test depends on how fast anything runs."""

from __future__ import annotations

import asyncio
import math

import pytest

from dsray import SamplingParams
from dsray.async_llm import AsyncLLM
from dsray.engine.block_manager import BlockManager
from dsray.engine.llm_engine import LLMEngine
from dsray.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from dsray.engine.sequence import Sequence
from dsray.engine_config import EngineConfig
from dsray.engine_core import EngineCore, EngineStep
from dsray.errors import DeadlineExceededError, InvalidRequestError
from dsray.make_model import make_model

EOS = 1
TOKEN = 7
T0 = 1000.0  # the arrival time every scheduler test's sequences share (monotonic seconds)


def scheduler_of(num_blocks: int = 64, block_size: int = 4, deadline_aware: bool = True, **config) -> Scheduler:
    config = SchedulerConfig(
        block_size=block_size, enable_prefix_caching=False, deadline_aware=deadline_aware, **config
    )
    return Scheduler(config, BlockManager(num_blocks, block_size, False), EOS)


def seq_of(name: str, num_tokens: int = 4, arrival: float = T0, **sampling) -> Sequence:
    ids = [100 + 10 * len(name) + j for j in range(num_tokens)]
    return Sequence(name, ids, SamplingParams(ignore_eos=True, **sampling), arrival_time=arrival)


def step(scheduler: Scheduler, now: float = T0) -> SchedulerOutput:
    out = scheduler.schedule(now)
    scheduler.postprocess(out, [TOKEN if s.needs_sample else None for s in out.scheduled])
    return out


def admission_order(scheduler: Scheduler, seqs: list[Sequence]) -> list[str]:
    """Ids in the order one-at-a-time admission (max_num_seqs=1, max_tokens=1) runs them."""
    for seq in seqs:
        scheduler.add(seq)
    order = []
    while scheduler.has_unfinished():
        order += [s.seq.request_id for s in step(scheduler).scheduled]
    return order


# Order ----------------------------------------------------------------------------------------


def test_admission_by_priority_then_deadline_then_arrival():
    seqs = [
        seq_of("late", max_tokens=1, deadline_s=50),
        seq_of("none", max_tokens=1),
        seq_of("soon", max_tokens=1, deadline_s=5),
        seq_of("urgent-low", max_tokens=1, deadline_s=1, priority=1),
        seq_of("high", max_tokens=1, priority=-1),
        seq_of("soon-2", max_tokens=1, deadline_s=5),  # same deadline as "soon": arrival decides
        seq_of("none-2", max_tokens=1),
    ]
    assert admission_order(scheduler_of(max_num_seqs=1), seqs) == [
        "high",
        "soon",
        "soon-2",
        "late",
        "none",
        "none-2",
        "urgent-low",
    ]


def test_deadline_unaware_orders_by_priority_then_arrival():
    seqs = [
        seq_of("a", max_tokens=1, deadline_s=50),
        seq_of("b", max_tokens=1),
        seq_of("c", max_tokens=1, deadline_s=5),
        seq_of("d", max_tokens=1, priority=-1),
    ]
    assert admission_order(scheduler_of(max_num_seqs=1, deadline_aware=False), seqs) == ["d", "a", "b", "c"]


def test_admission_under_the_token_budget_goes_in_order():
    scheduler = scheduler_of(max_num_batched_tokens=6)
    scheduler.add(seq_of("first", num_tokens=6, max_tokens=4))
    scheduler.add(seq_of("urgent", num_tokens=6, max_tokens=4, deadline_s=5))
    out = step(scheduler)
    assert [s.seq.request_id for s in out.scheduled] == ["urgent"]


# Preemption -----------------------------------------------------------------------------------


def _fill_and_preempt(seqs: list[Sequence], deadline_aware: bool = True) -> tuple[Scheduler, list[str]]:
    """Three 4-token prompts take 3 blocks of 4; the first decode takes the last, so the second one
    to need a block preempts a sequence."""
    scheduler = scheduler_of(num_blocks=4, deadline_aware=deadline_aware)
    for seq in seqs:
        scheduler.add(seq)
    step(scheduler)
    assert scheduler.num_running == 3 and scheduler.block_manager.num_free_blocks == 1
    out = step(scheduler)
    return scheduler, [s.request_id for s in out.preempted]


def test_preemption_victim_is_the_lowest_priority():
    seqs = [seq_of("low", priority=1, max_tokens=8), seq_of("a", max_tokens=8), seq_of("b", max_tokens=8)]
    scheduler, preempted = _fill_and_preempt(seqs)
    assert preempted == ["low"]  # not "b", the latest arrival
    assert scheduler.waiting[0].request_id == "low"


def test_preemption_victim_is_the_latest_deadline_among_equals():
    seqs = [
        seq_of("none", max_tokens=8),  # no deadline: the latest of all
        seq_of("soon", max_tokens=8, deadline_s=5),
        seq_of("later", max_tokens=8, deadline_s=50),
    ]
    _, preempted = _fill_and_preempt(seqs)
    assert preempted == ["none"]
    seqs = [
        seq_of("later", max_tokens=8, deadline_s=50),
        seq_of("soon", max_tokens=8, deadline_s=5),
        seq_of("x", max_tokens=8, deadline_s=6),
    ]
    _, preempted = _fill_and_preempt(seqs)
    assert preempted == ["later"]


def test_preemption_without_deadline_awareness_takes_the_latest_arrival():
    seqs = [
        seq_of("none", max_tokens=8),
        seq_of("soon", max_tokens=8, deadline_s=5),
        seq_of("last", max_tokens=8, deadline_s=1),
    ]
    _, preempted = _fill_and_preempt(seqs, deadline_aware=False)
    assert preempted == ["last"]


# Deadlines in the scheduler -------------------------------------------------------------------


def test_waiting_request_past_its_deadline_is_refused_and_holds_nothing():
    scheduler = scheduler_of(max_num_seqs=1)
    bm = scheduler.block_manager
    free = bm.num_free_blocks
    scheduler.add(seq_of("busy", max_tokens=100, priority=-1))  # ahead in the order: not displaced
    step(scheduler, T0)
    waiting = seq_of("waiting", max_tokens=4, deadline_s=2)
    scheduler.add(waiting)
    step(scheduler, T0 + 1)
    assert scheduler.waiting == [waiting]
    out = step(scheduler, T0 + 2)
    assert out.expired == [waiting] and waiting not in [s.seq for s in out.scheduled]
    assert waiting.finish_reason == "abort" and waiting.stop_reason == "deadline"
    assert scheduler.waiting == [] and not scheduler.abort("waiting")  # gone from every queue
    scheduler.abort("busy")
    assert bm.num_free_blocks == free


def test_chunked_prefill_past_its_deadline_frees_its_blocks():
    scheduler = scheduler_of(max_num_batched_tokens=8)
    bm = scheduler.block_manager
    free = bm.num_free_blocks
    long = seq_of("long", num_tokens=40, max_tokens=4, deadline_s=2)
    scheduler.add(long)
    step(scheduler, T0)
    step(scheduler, T0 + 1)
    assert long.num_output_tokens == 0 and long.num_computed_tokens == 16 and bm.num_free_blocks < free
    out = step(scheduler, T0 + 2)
    assert out.expired == [long] and out.is_empty
    assert long.finish_reason == "abort" and long.stop_reason == "deadline"
    assert bm.num_free_blocks == free and not scheduler.has_unfinished()


def test_running_request_at_its_deadline_ends_with_length_keeping_its_tokens():
    scheduler = scheduler_of()
    bm = scheduler.block_manager
    free = bm.num_free_blocks
    seq = seq_of("r", max_tokens=100, deadline_s=3)
    other = seq_of("other", max_tokens=100)
    scheduler.add(seq)
    scheduler.add(other)
    for t in range(3):
        step(scheduler, T0 + t)
    assert seq.output_token_ids == [TOKEN] * 3
    out = step(scheduler, T0 + 3)
    assert out.expired == [seq] and [s.seq for s in out.scheduled] == [other]
    assert seq.finish_reason == "length" and seq.stop_reason == "deadline"
    assert seq.output_token_ids == [TOKEN] * 3
    scheduler.abort("other")
    assert bm.num_free_blocks == free


def test_preempted_request_past_its_deadline_keeps_its_tokens():
    """Preempted, it waits again holding no blocks; it had tokens, so it ends "length", not refused."""
    seqs = [
        seq_of("a", max_tokens=8),
        seq_of("b", max_tokens=8),
        seq_of("victim", priority=1, max_tokens=8, deadline_s=5),
    ]
    scheduler, preempted = _fill_and_preempt(seqs)
    victim = scheduler.waiting[0]
    assert preempted == ["victim"] and victim.block_table == [] and victim.num_output_tokens == 1
    out = step(scheduler, T0 + 5)
    assert out.expired == [victim] and victim.finish_reason == "length" and victim.stop_reason == "deadline"


# Invalid values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"deadline_s": -1}, "deadline_s"),
        ({"deadline_s": 0}, "deadline_s"),
        ({"deadline_s": math.nan}, "deadline_s"),
        ({"deadline_s": math.inf}, "deadline_s"),
        ({"deadline_s": "5"}, "deadline_s"),
        ({"deadline_s": True}, "deadline_s"),
        ({"priority": 1.5}, "priority"),
        ({"priority": "1"}, "priority"),
        ({"priority": None}, "priority"),
        ({"priority": False}, "priority"),
    ],
)
def test_invalid_values_raise_the_typed_error_naming_the_field(fields, param):
    with pytest.raises(InvalidRequestError, match=param) as info:
        SamplingParams(**fields)
    assert info.value.param == param and info.value.status == 400


def test_valid_values():
    params = SamplingParams(deadline_s=0.5, priority=-3)
    assert (params.deadline_s, params.priority) == (0.5, -3)
    assert (SamplingParams().deadline_s, SamplingParams().priority) == (None, 0)


# The engine, end to end on the tiny model -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny", dtype="float32")


def _run_core(engine: LLMEngine) -> list[EngineStep]:
    reports: list[EngineStep] = []
    EngineCore(engine).run(lambda timeout: [], reports.append, until_idle=True)
    return reports


def test_engine_refuses_a_request_past_its_deadline_before_its_first_token(tiny):
    engine = LLMEngine(EngineConfig(model=str(tiny), dtype="float32"))
    bm = engine.scheduler.block_manager
    free = bm.num_free_blocks
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, deadline_s=60), request_id="late")
    engine.add_request([5, 6, 8], SamplingParams(max_tokens=4, ignore_eos=True), request_id="fine")
    engine.scheduler.waiting[0].deadline -= 61  # its deadline has passed before any step
    reports = _run_core(engine)
    refused = [r for report in reports for r in report.refused]
    assert [rid for rid, _ in refused] == ["late"]
    error = refused[0][1]
    assert isinstance(error, DeadlineExceededError)
    assert (error.status, error.code, error.param) == (504, "deadline_exceeded", "deadline_s")
    finished = [d for report in reports for d in report.deltas if d[4] is not None]
    assert [d[0] for d in finished] == ["fine"]
    assert "late" not in engine.requests and not engine.has_unfinished() and bm.num_free_blocks == free


def test_engine_ends_a_started_request_at_its_deadline_with_its_tokens(tiny):
    engine = LLMEngine(EngineConfig(model=str(tiny), dtype="float32"))
    bm = engine.scheduler.block_manager
    free = bm.num_free_blocks
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True, deadline_s=60), request_id="r")
    for _ in range(3):
        engine.step()
    engine.scheduler.running[0].deadline -= 61
    reports = _run_core(engine)
    deltas = [d for report in reports for d in report.deltas]
    assert len(deltas) == 1 and deltas[0][1] == [] and deltas[0][4:6] == ("length", "deadline")
    assert not engine.has_unfinished() and bm.num_free_blocks == free


def test_async_llm_deadlines_refuse_waiting_and_cut_running(tiny):
    """Through AsyncLLM: with the one sequence slot taken by a higher-priority request that does not
    end, a second with a deadline is refused with the typed error; the first, given a deadline,
    ends at it."""
    llm = AsyncLLM(EngineConfig(model=str(tiny), dtype="float32", max_num_seqs=1))
    endless = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True, priority=-1)

    async def main():
        blocker = llm.generate([5, 6, 7], endless)
        first = await blocker.__anext__()
        assert first.token_ids
        with pytest.raises(DeadlineExceededError):
            async for _ in llm.generate([8, 9], SamplingParams(max_tokens=4, deadline_s=0.2)):
                pass
        await blocker.aclose()
        outs = [o async for o in llm.generate([5, 6, 7], SamplingParams(**{**vars(endless), "deadline_s": 0.3}))]
        last = outs[-1]
        assert (last.finish_reason, last.stop_reason) == ("length", "deadline")
        assert 0 < len(last.token_ids) < 2000 and last.token_ids == [t for o in outs for t in o.new_token_ids]
        for _ in range(200):
            if not llm.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        bm = llm.engine.scheduler.block_manager
        assert not llm.engine.has_unfinished() and bm.num_free_blocks == bm.num_total_blocks
    finally:
        llm.shutdown()


def test_a_waiting_request_of_higher_priority_takes_the_slot_of_the_last_running_one():
    scheduler = scheduler_of(max_num_seqs=2)
    for name in ("a", "b"):
        scheduler.add(seq_of(name, max_tokens=50))
    step(scheduler)
    later = seq_of("later", max_tokens=50)  # no deadline: waits its turn
    soon = seq_of("soon", max_tokens=50, deadline_s=5)  # an earlier deadline takes the next free slot
    scheduler.add(later)
    scheduler.add(soon)
    out = step(scheduler)
    assert out.preempted == [] and scheduler.waiting == [soon, later]
    important = seq_of("important", max_tokens=50, priority=-1)
    scheduler.add(important)
    out = step(scheduler)
    assert [s.request_id for s in out.preempted] == ["b"]
    assert "important" in [s.seq.request_id for s in out.scheduled]  # admitted in the same step
    assert [s.request_id for s in scheduler.running] == ["important", "a"]
    assert [s.request_id for s in scheduler.waiting] == ["soon", "b", "later"]  # b ahead of later arrivals
    scheduler.abort("a")
    step(scheduler)
    assert [s.request_id for s in scheduler.running] == ["important", "soon"]


@pytest.mark.parametrize("deadline_aware", [True, False])
def test_equal_priority_never_displaces(deadline_aware):
    scheduler = scheduler_of(max_num_seqs=1, deadline_aware=deadline_aware)
    scheduler.add(seq_of("a", max_tokens=50, priority=1))
    step(scheduler)
    scheduler.add(seq_of("urgent", max_tokens=50, deadline_s=5, priority=1))
    assert step(scheduler).preempted == []
    scheduler.add(seq_of("important", max_tokens=50, priority=0))
    assert [s.request_id for s in step(scheduler).preempted] == ["a"]
    assert [s.request_id for s in scheduler.running] == ["important"]
