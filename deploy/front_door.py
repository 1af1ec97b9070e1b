"""Admission at the front door: the rules every protocol applies to a request, written once.

HTTP (``deploy/ingress.py``), gRPC (``deploy/grpc_service.py``) and the in-cluster handle API
(``deploy/handle.py``) translate their wire format to and from these functions: the API key,
the request id, the model name, chat messages, a request's deadline and priority, what a failed
handle call or a cut-short stream means, and the chunk stream of one admitted request. A refusal is an ``ErrorInfo``
(``deploy/messages.py``), which each protocol turns into its own error (an OpenAI body, a gRPC
status, a ``dsray.client`` exception).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError

from deploy.messages import ErrorInfo, StreamChunk
from deploy.metrics import RequestObserver
from dsray.errors import InvalidRequestError
from dsray.sampling_params import check_scheduling

MAX_REQUEST_ID_CHARS = 256
CONTROL_TIMEOUT_S = 5.0  # health, stats and model-list calls to an LLMServer
# Chat roles as the chat template takes them: OpenAI's developer role is spoken as system.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# Admission ------------------------------------------------------------------------------------


def api_key_error(api_key: str | None, authorization: str, how_to_send: str) -> ErrorInfo | None:
    """None when no key is set or ``authorization`` is ``Bearer <api_key>``; else a 401.

    ``how_to_send`` completes "Missing API key: send ..." in the protocol's words.
    """
    if not api_key:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return None
    message = f"Missing API key: send {how_to_send}." if not token else "Incorrect API key provided."
    return ErrorInfo(message, type="AuthenticationError", code="invalid_api_key", status=401)


def request_id_error(request_id: str, field: str, param: str | None = None) -> ErrorInfo | None:
    """None for an id the engine can take (printable, at most MAX_REQUEST_ID_CHARS); else a 400 naming ``field``."""
    if len(request_id) <= MAX_REQUEST_ID_CHARS and request_id.isprintable():
        return None
    return ErrorInfo(f"{field} must be printable and at most {MAX_REQUEST_ID_CHARS} characters", param=param)


def model_error(requested: str | None, served: str) -> ErrorInfo | None:
    """None when the request names no model (None) or the served one; else OpenAI's 404 ``model_not_found``."""
    if requested is None or requested == served:
        return None
    return ErrorInfo(f"The model `{requested}` does not exist.", "NotFoundError", "model", "model_not_found", 404)


def scheduling_error(sampling: dict[str, Any]) -> ErrorInfo | None:
    """None when the request's ``deadline_s`` (absent, or positive finite seconds) and ``priority``
    (absent, or an int) are valid; else a 400 naming the field. SamplingParams' own rule, applied
    before the request travels to an LLMServer."""
    try:
        check_scheduling(sampling.get("deadline_s"), sampling.get("priority", 0))
    except InvalidRequestError as exc:
        return ErrorInfo(exc.message, param=exc.param)
    return None


def chat_message(role: str, content: str, index: int = 0) -> dict[str, str]:
    """One chat message as the chat template takes it; ValueError naming ``messages[index]`` for an unknown role."""
    if role not in CHAT_ROLES:
        raise ValueError(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
    return {"role": CHAT_ROLES[role], "content": content}


# Failures -------------------------------------------------------------------------------------


def handle_failure(exc: BaseException) -> ErrorInfo:
    """A failed handle call (no replica, replica died, Serve's queue full) as a 503."""
    reason = "server is overloaded" if isinstance(exc, BackPressureError) else "model instance unavailable"
    return ErrorInfo(f"{reason}: {exc}", type="ServiceUnavailableError", status=503)


def unhealthy(exc: BaseException) -> ErrorInfo:
    """A failed health check: no model instance can serve (dead, starting)."""
    return ErrorInfo(f"unhealthy: {exc}", type="ServiceUnavailableError", status=503)


def cut_short() -> ErrorInfo:
    """A chunk stream that ended before a chunk with a finish reason."""
    return ErrorInfo("stream ended without a finish reason", "InternalServerError", status=500)


async def control(call: Any) -> Any:
    """Await a small handle call (health, stats, models), giving up and cancelling it after CONTROL_TIMEOUT_S."""

    async def result() -> Any:
        return await call

    try:
        return await asyncio.wait_for(result(), CONTROL_TIMEOUT_S)
    except BaseException:
        call.cancel()
        raise


# Streams --------------------------------------------------------------------------------------


async def next_message(stream: Any) -> StreamChunk | ErrorInfo:
    """``stream``'s next message; a failed call or a stream that ended early as an ``ErrorInfo``."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return cut_short()
    except Exception as exc:
        return handle_failure(exc)


async def chunks(
    stream: Any, observer: RequestObserver, first: StreamChunk | ErrorInfo | None = None
) -> AsyncIterator[StreamChunk | ErrorInfo]:
    """An admitted request's chunks (``first``, if already read, then the rest of ``stream``), timed by ``observer``.

    Ends after the chunk with a finish reason or with one ``ErrorInfo``: the LLMServer's refusal, a
    failed handle call, or a stream cut short. Does not cancel ``stream``: its caller does that
    when ``observer.done`` is still False at the end (refused, failed, or the client left).
    """
    chunk = first
    while True:
        if chunk is None:
            chunk = await next_message(stream)
        if isinstance(chunk, ErrorInfo):
            yield chunk
            return
        observer.on_chunk(chunk)
        if chunk.finish_reason is not None:
            observer.on_finish(chunk)
        yield chunk
        if chunk.finish_reason is not None:
            return
        chunk = None
