"""What a step sends to the workers: only what changed, so its size does not grow with the context."""

from __future__ import annotations

import pickle

import pytest

from dsray import LLM, SamplingParams
from dsray.protocol import StepInput

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    from dsray.make_model import ensure_default_model

    return ensure_default_model()


def _record(llm: LLM) -> list[StepInput]:
    """Every StepInput the engine hands the executor, as the worker would receive it (pickled and back)."""
    sent: list[StepInput] = []
    execute = llm.engine.executor.execute

    def recording(steps):
        sent.append(pickle.loads(pickle.dumps(steps[0])))
        return execute(steps)

    llm.engine.executor.execute = recording
    return sent


def _decode_step_bytes(tiny, context: int, num_seqs: int = 8) -> int:
    llm = LLM(
        tiny,
        dtype="float32",
        max_model_len=context + 16,
        max_num_batched_tokens=num_seqs * context,  # one prefill step, then decode steps of the whole batch
        kv_cache_memory_gb=0.25,
    )
    sent = _record(llm)
    llm.generate([[4 + (i * 7 + j) % 900 for j in range(context)] for i in range(num_seqs)], PARAMS)
    decode = [s for s in sent if s.seqs and all(q.num_new_tokens == 1 for q in s.seqs) and len(s.seqs) == num_seqs]
    assert decode, "no pure decode step of the whole batch"
    return max(len(pickle.dumps(s)) for s in decode)


def test_decode_step_bytes_do_not_grow_with_context(tiny):
    short, long = _decode_step_bytes(tiny, 100), _decode_step_bytes(tiny, 3000)
    # The old message carried every token and block of every sequence: ~8 × 3000 token ids at 3000.
    assert long <= short + 64, (short, long)


def test_tokens_go_once_and_finished_ids_are_dropped(tiny):
    llm = LLM(tiny, dtype="float32")
    sent = _record(llm)
    outs = llm.generate([[5, 6, 7, 8], list(range(10, 50))], PARAMS)
    new = [n for s in sent for n in s.new]
    assert sorted(n.request_id for n in new) == sorted(o.request_id for o in outs)  # each sequence's tokens once
    assert [n.token_ids for n in sorted(new, key=lambda n: n.request_id)] == [o.prompt_token_ids for o in outs]
    first = len(sent)
    llm.generate([[9, 9, 9]], PARAMS)  # the next step tells the worker to forget the finished ones
    assert {rid for s in sent[first:] for rid in s.dropped} == {o.request_id for o in outs}
    assert not {o.request_id for o in outs} & set(llm.engine.executor.runner.seqs)


def test_preempted_sequences_are_sent_again_and_outputs_do_not_change(tiny):
    prompts = [list(range(10 + 40 * i, 40 + 40 * i)) for i in range(6)]
    expected = [o.token_ids for o in LLM(tiny, dtype="float32").generate(prompts, PARAMS)]
    llm = LLM(tiny, dtype="float32", max_num_blocks=24, block_size=4, max_num_batched_tokens=64)
    sent = _record(llm)
    assert [o.token_ids for o in llm.generate(prompts, PARAMS)] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    readmitted = [n for s in sent for n in s.new if len(n.token_ids) > n.num_prompt_tokens]
    assert readmitted, "a preempted sequence comes back with its outputs so far"
    assert all(rid in {d for s in sent for d in s.dropped} for rid in {n.request_id for n in readmitted})
    # Finished: the worker keeps only what finished in the last step (forgotten with the next step).
    assert set(llm.engine.executor.runner.seqs) <= {q.request_id for q in sent[-1].seqs}
