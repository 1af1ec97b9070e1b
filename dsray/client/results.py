"""What dsray.client returns: typed results, and streams of chunks decoded from the server's SSE events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2

from dsray.client.errors import APIConnectionError, DsrayAPIError, api_error

REQUEST_ID_HEADER = "x-request-id"


def _stream_error(error: dict[str, Any], request_id: str | None) -> DsrayAPIError:
    # Mid-stream the server can no longer change the status, so it sends the status as `code`
    # where the error has no code of its own.
    code = error.get("code")
    status = code if isinstance(code, int) else None
    return api_error(
        status,
        error.get("message") or "the request failed while streaming",
        error.get("type"),
        error.get("param"),
        None if status is not None else code,
        request_id=request_id,
    )


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0

    @classmethod
    def from_json(cls, usage: dict[str, Any] | None) -> Usage | None:
        if not usage:
            return None
        details = usage.get("prompt_tokens_details") or {}
        return cls(
            usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"], details.get("cached_tokens", 0)
        )


@dataclass
class Completion:
    """A whole answer (completions or chat): its text, why it ended, token counts, and the body."""

    id: str
    text: str
    finish_reason: str | None
    usage: Usage | None
    request_id: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass
class CompletionChunk:
    """One streamed delta. The last one has ``finish_reason`` and (streams ask for it) ``usage``.

    ``token_ids`` are the delta's token ids where the server sends them, else None.
    """

    id: str
    text: str
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    usage: Usage | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ModelInfo:
    """One entry of ``/v1/models``."""

    id: str
    owned_by: str | None
    max_model_len: int | None
    raw: dict[str, Any] = field(repr=False)


def completion(body: dict[str, Any], chat: bool, request_id: str | None) -> Completion:
    """The ``Completion`` of a non-streamed response body (completions or, with ``chat``, chat)."""
    choice = body["choices"][0]
    text = (choice["message"].get("content") or "") if chat else choice["text"]
    usage = Usage.from_json(body.get("usage"))
    return Completion(body["id"], text, choice.get("finish_reason"), usage, request_id, body)


class _StreamDecoder:
    """SSE lines of one stream in, chunks out.

    The server sends usage in its own event after the finishing chunk; the decoder holds that
    chunk back until then, so the last chunk a caller sees carries both.
    """

    def __init__(self, chat: bool, request_id: str | None):
        self.chat = chat
        self.request_id = request_id
        self.held: CompletionChunk | None = None
        self.done = False

    def feed(self, line: str) -> list[CompletionChunk]:
        if not line.startswith("data:"):
            return []  # blank separators, comments, other SSE fields
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return self.finish()
        event = json.loads(data)
        if "error" in event:
            raise _stream_error(event["error"], self.request_id)
        usage = Usage.from_json(event.get("usage"))
        if not event.get("choices"):  # the usage event
            if self.held is not None:
                self.held.usage = usage
            return []
        choice = event["choices"][0]
        text = (choice["delta"].get("content") or "") if self.chat else choice.get("text", "")
        chunk = CompletionChunk(event["id"], text, choice.get("finish_reason"), choice.get("token_ids"), usage, event)
        if chunk.finish_reason is None:
            return [chunk]
        self.held = chunk
        return []

    def finish(self) -> list[CompletionChunk]:
        """What is left when the stream ends; an error if it ended before the answer did."""
        held, self.held = self.held, None
        if held is None and not self.done:
            raise APIConnectionError("the stream ended before the answer finished", request_id=self.request_id)
        return [held] if held is not None else []


class Stream:
    """Chunks of one streaming answer. ``close()`` (or leaving a ``with`` block) hangs up, which
    aborts the request on the server."""

    def __init__(self, response: httpx2.Response, chat: bool):
        self.response = response
        self.request_id = response.headers.get(REQUEST_ID_HEADER)
        self._decoder = _StreamDecoder(chat, self.request_id)
        self._chunks = self._iterate()

    def _iterate(self) -> Iterator[CompletionChunk]:
        try:
            for line in self.response.iter_lines():
                yield from self._decoder.feed(line)
                if self._decoder.done:
                    return
            yield from self._decoder.finish()
        except httpx2.RequestError as exc:
            raise APIConnectionError(f"the stream broke: {exc!r}", request_id=self.request_id) from exc
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[CompletionChunk]:
        return self

    def __next__(self) -> CompletionChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream:
    """``Stream`` for ``AsyncClient``: ``async for`` over its chunks; ``aclose()`` hangs up."""

    def __init__(self, response: httpx2.Response, chat: bool):
        self.response = response
        self.request_id = response.headers.get(REQUEST_ID_HEADER)
        self._decoder = _StreamDecoder(chat, self.request_id)
        self._chunks = self._iterate()

    async def _iterate(self) -> AsyncIterator[CompletionChunk]:
        try:
            async for line in self.response.aiter_lines():
                for chunk in self._decoder.feed(line):
                    yield chunk
                if self._decoder.done:
                    return
            for chunk in self._decoder.finish():
                yield chunk
        except httpx2.RequestError as exc:
            raise APIConnectionError(f"the stream broke: {exc!r}", request_id=self.request_id) from exc
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[CompletionChunk]:
        return self

    async def __anext__(self) -> CompletionChunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
