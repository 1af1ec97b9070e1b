"""The offline API end to end on the embedded tiny model: batching never changes a request's output."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from attention.kv_cache import cache_bytes_per_token
from dsray import LLM, SamplingParams
from dsray.async_llm import AsyncLLM
from dsray.config import ModelArgs
from dsray.engine_config import EngineConfig
from dsray.make_model import make_model
from dsray.simple_generate import greedy_generate
from dsray.weights import load_transformer

MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny", dtype="float32")


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    base = [rng.randrange(4, 1000) for _ in range(40)]
    out = []
    for i in range(64):
        n = rng.randrange(3, 60)
        # Every fourth prompt shares a 32-token prefix, so prefix-cache hits happen.
        out.append(
            base[:32] + [rng.randrange(4, 1000) for _ in range(n)]
            if i % 4 == 0
            else [rng.randrange(4, 1000) for _ in range(n)]
        )
    return out


@pytest.fixture(scope="module")
def solo(tiny, prompts):
    """Each prompt alone through the single-sequence oracle (no engine, no batching)."""
    model = load_transformer(tiny, torch.float32, progress=False)
    return [greedy_generate(model, p, MAX_NEW) for p in prompts]


def _greedy(**kw):
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, **kw)


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(),  # everything in big steps
        dict(max_num_batched_tokens=64),  # chunked prefill: long prompts over several steps
        dict(max_num_blocks=40, block_size=4, max_num_batched_tokens=96),  # tiny cache: preemption
        dict(max_num_seqs=5, enable_prefix_caching=False),
    ],
    ids=["plain", "chunked", "preempt", "few-seqs-no-prefix-cache"],
)
def test_greedy_batch_of_64_equals_each_alone(tiny, prompts, solo, engine_args):
    llm = LLM(tiny, dtype="float32", **engine_args)
    outs = llm.generate(prompts, _greedy())
    assert [o.token_ids for o in outs] == solo
    sched = llm.engine.scheduler
    if "max_num_blocks" in engine_args:
        assert sched.num_preemptions > 0
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_total_blocks  # nothing leaked


def test_requests_joining_at_different_steps(tiny, prompts, solo):
    llm = LLM(tiny, dtype="float32", max_num_batched_tokens=64)
    engine = llm.engine
    pending = list(enumerate(prompts))
    done = {}
    ids = {}
    step = 0
    while pending or engine.has_unfinished():
        for _ in range(step % 3):  # 0–2 new requests per step, while others decode
            if pending:
                i, p = pending.pop(0)
                ids[engine.add_request(p, _greedy())] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
        step += 1
    assert [done[i] for i in range(len(prompts))] == solo


def test_prefix_cache_hit_skips_compute_and_keeps_output(tiny, prompts, solo):
    llm = LLM(tiny, dtype="float32")
    first = llm.generate(prompts[0], _greedy())[0]
    again = llm.generate(prompts[0], _greedy())[0]
    assert first.token_ids == again.token_ids == solo[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 32
    assert llm.engine.scheduler.block_manager.num_prefix_hits >= 32


def test_seeded_sampling_independent_of_batch(tiny, prompts):
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=i, max_tokens=MAX_NEW, ignore_eos=True)
        for i in range(16)
    ]
    llm = LLM(tiny, dtype="float32", max_num_blocks=40, block_size=4, max_num_batched_tokens=48)
    batched = [o.token_ids for o in llm.generate(prompts[:16], params)]
    assert llm.engine.scheduler.num_preemptions > 0
    alone = [LLM(tiny, dtype="float32").generate(prompts[i], params[i])[0].token_ids for i in (0, 7, 15)]
    assert [batched[i] for i in (0, 7, 15)] == alone
    assert len({tuple(t) for t in batched}) > 1


def test_text_prompt_logprobs_and_finish_reasons(tiny):
    llm = LLM(tiny, dtype="float32")
    out = llm.generate("The weather today is", SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs):
        assert token in lp and 3 <= len(lp) <= 4
        assert max(lp.values()) == pytest.approx(lp[token])  # greedy picks the most likely token
        assert all(v <= 0 for v in lp.values())
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_token_ids_and_stop_strings(tiny):
    llm = LLM(tiny, dtype="float32")
    free = llm.generate("Once upon a time", _greedy())[0]
    stop_id = free.token_ids[3]
    out = llm.generate("Once upon a time", _greedy(stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    text = free.text
    stop_str = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop_str
    out = llm.generate("Once upon a time", _greedy(stop=[stop_str]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_str
    assert out.text == text[: text.index(stop_str)]  # the stop string is not emitted
    out = llm.generate("Once upon a time", _greedy(stop=[stop_str], include_stop_str_in_output=True))[0]
    assert out.text == text[: text.index(stop_str) + len(stop_str)]


def test_eos_stops_unless_ignored(tiny):
    llm = LLM(tiny, dtype="float32")
    eos = ModelArgs.from_pretrained(tiny).eos_token_ids[0]
    free = llm.generate([5, 6, 7], _greedy())[0]
    # Make a token the model does emit act as EOS by asking for it as a stop id of "eos" semantics.
    llm.engine.scheduler.eos_token_id = free.token_ids[2]
    out = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=MAX_NEW))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) <= 3
    out = llm.generate([5, 6, 7], _greedy())[0]
    assert out.finish_reason == "length" and out.token_ids == free.token_ids
    assert eos == 1


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ([1] * 4096, SamplingParams(max_tokens=1), "context"),
        ([1] * 4000, SamplingParams(max_tokens=200), "max_tokens"),
        ([[]], SamplingParams(), "empty"),
        ([5, 100000], SamplingParams(), "token ids"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(tiny, prompt, params, match):
    llm = LLM(tiny, dtype="float32")
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, params)
    assert not llm.engine.has_unfinished()
    assert llm.generate([5, 6], SamplingParams(max_tokens=2, ignore_eos=True))[0].finish_reason == "length"


def test_kv_bytes_per_token_measured_from_the_pools(tiny):
    llm = LLM(tiny, dtype="bfloat16", kv_cache_memory_gb=0.01)
    args = ModelArgs.from_pretrained(tiny)
    cache = llm.engine.executor.runner.kv_cache
    assert cache_bytes_per_token(cache) == (args.kv_lora_rank + args.qk_rope_head_dim) * args.num_hidden_layers * 2
    assert llm.engine.executor.num_blocks * 16 * cache_bytes_per_token(cache) <= 0.01 * 2**30


def test_async_stream_and_abort_free_blocks(tiny):
    engine_config = EngineConfig(model=str(tiny), dtype="float32")
    llm = AsyncLLM(engine_config)

    async def main():
        chunks = [o async for o in llm.generate([5, 6, 7], _greedy())]
        assert chunks[-1].finished and len(chunks) == MAX_NEW
        assert [c.new_token_ids[0] for c in chunks] == chunks[-1].token_ids
        stream = llm.generate([8, 9, 10], SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
        async for out in stream:
            if len(out.token_ids) == 3:
                break  # the consumer goes away mid-stream
        await stream.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not llm.engine.has_unfinished():
                break
        bm = llm.engine.scheduler.block_manager
        assert not llm.engine.has_unfinished() and bm.num_free_blocks == bm.num_total_blocks
        with pytest.raises(ValueError, match="temperature"):
            async for _ in llm.generate([5], SamplingParams(temperature=-1)):
                pass

    try:
        asyncio.run(main())
        assert llm.is_healthy
    finally:
        llm.shutdown()


def test_num_threads_defaults_to_dsray_num_threads(monkeypatch):
    from dsray.engine_config import EngineConfig

    monkeypatch.setenv("DSRAY_NUM_THREADS", "3")
    assert EngineConfig(model="m").num_threads == 3
    assert EngineConfig(model="m", num_threads=1).num_threads == 1
    monkeypatch.delenv("DSRAY_NUM_THREADS")
    assert EngineConfig(model="m").num_threads is None


def test_use_tqdm_shows_a_progress_bar_and_changes_no_output(tiny, prompts, solo, capsys):
    llm = LLM(tiny, dtype="float32")
    quiet = [o.token_ids for o in llm.generate(prompts[:3], _greedy())]
    assert "dsray: requests" not in capsys.readouterr().err
    shown = [o.token_ids for o in llm.generate(prompts[:3], _greedy(), use_tqdm=True)]
    err = capsys.readouterr().err
    assert "dsray: requests" in err and "3/3" in err
    assert shown == quiet == solo[:3]
