"""SamplingParams: how one request is sampled and when it stops (field names as in vLLM).

Pure Python and validated on construction, so a bad request fails at the front door with a
message naming the parameter and its allowed range, never deep inside a model step.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsray.errors import InvalidRequestError

# Below this temperature sampling is treated as greedy: dividing logits by ~0 only overflows.
_GREEDY_EPS = 1e-5
_MAX_LOGPROBS = 20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_scheduling(deadline_s: object, priority: object) -> None:
    """Raise ``InvalidRequestError`` naming the field unless ``deadline_s`` is None or a positive finite
    number of seconds and ``priority`` an int. The one rule for every front end: SamplingParams
    applies it to Python callers, ``deploy/front_door.py`` to HTTP, gRPC and handle requests."""
    if deadline_s is not None and (not _is_number(deadline_s) or not (0 < deadline_s < float("inf"))):
        raise InvalidRequestError(
            f"deadline_s must be a positive finite number of seconds or None, got {deadline_s!r}", param="deadline_s"
        )
    if not _is_int(priority):
        raise InvalidRequestError(f"priority must be an int (lower runs first), got {priority!r}", param="priority")


def _check_range(name: str, value: object, low: float, high: float, rule: str) -> None:
    """Raise unless ``low <= value <= high`` (written so that NaN fails too)."""
    if not _is_number(value) or not (low <= value <= high):
        raise InvalidRequestError(f"{name} must be {rule}, got {value!r}", param=name)


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request.

    ``top_k`` of 0 or -1 disables top-k (stored as 0); ``stop`` may be one string, and is
    stored as a list; ``stop_token_ids`` None is stored as an empty list. ``max_tokens=None``
    means "until a stop condition or the model's length limit".
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    deadline_s: float | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        self._normalize()
        self._validate()

    def _normalize(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0

    def _validate(self) -> None:
        if not _is_int(self.n) or self.n != 1:
            raise InvalidRequestError(f"n must be 1 (parallel sampling is not supported), got {self.n!r}", param="n")
        _check_range("temperature", self.temperature, 0.0, float("inf"), ">= 0")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k!r}", param="top_k")
        _check_range("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequestError(f"seed must be an int or None, got {self.seed!r}", param="seed")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not (self.repetition_penalty > 0):
            raise InvalidRequestError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty!r}", param="repetition_penalty"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must hold non-empty strings, got {s!r}", param="stop")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise InvalidRequestError(
                    f"stop_token_ids must hold non-negative ints, got {t!r}", param="stop_token_ids"
                )
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidRequestError(f"max_tokens must be >= 1 or None, got {self.max_tokens!r}", param="max_tokens")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be >= 0, got {self.min_tokens!r}", param="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} and max_tokens={self.max_tokens}",
                param="min_tokens",
            )
        if self.logprobs is not None and (not _is_int(self.logprobs) or not (0 <= self.logprobs <= _MAX_LOGPROBS)):
            raise InvalidRequestError(
                f"logprobs must be in [0, {_MAX_LOGPROBS}] or None, got {self.logprobs!r}", param="logprobs"
            )
        check_scheduling(self.deadline_s, self.priority)

    @property
    def is_greedy(self) -> bool:
        """Whether to take the argmax (temperature 0, or so close to it that it makes no difference)."""
        return self.temperature < _GREEDY_EPS
