"""EngineCore: the one engine loop — typed commands in, one report per step out.

``EngineCore.run`` is the loop every front end uses: take the commands that came (add, abort,
rebalance, shutdown), step the ``LLMEngine`` if it has work, report the step. Where it runs is
the transport's business (``dsray/engine_core_client.py``): in the caller's thread (``LLM``), on a
thread of its own (``AsyncLLM``), or in a child process (``AsyncLLM`` with ``engine_process``,
what the server runs — as vLLM's V1 engine core does). The name is vLLM's: the core is the loop
itself; ``EngineCoreClient`` is the side that talks to it.

A report (``EngineStep``) carries every request's delta (new token ids, new text, new logprobs,
finish reason), the requests the engine refused, the engine's stats and, when it changed, the
expert load; ``EngineCoreClient`` rebuilds each request's cumulative ``RequestOutput`` from the
deltas. Deltas are plain tuples: a step carries hundreds, and pickling a tuple costs a tenth of
a dataclass. Everything here crosses a process boundary, so it is small and picklable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from dsray.engine.llm_engine import LLMEngine
from dsray.engine_config import EngineConfig
from dsray.outputs import RequestOutput
from dsray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # an idle loop sleeps at most this long between looks for a command


# Commands ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    """Queue a request already tokenized and validated by the client (the engine checks again)."""

    request_id: str
    prompt: str | list[int]
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Rebalance:
    """Re-plan the expert placement from the load seen so far (``LLMEngine.request_rebalance``)."""


@dataclass(frozen=True)
class Scale:
    """Grow or shrink the attention and expert pools (``LLMEngine.scale``); None keeps a pool's size."""

    attention: int | None = None
    experts: int | None = None


@dataclass(frozen=True)
class Shutdown:
    """Leave the loop; its host then releases the executor's workers."""


Command = AddRequest | AbortRequest | Rebalance | Scale | Shutdown


# Outputs ----------------------------------------------------------------------------------------


class Delta(NamedTuple):
    """One request's progress in one step; it travels as ``tuple(delta)`` and is read back with
    ``Delta._make``."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    first_token_time: float | None


@dataclass
class EngineReady:
    """The engine is built: the longest sequence one rank's KV cache holds, and its first stats."""

    max_seq_len: int
    stats: dict[str, Any]


@dataclass
class EngineStep:
    """One turn of the loop: deltas (``Delta``-shaped tuples), refused requests with the error that
    refused them, stats after the step, and the expert load when it changed (else None)."""

    deltas: list[tuple]
    refused: list[tuple[str, Exception]]
    stats: dict[str, Any]
    expert_load: list[list[int]] | None


@dataclass
class EngineFailed:
    """The loop stopped on an error (or the engine could not start); no request can be served."""

    message: str


EngineMessage = EngineReady | EngineStep | EngineFailed


def delta(out: RequestOutput) -> tuple:
    """``out``'s last step as a ``Delta``-shaped plain tuple."""
    n = len(out.new_token_ids)
    logprobs = out.logprobs[len(out.logprobs) - n :] if out.logprobs is not None and n else None
    return (
        out.request_id,
        list(out.new_token_ids),
        out.new_text,
        logprobs,
        out.finish_reason,
        out.stop_reason,
        out.num_cached_tokens,
        out.first_token_time,
    )


# The loop ---------------------------------------------------------------------------------------


class EngineCore:
    """Runs an ``LLMEngine`` on commands: ``run(receive, send)`` is the whole engine loop."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._sent_load: list[list[int]] | None = None

    def ready(self) -> EngineReady:
        return EngineReady(self.engine.max_seq_len, self.engine.stats())

    def run(
        self,
        receive: Callable[[float], list[Command]],
        send: Callable[[EngineStep], None],
        until_idle: bool = False,
    ) -> None:
        """Loop: ``receive(timeout)`` the commands that came (waiting up to ``timeout`` seconds for
        one: none while there is work), apply them, step if there is work, ``send`` the report.

        Returns on ``Shutdown`` or, with ``until_idle``, once no command is pending and no request
        is unfinished. Errors propagate: the host decides what a failed loop means.
        """
        engine = self.engine
        while True:
            busy = engine.has_unfinished()
            commands = receive(0.0 if busy or until_idle else IDLE_WAIT_S)
            refused: list[tuple[str, Exception]] = []
            for command in commands:
                if isinstance(command, Shutdown):
                    return
                self._apply(command, refused)
            if until_idle and not commands and not engine.has_unfinished():
                return
            # Replacements of lost workers join an idle engine too (and the stats say so).
            joined = not busy and engine.admit_workers()
            report = self._step(refused, bool(commands) or joined)
            if report is not None:
                send(report)

    def _apply(self, command: Command, refused: list[tuple[str, Exception]]) -> None:
        if isinstance(command, AddRequest):
            try:
                self.engine.add_request(
                    command.prompt, command.params, request_id=command.request_id, prompt_ids=command.prompt_token_ids
                )
            except ValueError as exc:
                refused.append((command.request_id, exc))
        elif isinstance(command, AbortRequest):
            self.engine.abort(command.request_id)
        elif isinstance(command, Rebalance):
            self.engine.request_rebalance()
        elif isinstance(command, Scale):
            try:
                self.engine.scale(command.attention, command.experts)
            except (ValueError, RuntimeError) as exc:  # asked for what cannot be done now: serving goes on
                logger.warning(
                    "dsray: scale to attention=%s experts=%s refused: %s", command.attention, command.experts, exc
                )

    def _step(self, refused: list[tuple[str, Exception]], got_commands: bool) -> EngineStep | None:
        """Step if there is work; the report, or None when nothing changed that a client could see."""
        engine = self.engine
        deltas = [delta(out) for out in engine.step()] if engine.has_unfinished() else []
        if engine.refused:  # queued, then refused in the step (a deadline passed before the first token)
            refused += engine.refused
            engine.refused = []
        load = engine.expert_load()
        if not (deltas or refused or got_commands or load is not self._sent_load):
            return None
        # Stats ride along with every step (and after commands that changed the queues).
        report = EngineStep(deltas, refused, engine.stats(), load if load is not self._sent_load else None)
        self._sent_load = load
        return report


# The child process ------------------------------------------------------------------------------


def run_engine_process(config: dict[str, Any], conn: Any) -> None:
    """A child process's main: build the engine, report ready, run the loop over the pipe ``conn``."""
    try:
        engine = LLMEngine(EngineConfig.model_validate(config))
    except BaseException as exc:
        conn.send(EngineFailed(f"the engine could not start: {exc!r}"))
        return
    core = EngineCore(engine)
    conn.send(core.ready())
    try:
        core.run(_pipe_receiver(conn), conn.send)
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the client went away
    except BaseException as exc:
        try:
            conn.send(EngineFailed(f"engine failed: {exc!r}"))
        finally:
            raise
    finally:
        engine.executor.shutdown()  # Ray workers and their placement group go with the engine


def _pipe_receiver(conn: Any) -> Callable[[float], list[Command]]:
    def receive(timeout: float) -> list[Command]:
        commands = []
        while conn.poll(timeout):
            timeout = 0.0
            commands.append(conn.recv())
        return commands

    return receive
