"""The engine loop in a process of its own, and the front end that talks to it.

Serving runs two CPU-bound Python loops: the engine (schedule, sample, detokenize) and the
asyncio side (request admission, chunking, Serve's streaming of every chunk). In one process they
share one GIL and take turns; the engine then gets a fraction of a core however many the machine
has. ``EngineCore`` moves the engine into a spawned child, the way vLLM's V1 engine core runs, and
keeps only what validation needs (config, tokenizer, context limits) in the front end.

The pipe carries commands one way — ``("add", (prompt, ids, params, request_id))``,
``("abort", request_id)``, ``("rebalance", None)``, ``("stop", None)`` — and, the other way, one message per engine step
with every request's delta (new token ids, new text, new logprobs, finish reason) plus the
engine's stats; ``EngineCore`` rebuilds the cumulative ``RequestOutput`` of each request from
them. A child that dies (or a pipe that breaks) is reported as the loop's failure.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dsray.config import ModelArgs
from dsray.engine.llm_engine import LLMEngine, RequestChecks
from dsray.engine_config import EngineConfig
from dsray.outputs import RequestOutput
from dsray.tokenizer import Tokenizer

START_TIMEOUT_S = 600.0  # loading a large checkpoint in the child


class Delta(NamedTuple):
    """One request's progress in one step. It crosses the pipe as a plain tuple (``tuple(delta)``):
    a step carries hundreds, and pickling a tuple costs a tenth of a dataclass or NamedTuple."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    first_token_time: float | None


@dataclass
class _Tracked:
    output: RequestOutput
    logprobs: bool = field(default=False)


def _delta(out: RequestOutput) -> tuple:
    """``out``'s step as a ``Delta``-shaped plain tuple (what the pipe carries)."""
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


def core_main(config: dict[str, Any], conn: Any) -> None:
    """The child: build the engine, then loop over commands and steps until told to stop."""
    try:
        engine = LLMEngine(EngineConfig.model_validate(config))
    except BaseException as exc:
        conn.send(("failed", f"the engine could not start: {exc!r}"))
        return
    conn.send(("ready", {"max_seq_len": engine.max_seq_len, "stats": engine.stats()}))
    sent_load = None
    try:
        while True:
            # Idle: block for the next command. Busy: take whatever has arrived, then step.
            timeout, got_command, refused = (0.0 if engine.has_unfinished() else 1.0), False, []
            while conn.poll(timeout):
                timeout, got_command = 0.0, True
                kind, payload = conn.recv()
                if kind == "add":
                    prompt, ids, params, request_id = payload
                    try:
                        engine.add_request(prompt, params, request_id=request_id, prompt_ids=ids)
                    except ValueError as exc:
                        refused.append((request_id, str(exc)))
                elif kind == "abort":
                    engine.abort(payload)
                elif kind == "rebalance":
                    engine.request_rebalance()
                elif kind == "stop":
                    return
            deltas = [_delta(out) for out in engine.step()] if engine.has_unfinished() else []
            load = engine.expert_load()
            if deltas or refused or got_command or load is not sent_load:
                # Stats ride along with every step (and after commands that changed the queues).
                conn.send(("step", deltas, refused, engine.stats(), load if load is not sent_load else None))
                sent_load = load
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the front end went away
    except BaseException as exc:
        try:
            conn.send(("failed", f"engine failed: {exc!r}"))
        finally:
            raise
    finally:
        engine.executor.shutdown()  # Ray workers and their placement group go with the engine


class EngineCore(RequestChecks):
    """Front end of an engine running in a child process: validation here, stepping there.

    ``on_outputs(items)`` is called on the reader thread with ``(request_id, RequestOutput or
    exception)`` pairs after every step; ``on_failure(message)`` once if the child fails or dies.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_outputs: Callable[[list[tuple[str, Any]]], None],
        on_failure: Callable[[str], None],
    ):
        self.config = config
        self.args = ModelArgs.from_pretrained(config.model)
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(config.model)
        except FileNotFoundError:
            self.tokenizer = None
        self.max_model_len = config.max_model_len or self.args.max_position_embeddings
        self._on_outputs, self._on_failure = on_outputs, on_failure
        self._tracked: dict[str, _Tracked] = {}
        self._stats: dict[str, float] = {}
        self._expert_load: list[list[int]] = []
        self._send_lock = threading.Lock()
        self._stopping = False
        ctx = multiprocessing.get_context("spawn")  # never fork a process holding threads and torch state
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=core_main, args=(config.model_dump(), child_conn), name="dsray-engine-core", daemon=True
        )
        self.process.start()
        child_conn.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.process.kill()
            raise RuntimeError(f"the engine process did not start within {START_TIMEOUT_S:.0f}s")
        kind, info = self._conn.recv()
        if kind != "ready":
            self.process.join(timeout=10)
            raise RuntimeError(info)
        self.max_seq_len = info["max_seq_len"]
        self._stats = info["stats"]
        self._reader = threading.Thread(target=self._read, name="dsray-engine-reader", daemon=True)
        self._reader.start()

    # What the server reads ----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def expert_load(self) -> list[list[int]]:
        return self._expert_load

    # Commands -------------------------------------------------------------------------------------

    def add(self, prompt: str | list[int], ids: list[int], params: Any, request_id: str) -> None:
        self._tracked[request_id] = _Tracked(
            RequestOutput(request_id, prompt if isinstance(prompt, str) else None, list(ids)),
            params.logprobs is not None,
        )
        self._send(("add", (prompt, ids, params, request_id)))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def request_rebalance(self) -> None:
        self._send(("rebalance", None))

    def shutdown(self) -> None:
        self._stopping = True
        try:
            self._send(("stop", None))
        except OSError:
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)

    def _send(self, message: tuple[str, Any]) -> None:
        with self._send_lock:
            self._conn.send(message)

    # The reader thread ------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "failed":
                    self._on_failure(message[1])
                    return
                _, deltas, refused, stats, load = message
                self._stats = stats
                if load is not None:
                    self._expert_load = load
                items: list[tuple[str, Any]] = [(rid, ValueError(msg)) for rid, msg in refused]
                for rid, _ in refused:
                    self._tracked.pop(rid, None)
                items += [(d[0], out) for d in deltas if (out := self._apply(Delta._make(d))) is not None]
                if items:
                    self._on_outputs(items)
        except (EOFError, OSError) as exc:
            if not self._stopping:
                code = self.process.exitcode
                self._on_failure(f"the engine process died (exit code {code}): {exc!r}")

    def _apply(self, d: Delta) -> RequestOutput | None:
        """The cumulative output after ``d`` (a fresh object: the consumer may keep it)."""
        tracked = self._tracked.get(d.request_id)
        if tracked is None:
            return None
        prev = tracked.output
        logprobs = None
        if tracked.logprobs:
            logprobs = list(prev.logprobs or []) + list(d.new_logprobs or [])
        out = RequestOutput(
            request_id=prev.request_id,
            prompt=prev.prompt,
            prompt_token_ids=prev.prompt_token_ids,
            token_ids=prev.token_ids + d.new_token_ids,
            text=prev.text + d.new_text,
            logprobs=logprobs,
            finish_reason=d.finish_reason,
            stop_reason=d.stop_reason,
            num_cached_tokens=d.num_cached_tokens,
            new_token_ids=d.new_token_ids,
            new_text=d.new_text,
            arrival_time=prev.arrival_time,
            first_token_time=d.first_token_time,
        )
        if out.finished:
            del self._tracked[d.request_id]
        else:
            tracked.output = out
        return out
