"""AsyncLLM: the engine loop on a background thread (or in a child process), per-request async streams, abort.

With ``engine_process`` set (and the local executor), the loop runs in a process of its own
(``dsray/engine_core.py``) and this object keeps validation and the streams; otherwise on a
thread here.

The server's handlers call ``generate`` (an async iterator of incremental outputs) and
``abort``. Validation happens in the caller before anything is queued, so a bad request raises
at once and never reaches the loop. If the consumer stops iterating (a client disconnect
cancels the task), the request is aborted and its KV blocks freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from dsray.engine.llm_engine import LLMEngine
from dsray.engine_config import EngineConfig
from dsray.engine_core import EngineCore
from dsray.outputs import RequestOutput
from dsray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served."""


class AsyncLLM:
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self.core: EngineCore | None = None
        if engine is None and config.engine_process and config.executor == "local":
            self.core = EngineCore(config, self._deliver_many, self._fail)
            self.engine: LLMEngine | EngineCore = self.core
            self._thread = None
        else:
            self.engine = engine or LLMEngine(config)
            self._thread = threading.Thread(target=self._loop, name="dsray-engine", daemon=True)
            self._thread.start()

    @property
    def is_healthy(self) -> bool:
        if self.error is not None or self._stopped:
            return False
        return self.core.process.is_alive() if self.core is not None else self._thread.is_alive()

    def check_health(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream incremental outputs (``new_text``/``new_token_ids`` per step) until finished."""
        self.check_health()
        params = params or SamplingParams()
        ids = self.engine.tokenize(prompt)
        params = self.engine.validate(ids, params)
        request_id = request_id or self.engine.new_request_id()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        if self.core is not None:
            self.core.add(prompt, ids, params, request_id)
        else:
            self._send("add", (prompt, ids, params, request_id))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def shutdown(self) -> None:
        self._stopped = True
        if self.core is not None:
            self.core.shutdown()
            return
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.executor.shutdown()

    # Engine thread ----------------------------------------------------------------------------

    def _send(self, kind: str, payload: Any) -> None:
        if self.core is not None:
            if kind == "abort" and not self._stopped and self.error is None:
                self.core.abort(payload)
            return
        self._commands.put((kind, payload))
        self._wake.set()

    def _fail(self, message: str) -> None:
        """The engine (process) failed: no request can be served; every waiter gets the error."""
        self.error = EngineDeadError(message)
        self._deliver_many([(request_id, self.error) for request_id in list(self._streams)])

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_many([(request_id, item)])

    def _deliver_many(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand a step's items to their streams: one wake-up per event loop, not one per request.

        Each ``call_soon_threadsafe`` writes to the loop's self-pipe and costs the engine thread a
        system call and the loop a wake-up; at hundreds of running requests per step, batching
        them is most of the delivery cost saved.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                prompt, ids, params, request_id = payload
                try:
                    self.engine.add_request(prompt, params, request_id=request_id, prompt_ids=ids)
                except ValueError as exc:
                    self._deliver(request_id, exc)
            else:
                self.engine.abort(payload)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                self._deliver_many([(out.request_id, _snapshot(out)) for out in self.engine.step()])
        except BaseException as exc:  # the loop must never die silently: fail every waiter
            logger.exception("dsray engine loop failed")
            self.error = exc
            dead = EngineDeadError(f"engine failed: {exc!r}")
            self._deliver_many([(request_id, dead) for request_id in list(self._streams)])


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the consumer may keep while the engine goes on updating the original."""
    return replace(
        out,
        token_ids=list(out.token_ids),
        new_token_ids=list(out.new_token_ids),
        logprobs=list(out.logprobs) if out.logprobs is not None else None,
    )
