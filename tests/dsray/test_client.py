"""dsray.client without a server: error classes by status and type, the SSE stream decoder, connection errors."""

from __future__ import annotations

import json

import pytest

from dsray import client as dc
from dsray.client.results import _StreamDecoder


def _data(event: dict) -> str:
    return f"data: {json.dumps(event)}"


def _chunk(text: str, finish_reason: str | None = None, **extra) -> str:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, **extra}
    return _data({"id": "cmpl-r1", "object": "text_completion", "choices": [choice], "usage": None})


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1}}


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, dc.BadRequestError),
        (401, dc.AuthenticationError),
        (404, dc.NotFoundError),
        (409, dc.ConflictError),
        (429, dc.RateLimitError),
        (500, dc.InternalServerError),
        (502, dc.InternalServerError),
        (503, dc.ServiceUnavailableError),
        (418, dc.DsrayAPIError),
    ],
)
def test_error_class_follows_status(status, cls):
    error = dc.api_error(status, "boom", "SomeError", "temperature", "bad", request_id="r1", retry_after=2.0)
    assert type(error) is cls and error.status_code == status
    assert (error.message, error.param, error.code, error.request_id, error.retry_after) == (
        "boom",
        "temperature",
        "bad",
        "r1",
        2.0,
    )


def test_error_class_follows_type_without_status():
    assert isinstance(dc.api_error(None, "gone", "ServiceUnavailableError"), dc.ServiceUnavailableError)
    assert dc.api_error(None, "gone", "ServiceUnavailableError").status_code == 503
    assert type(dc.api_error(None, "odd", "WeirdError")) is dc.DsrayAPIError


def test_stream_decoder_holds_the_last_chunk_for_usage():
    decoder = _StreamDecoder(chat=False, request_id="r1")
    usage_event = _data({"id": "cmpl-r1", "choices": [], "usage": USAGE})
    lines = [_chunk("Hel"), "", _chunk("lo", token_ids=[7]), _chunk("", "length"), usage_event, "data: [DONE]"]
    out = [chunk for line in lines for chunk in decoder.feed(line)]
    assert [c.text for c in out] == ["Hel", "lo", ""]
    assert out[1].token_ids == [7] and out[0].token_ids is None
    assert out[-1].finish_reason == "length" and out[-1].usage == dc.Usage(3, 2, 5, 1)
    assert decoder.done and all(c.usage is None for c in out[:-1])


def test_stream_decoder_reads_chat_deltas():
    decoder = _StreamDecoder(chat=True, request_id=None)
    event = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}
    assert decoder.feed(_data(event))[0].text == "Hi"


def test_error_event_mid_stream_raises_by_status_in_code():
    decoder = _StreamDecoder(chat=False, request_id="r1")
    assert decoder.feed(_chunk("a"))
    error = {"message": "the model instance cannot serve", "type": "ServiceUnavailableError", "param": None}
    with pytest.raises(dc.ServiceUnavailableError, match="cannot serve") as info:
        decoder.feed(_data({"error": {**error, "code": 503}}))
    assert info.value.status_code == 503 and info.value.code is None and info.value.request_id == "r1"
    with pytest.raises(dc.BadRequestError) as info:
        _StreamDecoder(False, None).feed(_data({"error": {**error, "type": "BadRequestError", "code": "x"}}))
    assert info.value.code == "x"


def test_stream_cut_short_is_a_connection_error():
    decoder = _StreamDecoder(chat=False, request_id="r1")
    decoder.feed(_chunk("a"))
    with pytest.raises(dc.APIConnectionError, match="before the answer finished"):
        decoder.finish()


def test_unreachable_server_is_a_connection_error():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with dc.Client(f"http://127.0.0.1:{port}", timeout=5) as client, pytest.raises(dc.APIConnectionError):
            client.completions("hi")


def test_base_url_may_name_v1_and_api_key_defaults_to_env(monkeypatch):
    monkeypatch.setenv("DSRAY_API_KEY", "from-env")
    with dc.Client("http://127.0.0.1:1/v1/") as client:
        assert client.base_url == "http://127.0.0.1:1"
        assert client._headers("r9") == {"Authorization": "Bearer from-env", "x-request-id": "r9"}
    with dc.Client(api_key="") as client:
        assert client._headers(None) == {}
