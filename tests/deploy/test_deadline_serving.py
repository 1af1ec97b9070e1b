"""deadline_s and priority through the real server: a request that cannot start in time is a 504
(gRPC DEADLINE_EXCEEDED) and holds nothing afterwards; one that started ends at its deadline with
finish_reason "length", stop_reason "deadline" and its tokens counted; invalid values are 400s
naming the field. Waiting is made certain by filling every sequence slot of a second app, whose
every step sleeps (``slow_async_llm``), with requests that run for the whole test: never by how
fast a step of the real engine is (the C decode step finishes a whole tiny context in well under
a second).

The same app sends keep-alives early (``KEEPALIVE_S``): a stream that waits for its first token
gets its 200 and ``: queued`` comment lines, so a client's read timeout shorter than the queue
does not end it; a streaming request with a deadline keeps its 504."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import grpc
import openai
import pytest
import requests

from deploy.proto_gen import dsray_pb2 as pb
from deploy.proto_gen import dsray_pb2_grpc
from dsray.testing import wait_for

APP = ("application", "dsray")
SLOW = "deadline-slow"  # the app whose steps sleep: its slots stay taken for as long as a test needs
KEEPALIVE_S = 0.5  # the slow app's stream_keepalive_s


def _idle(server, app: str = "dsray") -> dict:
    """The app once no request runs or waits and every KV block is free again."""
    return wait_for(
        lambda: server.stats(app),
        lambda s: s["num_requests_admitted"] == 0 and s["num_requests_running"] == 0 and s["kv_cache_usage_perc"] == 0,
        what=f"an idle {app} app with every KV block free",
    )


@pytest.fixture(scope="module")
def slow(server):
    """The second app, with the main app's API key: ``max_num_seqs`` 2, each step first sleeping
    ``SLOW_STEP_S`` (so a whole-context request runs for >= 12 s, however fast the engine is)."""
    from ray import serve

    from deploy.app import build_app_with_engine
    from dsray.testing import slow_async_llm

    args = {
        "model": str(server.model_dir),
        "api_key": server.api_key,
        "max_waiting_requests": 2,
        "stream_keepalive_s": KEEPALIVE_S,
        "engine": {"max_model_len": server.max_model_len, "max_num_seqs": 2, "kv_cache_memory_gb": 0.05},
    }
    serve.run(build_app_with_engine(args, slow_async_llm), name=SLOW, route_prefix=f"/{SLOW}")
    try:
        yield dataclasses.replace(server, url=f"{server.url}/{SLOW}", max_num_seqs=2, max_waiting_requests=2)
    finally:
        serve.delete(SLOW)


@pytest.fixture
def slow_client(slow):
    with openai.OpenAI(base_url=slow.base_url, api_key=slow.api_key, max_retries=0, timeout=60) as c:
        yield c


@contextlib.contextmanager
def _every_slot_taken(server):
    """``max_num_seqs`` streaming requests of priority -1 to the slow app that each want the whole
    context, all started (first chunk read); closing them on exit aborts them. Meanwhile a new
    request of priority 0 can only wait."""
    body = {"model": server.model, "prompt": [5, 6, 7], "max_tokens": server.max_model_len - 4, "ignore_eos": True}
    body.update(stream=True, priority=-1)  # ahead of the requests under test: they cannot take a slot
    responses = []
    try:
        for _ in range(server.max_num_seqs):
            response = requests.post(f"{server.base_url}/completions", json=body, headers=server.auth, stream=True)
            lines = response.iter_lines()
            responses.append((response, lines))  # dropping the line iterator would close the connection
            assert response.status_code == 200
            assert next(line for line in lines if line and not line.startswith(b":")).startswith(b"data: ")
        slots_full = lambda s: s["num_requests_running"] == server.max_num_seqs  # noqa: E731
        wait_for(lambda: server.stats(SLOW), slots_full, 10, "every slot taken")
        yield
    finally:
        for response, _ in responses:
            response.close()


@pytest.fixture(scope="module")
def cut_s(server) -> float:
    """A deadline that falls a quarter of the way through a whole-context answer on this machine, so
    a request given it has started long before and is far from done (calibrated, not assumed)."""
    with openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60) as client:
        start = time.monotonic()
        out = client.completions.create(
            model=server.model, prompt=[5, 6, 7], max_tokens=server.max_model_len - 4, extra_body={"ignore_eos": True}
        )
    assert out.usage.completion_tokens == server.max_model_len - 4
    return (time.monotonic() - start) / 4


def test_waiting_request_past_its_deadline_is_a_504_and_frees_everything(slow, slow_client):
    _idle(slow, SLOW)
    with _every_slot_taken(slow):
        with pytest.raises(openai.APIStatusError) as info:
            slow_client.completions.create(
                model=slow.model, prompt="too late", max_tokens=4, extra_body={"deadline_s": 0.2}
            )
        with pytest.raises(openai.APIStatusError) as chat_info:
            slow_client.chat.completions.create(
                model=slow.model,
                messages=[{"role": "user", "content": "too late"}],
                max_tokens=4,
                stream=True,
                extra_body={"deadline_s": 0.2, "priority": 0},
            )
    for exc in (info.value, chat_info.value):
        assert exc.status_code == 504
        assert exc.body["code"] == "deadline_exceeded" and exc.body["param"] == "deadline_s"
        assert "deadline_s" in exc.body["message"]
    _idle(slow, SLOW)


def test_running_request_at_its_deadline_ends_with_length_and_keeps_its_tokens(server, client, cut_s):
    _idle(server)
    max_tokens = server.max_model_len - 4
    kwargs = dict(model=server.model, prompt=[5, 6, 7], max_tokens=max_tokens, temperature=0)
    out = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "deadline_s": cut_s})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.model_extra["stop_reason"] == "deadline"
    assert 0 < out.usage.completion_tokens < max_tokens

    chunks = list(
        client.completions.create(
            **kwargs,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "deadline_s": cut_s},
        )
    )
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == "length" and last.model_extra["stop_reason"] == "deadline"
    assert 0 < chunks[-1].usage.completion_tokens < max_tokens
    # Tokens so far are kept: the text streamed is the text of those tokens.
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    again = client.completions.create(
        **{**kwargs, "max_tokens": chunks[-1].usage.completion_tokens}, extra_body={"ignore_eos": True}
    )
    assert text == again.choices[0].text and again.choices[0].model_extra["stop_reason"] is None
    _idle(server)


def test_no_deadline_finishes_without_stop_reason(server, client):
    out = client.completions.create(
        model=server.model, prompt=[5, 6, 7], max_tokens=4, extra_body={"ignore_eos": True, "priority": 3}
    )
    assert out.choices[0].finish_reason == "length" and out.choices[0].model_extra["stop_reason"] is None
    assert out.usage.completion_tokens == 4


@pytest.mark.parametrize(
    "raw, param",
    [
        ('"deadline_s": -1', "deadline_s"),
        ('"deadline_s": 0', "deadline_s"),
        ('"deadline_s": NaN', "deadline_s"),
        ('"deadline_s": "5"', "deadline_s"),
        ('"deadline_s": true', "deadline_s"),
        ('"priority": 1.5', "priority"),
        ('"priority": "high"', "priority"),
    ],
)
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_invalid_values_are_400s_naming_the_field(server, http, route, raw, param):
    prompt = '"prompt": "hi"' if route == "completions" else '"messages": [{"role": "user", "content": "hi"}]'
    body = f'{{"model": "{server.model}", {prompt}, "max_tokens": 2, {raw}}}'
    response = http.post(f"{server.base_url}/{route}", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


# gRPC -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = dsray_pb2_grpc.DsrayStub(channel)
        deadline = time.monotonic() + 60
        while True:  # the proxy learns about the app's routes shortly after serve.run returns
            try:
                stub.Health(pb.HealthRequest(), metadata=[APP], timeout=10)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield stub


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_grpc_deadline_exceeded_and_invalid_argument(server, slow, stub, rpc, cut_s):
    auth = ("authorization", f"Bearer {server.api_key}")
    call = getattr(stub, rpc)

    def run(request, app=APP):
        result = call(request, metadata=[app, auth], timeout=60)
        return [result] if rpc == "Generate" else list(result)

    request = pb.GenerateRequest(prompt="too late", sampling=pb.SamplingParams(max_tokens=4), deadline_s=0.2)
    _idle(slow, SLOW)
    with _every_slot_taken(slow):
        with pytest.raises(grpc.RpcError) as info:
            run(request, ("application", SLOW))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline_s" in info.value.details()
    _idle(slow, SLOW)
    with pytest.raises(grpc.RpcError) as info:
        run(pb.GenerateRequest(prompt="hi", deadline_s=-1.0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "deadline_s" in info.value.details()
    sampling = pb.SamplingParams(max_tokens=server.max_model_len - 4, ignore_eos=True)
    messages = run(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=sampling, deadline_s=cut_s, priority=2))
    assert messages[-1].finish_reason == "length" and messages[-1].stop_reason == "deadline"
    assert 0 < messages[-1].usage.completion_tokens < server.max_model_len - 4
    assert sum(len(m.token_ids) for m in messages) == messages[-1].usage.completion_tokens


def test_handle_api_refuses_invalid_values_before_sending():
    from deploy.handle import generate_request
    from dsray.client import BadRequestError

    with pytest.raises(BadRequestError) as info:
        generate_request("hi", deadline_s=float("nan"))
    assert info.value.param == "deadline_s"
    with pytest.raises(BadRequestError) as info:
        generate_request("hi", priority="1")
    assert info.value.param == "priority"
    assert generate_request("hi", deadline_s=2.5, priority=1).sampling == {"deadline_s": 2.5, "priority": 1}


def test_sse_stream_last_chunk_carries_stop_reason(server, http, cut_s):
    body = {
        "model": server.model,
        "prompt": [5, 6, 7],
        "max_tokens": server.max_model_len - 4,
        "ignore_eos": True,
        "stream": True,
        "deadline_s": cut_s,
    }
    with http.post(f"{server.base_url}/completions", json=body, stream=True) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != b"data: [DONE]"]
    finals = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["finish_reason"] == "length" and finals[0]["stop_reason"] == "deadline"
    assert all(
        "stop_reason" not in e["choices"][0] for e in events if e["choices"] and not e["choices"][0]["finish_reason"]
    )


# Keep-alive while queued ----------------------------------------------------------------------


def _queued_stream(server, **fields):
    """A streaming completion of priority 0 to ``server`` (raw SSE), its response and line iterator."""
    body = {"model": server.model, "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    body.update(stream=True, **fields)
    response = requests.post(f"{server.base_url}/completions", json=body, headers=server.auth, stream=True, timeout=60)
    return response, response.iter_lines()


def test_queued_stream_gets_its_200_and_comments_then_its_tokens(slow, client):
    _idle(slow, SLOW)
    with _every_slot_taken(slow):
        response, lines = _queued_stream(slow)
        assert response.status_code == 200  # headers sent while every slot is still taken
        lines = (line for line in lines if line)
        before = [next(lines), next(lines)]
        assert slow.stats(SLOW)["num_requests_waiting"] == 1  # still queued after them
    assert before == [b": queued", b": queued"]
    events = [line for line in lines if line != b": queued"]
    response.close()
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    expected = client.completions.create(
        model=slow.model, prompt=[5, 6, 7], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.choices[0].text
    _idle(slow, SLOW)


def test_openai_client_read_timeout_shorter_than_the_queue(slow):
    """The official client gives up on a read after its timeout; comments keep its stream alive
    while the request waits 4x that long, and the answer comes in full."""
    import threading

    _idle(slow, SLOW)
    read_timeout_s = 4 * KEEPALIVE_S
    result: dict = {}

    def read() -> None:
        with openai.OpenAI(base_url=slow.base_url, api_key=slow.api_key, max_retries=0, timeout=read_timeout_s) as c:
            try:
                stream = c.completions.create(
                    model=slow.model, prompt="queued", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
                )
                result["chunks"] = list(stream)
            except Exception as exc:  # reported below, on the test's thread
                result["error"] = exc

    with _every_slot_taken(slow):
        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: slow.stats(SLOW), lambda s: s["num_requests_waiting"] == 1, 10, "the request queued")
        time.sleep(4 * read_timeout_s)
        assert reader.is_alive() and slow.stats(SLOW)["num_requests_waiting"] == 1
    reader.join(60)
    assert "error" not in result, result.get("error")
    finals = [c.choices[0] for c in result["chunks"] if c.choices and c.choices[0].finish_reason]
    assert [f.finish_reason for f in finals] == ["length"]
    _idle(slow, SLOW)


def test_client_leaving_a_committed_queued_stream_aborts_it(slow):
    _idle(slow, SLOW)
    with _every_slot_taken(slow):
        response, lines = _queued_stream(slow)
        assert response.status_code == 200 and next(line for line in lines if line) == b": queued"
        response.close()
        wait_for(lambda: slow.stats(SLOW), lambda s: s["num_requests_waiting"] == 0, 10, "the request aborted")
        assert slow.stats(SLOW)["num_requests_admitted"] == slow.max_num_seqs  # the slot-takers alone
    _idle(slow, SLOW)


def test_queued_stream_with_a_deadline_keeps_its_504(slow):
    """A deadline longer than the keep-alive wait: still no early 200, the missed deadline is a 504."""
    _idle(slow, SLOW)
    with _every_slot_taken(slow):
        response, _ = _queued_stream(slow, deadline_s=4 * KEEPALIVE_S)
        with response:
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "deadline_exceeded"
    _idle(slow, SLOW)
