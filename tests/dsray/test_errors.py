"""Errors are typed: each carries its status and OpenAI fields, survives pickling, and still is a ValueError
where the request is at fault; the server maps them by type, not by message."""

from __future__ import annotations

import pickle

import pytest

from deploy.server import error_info
from dsray.async_llm import AsyncLLM, OutputStream
from dsray.engine_protocol import EngineProtocol, OutputStreamProtocol
from dsray.errors import ContextLengthError, EngineDeadError, InvalidRequestError, RequestIdInUseError
from dsray.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("error", "status", "kind", "param", "code"),
    [
        (InvalidRequestError("bad", param="top_p"), 400, "BadRequestError", "top_p", None),
        (ContextLengthError("long"), 400, "BadRequestError", "prompt", "context_length_exceeded"),
        (RequestIdInUseError("twice"), 409, "ConflictError", "x-request-id", None),
        (EngineDeadError("gone"), 503, "ServiceUnavailableError", None, None),
    ],
)
def test_each_error_carries_its_fields_through_a_pickle(error, status, kind, param, code):
    for e in (error, pickle.loads(pickle.dumps(error))):  # the engine process's pipe pickles them
        assert type(e) is type(error) and str(e) == error.message
        assert (e.status, e.type, e.param, e.code) == (status, kind, param, code)


def test_request_errors_stay_value_errors_and_sampling_params_name_their_field():
    with pytest.raises(ValueError) as info:
        SamplingParams(top_p=0)
    assert isinstance(info.value, InvalidRequestError) and info.value.param == "top_p"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(min_tokens=5, max_tokens=2)
    assert info.value.param == "min_tokens"


def test_the_server_maps_errors_by_type_whatever_their_message():
    # A message that reads like another error changes nothing: only the type counts.
    info = error_info(InvalidRequestError("the context is already in use", param="stop"), "messages")
    assert (info.status, info.param, info.code) == (400, "stop", None)
    info = error_info(ContextLengthError("too long"), "messages")  # a chat request's prompt is its messages
    assert (info.status, info.param, info.code) == (400, "messages", "context_length_exceeded")
    info = error_info(RequestIdInUseError("x"))
    assert (info.status, info.type, info.param) == (409, "ConflictError", "x-request-id")


def test_async_llm_implements_the_engine_protocol():
    assert issubclass(AsyncLLM, EngineProtocol) and issubclass(OutputStream, OutputStreamProtocol)
    assert not AsyncLLM.__abstractmethods__ and not OutputStream.__abstractmethods__
