"""Many requests per handle call between an ingress replica and its LLMServer.

A Serve handle call costs both replicas CPU per call and per streamed item (routing, the call's
own gRPC stream, request bookkeeping, metrics, serialization) — at 1,000 streams on the 2-core
bench machine, more than the engine's own share. ``RequestMux`` sends the requests that arrive in
one turn of the ingress's event loop as one ``LLMServer.generate_batch`` call and splits its
stream of ``[(index, chunk), ...]`` lists back into one ``MuxStream`` per request, so the per-call
cost is paid per batch and a stream item carries the chunks of many requests.

A ``MuxStream`` behaves like the ``DeploymentResponseGenerator`` of a per-request
``generate.remote``: ``async for`` / ``__anext__`` give the request's chunks (``StreamChunk`` or
a final ``ErrorInfo``), a failed call raises its exception in every request it carried, and
``cancel()`` aborts the request alone (``LLMServer.abort``) while the others go on. An abort names
the request by a key this mux made for it, never by its request id: clients choose ids, and a
second request reusing a running one's id (refused with 409) must not be able to abort it. Aborts
reach the replica holding the request only when the deployment has one replica, so the ingress
uses the mux only then (``DsrayServeArgs.batches_requests``) and per-request calls otherwise.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import uuid
from typing import Any

from ray.serve.handle import DeploymentHandle

from deploy.messages import ErrorInfo, GenerateRequest, StreamChunk

logger = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 10.0
_END = object()  # the batch stream ended before this request finished


class MuxStream:
    """One request's chunks out of a shared batch stream."""

    def __init__(self, mux: RequestMux, request_id: str, key: str):
        self._mux = mux
        self.request_id = request_id
        self.key = key  # names this request in LLMServer.generate_batch / abort
        self._queue: asyncio.Queue = asyncio.Queue()
        self.done = False  # finished, failed, or ended: nothing more will come
        self.cancelled = False
        self.sent = False  # part of a batch call already

    def __aiter__(self) -> MuxStream:
        return self

    async def __anext__(self) -> StreamChunk | ErrorInfo:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stays ended
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """Abort the request (the client went away); a no-op once it is done."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        if self.sent:
            self._mux.abort(self.key)

    # Fed by the mux ---------------------------------------------------------------------------

    def _put(self, chunk: StreamChunk | ErrorInfo) -> None:
        if self.done or self.cancelled:
            return
        self._queue.put_nowait(chunk)
        if isinstance(chunk, ErrorInfo) or chunk.finish_reason is not None:
            self.done = True
            self._queue.put_nowait(_END)  # the request's last item: iteration stops after it

    def _end(self, exc: BaseException | None) -> None:
        if not self.done:
            self.done = True
            self._queue.put_nowait(exc if exc is not None else _END)


class RequestMux:
    """Batches an ingress replica's requests into ``generate_batch`` calls (see the module doc)."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._pending: list[tuple[GenerateRequest, MuxStream]] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self._prefix = uuid.uuid4().hex[:12]  # keys unique across the ingress replicas sharing an LLMServer
        self._numbers = itertools.count()

    def generate(self, request: GenerateRequest) -> MuxStream:
        """Queue ``request`` for the next batch call (this turn of the loop); its stream of chunks."""
        stream = MuxStream(self, request.request_id, f"{self._prefix}-{next(self._numbers)}")
        self._pending.append((request, stream))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # A fresh context: the batch call belongs to no single HTTP request, so Serve must not
            # cancel it (and every request in it) when the request that happened to flush it ends.
            asyncio.get_running_loop().call_soon(self._flush, context=contextvars.Context())
        return stream

    def abort(self, key: str) -> None:
        self._spawn(self._abort(key))

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch = [(request, stream) for request, stream in self._pending if not stream.cancelled]
        self._pending = []
        if batch:
            for _, stream in batch:
                stream.sent = True
            self._spawn(self._run(batch))

    def _spawn(self, coro: Any) -> None:
        # In a fresh context (see generate): a task copies the context it is created in.
        task = contextvars.Context().run(asyncio.get_running_loop().create_task, coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[GenerateRequest, MuxStream]]) -> None:
        streams = [stream for _, stream in batch]
        keys = [stream.key for stream in streams]
        call = self._stream_handle.generate_batch.remote([request for request, _ in batch], keys)
        failure: BaseException | None = None
        try:
            async for items in call:
                for index, chunk in items:
                    streams[index]._put(chunk)
        except Exception as exc:  # the call failed (replica died, no replica): every request fails with it
            failure = exc
        finally:
            for stream in streams:
                stream._end(failure)

    async def _abort(self, key: str) -> None:
        call = self._handle.abort.remote([key])

        async def result() -> Any:
            return await call

        try:
            await asyncio.wait_for(result(), ABORT_TIMEOUT_S)
        except Exception as exc:  # the replica is gone (and the request with it) or busy: nothing to undo
            logger.warning("could not abort request %s: %r", key, exc)
