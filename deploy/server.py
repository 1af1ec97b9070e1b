"""LLMServer: one model instance behind Serve — admission, streaming chunks, health and stats.

A plain class (``deploy/app.py`` turns it into a Serve deployment), so tests can drive it
without Ray. It owns one engine (``AsyncLLM`` unless another engine class is injected) and
speaks the typed messages of ``deploy/messages.py``: a refused request gets exactly one
``ErrorInfo`` and nothing else; an admitted one gets ``StreamChunk``s until its finish reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deploy.messages import ErrorInfo, GenerateRequest, StreamChunk
from dsray.async_llm import AsyncLLM
from dsray.engine_config import EngineConfig
from dsray.engine_protocol import EngineProtocol
from dsray.errors import ContextLengthError, DsrayError, EngineDeadError, InvalidRequestError
from dsray.outputs import RequestOutput
from dsray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.02
EARLY_ABORT_TTL_S = 60.0  # how long an abort waits for a generate_batch request that has not arrived


def error_info(exc: Exception, prompt_param: str = "prompt") -> ErrorInfo:
    """A request's refusal as an OpenAI error, from the error's type: ``dsray.errors`` carry status,
    type, param and code; a context-length error names the request's prompt field."""
    if not isinstance(exc, DsrayError):  # a plain ValueError from deeper down: still the request's fault
        return ErrorInfo(str(exc))
    param = prompt_param if isinstance(exc, ContextLengthError) else exc.param
    return ErrorInfo(exc.message, type=exc.type, param=param, code=exc.code, status=exc.status)


def engine_dead_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(
        f"the model instance cannot serve: {exc}", type=EngineDeadError.type, status=EngineDeadError.status
    )


