"""AsyncLLM: per-request async streams over the engine loop, on a background thread or in a child process.

It talks to the loop (``dsray/engine_core.py``) through an ``EngineCoreClient``: on a thread of
this process, or, with ``engine_process`` set, in a process of its own (with the Ray executor
that process drives the workers, joining this process's Ray cluster). This object keeps the
streams; the client checks requests and rebuilds their outputs.

``shutdown()`` (or ``with AsyncLLM(...)``) stops the loop and releases the engine's workers; an
``AsyncLLM`` that is garbage-collected does the same, so a new one in the same process starts
normally.

The server's handlers call ``generate`` (an async iterator of every step's output), ``stream``
(an ``OutputStream`` that hands over only the newest output whenever its reader asks: a server
chunking a stream by time does no work per step and per request) and ``abort``. Validation
happens in the caller before anything is queued, so a bad request raises at once and never
reaches the loop. If the consumer stops iterating (a client disconnect cancels the task), the
request is aborted and its KV blocks freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from dsray.engine.llm_engine import LLMEngine
from dsray.engine_config import EngineConfig
from dsray.engine_core_client import EngineCoreClient
from dsray.engine_protocol import EngineProtocol, OutputStreamProtocol
from dsray.errors import EngineDeadError, InvalidRequestError, RequestIdInUseError
from dsray.outputs import RequestOutput
from dsray.sampling_params import SamplingParams
from dsray.tokenizer import Tokenizer


class OutputStream(OutputStreamProtocol):
    """One request's outputs as its reader wants them: the newest cumulative output, on demand.

    The engine side only stores each step's output (``offer``, on the reader's event loop) and
    wakes the reader only when it waits for something new, so a reader that sleeps between reads
    costs nothing per step. ``RequestOutput``'s ``token_ids``, ``text`` and ``logprobs`` are
    cumulative, so nothing is lost by skipping steps; ``new_token_ids``/``new_text`` cover only the
    last step. The first output is the exception: it is returned as it came (time to first
    token). Iterate (``async for``) or call ``next``; ``wait_finished`` sleeps until the request
    ends or a timeout passes; ``aclose`` aborts an unfinished request.
    """

    def __init__(self, owner: AsyncLLM, request_id: str):
        self._owner = owner
        self.request_id = request_id
        self._latest: RequestOutput | None = None
        self._first: RequestOutput | None = None  # the first output, until it is returned
        self._returned_any = False
        self._error: BaseException | None = None
        self._fresh = False
        self._waiter: asyncio.Future | None = None
        self._wake_on_any = True
        self.finished = False
        self._closed = False

    def offer(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            if self._first is None and not self._returned_any:
                self._first = item  # kept apart: the first token goes out alone however late the reader is
            self._latest, self._fresh = item, True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._wake_on_any or self._error is not None or item.finished:
                waiter.set_result(None)

    async def _wait(self, wake_on_any: bool, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._wake_on_any = wake_on_any
        timer = loop.call_later(timeout, _resolve, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def next(self) -> RequestOutput:
        while not self._fresh and self._error is None:
            await self._wait(wake_on_any=True)
        if self._first is not None:
            out, self._first, self._returned_any = self._first, None, True
            if out is self._latest:
                self._fresh = False
            self.finished = out.finished
            return out
        if self._fresh:  # a finished output delivered before a later failure still counts
            self._fresh = False
            if self._latest.finished:
                self.finished = True
            return self._latest
        raise self._error

    async def wait_finished(self, timeout: float) -> None:
        if self._error is None and not (self._latest is not None and self._latest.finished):
            await self._wait(wake_on_any=False, timeout=timeout)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        return await self.next()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner._streams.pop(self.request_id, None)
        if not self.finished:
            self._owner.abort(self.request_id)


class AsyncLLM(EngineProtocol):
    """Async generation on an ``EngineCoreClient``: per-request streams fed from the engine loop."""

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        # request id -> (the reader's loop, what takes each output there: a queue's put or an OutputStream's offer)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Callable[[Any], None]]] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self.config = config
        # The engine side holds this object only weakly, so dropping it releases the engine.
        ref = weakref.ref(self)
        self.client = EngineCoreClient(
            _with_ray_address(config), _weak(ref, "_deliver_many"), _weak(ref, "_fail"), engine=engine
        )
        self._finalizer = weakref.finalize(self, self.client.shutdown)

    @property
    def engine(self) -> LLMEngine | None:
        """The ``LLMEngine`` when the loop runs in this process; None when it runs in a child process."""
        return self.client.engine

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.client.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    @property
    def engine_pid(self) -> int | None:
        return self.client.pid

    @property
    def is_healthy(self) -> bool:
        return self.error is None and not self._stopped and self.client.is_alive()

    def check_health(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def expert_load(self) -> list[list[int]]:
        return self.client.expert_load()

    def _submit(self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None, sink) -> str:
        """Validate and queue a request whose outputs go to ``sink`` on the caller's loop; returns its id."""
        self.check_health()
        params = params or SamplingParams()
        ids = self.client.tokenize(prompt)
        params = self.client.validate(ids, params)
        request_id = request_id or self.client.new_request_id()
        if request_id in self._streams:
            raise RequestIdInUseError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = (asyncio.get_running_loop(), sink)
        self.client.add(prompt, ids, params, request_id)
        return request_id

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream incremental outputs (``new_text``/``new_token_ids`` per step) until finished."""
        queue_: asyncio.Queue = asyncio.Queue()
        request_id = self._submit(prompt, params, request_id, queue_.put_nowait)
        finished = False
        try:
            while True:
                item = await queue_.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> OutputStream:
        """Start a request and return its ``OutputStream`` (validation errors raise here, nothing queued).

        Call from a coroutine (the stream belongs to the running loop); close it (``aclose``, or
        ``contextlib.aclosing``) when done: an unfinished request is then aborted.
        """
        request_id = request_id or self.client.new_request_id()
        out = OutputStream(self, request_id)
        self._submit(prompt, params, request_id, out.offer)
        return out

    def abort(self, request_id: str) -> None:
        if not self._stopped and self.error is None:
            self.client.abort(request_id)

    def request_rebalance(self) -> bool:
        """Re-plan the expert placement and move to it while serving (from the next step); False when
        this engine has no expert workers (the local executor holds every expert)."""
        self.check_health()
        if self.config.executor != "ray":
            return False
        self.client.request_rebalance()
        return True

    def scale(self, attention: int | None = None, experts: int | None = None) -> bool:
        """Grow or shrink the attention and expert worker pools while serving (from the next step; new
        workers join once loaded); False when this engine has no worker pools (the local executor)."""
        self.check_health()
        if self.config.executor != "ray":
            return False
        for name, value in (("attention", attention), ("experts", experts)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"{name} must be a whole number of workers >= 1, got {value!r}", param=name)
        self.client.scale(attention, experts)
        return True

    def shutdown(self) -> None:
        """Stop the engine loop and release its workers (idempotent)."""
        self._stopped = True
        self._finalizer()

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc) -> None:
        self.shutdown()

    # Outputs, on the engine's thread ------------------------------------------------------------

    def _fail(self, message: str) -> None:
        """The engine loop failed: no request can be served; every waiter gets the error."""
        self.error = EngineDeadError(message)
        self._deliver_many([(request_id, self.error) for request_id in list(self._streams)])

    def _deliver_many(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand a step's items to their streams: one wake-up per event loop, not one per request.

        Each ``call_soon_threadsafe`` writes to the loop's self-pipe and costs the engine thread a
        system call and the loop a wake-up; at hundreds of running requests per step, batching
        them is most of the delivery cost saved.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[Any], None], Any]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)


def _weak(ref: weakref.ref, method: str) -> Callable[..., None]:
    """A callback that reaches ``ref()``'s method while the object lives, and does nothing after."""

    def call(*args: Any) -> None:
        obj = ref()
        if obj is not None:
            getattr(obj, method)(*args)

    return call


def _with_ray_address(config: EngineConfig) -> EngineConfig:
    """The engine process joins the Ray cluster this process is connected to (a Serve replica's)."""
    if config.executor != "ray" or config.ray_address is not None:
        return config
    import ray

    if not ray.is_initialized():
        return config
    return config.model_copy(update={"ray_address": ray.get_runtime_context().gcs_address})


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _put_all(batch: list[tuple[Callable[[Any], None], Any]]) -> None:
    for sink, item in batch:
        sink(item)
