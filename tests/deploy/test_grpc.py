"""The gRPC service (deploy/dsray.proto) over a real channel through Serve's gRPC proxy: results match
HTTP, streams add up to the unary answer, refusals are gRPC statuses naming what was wrong."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import json_format

from deploy.grpc_service import SERVICER_FUNCTION, sampling_fields, to_generate_request
from deploy.proto_gen import dsray_pb2 as pb
from deploy.proto_gen import dsray_pb2_grpc
from dsray.sampling_params import SamplingParams

APP = ("application", "dsray")  # the session runs a second app at times: say which one


def _greedy(prompt: str = "The weather today is", max_tokens: int = 8, **sampling) -> pb.GenerateRequest:
    sampling = {"temperature": 0.0, "max_tokens": max_tokens, **sampling}
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(**sampling))


def _call(stub, rpc: str, request: pb.GenerateRequest, metadata) -> list[pb.GenerateResponse]:
    """The rpc's messages: one for Generate, every chunk for GenerateStream."""
    if rpc == "Generate":
        return [stub.Generate(request, metadata=metadata, timeout=60)]
    return list(stub.GenerateStream(request, metadata=metadata, timeout=60))


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


@pytest.fixture
def metadata(server):
    return [APP, ("authorization", f"Bearer {server.api_key}")]


# Without Ray --------------------------------------------------------------------------------


def test_sampling_fields_are_sampling_params_and_unset_means_default():
    assert set(pb.SamplingParams.DESCRIPTOR.fields_by_name) <= set(SamplingParams.__dataclass_fields__)
    assert sampling_fields(pb.SamplingParams()) == {}
    fields = sampling_fields(pb.SamplingParams(temperature=0.0, stop=["\n"], stop_token_ids=[2], ignore_eos=False))
    assert fields == {"temperature": 0.0, "stop": ["\n"], "stop_token_ids": [2], "ignore_eos": False}
    SamplingParams(**fields)


def test_request_conversion():
    chat = pb.GenerateRequest(messages=[pb.ChatMessage(role="developer", content="Be brief.")])
    assert to_generate_request(chat, "r").messages == [{"role": "system", "content": "Be brief."}]
    assert to_generate_request(chat, "r").prompt is None
    empty = to_generate_request(pb.GenerateRequest(prompt=""), "r")
    assert empty.prompt == "" and empty.prompt_token_ids is None and empty.messages is None
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        to_generate_request(pb.GenerateRequest(messages=[pb.ChatMessage(role="robot")]), "r")


def test_serve_yaml_serves_the_grpc_service():
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml").read_text())
    assert config["grpc_options"]["grpc_servicer_functions"] == [SERVICER_FUNCTION]


# Through Serve ----------------------------------------------------------------------------------


def test_generate_matches_http_completion(stub, metadata, client, server):
    out = stub.Generate(_greedy(), metadata=metadata, timeout=60)
    http = client.completions.create(model=server.model, prompt="The weather today is", max_tokens=8, temperature=0)
    assert out.text == http.choices[0].text and out.finish_reason == http.choices[0].finish_reason
    assert out.usage.prompt_tokens == http.usage.prompt_tokens
    assert out.usage.completion_tokens == http.usage.completion_tokens == len(out.token_ids)
    assert out.model == server.model and out.request_id


def test_stream_adds_up_to_generate(stub, metadata):
    request = _greedy("Inference on many machines", max_tokens=16)
    whole = stub.Generate(request, metadata=metadata, timeout=60)
    chunks = list(stub.GenerateStream(request, metadata=metadata, timeout=60))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert all(c.finish_reason == "" and not c.HasField("usage") for c in chunks[:-1])
    assert chunks[-1].finish_reason == whole.finish_reason and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens == len(whole.token_ids) > 0


