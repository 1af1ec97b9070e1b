"""OpenAI request bodies (pydantic) and response bodies (dicts) for completions and chat.

Requests are validated here for shape and type only; value ranges are SamplingParams' job
(one place for the rules, and the same messages offline and served). Unknown fields are
refused, as OpenAI's own API does, rather than silently ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from deploy.front_door import chat_message
from deploy.messages import StreamChunk

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
TokenIds = list[StrictInt]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _SamplingBody(_Body):
    """Fields completions and chat share: OpenAI's sampling parameters plus vLLM's extras."""

    model: StrictStr | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # vLLM extras
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: TokenIds | None = None
    min_tokens: StrictInt = 0
    # Scheduling (dsray; vLLM names priority the same): seconds from arrival, lower priority first
    deadline_s: Number | None = None
    priority: StrictInt | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be given when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        fields = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "logprobs": logprobs,
            "deadline_s": self.deadline_s,
            "priority": self.priority,
        }
        sampling = {k: v for k, v in fields.items() if v is not None}
        sampling["max_tokens"] = max_tokens  # None: until the context is full
        return sampling


class CompletionRequest(_SamplingBody):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False

    @model_validator(mode="after")
    def _supported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def prompt_fields(self) -> dict[str, Any]:
        """``prompt`` or ``prompt_token_ids`` of a GenerateRequest; one prompt per request."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"prompt: give one prompt per request (got a batch of {len(prompt)})")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return {"prompt": prompt}
        return {"prompt_token_ids": list(prompt)}

    def sampling(self) -> dict[str, Any]:
        return self._sampling(self.max_tokens, self.logprobs)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def plain(self) -> dict[str, Any]:
        """The message as the chat template takes it: text content, developer spoken as system."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return chat_message(self.role, content or "")


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def sampling(self) -> dict[str, Any]:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


# Responses ------------------------------------------------------------------------------------


def usage(chunk: StreamChunk) -> dict[str, Any]:
    return {
        "prompt_tokens": chunk.num_prompt_tokens,
        "completion_tokens": chunk.num_generated_tokens,
        "total_tokens": chunk.num_prompt_tokens + chunk.num_generated_tokens,
        "prompt_tokens_details": {"cached_tokens": chunk.num_cached_tokens},
    }


def completion_logprobs(chunk: StreamChunk, text_offset: int) -> dict[str, Any] | None:
    """Legacy completions logprobs of a chunk's tokens; offsets count from ``text_offset``."""
    if chunk.logprobs is None:
        return None
    texts = chunk.token_texts or {}
    tokens, offsets, offset = [], [], text_offset
    for token_id in chunk.new_token_ids:
        tokens.append(texts.get(token_id, ""))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp.get(t) for t, lp in zip(chunk.new_token_ids, chunk.logprobs)],
        "top_logprobs": [{texts.get(i, ""): v for i, v in lp.items()} for lp in chunk.logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(chunk: StreamChunk, num_top: int) -> dict[str, Any] | None:
    """Chat logprobs (``{"content": [...]}``) of a chunk's tokens, with the ``num_top`` best of each."""
    if chunk.logprobs is None:
        return None
    texts = chunk.token_texts or {}

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = texts.get(token_id, "")
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for token_id, lp in zip(chunk.new_token_ids, chunk.logprobs):
        best = sorted(lp.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
        content.append({**entry(token_id, lp.get(token_id, 0.0)), "top_logprobs": [entry(i, v) for i, v in best]})
    return {"content": content}


class ResponseBuilder:
    """Builds the OpenAI bodies of one request: stream deltas, the usage event, or the full response."""

    def __init__(self, request_id: str, model: str, chat: bool, body: CompletionRequest | ChatCompletionRequest):
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.chat = chat
        self.created = int(time.time())
        self.include_usage = body.include_usage
        self.continuous_usage = bool(body.stream_options and body.stream_options.continuous_usage_stats)
        self.num_top = (body.top_logprobs or 0) if isinstance(body, ChatCompletionRequest) else 0
        self.texts: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.num_chars = 0
        self.first = True

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, chunk: StreamChunk) -> dict[str, Any] | None:
        if self.chat:
            return chat_logprobs(chunk, self.num_top)
        return completion_logprobs(chunk, self.num_chars)

    def delta(self, chunk: StreamChunk) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": chunk.new_text} if self.first else {"content": chunk.new_text}
            )
            kind = "chat.completion.chunk"
        else:
            choice["text"] = chunk.new_text
            kind = "text_completion"
        choice["logprobs"] = self._logprobs(chunk)
        choice["finish_reason"] = chunk.finish_reason
        if chunk.finish_reason is not None:
            choice["stop_reason"] = chunk.stop_reason
        self.first = False
        self.num_chars += len(chunk.new_text)
        event = self._envelope(kind, [choice])
        if self.include_usage:
            event["usage"] = usage(chunk) if self.continuous_usage else None
        return event

    def usage_event(self, chunk: StreamChunk) -> dict[str, Any]:
        event = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        event["usage"] = usage(chunk)
        return event

    def add(self, chunk: StreamChunk) -> None:
        logprobs = self._logprobs(chunk)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        self.texts.append(chunk.new_text)
        self.num_chars += len(chunk.new_text)

    def full(self, final: StreamChunk) -> dict[str, Any]:
        text = "".join(self.texts)
        logprobs = _merge_logprobs(self.logprobs, self.chat) if self.logprobs else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs}
        choice["finish_reason"] = final.finish_reason
        choice["stop_reason"] = final.stop_reason  # vLLM's: the stop token id or string, or "deadline"
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        body["usage"] = usage(final)
        return body


def _merge_logprobs(parts: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": [entry for part in parts for entry in part["content"]]}
    return {key: [v for part in parts for v in part[key]] for key in parts[0]}
