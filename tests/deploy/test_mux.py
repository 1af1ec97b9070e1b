"""RequestMux + LLMServer.generate_batch without Ray: one call per loop turn, same chunks as one call per
request, a cancel aborts only its request (also when another request reuses its id), a failed call fails
every request it carried."""

from __future__ import annotations

import asyncio

import pytest

from deploy.messages import ErrorInfo, GenerateRequest
from deploy.mux import RequestMux
from deploy.server import LLMServer


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Handle:
    """The part of a DeploymentHandle RequestMux uses, calling an LLMServer in this process."""

    def __init__(self, server: LLMServer, fail_after: int | None = None):
        self.server, self.fail_after = server, fail_after
        self.batches: list[list[str]] = []
        self.aborts: list[list[str]] = []
        self.generate_batch = _Remote(self._batch)
        self.abort = _Remote(self._abort)

    def options(self, **_):
        return self

    def _batch(self, requests, keys):
        self.batches.append([r.request_id for r in requests])
        stream = self.server.generate_batch(requests, keys)
        return stream if self.fail_after is None else self._failing(stream)

    async def _failing(self, stream):
        async for n, items in _enumerate(stream):
            if n == self.fail_after:
                await stream.aclose()
                raise RuntimeError("the replica died")
            yield items

    def _abort(self, keys):
        self.aborts.append(list(keys))
        return self.server.abort(keys)


async def _all(stream) -> list:
    return [chunk async for chunk in stream]


async def _enumerate(stream):
    n = 0
    async for item in stream:
        yield n, item
        n += 1


def _request(request_id: str, max_tokens: int, prompt: str | None = None) -> GenerateRequest:
    sampling = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    return GenerateRequest(request_id, prompt=prompt or f"Request {request_id} says", sampling=sampling)


@pytest.fixture(scope="module")
def server(tiny_model):
    engine = {"model": str(tiny_model), "max_model_len": 128, "kv_cache_memory_gb": 0.02, "dtype": "float32"}
    server = LLMServer(engine, served_model_name="tiny", stream_interval_ms=0, stream_chunks_per_s=0)
    yield server
    server.llm.shutdown()


def _idle(server: LLMServer) -> bool:
    stats = server.llm.stats()
    return stats["num_running"] == stats["num_waiting"] == 0 and not server.batched


async def _settle(server: LLMServer) -> None:
    """Give the engine up to 2 s to drop what was aborted or cancelled."""
    for _ in range(100):
        if _idle(server):
            return
        await asyncio.sleep(0.02)


def test_one_call_per_loop_turn_and_the_chunks_of_one_call_per_request(server):
    requests = [_request(f"r{i}", 6 + 5 * i) for i in range(6)]

    async def scenario():
        handle = _Handle(server)
        mux = RequestMux(handle)
        streams = [mux.generate(r) for r in requests]  # one turn of the loop
        muxed = await asyncio.gather(*(_all(s) for s in streams))
        alone = []
        for r in requests:  # the same prompts, one plain generate each
            alone.append(
                await _all(server.generate(_request(r.request_id + "-alone", r.sampling["max_tokens"], r.prompt)))
            )
        return handle, muxed, alone

    handle, muxed, alone = asyncio.run(scenario())
    assert handle.batches == [[r.request_id for r in requests]]
    for request, got, expected in zip(requests, muxed, alone):
        assert [t for c in got for t in c.new_token_ids] == [t for c in expected for t in c.new_token_ids]
        assert "".join(c.new_text for c in got) == "".join(c.new_text for c in expected)
        assert got[-1].finish_reason == "length" and got[-1].num_generated_tokens == request.sampling["max_tokens"]
    assert _idle(server)


def test_cancel_aborts_only_its_request(server):
    async def scenario():
        handle = _Handle(server)
        mux = RequestMux(handle)
        streams = {rid: mux.generate(_request(rid, 60)) for rid in "abc"}
        await streams["b"].__anext__()
        streams["b"].cancel()
        rest = {rid: await _all(streams[rid]) for rid in "ac"}
        await _settle(server)  # the abort is a call of its own; the engine drops the request at its next step
        return handle, rest, streams["b"].key

    handle, rest, key = asyncio.run(scenario())
    assert handle.aborts == [[key]] and key != "b"  # aborts name the mux's key, never the client's id
    assert all(chunks[-1].num_generated_tokens == 60 for chunks in rest.values())
    assert server.counters["num_cancelled"] >= 1
    assert _idle(server)


def test_a_failed_call_fails_every_request_it_carried(server):
    async def scenario():
        mux = RequestMux(_Handle(server, fail_after=2))
        streams = [mux.generate(_request(f"f{i}", 40)) for i in range(3)]
        outcomes = []
        for stream in streams:
            try:
                outcomes.append(await _all(stream))
            except RuntimeError as exc:
                outcomes.append(exc)
        await _settle(server)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) and "replica died" in str(o) for o in outcomes)
    assert _idle(server)  # closing the batch stream cancelled every request in the engine


def test_a_duplicate_id_is_refused_and_the_first_request_stays_abortable(server):
    cancelled_before = server.counters["num_cancelled"]

    async def scenario():
        mux = RequestMux(_Handle(server))
        first = mux.generate(_request("dup", 100))
        await first.__anext__()
        refused = await _all(mux.generate(_request("dup", 5)))  # a later batch call, the same id
        first.cancel()
        await _settle(server)
        return refused

    refused = asyncio.run(scenario())
    assert len(refused) == 1 and isinstance(refused[0], ErrorInfo) and refused[0].status == 409
    assert server.counters["num_cancelled"] == cancelled_before + 1  # the cancel still found the first request
    assert _idle(server)


def test_a_duplicate_that_leaves_at_once_does_not_touch_the_running_request(server):
    """Issue 17: a second request reusing a running request's id, whose client disconnects at once, used to
    end the first one's stream (its abort was keyed by request id)."""

    async def scenario():
        handle = _Handle(server)
        mux = RequestMux(handle)
        first = mux.generate(_request("shared", 40))
        got = [await first.__anext__()]
        left = mux.generate(_request("shared", 5))  # the client leaves before its 409 arrives
        await asyncio.sleep(0)  # sent with the next batch call
        left.cancel()
        refused = await _all(mux.generate(_request("shared", 5)))
        got += await _all(first)
        await _settle(server)
        return handle, got, refused

    handle, got, refused = asyncio.run(scenario())
    assert len(handle.aborts) == 1  # the leaving duplicate's own abort, which found nothing to cancel
    assert len(refused) == 1 and isinstance(refused[0], ErrorInfo) and refused[0].status == 409
    assert got[-1].finish_reason == "length" and got[-1].num_generated_tokens == 40
    assert _idle(server)


def test_an_abort_that_overtakes_its_batch_call_still_cancels_the_request(server):
    """The abort is a call of its own: it can reach the LLMServer before the batch carrying its request."""
    cancelled_before = server.counters["num_cancelled"]

    async def scenario():
        await server.abort(["key-early"])
        return await _all(server.generate_batch([_request("early", 50)], ["key-early"]))

    assert asyncio.run(scenario()) == []  # cancelled before it produced a chunk
    assert server.counters["num_cancelled"] <= cancelled_before + 1 and not server.early_aborts
    assert _idle(server)
