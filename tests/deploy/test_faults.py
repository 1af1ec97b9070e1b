"""Faults against an app with an injected engine: full queue (429), client disconnect (abort), engine death (503).

The engine class is the LLMServer's parameter: ``ScriptedLLM`` slows every step down (so requests
stay in flight long enough to observe) and kills the engine loop once a request whose id starts
with ``die`` has produced three tokens.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from dsray.async_llm import AsyncLLM

STEP_S = 0.05  # 200 tokens take >= 10 s: long enough to observe on a loaded 2-core machine
MAX_NUM_SEQS = 2
MAX_WAITING = 2


class ScriptedLLM(AsyncLLM):
    def __init__(self, config):
        # In-process engine: the scripted step below patches it (the server's default is a child process).
        super().__init__(config.model_copy(update={"engine_process": False}))
        step = self.engine.step

        def scripted_step():
            time.sleep(STEP_S)
            outputs = step()
            if any(o.request_id.startswith("die") and len(o.token_ids) >= 3 for o in outputs):
                raise RuntimeError("injected engine failure")
            return outputs

        self.engine.step = scripted_step


@pytest.fixture(scope="module")
def faulty(server):
    """URL of a second app, ``/faulty``, whose LLMServer runs ScriptedLLM (no API key)."""
    import ray.cloudpickle
    from ray import serve

    from deploy.app import build_app_with_engine

    # This test module cannot be imported on a replica: ship ScriptedLLM by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    args = {
        "model": str(server.model_dir),
        "api_key": "",
        "max_waiting_requests": MAX_WAITING,
        "engine": {"max_model_len": 256, "max_num_seqs": MAX_NUM_SEQS, "kv_cache_memory_gb": 0.05},
        "llm_server": {"health_check_period_s": 5.0},
    }
    serve.run(build_app_with_engine(args, ScriptedLLM), name="faulty", route_prefix="/faulty")
    try:
        yield f"{server.url}/faulty"
    finally:
        serve.delete("faulty")


def _long_stream(client, i: int):
    return client.completions.create(
        model="tiny", prompt=f"request {i}", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )


def _wait_for(fetch, check, timeout_s: float = 30.0, what: str = "condition"):
    """Poll ``fetch()`` until ``check`` accepts its value; return that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fetch()
        if check(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {value!r})")


