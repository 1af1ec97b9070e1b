"""Scheduler: continuous batching, chunked prefill, budgets, preemption, FCFS, finishing, aborts."""

from __future__ import annotations

import random

import pytest

from dsray.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from dsray.engine.sequence import Sequence, SequenceStatus
from dsray.sampling_params import SamplingParams

EOS = 1  # create_scheduler's default eos_token_id
TOKEN = 7  # what the stub "model" samples unless told otherwise


def step(scheduler: Scheduler, token: int = TOKEN) -> SchedulerOutput:
    """One schedule → postprocess round where every sampled token is ``token``."""
    out = scheduler.schedule()
    scheduler.postprocess(out, [token if s.needs_sample else None for s in out.scheduled])
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def test_config_validates():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    assert SchedulerConfig().max_num_batched_tokens == 2048


def test_block_size_must_match(create_scheduler):
    scheduler = create_scheduler(block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(SchedulerConfig(block_size=8), scheduler.block_manager, EOS)


def test_prefill_then_decode(create_scheduler, create_requests):
    scheduler = create_scheduler()
    (seq,) = create_requests(1, num_tokens=10, max_tokens=3)
    scheduler.add(seq)
    out = step(scheduler)
    assert plan(out) == [("req-0", 10)]
    assert out.scheduled[0].needs_sample and out.scheduled[0].num_computed_tokens == 0
    assert seq.output_token_ids == [TOKEN] and not seq.is_prefill
    out = step(scheduler)
    assert plan(out) == [("req-0", 1)]
    assert out.scheduled[0].num_computed_tokens == 10
    step(scheduler)
    assert seq.output_token_ids == [TOKEN] * 3
    assert seq.finish_reason == "length"
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks


def test_continuous_batching_joins_at_step_boundaries(create_scheduler, create_requests):
    scheduler = create_scheduler()
    a, b = create_requests(2, num_tokens=6, max_tokens=10)
    scheduler.add(a)
    step(scheduler)
    step(scheduler)
    scheduler.add(b)
    assert scheduler.num_waiting == 1
    out = step(scheduler)
    assert plan(out) == [("req-0", 1), ("req-1", 6)]
    out = step(scheduler)
    assert plan(out) == [("req-0", 1), ("req-1", 1)]
    assert scheduler.num_running == 2


def test_chunked_prefill_obeys_token_budget(create_scheduler, create_requests):
    scheduler = create_scheduler(max_num_batched_tokens=16)
    decoding = Sequence("dec", [50, 51, 52, 53], SamplingParams(max_tokens=20))
    (long,) = create_requests(1, num_tokens=40)
    scheduler.add(decoding)
    step(scheduler)
    scheduler.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        out = step(scheduler)
        assert out.num_batched_tokens <= 16
        assert plan(out)[0] == ("dec", 1)
        chunks.append(out.scheduled[1].num_new_tokens)
        assert out.scheduled[1].needs_sample == (long.num_output_tokens == 1)
    assert chunks == [15, 15, 10]
    assert long.num_computed_tokens == 40 and long.num_output_tokens == 1


def test_chunk_that_needs_no_sample_gets_no_token(create_scheduler, create_requests):
    scheduler = create_scheduler(max_num_batched_tokens=8)
    (seq,) = create_requests(1, num_tokens=20)
    scheduler.add(seq)
    out = scheduler.schedule()
    assert not out.scheduled[0].needs_sample and seq.is_prefill
    assert scheduler.postprocess(out, [None]) == []
    assert seq.num_computed_tokens == 8 and seq.output_token_ids == []
    out = scheduler.schedule()
    assert scheduler.postprocess(out, {}) == []  # dict form: leave the key out
    out = scheduler.schedule()
    assert out.scheduled[0].needs_sample
    with pytest.raises(ValueError, match="no sampled token"):
        scheduler.postprocess(out, {})


def test_postprocess_accepts_dict(create_scheduler, create_requests):
    scheduler = create_scheduler()
    a, b = create_requests(2, num_tokens=5)
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    assert scheduler.postprocess(out, {"req-0": 11, "req-1": 12}) == [a, b]
    assert (a.last_token_id, b.last_token_id) == (11, 12)


def test_without_chunked_prefill_whole_prompt_or_wait(create_scheduler, create_requests):
    scheduler = create_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    a, b = create_requests(2, num_tokens=12, max_tokens=5)
    scheduler.add(a)
    scheduler.add(b)
    assert plan(step(scheduler)) == [("req-0", 12)]  # b does not fit beside a's 12
    assert plan(step(scheduler)) == [("req-0", 1), ("req-1", 12)]
    (c,) = create_requests(1, num_tokens=17, id_prefix="big")
    with pytest.raises(ValueError, match="at most 16 fit"):
        scheduler.add(c)


def test_max_num_seqs(create_scheduler, create_requests):
    scheduler = create_scheduler(max_num_seqs=2)
    seqs = create_requests(5, num_tokens=4, max_tokens=2)
    for seq in seqs:
        scheduler.add(seq)
    finished_order = []
    while scheduler.has_unfinished():
        out = step(scheduler)
        assert len(out.scheduled) <= 2 and scheduler.num_running <= 2
        finished_order += [s.seq.request_id for s in out.scheduled if s.seq.is_finished]
    assert finished_order == [s.request_id for s in seqs]


@pytest.mark.parametrize("chunked", [True, False])
def test_fcfs_no_overtaking(create_scheduler, create_requests, chunked):
    scheduler = create_scheduler(num_blocks=8, block_size=4, enable_chunked_prefill=chunked)
    (hog,) = create_requests(1, num_tokens=20, max_tokens=10, id_prefix="hog")  # 6 of 8 blocks
    (big,) = create_requests(1, num_tokens=16, id_prefix="big", first_token_id=10_000)  # 4 blocks
    (small,) = create_requests(1, num_tokens=3, id_prefix="small", first_token_id=20_000)  # 1 block
    scheduler.add(hog)
    step(scheduler)
    scheduler.add(big)
    scheduler.add(small)
    out = step(scheduler)
    # Chunked, big takes the 2 free blocks; unchunked, it waits whole. Either way small, which
    # would fit in 1 block, does not jump ahead of big.
    assert plan(out) == [("hog-0", 1)] + ([("big-0", 8)] if chunked else [])
    assert small.status is SequenceStatus.WAITING and small.block_table == []


def test_waiting_prefill_with_no_free_block_waits(create_scheduler, create_requests):
    scheduler = create_scheduler(num_blocks=4, block_size=4)
    (a,) = create_requests(1, num_tokens=16, max_tokens=1, id_prefix="a")
    (b,) = create_requests(1, num_tokens=4, id_prefix="b")
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    assert plan(out) == [("a-0", 16)]
    assert b.status is SequenceStatus.WAITING and b.block_table == []


def test_preemption_by_recompute(create_scheduler, create_requests, fake_model, run_to_completion):
    # 6 blocks of 4 slots; two sequences growing from 8 tokens to 8 + 12 cannot both fit.
    scheduler = create_scheduler(num_blocks=6, block_size=4)
    model = fake_model(6, 4)
    old, new = create_requests(2, num_tokens=8, max_tokens=12, ignore_eos=True)
    scheduler.add(old)
    scheduler.add(new)
    preempted = []
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        for seq in out.preempted:
            assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0
            assert seq.block_table == [] and scheduler.waiting[0] is seq
            preempted.append((seq.request_id, seq.num_output_tokens))
        scheduler.postprocess(out, model.step(out))
    assert preempted and preempted[0][0] == "req-1"  # the most recent arrival goes first
    assert preempted[0][1] > 0  # it had generated tokens, kept across the preemption
    assert scheduler.num_preemptions == len(preempted)
    assert old.finish_reason == new.finish_reason == "length"

    for seq in (old, new):  # each output is what it gets when run alone
        alone = create_scheduler(num_blocks=64, block_size=4)
        solo = Sequence("solo", seq.prompt_token_ids, seq.sampling_params)
        alone.add(solo)
        run_to_completion(alone, fake_model(64, 4))
        assert solo.output_token_ids == seq.output_token_ids
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks


def test_preempted_sequence_reuses_its_cached_prefix(create_scheduler, create_requests, fake_model):
    scheduler = create_scheduler(num_blocks=6, block_size=4)
    model = fake_model(6, 4)
    old, new = create_requests(2, num_tokens=8, max_tokens=12, ignore_eos=True)
    scheduler.add(old)
    scheduler.add(new)
    while not new.num_cached_tokens:
        out = scheduler.schedule()
        scheduler.postprocess(out, model.step(out))
        assert scheduler.has_unfinished()
    assert new.num_cached_tokens % 4 == 0 and new.num_computed_tokens >= new.num_cached_tokens


@pytest.mark.parametrize(
    "sampling, tokens, reason, stop_reason, num_out",
    [
        ({"max_tokens": 3}, [5, 6, 7, 8], "length", None, 3),
        ({}, [5, EOS, 6], "stop", None, 2),
        ({"ignore_eos": True, "max_tokens": 4}, [5, EOS, 6, 7, 8], "length", None, 4),
        ({"stop_token_ids": [9]}, [5, 9, 6], "stop", 9, 2),
        ({"stop_token_ids": [9], "ignore_eos": True}, [EOS, 9], "stop", 9, 2),
        ({"min_tokens": 3}, [EOS, 5, EOS, 6], "stop", None, 3),
        ({"min_tokens": 2, "stop_token_ids": [9]}, [9, 9], "stop", 9, 2),
        ({"max_tokens": 2}, [5, EOS], "stop", None, 2),  # a natural stop wins over length
    ],
)
def test_finish_reasons(create_scheduler, create_requests, sampling, tokens, reason, stop_reason, num_out):
    scheduler = create_scheduler()
    (seq,) = create_requests(1, num_tokens=5, **sampling)
    scheduler.add(seq)
    for token in tokens:
        out = step(scheduler, token)
        assert out.scheduled[0].seq is seq
        if seq.is_finished:
            break
    assert seq.finish_reason == reason
    assert seq.stop_reason == stop_reason
    assert seq.num_output_tokens == num_out
    assert seq.block_table == [] and scheduler.num_running == 0 and not scheduler.has_unfinished()


def test_finish_on_stop_string_from_engine(create_scheduler, create_requests):
    scheduler = create_scheduler()
    (seq,) = create_requests(1, num_tokens=5)
    scheduler.add(seq)
    step(scheduler)
    scheduler.finish(seq, "stop", stop_reason="###")
    assert seq.status is SequenceStatus.FINISHED_STOPPED and seq.stop_reason == "###"
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks
    with pytest.raises(ValueError, match="reason must be one of"):
        scheduler.finish(seq, "eos")


def test_abort_frees_blocks(create_scheduler, create_requests):
    scheduler = create_scheduler(max_num_seqs=1)
    running, waiting = create_requests(2, num_tokens=9)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler)
    assert running.block_table and waiting.status is SequenceStatus.WAITING
    assert scheduler.abort("req-1")
    assert scheduler.abort("req-0")
    assert not scheduler.abort("req-0") and not scheduler.abort("nope")
    for seq in (running, waiting):
        assert seq.status is SequenceStatus.FINISHED_ABORTED and seq.finish_reason == "abort"
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks
    assert scheduler.schedule().is_empty