def test_token_ids_and_chat_match_http(stub, metadata, client, server):
    ids = pb.GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=pb.SamplingParams(temperature=0, max_tokens=4))
    by_ids = stub.Generate(ids, metadata=metadata, timeout=60)
    http = client.completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=4, temperature=0)
    assert by_ids.usage.prompt_tokens == 3 and by_ids.text == http.choices[0].text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    chat = pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in messages], sampling=pb.SamplingParams(temperature=0, max_tokens=8)
    )
    out = stub.Generate(chat, metadata=metadata, timeout=60)
    http_chat = client.chat.completions.create(
        model=server.model, messages=messages, max_completion_tokens=8, temperature=0
    )
    assert out.text == http_chat.choices[0].message.content
    assert out.usage.prompt_tokens == http_chat.usage.prompt_tokens


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_logprobs(stub, metadata, rpc):
    messages = _call(stub, rpc, _greedy(max_tokens=4, logprobs=3), metadata)
    token_ids = [t for m in messages for t in m.token_ids]
    logprobs = [lp for m in messages for lp in m.logprobs]
    assert len(logprobs) == len(token_ids) == messages[-1].usage.completion_tokens
    for token_id, lp in zip(token_ids, logprobs):
        assert lp.chosen.token_id == token_id and lp.chosen.logprob <= 0
        assert len(lp.top) == 3 and [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.top[0].logprob == pytest.approx(lp.chosen.logprob)  # greedy: the chosen one is the best


def test_list_models_and_health(stub, metadata, server):
    (model,) = stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30).models
    assert model.id == server.model and model.max_model_len == server.max_model_len
    assert stub.Health(pb.HealthRequest(), metadata=[APP], timeout=30).status == "SERVING"  # no API key needed


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
@pytest.mark.parametrize(
    "request_fields, named",
    [
        ({"prompt": "x", "sampling": {"temperature": -1.0}}, "temperature"),
        ({"prompt": "x", "sampling": {"top_p": 0.0}}, "top_p"),
        ({"prompt": "x", "sampling": {"max_tokens": 0}}, "max_tokens"),
        ({"sampling": {"max_tokens": 2}}, "prompt"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"prompt": "hello", "sampling": {"max_tokens": 10_000}}, "max_tokens"),
    ],
)
def test_bad_parameter_is_invalid_argument(stub, metadata, rpc, request_fields, named):
    request = json_format.ParseDict(request_fields, pb.GenerateRequest())
    with pytest.raises(grpc.RpcError) as info:
        _call(stub, rpc, request, metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in info.value.details()


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "wrong-key"])
def test_missing_or_wrong_api_key_is_unauthenticated(stub, rpc, authorization):
    metadata = [APP] + ([("authorization", authorization)] if authorization else [])
    with pytest.raises(grpc.RpcError) as info:
        _call(stub, rpc, _greedy(max_tokens=2), metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_unknown_model_is_not_found(stub, metadata, rpc):
    request = _greedy(max_tokens=2)
    request.model = "gpt-5"
    with pytest.raises(grpc.RpcError) as info:
        _call(stub, rpc, request, metadata)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "gpt-5" in info.value.details()


def test_named_model_and_request_id(stub, metadata, server):
    request = _greedy(max_tokens=2)
    request.model, request.request_id = server.model, "grpc-id-1"
    chunks = list(stub.GenerateStream(request, metadata=metadata, timeout=60))
    assert {c.request_id for c in chunks} == {"grpc-id-1"}
    out = stub.Generate(_greedy(max_tokens=2), metadata=metadata + [("request_id", "from-metadata")], timeout=60)
    assert out.request_id == "from-metadata"


# Against a slow engine: requests stay in flight long enough to observe -------------------------


@pytest.fixture(scope="module")
def slow_app(server):
    """Name of a second app whose LLMServer runs slow_async_llm: one sequence running, one waiting, no API key."""
    from ray import serve

    from deploy.app import build_app_with_engine
    from dsray.testing import slow_async_llm

    args = {
        "model": str(server.model_dir),
        "api_key": "",
        "max_waiting_requests": 1,
        "engine": {"max_model_len": 256, "max_num_seqs": 1, "kv_cache_memory_gb": 0.05},
    }
    serve.run(build_app_with_engine(args, slow_async_llm), name="grpc-slow", route_prefix="/grpc-slow")
    try:
        yield "grpc-slow"
    finally:
        serve.delete("grpc-slow")


def _long(request_id: str = "") -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=200, ignore_eos=True)
    return pb.GenerateRequest(prompt="a long one", request_id=request_id, sampling=sampling)


def _wait_for(fetch, check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check(value := fetch()):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {value!r})")


def test_cancelled_stream_aborts_the_request(stub, slow_app, server):
    metadata = [("application", slow_app)]
    before = server.stats(slow_app)
    stream = stub.GenerateStream(_long(), metadata=metadata, timeout=60)
    assert next(stream).token_ids
    stream.cancel()
    # 200 steps take >= 10 s: a quick return to an empty cache means the request was aborted.
    after = _wait_for(
        lambda: server.stats(slow_app),
        lambda s: s["num_requests_running"] == 0 and s["kv_cache_usage_perc"] == 0,
        timeout_s=5.0,
        what="the cancelled request's KV blocks to be freed",
    )
    assert after["num_cancelled"] == before["num_cancelled"] + 1 and after["num_requests_admitted"] == 0


def test_request_id_in_flight_is_already_exists_and_full_queue_is_resource_exhausted(stub, slow_app, server):
    metadata = [("application", slow_app)]
    running = stub.GenerateStream(_long("twice"), metadata=metadata, timeout=60)
    waiting = None
    try:
        assert next(running).token_ids
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(_long("twice"), metadata=metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "already in use" in info.value.details()

        waiting = stub.GenerateStream(_long(), metadata=metadata, timeout=60)  # max_num_seqs 1: it waits
        _wait_for(lambda: server.stats(slow_app), lambda s: s["num_requests_admitted"] == 2, 30.0, "a full queue")
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(_greedy(max_tokens=2), metadata=metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in info.value.details()
    finally:
        running.cancel()
        if waiting is not None:
            waiting.cancel()
    _wait_for(lambda: server.stats(slow_app), lambda s: s["num_requests_admitted"] == 0, 10.0, "the queue to drain")
