"""dsray.client: call a dsray server — over HTTP (sync and async, streaming) or, in-cluster, through Serve.

``Client`` and ``AsyncClient`` (``http.py``) speak the server's OpenAI-compatible HTTP API and
return typed results (``results.py``): a ``Completion`` for a whole answer, or a stream of
``CompletionChunk``s. Every error answer raises a ``DsrayAPIError`` subclass chosen by HTTP
status and carrying OpenAI's error fields (``errors.py``); an error event in the middle of a
stream raises the same way. ``get_handle``, ``generate`` and ``agenerate`` reach the LLMServer
deployment directly from inside the Ray cluster (no HTTP); they live in ``deploy/handle.py``,
since only ``deploy/`` imports Ray Serve, and are imported on first use.
"""

from __future__ import annotations

from typing import Any

from dsray.client.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    DsrayAPIError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    api_error,
)
from dsray.client.http import DEFAULT_BASE_URL, AsyncClient, Client
from dsray.client.results import AsyncStream, Completion, CompletionChunk, ModelInfo, Stream, Usage

__all__ = [
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Completion",
    "CompletionChunk",
    "ConflictError",
    "DeadlineExceededError",
    "DsrayAPIError",
    "InternalServerError",
    "ModelInfo",
    "NotFoundError",
    "RateLimitError",
    "ServiceUnavailableError",
    "Stream",
    "Usage",
    "agenerate",
    "api_error",
    "generate",
    "get_handle",
]


def get_handle(app_name: str = "dsray"):
    """The LLMServer ``DeploymentHandle`` of Serve app ``app_name``, for callers inside the Ray cluster."""
    from deploy.handle import get_handle as get

    return get(app_name)


def generate(handle, prompt: str | list[int] | None = None, **kwargs: Any):
    """Stream ``StreamChunk``s of one request through ``handle`` (sync; see ``deploy.handle.generate``)."""
    from deploy.handle import generate as run

    return run(handle, prompt, **kwargs)


def agenerate(handle, prompt: str | list[int] | None = None, **kwargs: Any):
    """``generate`` for asyncio: an async iterator of ``StreamChunk``s."""
    from deploy.handle import agenerate as run

    return run(handle, prompt, **kwargs)