def test_abort_during_a_step_is_skipped(create_scheduler, create_requests):
    scheduler = create_scheduler()
    a, b = create_requests(2, num_tokens=5)
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    scheduler.abort("req-0")
    assert scheduler.postprocess(out, [TOKEN, TOKEN]) == [b]
    assert a.output_token_ids == []


def test_prefix_cache_hit_through_the_scheduler(create_scheduler, create_requests):
    scheduler = create_scheduler(block_size=4)
    a, b = create_requests(2, num_tokens=14, prefix=list(range(100, 110)))
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    out = step(scheduler)
    assert b.num_cached_tokens == 8
    assert plan(out) == [("req-0", 1), ("req-1", 6)]
    assert b.block_table[:2] == a.block_table[:2]


def test_add_rejects_duplicates_and_prompts_that_never_fit(create_scheduler, create_requests):
    scheduler = create_scheduler(num_blocks=4, block_size=4)
    (seq,) = create_requests(1, num_tokens=5)
    scheduler.add(seq)
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(Sequence("req-0", [1, 2]))
    with pytest.raises(ValueError, match="at most 16 fit"):
        scheduler.add(Sequence("long", list(range(17))))


def test_unbounded_sequence_ends_at_cache_size_instead_of_spinning(create_scheduler, create_requests):
    scheduler = create_scheduler(num_blocks=4, block_size=4)
    (seq,) = create_requests(1, num_tokens=5, max_tokens=None, ignore_eos=True)
    scheduler.add(seq)
    for _ in range(100):
        if not scheduler.has_unfinished():
            break
        out = step(scheduler)
        assert not out.preempted
    assert seq.finish_reason == "length"
    assert seq.num_tokens == 17  # the last token is returned but never needs KV


