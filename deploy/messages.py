"""Typed messages between the Serve deployments (ingress, gRPC servicer) and the LLMServer.

Small picklable dataclasses: they cross Ray actor boundaries on every streamed chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerateRequest:
    """One completion request as the LLMServer takes it.

    Exactly one of ``prompt`` (text) and ``prompt_token_ids`` is set; chat requests arrive here
    already rendered through the chat template by the caller (``messages`` set instead; the
    server renders them with the checkpoint's template). ``sampling`` holds SamplingParams
    fields by name, ``deadline_s`` and ``priority`` among them.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamChunk:
    """A request's delta since its previous chunk (one engine step, or several merged when the
    consumer lags), with the running totals. ``token_texts`` maps every token id in ``logprobs``
    (and ``new_token_ids``) to its text, for OpenAI's logprobs fields; set only with logprobs."""

    request_id: str
    new_text: str
    new_token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None  # for the new tokens, when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk
    stop_reason: int | str | None = None  # on the last chunk: the stop token id or string, or "deadline"
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    token_texts: dict[int, str] | None = None


@dataclass
class ErrorInfo:
    """A request the server refused: OpenAI error fields and the HTTP status to use."""

    message: str
    type: str = "BadRequestError"
    param: str | None = None
    code: str | None = None
    status: int = 400
