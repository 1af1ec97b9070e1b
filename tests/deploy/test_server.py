"""LLMServer without Ray: chunks, merging, the queue limit, cancellation, errors, engine death, stats."""

from __future__ import annotations

import asyncio

import pytest

from deploy.messages import ErrorInfo, GenerateRequest, StreamChunk
from deploy.server import LLMServer
from dsray import LLM, SamplingParams
from dsray.async_llm import AsyncLLM, EngineDeadError


def _server(model_dir, engine_cls=AsyncLLM, **kwargs) -> LLMServer:
    engine = {"model": str(model_dir), "max_model_len": 128, "kv_cache_memory_gb": 0.02}
    engine.update(kwargs.pop("engine", {}))
    return LLMServer(engine, served_model_name="tiny", engine_cls=engine_cls, **kwargs)


async def _collect(server: LLMServer, request: GenerateRequest) -> list[StreamChunk | ErrorInfo]:
    return [chunk async for chunk in server.generate(request)]


def _request(request_id: str, **sampling) -> GenerateRequest:
    return GenerateRequest(request_id, prompt="The weather today is", sampling={"temperature": 0, **sampling})


@pytest.fixture(scope="module")
def server(tiny_model):
    server = _server(tiny_model, stream_interval_ms=0, stream_chunks_per_s=0)  # a chunk per step
    yield server
    server.llm.shutdown()


def test_chunks_add_up_to_the_offline_result(server, tiny_model):
    chunks = asyncio.run(_collect(server, _request("a", max_tokens=24, ignore_eos=True)))
    offline = LLM(tiny_model, max_model_len=128).generate(
        "The weather today is", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )[0]
    assert [c.num_generated_tokens for c in chunks] == sorted({c.num_generated_tokens for c in chunks})
    assert [t for c in chunks for t in c.new_token_ids] == offline.token_ids
    assert "".join(c.new_text for c in chunks) == offline.text
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].num_prompt_tokens == len(offline.prompt_token_ids)


@pytest.mark.parametrize("interval_ms, chunks_per_s", [(50, 0), (0, 20)])
def test_stream_interval_merges_steps_into_fewer_chunks(tiny_model, interval_ms, chunks_per_s):
    server = _server(tiny_model, stream_interval_ms=interval_ms, stream_chunks_per_s=chunks_per_s)
    try:
        chunks = asyncio.run(_collect(server, _request("a", max_tokens=40, ignore_eos=True)))
    finally:
        server.llm.shutdown()
    assert len(chunks[0].new_token_ids) == 1  # the first token goes out alone
    assert len(chunks) < 40 and sum(len(c.new_token_ids) for c in chunks) == 40


def test_chat_messages_and_logprob_texts(server):
    request = GenerateRequest(
        "c",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        sampling={"temperature": 0, "max_tokens": 3, "logprobs": 2},
    )
    chunks = asyncio.run(_collect(server, request))
    for chunk in chunks:
        assert len(chunk.logprobs) == len(chunk.new_token_ids)
        assert all(t in chunk.token_texts for lp in chunk.logprobs for t in lp)


@pytest.mark.parametrize(
    "request_fields, param, code",
    [
        ({"sampling": {"top_p": 0}}, "top_p", None),
        ({"sampling": {"bogus": 1}}, None, None),
        ({"sampling": {"max_tokens": 500}}, "prompt", "context_length_exceeded"),
        ({"prompt": None, "messages": [], "sampling": {}}, "messages", None),
        ({"prompt": None, "prompt_token_ids": [10**6], "sampling": {}}, "prompt", None),
    ],
)
def test_refused_requests_get_one_error(server, request_fields, param, code):
    request = GenerateRequest("bad", **{"prompt": "x", **request_fields})
    (error,) = asyncio.run(_collect(server, request))
    assert isinstance(error, ErrorInfo) and error.status == 400
    assert error.param == param and error.code == code


def test_full_queue_refuses_without_touching_admitted(tiny_model):
    server = _server(tiny_model, max_waiting_requests=1, engine={"max_num_seqs": 1})

    async def scenario():
        admitted = [server.generate(_request(f"r{i}", max_tokens=30, ignore_eos=True)) for i in range(2)]
        first = await admitted[0].__anext__()
        waiting = asyncio.create_task(admitted[1].__anext__())
        await asyncio.sleep(0.05)
        assert server.num_admitted == 2
        refused = await _collect(server, _request("r2"))
        rest = [c async for c in admitted[0]]
        await waiting
        rest_waiting = [c async for c in admitted[1]]
        return first, refused, rest, rest_waiting

    try:
        first, refused, rest, rest_waiting = asyncio.run(scenario())
    finally:
        server.llm.shutdown()
    assert len(refused) == 1 and refused[0].status == 429 and refused[0].code == "queue_full"
    assert rest[-1].finish_reason == "length" and rest_waiting[-1].num_generated_tokens == 30
    assert server.counters["num_refused"] == 1 and server.num_admitted == 0