@pytest.fixture
def faulty_client(faulty):
    with openai.OpenAI(base_url=f"{faulty}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_full_queue_refuses_fast_and_keeps_admitted(faulty_client, server):
    capacity = MAX_NUM_SEQS + MAX_WAITING
    with ThreadPoolExecutor(capacity) as pool:
        pending = [pool.submit(_long_stream, faulty_client, i) for i in range(capacity)]
        _wait_for(lambda: server.stats("faulty"), lambda s: s["num_requests_admitted"] == capacity, what="a full queue")
        start = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            faulty_client.completions.create(model="tiny", prompt="one too many", max_tokens=2)
        assert time.monotonic() - start < 5  # refused at once, not queued behind the others
        assert info.value.response.headers["retry-after"] == "1"
        running = [f.result(timeout=60) for f in pending[:MAX_NUM_SEQS]]
        # The admitted requests were untouched: the running ones still stream tokens.
        assert next(iter(running[0])).choices[0].text is not None
        for stream in running:
            stream.close()
        for future in pending[MAX_NUM_SEQS:]:
            future.result(timeout=60).close()
    _wait_for(lambda: server.stats("faulty"), lambda s: s["num_requests_admitted"] == 0, what="the queue to drain")


def test_client_disconnect_aborts_and_frees_kv_blocks(faulty, server):
    before = server.stats("faulty")
    body = {"prompt": "a long one", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with requests.post(f"{faulty}/v1/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(l for l in lines if l).startswith(b"data: ")
        during = server.stats("faulty")
        assert during["num_requests_running"] == 1 and during["kv_cache_usage_perc"] > 0
    # 200 steps take >= 10 s: a quick return to an empty cache means the request was aborted.
    after = _wait_for(
        lambda: server.stats("faulty"),
        lambda s: s["num_requests_running"] == 0 and s["kv_cache_usage_perc"] == 0,
        timeout_s=3.0,
        what="the aborted request's KV blocks to be freed",
    )
    assert after["num_cancelled"] == before["num_cancelled"] + 1
    assert after["num_requests_admitted"] == 0


def test_request_id_in_flight_twice_is_a_conflict(faulty_client):
    same_id = faulty_client.with_options(default_headers={"x-request-id": "twice"})
    first = _long_stream(same_id, 0)
    try:
        next(iter(first))
        with pytest.raises(openai.ConflictError, match="already in use"):
            same_id.completions.create(model="tiny", prompt="again", max_tokens=2)
    finally:
        first.close()


def test_engine_death_fails_requests_cleanly_and_health_turns_503(faulty, faulty_client):
    assert requests.get(f"{faulty}/health", timeout=30).status_code == 200
    bystander = _long_stream(faulty_client, 0)
    next(iter(bystander))
    doomed = faulty_client.with_options(default_headers={"x-request-id": "die-1"})
    start = time.monotonic()
    with pytest.raises(openai.APIError, match="cannot serve"):
        for _ in _long_stream(doomed, 1):
            pass
    with pytest.raises(openai.APIError, match="cannot serve"):
        for _ in bystander:
            pass
    assert time.monotonic() - start < 30  # a clean error, not a hang
    health = requests.get(f"{faulty}/health", timeout=30)
    assert health.status_code == 503 and "error" in health.json()
    with pytest.raises(openai.InternalServerError) as info:  # 503: openai's class for 5xx
        faulty_client.completions.create(model="tiny", prompt="after the crash", max_tokens=2)
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
    # Serve sees check_health fail and replaces the replica: the app heals itself.
    _wait_for(
        lambda: requests.get(f"{faulty}/health", timeout=30).status_code, lambda code: code == 200, 90, "recovery"
    )
    out = faulty_client.completions.create(
        model="tiny", prompt="after recovery", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 2


@pytest.fixture(scope="module")
def separate(server):
    """URL of an app whose engine runs in its own process (the server's default), to be killed."""
    from ray import serve

    from deploy.app import build_app

    args = {
        "model": str(server.model_dir),
        "api_key": "",
        "engine": {"max_model_len": 256, "max_num_seqs": 4, "kv_cache_memory_gb": 0.05},
        "llm_server": {"health_check_period_s": 5.0},
    }
    serve.run(build_app(args), name="separate", route_prefix="/separate")
    try:
        yield f"{server.url}/separate"
    finally:
        serve.delete("separate")


def test_killed_engine_process_fails_streams_and_health_then_recovers(separate, server):
    import os
    import signal

    with openai.OpenAI(base_url=f"{separate}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        pid = server.stats("separate")["engine_pid"]
        assert pid != os.getpid()
        streams = [_long_stream(client, i) for i in range(2)]
        for stream in streams:
            next(iter(stream))
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for stream in streams:
            with pytest.raises(openai.APIError, match="engine process died"):
                for _ in stream:
                    pass
        assert time.monotonic() - start < 30
        assert requests.get(f"{separate}/health", timeout=30).status_code == 503
        main = requests.post(
            f"{server.url}/v1/completions",
            json={"model": "tiny", "prompt": "unaffected", "max_tokens": 2},
            headers=server.auth,
            timeout=60,
        )
        assert main.status_code == 200  # the other app never noticed
        _wait_for(
            lambda: requests.get(f"{separate}/health", timeout=30).status_code, lambda code: code == 200, 90, "recovery"
        )
        assert server.stats("separate")["engine_pid"] != pid
        after = client.completions.create(model="tiny", prompt="after", max_tokens=2, extra_body={"ignore_eos": True})
        assert after.usage.completion_tokens == 2
