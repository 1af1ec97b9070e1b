"""Killing real workers behind the server: streams go on; and when nothing can replace them, clean 503s
and a replica that heals.

A second app, ``/ep``, runs the Ray executor (one attention worker and two expert workers, real
actors) on its own copy of the checkpoint. With streams in flight, a worker's process gets SIGKILL,
as a crash or the OOM killer would do it:

* an expert worker: every stream finishes with all its tokens and no error, ``/ep/health`` says
  "degraded" until the replacement has joined, then "ok";
* the only attention worker: the streams wait for its replacement, which recomputes their
  sequences, and finish the same way;
* the only attention worker, with its checkpoint gone so no replacement can start: every stream
  ends with an error event and ``[DONE]`` within a bound, ``/ep/health`` is 503, a new request is
  refused with 503 and ``Retry-After``, the main app at ``/`` serves on, and once the checkpoint is
  back Serve replaces the failed replica with one that serves again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from dsray.client import Client, ServiceUnavailableError
from dsray.testing import wait_for

MAX_TOKENS = 1500  # minutes of decoding on the Ray executor: the streams are surely in flight at the kill
SURVIVING_TOKENS = 120  # streams that outlive an expert worker's loss: long enough to span the kill
ERROR_BOUND_S = 60.0  # every in-flight stream must have ended by then
HEALTH_CHECK_PERIOD_S = 5.0  # Serve replaces a replica after 3 failed checks in a row: 10-15 s of 503s to observe
RECOVERY_BOUND_S = 180.0
WORKER_NAMED = re.compile(r"(attention|expert) worker \d")
# The main app's replica holds 1 of the session's 4 CPUs; these keep /ep well inside the rest.
WORKER_RESOURCES = {"CPU": 0.25}


def _workers(class_name: str = "ExpertWorker") -> dict[str, int]:
    """Live actors of ``class_name`` in this Ray session: actor id -> pid.

    From the GCS actor table: the state API needs the dashboard, which this session runs without.
    """
    import ray._private.state

    actors = ray._private.state.actors()
    return {
        actor_id: info["Pid"]
        for actor_id, info in actors.items()
        if info["ActorClassName"] == class_name and info["State"] == "ALIVE"
    }


def _expert_workers() -> dict[str, int]:
    return _workers("ExpertWorker")


def _health(url: str) -> int:
    return requests.get(f"{url}/health", timeout=30).status_code


@dataclass
class EP:
    url: str
    model_dir: Path  # the /ep app's own copy of the checkpoint


@pytest.fixture(scope="module")
def ep(server, tmp_path_factory):
    """The ``/ep`` app (expert parallelism on Ray actors, no API key), serving its own checkpoint copy."""
    from ray import serve

    from deploy.app import build_app

    model_dir = tmp_path_factory.mktemp("ep") / "model"
    shutil.copytree(server.model_dir, model_dir)
    before = set(_workers("ExpertWorker")) | set(_workers("AttentionWorker"))
    args = {
        "model": str(model_dir),
        "api_key": "",
        "attention_workers": 1,
        "expert_workers": 2,
        "engine": {
            "max_model_len": 2048,
            "max_num_seqs": 4,
            "kv_cache_memory_gb": 0.05,
            "attention_worker_resources": WORKER_RESOURCES,
            "expert_worker_resources": WORKER_RESOURCES,
            "step_timeout_s": 20,
        },
        "llm_server": {"num_cpus": 0, "health_check_period_s": HEALTH_CHECK_PERIOD_S},
    }
    serve.run(build_app(args), name="ep", route_prefix="/ep")
    try:
        yield EP(f"{server.url}/ep", model_dir)
    finally:
        serve.delete("ep")
        # The replica owns its workers: they go with it, and their CPUs with them.
        live = lambda: (set(_workers("ExpertWorker")) | set(_workers("AttentionWorker"))) - before  # noqa: E731
        wait_for(live, lambda left: not left, 60, "the workers to go", every_s=0.5)


def _sse_stream(url: str, i: int, started, max_tokens: int = MAX_TOKENS) -> dict:
    """One long stream over raw HTTP: its data payloads in order, and when it ended."""
    body = {"prompt": f"request {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    if max_tokens != MAX_TOKENS:
        body["stream_options"] = {"include_usage": True}
    payloads = []
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=(10, 120)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                payloads.append(line[len(b"data: ") :].decode())
                if len(payloads) == 1:
                    started.release()
    return {"payloads": payloads, "ended": time.monotonic()}


def _client_stream(url: str, started) -> dict:
    """One long stream through dsray.client: the error it raised, and when."""
    with Client(url, timeout=120) as c:
        stream = c.completions("through the client", stream=True, max_tokens=MAX_TOKENS, ignore_eos=True)
        started.release()
        try:
            for _ in stream:
                pass
        except Exception as exc:
            return {"error": exc, "ended": time.monotonic()}
    return {"error": None, "ended": time.monotonic()}


def _health_status(url: str) -> str:
    response = requests.get(f"{url}/health", timeout=30)
    return response.json()["status"] if response.status_code == 200 else str(response.status_code)


def _kill_mid_stream_and_finish(ep: str, class_name: str) -> tuple[dict[str, int], set[str]]:
    """Three streams; SIGKILL the newest worker of ``class_name`` once they all run; every stream must end
    with all its tokens, its finish, usage and [DONE], and no error event. Returns the workers before
    the kill and the /health statuses seen right after it."""
    workers = _workers(class_name)
    assert _health_status(ep) == "ok"
    started = threading.Semaphore(0)
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(_sse_stream, ep, i, started, SURVIVING_TOKENS) for i in range(3)]
        for _ in streams:
            assert started.acquire(timeout=120), "a stream never started"
        os.kill(max(workers.values()), signal.SIGKILL)
        seen = {_health_status(ep) for _ in range(10) if not time.sleep(0.2)}  # while the replacement starts
        results = [f.result(timeout=180) for f in streams]
    for result in results:
        payloads = result["payloads"]
        assert payloads[-1] == "[DONE]", payloads[-3:]
        events = [json.loads(p) for p in payloads[:-1]]
        assert not any("error" in e for e in events), [e for e in events if "error" in e]
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
        assert events[-1]["usage"]["completion_tokens"] == SURVIVING_TOKENS
    return workers, seen


def test_killing_an_expert_worker_loses_no_stream(ep, server):
    workers, seen = _kill_mid_stream_and_finish(ep.url, "ExpertWorker")
    assert len(workers) == 2, workers
    assert "degraded" in seen, seen
    wait_for(lambda: _health_status(ep.url), lambda status: status == "ok", 120, "the replacement to join", every_s=0.5)
    assert server.stats("ep")["degraded"] is None
    new_workers = _expert_workers()
    assert len(new_workers) == 2 and len(set(new_workers) - set(workers)) == 1, (workers, new_workers)


def test_killing_the_only_attention_worker_loses_no_stream(ep, server):
    """Its replacement starts (the streams wait for it) and recomputes their sequences from their tokens."""
    workers, _ = _kill_mid_stream_and_finish(ep.url, "AttentionWorker")
    assert len(workers) == 1, workers
    assert _health_status(ep.url) == "ok" and server.stats("ep")["workers"] == {"attention": 1, "expert": 2}
    new_workers = _workers("AttentionWorker")
    assert len(new_workers) == 1 and not set(new_workers) & set(workers), (workers, new_workers)


def test_killing_the_only_attention_worker_without_a_replacement_fails_streams_cleanly_then_the_replica_heals(
    ep, server
):
    ep, model_dir = ep.url, ep.model_dir
    workers = _workers("AttentionWorker")
    assert len(workers) == 1, workers
    assert _health(ep) == 200
    engine_pid = server.stats("ep")["engine_pid"]  # the serving loop runs in a process of its own with Ray too
    assert "ExpertWorker" not in Path(f"/proc/{engine_pid}/cmdline").read_text(errors="replace")
    started = threading.Semaphore(0)
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(_sse_stream, ep, i, started) for i in range(2)]
        streams.append(pool.submit(_client_stream, ep, started))
        for _ in streams:
            assert started.acquire(timeout=120), "a stream never started"

        victim = max(workers.values())
        assert "AttentionWorker" in Path(f"/proc/{victim}/cmdline").read_text(errors="replace")
        hidden = model_dir.with_name("hidden")
        model_dir.rename(hidden)  # a replacement cannot load: nothing is left to serve with
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        results = [f.result(timeout=ERROR_BOUND_S + 30) for f in streams]
    elapsed = [r["ended"] - killed for r in results]
    assert max(elapsed) < ERROR_BOUND_S, elapsed

    for result in results[:2]:  # on the wire: tokens, then an error event, then [DONE]
        payloads = result["payloads"]
        assert payloads[-1] == "[DONE]" and len(payloads) >= 3, payloads[-3:]
        assert "choices" in json.loads(payloads[0])
        error = json.loads(payloads[-2])["error"]
        assert error["type"] == "ServiceUnavailableError" and error["code"] == 503, error
        assert WORKER_NAMED.search(error["message"]), error  # the killed one, or a peer stuck in its collective
    error = results[2]["error"]
    assert isinstance(error, ServiceUnavailableError) and error.status_code == 503, repr(error)

    # The replica is still there, with a dead engine: 503s until Serve replaces it.
    health = requests.get(f"{ep}/health", timeout=30)
    assert health.status_code == 503 and WORKER_NAMED.search(health.json()["error"]["message"])
    refused = requests.post(f"{ep}/v1/completions", json={"prompt": "after the kill", "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "ServiceUnavailableError"
    with Client(ep) as c:
        assert not c.health()
    noticed = time.monotonic() - killed
    # The executor killed the surviving workers too: nothing of the old group holds resources.
    wait_for(lambda: set(_expert_workers()), lambda alive: not alive, 30, "the survivors to go", every_s=0.5)
    hidden.rename(model_dir)  # the checkpoint is back: the next replica can start

    with Client(server.url, api_key=server.api_key) as main:  # the other app never noticed
        assert (
            main.health() and main.completions("still here", max_tokens=4, ignore_eos=True).usage.completion_tokens == 4
        )

    # Serve's health check fails three times, it replaces the replica, the new one starts new workers.
    wait_for(lambda: _health(ep), lambda code: code == 200, RECOVERY_BOUND_S, "the replica to be replaced", every_s=0.5)
    healed = time.monotonic() - killed
    with Client(ep) as c:
        assert c.completions("after recovery", max_tokens=4, ignore_eos=True).usage.completion_tokens == 4
    new_workers = _workers("AttentionWorker")
    assert len(new_workers) == 1 and not set(new_workers) & set(workers), (workers, new_workers)
    print(
        f"streams ended {max(elapsed):.1f}s after the kill; 503s seen by {noticed:.1f}s; healthy again at {healed:.1f}s"
    )
