"""EngineProtocol: what a server needs of an engine — the seam ``LLMServer`` depends on.

``AsyncLLM`` implements it; tests inject their own (``LLMServer(engine_cls=...)``). Everything a
server reads goes through these members, never through an engine's internals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from dsray.engine_config import EngineConfig
from dsray.outputs import RequestOutput
from dsray.sampling_params import SamplingParams


class OutputStreamProtocol(ABC):
    """One request's outputs, as a reader pulls them (``dsray.async_llm.OutputStream``)."""

    request_id: str

    @abstractmethod
    async def next(self) -> RequestOutput:
        """The newest cumulative output not yet returned (waits for one; the first is returned as it
        came). Raises what failed the request: an ``InvalidRequestError`` the engine refused it with,
        or ``EngineDeadError``."""

    @abstractmethod
    async def wait_finished(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, returning early when the request finishes or fails."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop reading; an unfinished request is aborted (idempotent)."""


class EngineProtocol(ABC):
    """An engine serving requests concurrently from one asyncio loop.

    Construction takes an ``EngineConfig`` and starts the engine; ``shutdown`` releases it. Errors
    are ``dsray.errors`` types: ``InvalidRequestError`` (and subclasses) for a request at fault,
    ``EngineDeadError`` once the engine cannot serve.
    """

    @abstractmethod
    def __init__(self, config: EngineConfig): ...

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (``encode``, ``decode``, ``apply_chat_template``, ``vocab``), or
        None when it has no tokenizer.json (only token-id prompts then)."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt plus output a request may ask for."""

    @property
    @abstractmethod
    def engine_pid(self) -> int | None:
        """The process the engine loop runs in, when it is not this one."""

    @property
    @abstractmethod
    def is_healthy(self) -> bool:
        """False once the engine cannot serve (failed or shut down); never goes back to True."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise ``EngineDeadError`` (saying why) unless healthy."""

    @abstractmethod
    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> OutputStreamProtocol:
        """Start a request (text or token ids) and return its stream; call from a coroutine.

        Checks run here: a bad request raises ``InvalidRequestError`` (``ContextLengthError``,
        ``RequestIdInUseError``, …) and nothing is queued. A dead engine raises ``EngineDeadError``.
        """

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort a request if it is still running (its KV blocks are freed at the next step)."""

    @abstractmethod
    def request_rebalance(self) -> bool:
        """Start moving the expert placement to follow the load; False when experts do not live on
        expert workers."""

    def scale(self, attention: int | None = None, experts: int | None = None) -> bool:
        """Grow or shrink the attention and expert worker pools while serving; False when this engine has
        no worker pools. Not every engine has them: by default, False."""
        return False

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Engine figures summed over attention ranks: ``num_running``, ``num_waiting``,
        ``kv_cache_usage``, ``num_preemptions``, ``prefix_cache_queries``, ``prefix_cache_hits`` and,
        with expert workers, ``eplb``. Cheap: read without calling into the engine loop."""

    @abstractmethod
    def expert_load(self) -> list[list[int]]:
        """Tokens routed per (MoE layer, expert) since start, as of the last refresh (may be empty)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and release its workers (idempotent)."""
