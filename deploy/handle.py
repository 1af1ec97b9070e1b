"""In-cluster access to a dsray app's LLMServer through a Serve ``DeploymentHandle``: no HTTP, no JSON.

For code running inside the Ray cluster: a Ray task or actor, another Serve deployment, the
driver that deployed the app. ``generate`` (sync) and ``agenerate`` (asyncio) stream the
LLMServer's ``StreamChunk``s and raise ``dsray.client``'s typed errors, the same an HTTP caller
gets. Users reach these through ``dsray.client``; they live here because only ``deploy/``
imports Ray Serve. The admission rules (request id, chat messages, what a failure means) are
``deploy/front_door.py``'s.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deploy.front_door import chat_message, cut_short, handle_failure, request_id_error, scheduling_error
from deploy.messages import ErrorInfo, GenerateRequest, StreamChunk
from dsray.client.errors import DsrayAPIError, api_error

LLM_SERVER = "LLMServer"  # the deployment name build_app gives it


def get_handle(app_name: str = "dsray") -> DeploymentHandle:
    """The LLMServer handle of Serve app ``app_name``. Make it once and reuse it: each handle
    starts its own router."""
    return serve.get_deployment_handle(LLM_SERVER, app_name=app_name)


def _error(info: ErrorInfo, request_id: str) -> DsrayAPIError:
    """``info`` as the ``dsray.client`` error an HTTP caller would get for it."""
    return api_error(info.status, info.message, info.type, info.param, info.code, request_id=request_id)


def generate_request(
    prompt: str | list[int] | None = None,
    messages: str | list[dict[str, Any]] | None = None,
    request_id: str | None = None,
    **sampling: Any,
) -> GenerateRequest:
    """The request for a text or token-id ``prompt``, or for chat ``messages`` (a string: one user
    message); ``sampling`` holds SamplingParams fields by name (``deadline_s`` and ``priority`` too).
    A request id the engine cannot take, or an invalid deadline or priority, raises
    ``dsray.client.BadRequestError``."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    request_id = request_id or uuid.uuid4().hex
    if (refusal := request_id_error(request_id, "request_id", param="request_id")) is not None:
        raise _error(refusal, request_id)
    if (refusal := scheduling_error(sampling)) is not None:
        raise _error(refusal, request_id)
    fields: dict[str, Any]
    if isinstance(messages, str):
        fields = {"messages": [chat_message("user", messages)]}
    elif messages is not None:
        try:  # the roles every protocol takes, normalised as the HTTP and gRPC front ends do
            fields = {"messages": [_message(m, i) for i, m in enumerate(messages)]}
        except ValueError as exc:
            raise _error(ErrorInfo(str(exc), param="messages"), request_id) from None
    elif isinstance(prompt, str):
        fields = {"prompt": prompt}
    else:
        fields = {"prompt_token_ids": list(prompt)}
    return GenerateRequest(request_id=request_id, sampling=sampling, **fields)


def _message(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise ValueError(f"messages[{index}] must be a dict with a 'role' and a string 'content'; got {message!r:.80}")
    return chat_message(message.get("role"), message["content"], index)


def _checked(item: StreamChunk | ErrorInfo, request_id: str) -> StreamChunk:
    if isinstance(item, ErrorInfo):
        raise _error(item, request_id)
    return item


def generate(handle: DeploymentHandle, prompt: str | list[int] | None = None, **kwargs: Any) -> Iterator[StreamChunk]:
    """Stream one request's chunks through ``handle`` (from sync code; in asyncio use ``agenerate``).

    ``kwargs`` are ``generate_request``'s. Stopping early (``close()``, ``break``) cancels the
    request, which aborts it in the engine.
    """
    request = generate_request(prompt, **kwargs)
    stream = handle.options(stream=True).generate.remote(request)
    finished = False
    try:
        while not finished:
            try:
                item = next(stream)
            except StopIteration:
                raise _error(cut_short(), request.request_id) from None
            except (RayError, RayServeException) as exc:
                raise _error(handle_failure(exc), request.request_id) from exc
            chunk = _checked(item, request.request_id)
            finished = chunk.finish_reason is not None
            yield chunk
    finally:
        if not finished:
            stream.cancel()


async def agenerate(
    handle: DeploymentHandle, prompt: str | list[int] | None = None, **kwargs: Any
) -> AsyncIterator[StreamChunk]:
    """``generate`` for asyncio."""
    request = generate_request(prompt, **kwargs)
    stream = handle.options(stream=True).generate.remote(request)
    finished = False
    try:
        while not finished:
            try:
                item = await stream.__anext__()
            except StopAsyncIteration:
                raise _error(cut_short(), request.request_id) from None
            except (RayError, RayServeException) as exc:
                raise _error(handle_failure(exc), request.request_id) from exc
            chunk = _checked(item, request.request_id)
            finished = chunk.finish_reason is not None
            yield chunk
    finally:
        if not finished:
            stream.cancel()
