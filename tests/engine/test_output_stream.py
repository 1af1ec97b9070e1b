"""OutputStream: the newest output on demand, nothing lost at the end, aborts on close, against a real AsyncLLM."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from dsray.async_llm import AsyncLLM, EngineDeadError, OutputStream
from dsray.engine_config import EngineConfig
from dsray.make_model import make_model
from dsray.outputs import RequestOutput
from dsray.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny", dtype="float32")


class _Owner:
    """What an OutputStream needs of its AsyncLLM: the stream table and abort."""

    def __init__(self):
        self._streams: dict = {}
        self.sent: list = []

    def abort(self, request_id):
        self.sent.append(("abort", request_id))


def _out(n: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [1], token_ids=list(range(n)), finish_reason="length" if finished else None)


def test_a_slow_reader_gets_the_first_output_then_the_newest_and_never_loses_the_last():
    async def run():
        owner = _Owner()
        stream = OutputStream(owner, "r")
        seen = []
        for n in range(1, 4):  # three steps land before the reader looks
            stream.offer(_out(n))
        seen.append(len((await stream.next()).token_ids))
        stream.offer(_out(4))
        stream.offer(_out(5, finished=True))
        seen += [len(out.token_ids) async for out in stream]
        await stream.aclose()
        return seen, owner.sent

    seen, sent = asyncio.run(run())
    assert seen == [1, 5]  # the first output as it came, then only the newest
    assert sent == []  # finished: nothing to abort


def test_next_waits_for_an_output_and_wait_finished_returns_early_only_on_finish():
    async def run():
        loop = asyncio.get_running_loop()
        stream = OutputStream(_Owner(), "r")
        loop.call_later(0.05, stream.offer, _out(1))
        first = await stream.next()
        began = loop.time()
        loop.call_later(0.02, stream.offer, _out(2))  # not the end: the sleep goes on
        await stream.wait_finished(0.2)
        slept = loop.time() - began
        began = loop.time()
        loop.call_later(0.02, stream.offer, _out(3, finished=True))
        await stream.wait_finished(5.0)
        return first, slept, loop.time() - began, await stream.next()

    first, slept, early, last = asyncio.run(run())
    assert len(first.token_ids) == 1
    assert slept >= 0.19
    assert early < 1.0
    assert last.finished and len(last.token_ids) == 3


def test_a_failure_is_raised_after_outputs_already_delivered():
    async def run():
        stream = OutputStream(_Owner(), "r")
        stream.offer(_out(2))
        stream.offer(EngineDeadError("gone"))
        out = await stream.next()
        with pytest.raises(EngineDeadError):
            await stream.next()
        return out

    assert len(asyncio.run(run()).token_ids) == 2


def test_closing_an_unfinished_stream_aborts_it():
    async def run():
        owner = _Owner()
        owner._streams["r"] = None
        stream = OutputStream(owner, "r")
        stream.offer(_out(1))
        await stream.next()
        await stream.aclose()
        await stream.aclose()
        return owner

    owner = asyncio.run(run())
    assert owner.sent == [("abort", "r")] and "r" not in owner._streams


@pytest.mark.parametrize("engine_process", [False, True])
def test_stream_equals_generate_on_a_real_engine(tiny_model, engine_process):
    llm = AsyncLLM(EngineConfig(model=str(tiny_model), max_model_len=128, engine_process=engine_process))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def run():
        steps = [out async for out in llm.generate("hello there", params)]
        stream = llm.stream("hello there", params)
        async with contextlib.aclosing(stream):
            await stream.next()
            await stream.wait_finished(30.0)  # sleep through the steps: only the newest is kept
            last = await stream.next()
        return steps[-1], last

    try:
        expected, last = asyncio.run(run())
        assert last.finished and last.token_ids == expected.token_ids and last.text == expected.text
        assert not llm._streams
    finally:
        llm.shutdown()
