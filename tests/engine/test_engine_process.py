"""AsyncLLM with the engine in a child process (what the server runs) against the in-thread engine."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from dsray import SamplingParams
from dsray.async_llm import AsyncLLM, EngineDeadError
from dsray.engine_config import EngineConfig
from dsray.make_model import make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny", dtype="float32")


def _config(tiny, **kw) -> EngineConfig:
    return EngineConfig(model=str(tiny), dtype="float32", **kw)


async def _run_all(llm: AsyncLLM, requests: list[tuple[list[int], SamplingParams]]) -> list[list]:
    """Every request concurrently; each one's full list of streamed outputs."""

    async def one(prompt, params):
        return [out async for out in llm.generate(prompt, params)]

    return await asyncio.gather(*(one(p, s) for p, s in requests))


def _requests() -> list[tuple[list[int], SamplingParams]]:
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    stop = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[3])
    return [([5, 6, 7, 8], greedy), ([9] * 20, seeded), ([11, 12], stop), ([13, 14, 15], greedy)]


def test_child_process_streams_the_same_outputs_as_the_thread(tiny):
    results = {}
    for engine_process in (False, True):
        llm = AsyncLLM(_config(tiny, engine_process=engine_process))
        try:
            assert (llm.engine_pid is not None) == engine_process
            results[engine_process] = asyncio.run(_run_all(llm, _requests()))
        finally:
            llm.shutdown()
    for thread_stream, process_stream in zip(results[False], results[True]):
        assert [o.new_token_ids for o in process_stream] == [o.new_token_ids for o in thread_stream]
        last_t, last_p = thread_stream[-1], process_stream[-1]
        assert (last_p.token_ids, last_p.text, last_p.finish_reason) == (
            last_t.token_ids,
            last_t.text,
            last_t.finish_reason,
        )
        # Which requests share a step depends on when each reaches the engine, and a matmul's
        # rounding on the batch's shape, so logprobs agree to float32 precision, not bit for bit.
        assert (last_p.logprobs is None) == (last_t.logprobs is None)
        assert [set(d) for d in last_p.logprobs or []] == [set(d) for d in last_t.logprobs or []]
        for got, want in zip(last_p.logprobs or [], last_t.logprobs or []):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert last_p.prompt_token_ids == last_t.prompt_token_ids


def test_abort_and_refusals_in_the_child(tiny):
    llm = AsyncLLM(_config(tiny, engine_process=True))

    async def main():
        stream = llm.generate([8, 9, 10], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for out in stream:
            if len(out.token_ids) == 3:
                break  # the consumer goes away mid-stream: the child aborts the request
        await stream.aclose()
        for _ in range(200):
            await asyncio.sleep(0.02)
            stats = llm.stats()
            if stats["num_running"] == 0 and stats["kv_cache_usage"] == 0:
                break
        assert llm.stats()["num_running"] == 0 and llm.stats()["kv_cache_usage"] == 0
        with pytest.raises(ValueError, match="temperature"):  # refused here, before the child sees it
            async for _ in llm.generate([5], SamplingParams(temperature=-1)):
                pass
        with pytest.raises(ValueError, match="context"):
            async for _ in llm.generate([5] * 10_000, SamplingParams(max_tokens=1)):
                pass
        outs = [o async for o in llm.generate([5, 6], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))]
        assert outs[-1].finished and len(outs[-1].token_ids) == 4  # still serving

    try:
        asyncio.run(main())
        assert llm.is_healthy
    finally:
        llm.shutdown()
    assert not llm.client.transport.process.is_alive()


def test_a_killed_engine_process_fails_every_stream_and_health(tiny):
    llm = AsyncLLM(_config(tiny, engine_process=True))

    async def main():
        params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
        streams = [llm.generate([5 + i, 6, 7], params) for i in range(3)]
        firsts = [await s.__anext__() for s in streams]
        assert all(not f.finished for f in firsts)
        os.kill(llm.engine_pid, signal.SIGKILL)
        start = time.monotonic()
        for s in streams:
            with pytest.raises(EngineDeadError, match="engine process died"):
                async for _ in s:
                    pass
        assert time.monotonic() - start < 10
        assert not llm.is_healthy
        with pytest.raises(EngineDeadError):
            llm.check_health()

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
