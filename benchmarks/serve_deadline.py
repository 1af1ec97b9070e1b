"""``benchmarks/serve.py --deadline``: deadline-aware scheduling under overload, against FCFS, same run.

A closed loop measures the server's capacity; then the same Poisson overload (``--overload`` × that
rate), a share of whose requests carry a ``deadline_s``, goes to a server with deadline-aware
scheduling and to one without (``SchedulerConfig.deadline_aware``). Reported per side: the share of
requests with a deadline that met it, 504s, requests cut at their deadline, output tok/s. See
``serve.py``'s docstring for the options.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from typing import Any

import aiohttp
from serve import _percentiles, closed_loop, make_prompts, start_server, stop_server


async def _timed_request(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> dict[str, Any]:
    """One non-streaming completion: status, finish and stop reason, tokens, client-side E2E."""
    start = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return {"status": None, "error": repr(exc)[:200], "e2e": time.perf_counter() - start}
    e2e = time.perf_counter() - start
    if status != 200:
        error = data.get("error") or {} if isinstance(data, dict) else {}
        return {"status": status, "code": error.get("code"), "error": str(error)[:200], "e2e": e2e}
    choice = data["choices"][0]
    return {
        "status": 200,
        "finish_reason": choice["finish_reason"],
        "stop_reason": choice.get("stop_reason"),
        "tokens": data["usage"]["completion_tokens"],
        "e2e": e2e,
    }


def _body(model: str, prompt: list[int], output_len: int, deadline_s: float | None) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True}
    if deadline_s is not None:
        body["deadline_s"] = deadline_s
    return body


async def run_capacity(
    url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int, api_key: str | None
) -> dict[str, Any]:
    """Closed loop of ``concurrency`` clients over ``prompts``: requests/s and E2E at capacity."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def request(prompt: list[int]) -> dict[str, Any]:
            body = _body(model, prompt, output_len, None)
            return await _timed_request(session, f"{url}/v1/completions", body, headers)

        results, duration = await closed_loop(concurrency, prompts, request)
    ok = [r for r in results if r["status"] == 200]
    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "failures": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tok_s": sum(r["tokens"] for r in ok) / duration,
        "e2e_s": _percentiles([r["e2e"] for r in ok]),
    }


def deadline_schedule(
    num: int, rate: float, share: float, deadline_s: float, prompts: list[list[int]], seed: int = 0
) -> list[tuple[float, list[int], float | None]]:
    """Poisson arrivals at ``rate``/s: (send time, prompt, deadline_s or None), a ``share`` with a deadline."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(num):
        t += rng.expovariate(rate)
        out.append((t, prompts[i % len(prompts)], deadline_s if rng.random() < share else None))
    return out


async def run_open_loop(
    url: str, model: str, schedule: list[tuple[float, list[int], float | None]], output_len: int, api_key: str | None
) -> dict[str, Any]:
    """Send every request of ``schedule`` at its time whatever is in flight; what became of each."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def send(at: float, prompt: list[int], deadline_s: float | None) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            body = _body(model, prompt, output_len, deadline_s)
            return {"deadline_s": deadline_s, **await _timed_request(session, f"{url}/v1/completions", body, headers)}

        start = time.perf_counter()
        results = await asyncio.gather(*(send(*item) for item in schedule))
        duration = time.perf_counter() - start

    def full(r: dict[str, Any]) -> bool:
        return r["status"] == 200 and r["stop_reason"] != "deadline" and r["tokens"] == output_len

    with_deadline = [r for r in results if r["deadline_s"] is not None]
    others = [r for r in results if r["deadline_s"] is None]
    met = [r for r in with_deadline if full(r)]
    tokens = sum(r.get("tokens", 0) for r in results if r["status"] == 200)
    return {
        "num_requests": len(results),
        "duration_s": duration,
        "output_tok_s": tokens / duration,
        "with_deadline": {
            "num": len(with_deadline),
            "met": len(met),
            "met_share": len(met) / len(with_deadline) if with_deadline else None,
            "refused_504": sum(r["status"] == 504 for r in with_deadline),
            "cut_at_deadline": sum(r["status"] == 200 and r["stop_reason"] == "deadline" for r in with_deadline),
            "client_e2e_within_deadline": sum(full(r) and r["e2e"] <= r["deadline_s"] for r in with_deadline),
            "e2e_s_of_met": _percentiles([r["e2e"] for r in met]),
        },
        "without_deadline": {
            "num": len(others),
            "completed": sum(full(r) for r in others),
            "e2e_s": _percentiles([r["e2e"] for r in others if full(r)]),
        },
        "other_failures": sum(r["status"] not in (200, 504) for r in results),
        "failure_examples": [r["error"] for r in results if r["status"] not in (200, 504)][:3],
    }


def deadline_main(args: argparse.Namespace, model: str, served: str, vocab: int) -> dict[str, Any]:
    """Capacity, then the same overload with and without deadline-aware scheduling (module docstring)."""
    from deploy import launch

    prompts = make_prompts(256, args.input_len, vocab, seed=1)
    base_engine = {"dtype": args.dtype, "max_num_seqs": args.max_num_seqs, "num_threads": args.num_threads}
    capacity, schedule, sides = None, None, {}
    for aware in (True, False):
        port = launch.free_port()
        url = f"http://127.0.0.1:{port}"
        server_args = {
            "model": model,
            "served_model_name": served,
            "api_key": args.api_key or "",
            "engine": {**base_engine, "deadline_aware": aware},
            "max_waiting_requests": 1_000_000,  # the queue is the experiment: no 429s
            "front_door": {"max_connections_per_client": 0},
            "stream_interval_ms": args.stream_interval_ms,
            "stream_chunks_per_s": args.stream_chunks_per_s,
            "port": port,
        }
        server = start_server(server_args, url)
        try:
            warm = prompts[: 2 * args.max_num_seqs]
            asyncio.run(run_capacity(url, served, warm, args.output_len, args.max_num_seqs, args.api_key))
            if capacity is None:  # measured once, on the first server; both sides get the same arrivals
                n = max(64, 8 * args.max_num_seqs)
                capacity = asyncio.run(
                    run_capacity(url, served, prompts[:n], args.output_len, args.max_num_seqs, args.api_key)
                )
                rate = args.overload * capacity["request_throughput"]
                deadline_s = args.deadline_factor * capacity["e2e_s"]["mean"]
                num = int(rate * args.duration_s)
                schedule = deadline_schedule(num, rate, args.deadline_share, deadline_s, prompts)
            load_before = os.getloadavg()[0]
            side = asyncio.run(run_open_loop(url, served, schedule, args.output_len, args.api_key))
            # A busy shared machine slows the engine between the capacity phase and this one: say how busy.
            side["loadavg_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
            sides["deadline_aware" if aware else "fcfs"] = side
        finally:
            stop_server(server)
    on, off = sides["deadline_aware"], sides["fcfs"]
    return {
        "benchmark": "serve --deadline",
        "model": model,
        "engine": base_engine,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "capacity": capacity,
        "offered_rate_req_s": args.overload * capacity["request_throughput"],
        "overload": args.overload,
        "duration_s": args.duration_s,
        "deadline_share": args.deadline_share,
        "deadline_s": args.deadline_factor * capacity["e2e_s"]["mean"],
        "num_requests": len(schedule),
        "deadline_aware": on,
        "fcfs": off,
        "deadlines_met_share": {
            "deadline_aware": on["with_deadline"]["met_share"],
            "fcfs": off["with_deadline"]["met_share"],
        },
        "throughput_cost": 1 - on["output_tok_s"] / off["output_tok_s"],
    }