def test_cancelled_consumer_aborts_and_frees_blocks(server):
    async def scenario():
        got_one = asyncio.Event()

        async def consume():
            async for _ in server.generate(_request("cancel-me", max_tokens=100, ignore_eos=True)):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        assert server.stats()["kv_cache_usage_perc"] > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            stats = server.stats()
            if stats["kv_cache_usage_perc"] == 0 and stats["num_requests_running"] == 0:
                return stats
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks not freed: {server.stats()}")

    before = server.counters["num_cancelled"]
    stats = asyncio.run(scenario())
    assert stats["num_cancelled"] == before + 1 and stats["num_requests_admitted"] == 0


class DyingLLM(AsyncLLM):
    """Its loop dies on the first step."""

    def __init__(self, config):
        # In-process engine: the scripted step below patches it (the server's default is a child process).
        super().__init__(config.model_copy(update={"engine_process": False}))

        def step():
            raise RuntimeError("injected")

        self.engine.step = step


def test_engine_death_is_a_clean_503_and_unhealthy(tiny_model):
    server = _server(tiny_model, engine_cls=DyingLLM)
    try:
        (error,) = asyncio.run(_collect(server, _request("x")))
        assert error.status == 503 and "injected" in error.message
        with pytest.raises(EngineDeadError):
            server.check_health()
        (again,) = asyncio.run(_collect(server, _request("y")))
        assert again.status == 503 and server.stats()["healthy"] is False
    finally:
        server.llm.shutdown()


def test_stats_and_models(server):
    stats = server.stats()
    for key in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_queries",
        "prefix_cache_hits",
        "num_finished",
        "num_refused",
        "replica",
        "model_name",
    ):
        assert key in stats
    # Tokens per (MoE layer, expert), refreshed by the engine loop after a step.
    load = stats["expert_load"]
    assert all(len(layer) == server.llm.client.args.n_routed_experts for layer in load)
    (model,) = server.models()
    assert model["id"] == "tiny" and model["max_model_len"] == 128


class _CountingTokenizer:
    """The tiny model's tokenizer, recording how much text each encode call read, and sleeping (GIL released)
    while it encodes so that a test can see whether the event loop kept running meanwhile."""

    def __init__(self, inner, sleep_s: float = 0.0):
        self.inner, self.sleep_s = inner, sleep_s
        self.lengths: list[int] = []

    def vocab(self):
        return self.inner.vocab()

    def encode(self, text, add_special_tokens=True):
        import time

        self.lengths.append(len(text))
        time.sleep(self.sleep_s)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing_all_of_it(server):
    from deploy.server import PromptTokenizer

    counting = _CountingTokenizer(server.tokenizer)
    prompts = PromptTokenizer(counting, server.llm.max_model_len)
    try:
        huge = "the weather today is fine " * 400_000  # 10 MB, a context of 128 tokens
        with pytest.raises(ValueError, match="context"):
            asyncio.run(prompts.encode(huge))
        assert counting.lengths == [prompts.prefix_chars] and prompts.prefix_chars < len(huge) / 100
        chunks = asyncio.run(_collect(server, GenerateRequest("huge", prompt=huge, sampling={"max_tokens": 1})))
        assert len(chunks) == 1 and chunks[0].status == 400 and chunks[0].code == "context_length_exceeded"
        assert asyncio.run(prompts.encode("The weather today is")) == server.tokenizer.encode("The weather today is")
    finally:
        prompts.shutdown()


def test_tokenizing_runs_off_the_event_loop(server):
    from deploy.server import PromptTokenizer

    prompts = PromptTokenizer(_CountingTokenizer(server.tokenizer, sleep_s=1.0), server.llm.max_model_len)

    async def scenario() -> int:
        ticks = 0
        encode = asyncio.ensure_future(prompts.encode("The weather today is"))
        while not encode.done():
            ticks += 1
            await asyncio.sleep(0.01)
        await encode
        return ticks

    try:
        assert asyncio.run(scenario()) > 10  # the loop kept turning during the one-second encode
    finally:
        prompts.shutdown()


class _ConfigOnly:
    """An engine that only keeps the config the server built (nothing starts)."""

    tokenizer = None
    max_model_len = 128

    def __init__(self, config):
        self.config = config

    def shutdown(self):
        pass


def test_the_engine_process_takes_every_core_not_rays_cap(tiny_model, monkeypatch):
    from deploy.server import default_num_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in a replica with num_cpus=1
    monkeypatch.delenv("DSRAY_NUM_THREADS", raising=False)
    assert _server(tiny_model, engine_cls=_ConfigOnly).llm.config.num_threads == default_num_threads() >= 1
    assert _server(tiny_model, engine_cls=_ConfigOnly, engine={"num_threads": 1}).llm.config.num_threads == 1
    assert _server(tiny_model, engine_cls=_ConfigOnly).llm.config.front_end_cores == 1  # the front end's core
    given = _server(tiny_model, engine_cls=_ConfigOnly, engine={"front_end_cores": 0}).llm.config
    assert given.front_end_cores == 0
    in_thread = _server(tiny_model, engine_cls=_ConfigOnly, engine={"engine_process": False}).llm.config
    assert in_thread.num_threads is None  # the engine shares this process: its threads are the host's business
