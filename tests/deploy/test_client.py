"""dsray.client against real Serve apps: HTTP sync and async, streaming, every error class, and Serve handles.

Greedy answers through the client must equal the openai client's for the same request. A second
app, ``/client-slow``, runs a slowed-down engine with room for two requests, so a full queue
(429) and a request id in flight twice (409) can be held long enough to observe.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dsray.client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    NotFoundError,
    RateLimitError,
    Stream,
    agenerate,
    generate,
    get_handle,
)

PROMPT = "The weather today is"


@pytest.fixture
def dsray_client(server):
    with Client(server.url, api_key=server.api_key) as c:
        yield c


# HTTP -----------------------------------------------------------------------------------------


def test_greedy_completion_equals_openai_clients(dsray_client, client, server):
    ours = dsray_client.completions(PROMPT, max_tokens=12, temperature=0)
    theirs = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert ours.text == theirs.choices[0].text and ours.finish_reason == theirs.choices[0].finish_reason
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens
    assert ours.usage.total_tokens == ours.usage.prompt_tokens + ours.usage.completion_tokens
    assert ours.raw["object"] == "text_completion" and ours.id.startswith("cmpl-")


def test_greedy_chat_equals_openai_clients(dsray_client, client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ours = dsray_client.chat(messages, model=server.model, max_tokens=10, temperature=0)
    theirs = client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, temperature=0)
    assert ours.text == theirs.choices[0].message.content and ours.finish_reason == theirs.choices[0].finish_reason
    assert ours.id.startswith("chatcmpl-")


def test_stream_matches_whole_answer_and_ends_with_usage(dsray_client):
    greedy = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    whole = dsray_client.completions("Inference on many machines", **greedy)
    with dsray_client.completions(
        "Inference on many machines", stream=True, request_id="client-stream-1", **greedy
    ) as stream:
        chunks = list(stream)
    assert stream.request_id == "client-stream-1" and {c.id for c in chunks} == {"cmpl-client-stream-1"}
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])


def test_streaming_chat_matches_whole_answer(dsray_client):
    whole = dsray_client.chat("Hi there", max_tokens=12, temperature=0)
    with dsray_client.chat("Hi there", stream=True, max_tokens=12, temperature=0) as stream:
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == whole.text and chunks[-1].finish_reason == whole.finish_reason


def test_request_id_is_sent_and_returned(dsray_client):
    out = dsray_client.completions("hi", max_tokens=2, request_id="client-rid-7")
    assert out.request_id == "client-rid-7" and out.id == "cmpl-client-rid-7"
    with pytest.raises(BadRequestError) as info:
        dsray_client.completions("hi", max_tokens=2, temperature=-1, request_id="client-rid-8")
    assert info.value.request_id == "client-rid-8"


def test_models_and_health(dsray_client, server):
    (model,) = dsray_client.models()
    assert model.id == server.model and model.max_model_len == server.max_model_len and model.owned_by == "dsray"
    assert dsray_client.health()


def test_errors_by_status(dsray_client, server):
    with pytest.raises(BadRequestError) as info:
        dsray_client.completions(PROMPT, temperature=-1)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    with pytest.raises(BadRequestError, match="top_k"):  # a stream's refusal comes before its first chunk
        dsray_client.completions(PROMPT, stream=True, top_k="many")
    with pytest.raises(BadRequestError) as info:
        dsray_client.completions("x" * 5000, max_tokens=2)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(NotFoundError) as info:
        dsray_client.completions(PROMPT, model="no-such-model")
    assert (info.value.status_code, info.value.code, info.value.param) == (404, "model_not_found", "model")
    with Client(server.url, api_key="wrong-key") as wrong, pytest.raises(AuthenticationError) as info:
        wrong.models()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with Client(server.url, api_key="") as anonymous, pytest.raises(AuthenticationError, match="Missing"):
        anonymous.chat("hello")
    with Client(server.url, api_key="") as anonymous:
        assert anonymous.health()  # /health needs no key


def test_async_client(server, client):
    async def main():
        async with AsyncClient(f"{server.url}/v1", api_key=server.api_key) as c:
            whole = await c.completions(PROMPT, max_tokens=12, temperature=0)
            whole_chat = await c.chat("Hi there", max_tokens=12, temperature=0)
            stream = await c.chat("Hi there", stream=True, max_tokens=12, temperature=0, request_id="async-1")
            async with stream:
                chunks = [chunk async for chunk in stream]
            models, healthy = await c.models(), await c.health()
            with pytest.raises(BadRequestError, match="temperature"):
                await c.completions(PROMPT, temperature=-1, stream=True)
            with pytest.raises(NotFoundError):
                await c.chat("Hi", model="no-such-model")
        async with AsyncClient(server.url, api_key="wrong-key") as wrong:
            with pytest.raises(AuthenticationError):
                await wrong.completions(PROMPT)
        return whole, whole_chat, stream, chunks, models, healthy

    whole, whole_chat, stream, chunks, models, healthy = asyncio.run(main())
    theirs = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.text == theirs.choices[0].text
    assert stream.request_id == "async-1" and "".join(c.text for c in chunks) == whole_chat.text
    assert chunks[-1].usage.completion_tokens == whole_chat.usage.completion_tokens
    assert [m.id for m in models] == [server.model] and healthy


# Serve handles (the test process is the Ray driver, inside the cluster) ---------------------


def test_handle_streams_the_same_greedy_answer(server, dsray_client):
    handle = get_handle("dsray")
    chunks = list(generate(handle, PROMPT, max_tokens=12, temperature=0))
    http = dsray_client.completions(PROMPT, max_tokens=12, temperature=0)
    assert "".join(c.new_text for c in chunks) == http.text
    assert chunks[-1].finish_reason == http.finish_reason and chunks[0].num_prompt_tokens == http.usage.prompt_tokens
    assert sum(len(c.new_token_ids) for c in chunks) == chunks[-1].num_generated_tokens == http.usage.completion_tokens
    by_ids = list(generate(handle, [5, 6, 7], max_tokens=4, temperature=0, request_id="handle-ids"))
    assert by_ids[-1].num_prompt_tokens == 3 and by_ids[-1].request_id == "handle-ids"


def test_handle_async_chat_and_errors(server, dsray_client):
    handle = get_handle("dsray")

    async def main():
        chunks = [c async for c in agenerate(handle, messages="Hello", max_tokens=8, temperature=0)]
        with pytest.raises(BadRequestError) as info:
            async for _ in agenerate(handle, PROMPT, temperature=-1):
                pass
        return chunks, info.value

    chunks, error = asyncio.run(main())
    assert "".join(c.new_text for c in chunks) == dsray_client.chat("Hello", max_tokens=8, temperature=0).text
    assert error.status_code == 400 and error.param == "temperature"
    with pytest.raises(ValueError, match="exactly one"):
        next(generate(handle, PROMPT, messages="Hello"))


# Full queue and request-id conflicts, on a slowed-down app --------------------------------


@pytest.fixture(scope="module")
def slow(server):
    """URL of an app whose replica takes two requests at most (one running, one waiting); no API key."""
    from ray import serve

    from deploy.app import build_app_with_engine
    from dsray.testing import slow_async_llm

    args = {
        "model": str(server.model_dir),
        "api_key": "",
        "max_waiting_requests": 1,
        "engine": {"max_model_len": 256, "max_num_seqs": 1, "kv_cache_memory_gb": 0.05},
        "llm_server": {"num_cpus": 0},
    }
    serve.run(build_app_with_engine(args, slow_async_llm), name="client-slow", route_prefix="/client-slow")
    try:
        yield f"{server.url}/client-slow"
    finally:
        serve.delete("client-slow")


def _hold(c: Client, request_id: str) -> Stream:
    stream = c.completions("hold", stream=True, request_id=request_id, max_tokens=200, ignore_eos=True)
    next(stream)  # running: the ingress answers a stream once its first chunk is there
    return stream


def test_full_queue_is_rate_limit_error_with_retry_after(slow, server):
    with Client(slow) as c, Client(slow) as other, ThreadPoolExecutor(1) as pool:
        with _hold(c, "hold-1"):
            # The second waits behind the running one; its call returns once it runs, so in a thread.
            waiting = pool.submit(other.completions, "second", stream=True, max_tokens=200, ignore_eos=True)
            deadline = time.monotonic() + 30
            while server.stats("client-slow")["num_requests_admitted"] < 2:
                assert time.monotonic() < deadline, "the second request never reached the replica"
                time.sleep(0.1)
            with pytest.raises(RateLimitError) as info:
                c.completions("one too many", max_tokens=2)
            assert info.value.status_code == 429 and info.value.code == "queue_full"
            assert info.value.retry_after == 1.0
            with pytest.raises(RateLimitError):  # the same refusal through a handle
                next(generate(get_handle("client-slow"), "via handle", max_tokens=2))
        waiting.result(timeout=60).close()  # hanging up on the first let the second run


def test_request_id_in_flight_twice_is_conflict_error(slow):
    with Client(slow) as c, _hold(c, "twice"):
        with pytest.raises(ConflictError, match="already in use") as info:
            c.completions("again", max_tokens=2, request_id="twice")
        assert info.value.status_code == 409 and info.value.param == "x-request-id"


def test_client_timeout_is_a_connection_error(slow):
    with Client(slow, timeout=0.5) as c, pytest.raises(APIConnectionError):
        c.completions("slow whole answer", max_tokens=200, ignore_eos=True)  # >= 10 s of steps
