"""What the engine returns for a request: the cumulative result, plus the delta of the last step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated so far
    text: str = ""  # detokenized generated text (stop strings excluded)
    logprobs: list[dict[int, float]] | None = None  # per generated token: top-N and the chosen one
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it, or "deadline"
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    new_token_ids: list[int] = field(default_factory=list)  # this step's delta, for streaming
    new_text: str = ""
    arrival_time: float = 0.0
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
