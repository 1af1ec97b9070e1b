"""EngineCoreClient: the front ends' side of the engine loop — request checks, typed commands, outputs.

``LLM``, ``AsyncLLM`` (and through it the server) talk to the engine only through this client. It
tokenizes and validates a request before anything is queued (a bad one raises at once, nothing
sent), sends ``dsray/engine_core.py``'s typed commands, and turns each ``EngineStep`` back into
every request's cumulative ``RequestOutput``. Two transports carry the commands and reports:

* ``EngineInThread`` — the ``EngineCore`` in this process. Its loop runs on a daemon thread of its
  own (``start()``: ``AsyncLLM``) or in the caller's thread until the engine is idle
  (``run_until_idle()``: ``LLM``, whose benchmarks also drive ``llm.engine`` directly between
  calls, so nothing may step behind their back).
* ``EngineInProcess`` — the ``EngineCore`` in a spawned child process, over a pipe. Serving runs
  two CPU-bound Python loops, the engine's and asyncio's; in one process they share one GIL and
  the engine gets a fraction of a core however many the machine has.

``on_outputs(items)`` gets ``(request_id, RequestOutput or exception)`` pairs after every step,
on the thread that ran the loop (or read the pipe); ``on_failure(message)`` once, if the loop
fails or the child dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsray.config import ModelArgs
from dsray.engine.llm_engine import LLMEngine, RequestChecks
from dsray.engine_config import EngineConfig
from dsray.engine_core import (
    AbortRequest,
    AddRequest,
    Command,
    Delta,
    EngineCore,
    EngineFailed,
    EngineMessage,
    EngineReady,
    EngineStep,
    Rebalance,
    Scale,
    Shutdown,
    run_engine_process,
)
from dsray.outputs import RequestOutput
from dsray.sampling_params import SamplingParams
from dsray.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large checkpoint in the child
STOP_TIMEOUT_S = 30.0


# Transports -------------------------------------------------------------------------------------


class EngineInThread:
    """The engine loop in this process: on a daemon thread (``start``) or the caller's (``run_until_idle``).

    ``engine`` stays reachable (tests and benchmarks read its scheduler and executor). A loop on its
    own thread that fails reports ``EngineFailed``; one in the caller's thread raises to the caller.
    Either way the executor's workers are released when the loop ends for good (``shutdown``).
    """

    def __init__(self, engine: LLMEngine, on_message: Callable[[EngineMessage], None]):
        self.engine = engine
        self.pid: int | None = None  # no process of its own
        self._core = EngineCore(engine)
        self.ready = self._core.ready()
        self._on_message = on_message
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_on_thread, name="dsray-engine", daemon=True)
        self._thread.start()

    def run_until_idle(self) -> None:
        self._core.run(self._receive, self._on_message, until_idle=True)

    def send(self, command: Command) -> None:
        self._inbox.put(command)
        self._wake.set()

    def is_alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def shutdown(self) -> None:
        if self._thread is None:
            self.engine.executor.shutdown()
            return
        self.send(Shutdown())
        if self._thread is not threading.current_thread():  # a finalizer may run on the loop's own thread
            self._thread.join(timeout=STOP_TIMEOUT_S)

    def _receive(self, timeout: float) -> list[Command]:
        commands = self._drain()
        if not commands and timeout > 0:
            self._wake.wait(timeout)
            self._wake.clear()
            commands = self._drain()
        return commands

    def _drain(self) -> list[Command]:
        commands = []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _run_on_thread(self) -> None:
        try:
            self._core.run(self._receive, self._on_message)
        except BaseException as exc:  # the loop must never die silently: fail every waiter
            logger.exception("dsray engine loop failed")
            self._on_message(EngineFailed(f"engine failed: {exc!r}"))
        finally:
            self.engine.executor.shutdown()


class EngineInProcess:
    """The engine loop in a spawned child process; a reader thread here hands its reports on."""

    engine = None  # lives in the child

    def __init__(self, config: EngineConfig, on_message: Callable[[EngineMessage], None]):
        self._on_message = on_message
        self._send_lock = threading.Lock()
        self._stopping = False
        ctx = multiprocessing.get_context("spawn")  # never fork a process holding threads and torch state
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=run_engine_process, args=(config.model_dump(), child_conn), name="dsray-engine-core", daemon=True
        )
        self.process.start()
        child_conn.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.process.kill()
            raise RuntimeError(f"the engine process did not start within {START_TIMEOUT_S:.0f}s")
        ready = self._conn.recv()
        if not isinstance(ready, EngineReady):
            self.process.join(timeout=10)
            raise RuntimeError(ready.message)
        self.ready = ready
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, name="dsray-engine-reader", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def send(self, command: Command) -> None:
        with self._send_lock:
            self._conn.send(command)

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def shutdown(self) -> None:
        self._stopping = True
        try:
            self.send(Shutdown())
        except OSError:
            pass
        self.process.join(timeout=STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                self._on_message(message)
                if isinstance(message, EngineFailed):
                    return
        except (EOFError, OSError) as exc:
            if not self._stopping:
                code = self.process.exitcode
                self._on_message(EngineFailed(f"the engine process died (exit code {code}): {exc!r}"))


# The client -------------------------------------------------------------------------------------


@dataclass
class _Tracked:
    output: RequestOutput
    logprobs: bool


class EngineCoreClient(RequestChecks):
    """Checks requests, sends them to the engine loop, rebuilds their outputs (see the module docstring).

    The loop runs in a child process when ``config.engine_process`` is set and no ``engine`` is
    given; otherwise in this process, on a thread of its own (``background``) or in the caller's
    thread during ``run_until_idle``.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_outputs: Callable[[list[tuple[str, Any]]], None],
        on_failure: Callable[[str], None],
        engine: LLMEngine | None = None,
        background: bool = True,
    ):
        self.config = config
        self._on_outputs, self._on_failure = on_outputs, on_failure
        self._tracked: dict[str, _Tracked] = {}
        self._expert_load: list[list[int]] = []
        self.failed = False
        self.transport: EngineInThread | EngineInProcess
        if engine is None and config.engine_process:
            self.args = ModelArgs.from_pretrained(config.model)
            try:
                self.tokenizer: Tokenizer | None = Tokenizer(config.model)
            except FileNotFoundError:
                self.tokenizer = None  # token-id prompts still work
            self.transport = EngineInProcess(config, self._on_message)
        else:
            engine = engine or LLMEngine(config)
            self.args, self.tokenizer = engine.args, engine.tokenizer
            self.transport = EngineInThread(engine, self._on_message)
        self.max_model_len = config.max_model_len or self.args.max_position_embeddings
        self.max_seq_len = self.transport.ready.max_seq_len
        self._stats: dict[str, Any] = self.transport.ready.stats
        if background or isinstance(self.transport, EngineInProcess):
            self.transport.start()

    @property
    def engine(self) -> LLMEngine | None:
        """The ``LLMEngine`` when the loop runs in this process (None when it runs in a child)."""
        return self.transport.engine

    @property
    def pid(self) -> int | None:
        """The engine loop's own process id, when it has one."""
        return self.transport.pid

    def is_alive(self) -> bool:
        return not self.failed and self.transport.is_alive()

    # What the front ends read -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The engine's stats as of its last report (after every step and every command)."""
        return dict(self._stats)

    def expert_load(self) -> list[list[int]]:
        return self._expert_load

    # Commands -----------------------------------------------------------------------------------

    def add(self, prompt: str | list[int], ids: list[int], params: SamplingParams, request_id: str) -> None:
        """Send a request checked with ``tokenize``/``validate``; its outputs come to ``on_outputs``."""
        output = RequestOutput(
            request_id, prompt if isinstance(prompt, str) else None, list(ids), arrival_time=time.monotonic()
        )
        self._tracked[request_id] = _Tracked(output, params.logprobs is not None)
        self.transport.send(AddRequest(request_id, prompt, ids, params))

    def abort(self, request_id: str) -> None:
        if self.is_alive():
            self.transport.send(AbortRequest(request_id))

    def request_rebalance(self) -> None:
        self.transport.send(Rebalance())

    def scale(self, attention: int | None, experts: int | None) -> None:
        self.transport.send(Scale(attention, experts))

    def run_until_idle(self) -> None:
        """Run the loop in this thread until every request has finished (in-thread, not started)."""
        self.transport.run_until_idle()

    def shutdown(self) -> None:
        """Stop the loop and release the executor's workers."""
        self.transport.shutdown()

    # Reports ------------------------------------------------------------------------------------

    def _on_message(self, message: EngineMessage) -> None:
        if isinstance(message, EngineFailed):
            self.failed = True
            self._on_failure(message.message)
            return
        assert isinstance(message, EngineStep)
        self._stats = message.stats
        if message.expert_load is not None:
            self._expert_load = message.expert_load
        items: list[tuple[str, Any]] = list(message.refused)
        for request_id, _ in message.refused:
            self._tracked.pop(request_id, None)
        items += [(d[0], out) for d in message.deltas if (out := self._apply(Delta._make(d))) is not None]
        if items:
            self._on_outputs(items)

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
