"""deploy/front_door.py: the admission rules HTTP, gRPC and the handle API share (no Ray cluster)."""

import asyncio

import pytest
from ray.serve.exceptions import BackPressureError

from deploy import front_door
from deploy.messages import ErrorInfo, StreamChunk
from deploy.metrics import ServingMetrics


def test_api_key_open_without_a_key():
    assert front_door.api_key_error(None, "", "x") is None
    assert front_door.api_key_error("", "Bearer whatever", "x") is None


def test_api_key_accepts_bearer_in_any_case():
    assert front_door.api_key_error("k1", "Bearer k1", "x") is None
    assert front_door.api_key_error("k1", "bearer  k1 ", "x") is None


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ("", "Missing API key: send 'Authorization: Bearer <key>'."),
        ("Bearer k2", "Incorrect API key provided."),
        ("Basic k1", "Incorrect API key provided."),
    ],
)
def test_api_key_refusals_are_401(authorization, message):
    info = front_door.api_key_error("k1", authorization, "'Authorization: Bearer <key>'")
    assert info == ErrorInfo(message, "AuthenticationError", None, "invalid_api_key", 401)


def test_request_id_rules():
    assert front_door.request_id_error("a" * front_door.MAX_REQUEST_ID_CHARS, "x-request-id") is None
    too_long = front_door.request_id_error("a" * (front_door.MAX_REQUEST_ID_CHARS + 1), "x-request-id")
    assert too_long is not None and too_long.status == 400 and too_long.message.startswith("x-request-id ")
    bad = front_door.request_id_error("a\nb", "request_id", param="request_id")
    assert bad is not None and bad.param == "request_id"


def test_model_lookup():
    assert front_door.model_error(None, "m") is None
    assert front_door.model_error("m", "m") is None
    info = front_door.model_error("other", "m")
    assert info == ErrorInfo("The model `other` does not exist.", "NotFoundError", "model", "model_not_found", 404)
    assert front_door.model_error("", "m") is not None  # HTTP's "model": "" names no model that exists


def test_chat_roles():
    assert front_door.chat_message("developer", "be brief") == {"role": "system", "content": "be brief"}
    assert front_door.chat_message("user", "hi") == {"role": "user", "content": "hi"}
    with pytest.raises(ValueError, match=r"messages\[3\]\.role must be one of"):
        front_door.chat_message("tool", "x", 3)


def test_failures_are_503_or_500():
    overloaded = front_door.handle_failure(BackPressureError(num_queued_requests=1, max_queued_requests=1))
    assert overloaded.status == 503 and overloaded.message.startswith("server is overloaded: ")
    died = front_door.handle_failure(RuntimeError("gone"))
    assert died == ErrorInfo("model instance unavailable: gone", "ServiceUnavailableError", status=503)
    assert front_door.unhealthy(RuntimeError("x")).status == 503
    assert front_door.cut_short().status == 500


class _Stream:
    """A handle stream: its items in order (an exception is raised when reached)."""

    def __init__(self, items):
        self.items = list(items)

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.items = []


def _chunk(text, finish=None):
    return StreamChunk("r", text, [1], finish_reason=finish, num_generated_tokens=1)


def _read(items, first=None):
    observer = ServingMetrics("m").observer()

    async def run():
        return [c async for c in front_door.chunks(_Stream(items), observer, first)]

    return asyncio.run(run()), observer


def test_chunks_end_at_the_finish_reason():
    got, observer = _read([_chunk("b"), _chunk("c", "stop"), _chunk("never")], first=_chunk("a"))
    assert [c.new_text for c in got] == ["a", "b", "c"] and observer.done


def test_chunks_end_with_one_error():
    refused = ErrorInfo("queue full", status=429)
    got, observer = _read([refused, _chunk("never")])
    assert got == [refused] and not observer.done
    got, _ = _read([_chunk("a"), RuntimeError("replica died")])
    assert got[-1].status == 503 and "replica died" in got[-1].message
    got, _ = _read([_chunk("a")])
    assert got[-1] == front_door.cut_short()


def test_control_cancels_a_call_that_fails():
    class Call:
        cancelled = False

        def __await__(self):
            raise RuntimeError("boom")
            yield

        def cancel(self):
            self.cancelled = True

    call = Call()
    with pytest.raises(RuntimeError):
        asyncio.run(front_door.control(call))
    assert call.cancelled


def test_handle_requests_follow_the_rules():
    from deploy.handle import generate_request
    from dsray.client.errors import BadRequestError

    assert generate_request(messages="hi", request_id="r1").messages == [{"role": "user", "content": "hi"}]
    with pytest.raises(BadRequestError, match="request_id must be printable"):
        generate_request("hi", request_id="bad\nid")
    # Message dicts take the roles HTTP and gRPC take, normalised the same way ("developer" is a system message).
    chat = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert generate_request(messages=chat).messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    with pytest.raises(BadRequestError, match=r"messages\[1\].role must be one of"):
        generate_request(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(BadRequestError, match=r"messages\[0\] must be a dict"):
        generate_request(messages=[{"role": "user", "content": 3}])