def default_num_threads() -> int:
    """The torch threads a process that nobody capped gets here: the physical cores it may run on
    (one per core, as torch picks them; every CPU where the topology is not readable)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))


def max_token_chars(tokenizer: Any) -> int:
    """The longest text one token of ``tokenizer`` stands for, in characters (at least 1).

    Byte-level BPE vocabularies spell each byte as one character, so this bounds bytes too; a
    prompt of N tokens is then at most N times this long, unless the tokenizer drops characters.
    """
    vocab = tokenizer.vocab() if tokenizer is not None else {}
    return max((len(token) for token in vocab), default=1) or 1


class PromptTokenizer:
    """Text → token ids off the event loop, refusing a prompt that cannot fit without reading all of it.

    Tokenizing is CPU work proportional to the text: on the replica's event loop a multi-megabyte
    prompt stalled every stream and the health check for seconds. Here it runs on a worker thread
    (the tokenizer releases the GIL), and text longer than ``prefix_chars`` is tokenized only that
    far first: a prefix that already has ``max_model_len`` tokens or more (plus what a cut through
    one token can add) means the whole prompt cannot fit, and the rest is never read. Only a
    tokenizer that drops characters makes the prefix short of that, and then the whole text is
    tokenized.
    """

    def __init__(self, tokenizer: Any, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        token_chars = max_token_chars(tokenizer)
        self.limit_tokens = max_model_len + token_chars
        self.prefix_chars = self.limit_tokens * token_chars
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsray-tokenize")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenizer.encode(text)``, or ``ContextLengthError`` when it cannot fit the model."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, text, add_special_tokens)

    async def render_and_encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Chat ``messages`` through the chat template, then ``encode`` (the template writes bos itself)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._render_and_encode, messages)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > self.prefix_chars:
            prefix = self.tokenizer.encode(text[: self.prefix_chars], add_special_tokens=add_special_tokens)
            if len(prefix) >= self.limit_tokens:
                raise ContextLengthError(
                    f"prompt has more than {self.max_model_len} tokens ({len(text)} characters); this model's "
                    f"context is {self.max_model_len} tokens (prompt plus at least one generated token must fit)"
                )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _render_and_encode(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:  # the template refused the messages (raise_exception)
            raise InvalidRequestError(str(exc)) from exc
        except Exception as exc:  # a template tripping over odd content is the request's fault
            raise InvalidRequestError(f"chat template could not render these messages: {exc}") from exc
        return self._encode(text, add_special_tokens=False)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LLMServer:
    """One model instance: an engine plus the queue limit in front of it.

    ``engine_config`` is an ``EngineConfig`` or its fields; a dict whose ``model`` is None gets
    the embedded tiny model.

    ``max_waiting_requests`` bounds what a replica takes beyond a full batch: with
    ``max_num_seqs + max_waiting_requests`` requests already admitted, another is refused at once
    with a 429 and the admitted ones are untouched. ``stream_interval_ms`` and
    ``stream_chunks_per_s`` set how long a stream gathers tokens into one chunk (see
    ``_stream_interval``); with both 0 a chunk carries whatever tokens are ready.
    """

    def __init__(
        self,
        engine_config: EngineConfig | dict[str, Any],
        served_model_name: str | None = None,
        max_waiting_requests: int = 1024,
        stream_interval_ms: float = 50.0,
        stream_chunks_per_s: float = 500.0,
        engine_cls: type[EngineProtocol] = AsyncLLM,
    ):
        if isinstance(engine_config, dict) and engine_config.get("model") is None:
            from dsray.make_model import ensure_default_model

            # Made here, on the replica's node, so a cluster needs no shared filesystem for it.
            engine_config = {**engine_config, "model": str(ensure_default_model())}
        if isinstance(engine_config, dict):
            # The engine in a process of its own: this replica's event loop streams every chunk, and
            # sharing one GIL with the engine left both at a fraction of a core (benchmarks/serve.py).
            engine_config = {"engine_process": True, **engine_config}
        config = EngineConfig.model_validate(engine_config)
        if config.engine_process and config.num_threads is None:
            # Ray sets OMP_NUM_THREADS to a replica's num_cpus (1 by default) and the engine process
            # inherits it: serving ran the model on one core where dsray.LLM takes all of them
            # (0.68 of offline speed at one client on 2 cores). Torch's own default instead.
            config = config.model_copy(update={"num_threads": default_num_threads()})
        if config.engine_process and "front_end_cores" not in config.model_fields_set:
            # The engine shares this node's cores with the replicas, HAProxy and Ray streaming its chunks.
            config = config.model_copy(update={"front_end_cores": 1})
        self.config = config
        self.model_name = served_model_name or config.model.rstrip("/").rsplit("/", 1)[-1]
        self.replica_id = uuid.uuid4().hex[:8]
        # The engine thread is CPU-bound Python; at the default 5 ms GIL switch interval the event
        # loops streaming its chunks take the GIL from it hundreds of times a second, and each
        # hand-over costs both sides. 20 ms raised serving throughput by a quarter or more in our
        # 2-core runs (benchmarks/serve.py). The setting is per process; a replica is its own.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.llm: EngineProtocol = engine_cls(config)
        self.tokenizer = self.llm.tokenizer
        self.prompts = PromptTokenizer(self.tokenizer, self.llm.max_model_len) if self.tokenizer else None
        self.max_admitted = config.scheduler.max_num_seqs + max_waiting_requests
        self.stream_interval_s = stream_interval_ms / 1000
        self.stream_chunks_per_s = stream_chunks_per_s
        self.created = int(time.time())
        self.num_admitted = 0  # requests between admission and their last chunk
        # A generate_batch request's task, by the key its caller gave it (never by request id: ids come from
        # clients, and one client's abort must not reach another's request).
        self.batched: dict[str, asyncio.Task] = {}
        # Keys aborted before their generate_batch call registered them (the abort is a call of its own
        # and can overtake the batch), with when: their request is cancelled as soon as it arrives.
        self.early_aborts: dict[str, float] = {}
        self.counters = {"num_finished": 0, "num_refused": 0, "num_failed": 0, "num_cancelled": 0}

    # Requests ---------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk | ErrorInfo]:
        """Stream ``request``'s chunks; one ``ErrorInfo`` (and nothing else) when it is refused or fails."""
        refusal = self._admission_error()
        if refusal is not None:
            self.counters["num_refused"] += 1
            yield refusal
            return
        prompt_param = "messages" if request.messages is not None else "prompt"
        self.num_admitted += 1  # counted while it tokenizes too: the queue limit bounds that work as well
        try:
            params = _sampling_params(request.sampling)
            prompt = await self._prompt(request)
        except ValueError as exc:
            self.num_admitted -= 1
            yield error_info(exc, prompt_param)
            return
        except BaseException:
            self.num_admitted -= 1
            raise
        finished = False
        try:
            stream = self.llm.stream(prompt, params, request.request_id)
            async with contextlib.aclosing(stream):
                num_tokens, num_chars = 0, 0
                while not finished:
                    if num_tokens:  # the first token never waits; later ones gather for an interval
                        interval_s = self._stream_interval()
                        if interval_s > 0:
                            await stream.wait_finished(interval_s)  # the last token must not wait
                    chunk = self._chunk(await stream.next(), num_tokens, num_chars, params.logprobs is not None)
                    num_tokens, num_chars = chunk.num_generated_tokens, num_chars + len(chunk.new_text)
                    finished = chunk.finish_reason is not None
                    yield chunk
        except ValueError as exc:  # validation inside the engine (context length, token ids, request id)
            yield error_info(exc, prompt_param)
        except EngineDeadError as exc:
            self.counters["num_failed"] += 1
            yield engine_dead_info(exc)
        except DsrayError as exc:  # refused after queueing: its deadline passed before its first token (504)
            yield error_info(exc, prompt_param)
        except asyncio.CancelledError:
            self.counters["num_cancelled"] += 1  # client went away; the engine aborts the request
            raise
        except Exception as exc:  # never let one request's surprise take the replica's stream down silently
            logger.exception("request %s failed", request.request_id)
            self.counters["num_failed"] += 1
            yield ErrorInfo(f"internal error: {exc!r}", type="InternalServerError", status=500)
        finally:
            self.num_admitted -= 1
            if finished:
                self.counters["num_finished"] += 1

    async def generate_batch(
        self, requests: list[GenerateRequest], keys: list[str] | None = None
    ) -> AsyncIterator[list[tuple[int, Any]]]:
        """Several requests over one stream (``deploy/mux.py``): lists of ``(index, chunk or ErrorInfo)``.

        Each request runs ``generate`` in a task of its own, so admission, validation, chunking and
        errors are those of a single request; a list goes out whenever chunks have piled up, and
        the stream ends when every request has. ``abort(keys)`` cancels the requests given those
        ``keys`` (unique per request, chosen by the caller: a request id, which clients choose,
        could name someone else's request); cancelling the stream (the ingress went away) cancels
        them all.
        """
        ready: list[tuple[int, Any]] = []
        wake = asyncio.Event()

        async def run(index: int, request: GenerateRequest) -> None:
            async for chunk in self.generate(request):
                ready.append((index, chunk))
                wake.set()

        tasks = []
        for index, request in enumerate(requests):
            task = asyncio.create_task(run(index, request))
            task.add_done_callback(lambda _: wake.set())
            if keys is not None and self.early_aborts.pop(keys[index], None) is not None:
                task.cancel()  # its client left while the call was on its way
            elif keys is not None and self.batched.setdefault(keys[index], task) is task:
                task.add_done_callback(lambda done, key=keys[index]: self._unregister(key, done))
            tasks.append(task)
        try:
            while True:
                if ready:
                    items = ready[:]
                    ready.clear()
                    yield items
                    continue
                if all(task.done() for task in tasks):
                    return
                wake.clear()  # nothing awaited since the checks above: no wake-up is lost
                await wake.wait()
        finally:
            for task in tasks:
                task.cancel()

    def _unregister(self, key: str, task: asyncio.Task) -> None:
        if self.batched.get(key) is task:
            del self.batched[key]

    async def abort(self, keys: list[str]) -> None:
        """Cancel the ``generate_batch`` requests given these keys (one not here yet is cancelled on arrival)."""
        now = time.monotonic()
        for key, when in list(self.early_aborts.items()):
            if now - when > EARLY_ABORT_TTL_S:  # its request finished, or never came
                del self.early_aborts[key]
        for key in keys:
            task = self.batched.get(key)
            if task is not None:
                task.cancel()
            else:
                self.early_aborts[key] = now

    def _stream_interval(self) -> float:
        """Seconds a stream gathers tokens before its next chunk (the first token never waits).

        At least ``stream_interval_ms``; with ``stream_chunks_per_s`` set, also long enough that all
        running streams together send about that many chunks a second. Every chunk costs the
        Serve pipeline (handle stream, ingress, proxy, client) the same CPU whatever it carries,
        so under load chunks grow instead of multiplying, and the engine keeps its share.
        """
        interval = self.stream_interval_s
        if self.stream_chunks_per_s:
            interval = max(interval, self.llm.stats()["num_running"] / self.stream_chunks_per_s)
        return interval

    def _admission_error(self) -> ErrorInfo | None:
        if not self.llm.is_healthy:
            return engine_dead_info(self.llm.error or RuntimeError("engine stopped"))
        if self.num_admitted >= self.max_admitted:
            return ErrorInfo(
                f"server is at capacity ({self.num_admitted} requests admitted, limit {self.max_admitted}); "
                "retry later",
                type="RateLimitError",
                code="queue_full",
                status=429,
            )
        return None

    async def _prompt(self, request: GenerateRequest) -> list[int]:
        """The request's prompt as token ids; text is rendered and tokenized off the event loop."""
        given = [x is not None for x in (request.prompt, request.prompt_token_ids, request.messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_token_ids and messages")
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if self.prompts is None:
            what = "text prompts" if request.prompt is not None else "chat messages"
            raise InvalidRequestError(
                f"this model has no tokenizer.json, so it cannot take {what}: give prompt_token_ids"
            )
        if request.prompt is not None:
            if not request.prompt:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            return await self.prompts.encode(request.prompt)
        messages = [_plain_message(m) for m in request.messages or []]
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        return await self.prompts.render_and_encode(messages)

    def _chunk(self, out: RequestOutput, num_tokens: int, num_chars: int, want_logprobs: bool) -> StreamChunk:
        """The delta of ``out`` (cumulative) since ``num_tokens`` tokens and ``num_chars`` characters."""
        new_ids = out.token_ids[num_tokens:]
        logprobs = out.logprobs[num_tokens:] if want_logprobs and out.logprobs is not None else None
        token_texts = None
        if logprobs is not None and self.tokenizer is not None:
            ids = set(new_ids).union(*(d.keys() for d in logprobs))
            token_texts = {i: self.tokenizer.decode([i], skip_special_tokens=False) for i in ids}
        return StreamChunk(
            request_id=out.request_id,
            new_text=out.text[num_chars:],
            new_token_ids=new_ids,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
            num_prompt_tokens=len(out.prompt_token_ids),
            num_generated_tokens=len(out.token_ids),
            num_cached_tokens=out.num_cached_tokens,
            token_texts=token_texts,
        )

    # Control ----------------------------------------------------------------------------------

    def check_health(self) -> str | None:
        """Raise when this instance cannot serve (Serve then replaces the replica); else why it serves
        with fewer workers than configured (a lost worker not yet replaced), or None."""
        self.llm.check_health()
        return self.llm.stats().get("degraded")

    def rebalance(self) -> bool:
        """Start an expert rebalance of this instance (see ``AsyncLLM.request_rebalance``)."""
        return self.llm.request_rebalance()

    def scale(self, attention: int | None = None, experts: int | None = None) -> bool:
        """Grow or shrink this instance's worker pools (see ``AsyncLLM.scale``)."""
        return self.llm.scale(attention, experts)

    def models(self) -> list[dict[str, Any]]:
        return [
            {
                "id": self.model_name,
                "object": "model",
                "created": self.created,
                "owned_by": "dsray",
                "root": self.config.model,
                "max_model_len": self.llm.max_model_len,
            }
        ]

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: queue, KV cache, prefix cache and request counters.

        Engine fields are read from another thread without a lock: each is one int or float
        read, good enough for a gauge. An engine that reports ``expert_load`` (tokens per MoE
        layer and expert) has it passed through for the exporter.
        """
        engine = self.llm.stats()  # summed over the instance's attention ranks
        stats: dict[str, Any] = {
            "model_name": self.model_name,
            "replica": self.replica_id,
            "healthy": self.llm.is_healthy,
            "degraded": engine.get("degraded"),
            "workers": engine.get("workers"),  # live attention and expert workers (Ray executor)
            "num_requests_running": engine["num_running"],
            "num_requests_waiting": engine["num_waiting"],
            "num_requests_admitted": self.num_admitted,
            "kv_cache_usage_perc": engine["kv_cache_usage"],
            "prefix_cache_queries": engine["prefix_cache_queries"],
            "prefix_cache_hits": engine["prefix_cache_hits"],
            **self.counters,
        }
        if engine.get("eplb") is not None:
            stats["eplb"] = engine["eplb"]  # expert rebalancing (Ray executor)
        if self.llm.engine_pid is not None:
            stats["engine_pid"] = self.llm.engine_pid  # the engine's own process (engine_process mode)
        stats["expert_load"] = self.llm.expert_load()
        return stats

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
        prompts = getattr(self, "prompts", None)
        if prompts is not None:
            prompts.shutdown()


def _sampling_params(fields: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except TypeError as exc:  # a field SamplingParams does not have
        raise InvalidRequestError(str(exc)) from exc


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose content is a string, as chat templates expect (text parts joined, None → "")."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise InvalidRequestError(
            f"message content must be a string or a list of text parts, got {type(content).__name__}"
        )
    return {**message, "content": content}