def test_sequence_progress_properties():
    seq = Sequence("s", [3, 4, 5], SamplingParams())
    assert seq.is_prefill and seq.num_uncomputed_tokens == 3
    seq.num_computed_tokens = 3
    seq.append_token(9)
    assert not seq.is_prefill and seq.all_token_ids == [3, 4, 5, 9] and seq.last_token_id == 9
    assert (seq.num_prompt_tokens, seq.num_output_tokens, seq.num_tokens) == (3, 1, 4)
    assert not Sequence("one", [3]).is_prefill  # a one-token prompt computes like a decode
    with pytest.raises(ValueError, match="must not be empty"):
        Sequence("empty", [])


def test_random_workload_is_deterministic_and_leak_free(create_scheduler, fake_model, run_to_completion):
    """1,000 requests with shared prefixes, random lengths and aborts, on a cache small enough
    to preempt: every request finishes, no block leaks, and every output equals the output of
    the same request run alone."""
    rng = random.Random(0)
    num_blocks, block_size = 48, 4
    scheduler = create_scheduler(
        num_blocks=num_blocks, block_size=block_size, max_num_seqs=12, max_num_batched_tokens=48
    )
    model = fake_model(num_blocks, block_size)
    prefixes = [[rng.randrange(2, 64) for _ in range(rng.randrange(1, 20))] for _ in range(8)]

    def new_request(i: int) -> Sequence:
        if requests and rng.random() < 0.1:  # a repeated prompt: a full prefix-cache hit but one token
            prompt = requests[-rng.randrange(1, min(len(requests), 8) + 1)].prompt_token_ids[:]
        else:
            prompt = rng.choice(prefixes)[:] if rng.random() < 0.6 else []
            prompt += [rng.randrange(2, 64) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(
            max_tokens=rng.randrange(1, 24),
            ignore_eos=rng.random() < 0.2,
            min_tokens=rng.choice([0, 0, 1]),
            stop_token_ids=[rng.randrange(2, 64)] if rng.random() < 0.3 else None,
        )
        return Sequence(f"r{i}", prompt[:150], params)

    requests: list[Sequence] = []
    for i in range(1000):
        requests.append(new_request(i))
    pending = list(reversed(requests))
    aborted = set()
    while pending or scheduler.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 2, 4])):
            if pending:
                scheduler.add(pending.pop())
        if rng.random() < 0.05 and scheduler.has_unfinished():
            victim = rng.choice(list(scheduler.running) + list(scheduler.waiting))
            assert scheduler.abort(victim.request_id)
            aborted.add(victim.request_id)
        if not scheduler.has_unfinished():
            continue
        out = scheduler.schedule()
        assert not out.is_empty
        assert out.num_batched_tokens <= 48 and len(out.scheduled) <= 12
        scheduler.postprocess(out, model.step(out))
        held = sum(b.ref_count for b in scheduler.block_manager.blocks)
        assert held == sum(len(s.block_table) for s in scheduler.running)

    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert scheduler.num_preemptions > 0 and bm.num_prefix_hits > 0
    assert all(seq.is_finished for seq in requests)
    assert {s.request_id for s in requests if s.finish_reason == "abort"} == aborted

    for seq in requests:
        if seq.request_id in aborted:
            continue
        alone = create_scheduler(num_blocks=64, block_size=block_size)
        solo = Sequence(seq.request_id, seq.prompt_token_ids, seq.sampling_params)
        alone.add(solo)
        run_to_completion(alone, fake_model(64, block_size))
        assert solo.output_token_ids == seq.output_token_ids, seq.request_id
        assert (solo.finish_reason, solo.stop_reason) == (seq.finish_reason, seq.stop_reason)
