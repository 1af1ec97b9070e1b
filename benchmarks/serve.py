"""Online serving benchmark: N concurrent streaming clients against the OpenAI server, and the offline peer.

For each concurrency C, ``--num-prompts`` requests (token-id prompts of ``--input-len``, exactly
``--output-len`` tokens each with ``ignore_eos``) are sent by C closed-loop streaming clients
(asyncio + aiohttp) to ``/v1/completions``. Metrics are ``vllm bench serve``'s: TTFT (sent →
first streamed chunk), TPOT ((E2E − TTFT) ÷ (tokens − 1)), ITL (every gap between chunks), E2E
(mean, p50, p99), output tok/s, request/s, failures.

The peer, in the same run and on the same prompts: the same engine configuration driven
offline (``dsray.LLM``'s engine, C requests kept in flight, refilled as they finish), at its best:
alone on the machine in a fresh process that is not a Ray driver, with no cluster running. It runs
once before the server starts and once after it has stopped (each time in a new process, so the
second run starts with an empty prefix cache too), and the ratio serving ÷ offline output tok/s
is taken against the mean of the two: this VM's speed drifts by 10-20 % over minutes, and a
bracket shows how much it did.
The ratio is the serving overhead (Ray Serve, HTTP, SSE and — on a small machine — the client's
own CPU share).

``--deadline`` measures deadline-aware scheduling instead (``deadline_main``): a closed loop of
``--max-num-seqs`` clients gives the server's capacity (requests/s) and its latency at capacity;
then an open loop offers ``--overload`` times that rate (Poisson arrivals for ``--duration-s``),
a ``--deadline-share`` of the requests carrying ``deadline_s`` = ``--deadline-factor`` x that
latency, the others none. The same arrivals go to a server with ``deadline_aware`` scheduling and
to one without it (first come, first served; deadlines still enforced), and the report gives for
each the share of deadlines met (the request finished in full: not refused with 504, not cut at
its deadline), what happened to the others, and output tok/s, whose difference is the
throughput cost. Give it a batch small enough for a queue to form, e.g. ``--deadline
--max-num-seqs 16 --output-len 32``: with 256 slots an overload only slows the batch down.

Without ``--url`` the benchmark starts the server itself in a process of its own (``launch.start``,
what ``dsray serve`` runs: a local Ray cluster and the dsray app with the same engine options as
the offline peer), so the client is not a Ray driver either. Prints one JSON object (and writes it
to ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import signal
import statistics
import time
import urllib.request
from queue import Empty
from typing import Any

import aiohttp


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def make_prompts(num: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Distinct random token-id prompts (ids clear of the special tokens at the low end)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(input_len)] for _ in range(num)]


# Serving side ---------------------------------------------------------------------------------


async def closed_loop(concurrency: int, prompts: list, request) -> tuple[list[dict[str, Any]], float]:
    """``concurrency`` clients, each sending the next of ``prompts`` (``await request(prompt)``) as soon as
    its last one ended, until none is left: every result, and the seconds it took."""
    queue = list(reversed(prompts))
    results: list[dict[str, Any]] = []

    async def client() -> None:
        while queue:
            results.append(await request(queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def _one_request(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> dict[str, Any]:
    start = time.perf_counter()
    chunk_times: list[float] = []
    num_tokens = 0
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                return {"ok": False, "error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    return {"ok": False, "error": str(event["error"])[:200]}
                if event.get("usage"):
                    num_tokens = event["usage"]["completion_tokens"]
                if event["choices"]:
                    chunk_times.append(now)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return {"ok": False, "error": repr(exc)[:200]}
    if not chunk_times:
        return {"ok": False, "error": "no chunks"}
    end = chunk_times[-1]
    ttft = chunk_times[0] - start
    return {
        "ok": True,
        "ttft": ttft,
        "e2e": end - start,
        "tpot": (end - start - ttft) / (num_tokens - 1) if num_tokens > 1 else None,
        "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
        "num_tokens": num_tokens,
        "num_chunks": len(chunk_times),
    }


async def run_serving(
    url: str,
    model: str,
    prompts: list[list[int]] | list[str],
    output_len: int,
    concurrency: int,
    api_key: str | None,
    force_close: bool = False,
) -> dict[str, Any]:
    """C closed-loop streaming clients over all ``prompts``; vLLM bench's metrics. ``force_close``: a new
    connection per request (llama-server drops a kept-alive connection after each streamed answer)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0, force_close=force_close)  # the default pool of 100 would cap concurrency
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def request(prompt: list[int] | str) -> dict[str, Any]:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": output_len,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            return await _one_request(session, f"{url}/v1/completions", body, headers)

        results, duration = await closed_loop(concurrency, prompts, request)

    ok = [r for r in results if r["ok"]]
    failures = [r["error"] for r in results if not r["ok"]]
    total_tokens = sum(r["num_tokens"] for r in ok)
    return {
        "num_requests": len(results),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "duration_s": duration,
        "output_tok_s": total_tokens / duration,
        "request_throughput": len(ok) / duration,
        "tokens_per_chunk": total_tokens / max(1, sum(r["num_chunks"] for r in ok)),
        "ttft_s": _percentiles([r["ttft"] for r in ok]),
        "tpot_s": _percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_s": _percentiles([gap for r in ok for gap in r["itl"]]),
        "e2e_s": _percentiles([r["e2e"] for r in ok]),
    }


# Offline peer ---------------------------------------------------------------------------------


def run_offline(llm, prompts: list[list[int]], output_len: int, concurrency: int) -> dict[str, Any]:
    """The same workload through the engine in this process: ``concurrency`` requests in flight."""
    from dsray import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    pending = list(reversed(prompts))
    in_flight, total_tokens = 0, 0
    start = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            engine.add_request(pending.pop(), params)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                in_flight -= 1
                total_tokens += len(out.token_ids)
    duration = time.perf_counter() - start
    return {"duration_s": duration, "output_tok_s": total_tokens / duration, "num_requests": len(prompts)}


def _offline_peer_main(model: str, engine: dict, workloads: dict[int, list[list[int]]], output_len: int, queue) -> None:
    from dsray import LLM

    llm = LLM(model, **engine)
    first = next(iter(workloads.values()))
    run_offline(llm, first[:4], output_len, 4)  # warm-up
    queue.put({c: run_offline(llm, prompts, output_len, c) for c, prompts in workloads.items()})


def offline_peer(model: str, engine: dict, workloads: dict[int, list[list[int]]], output_len: int) -> dict:
    """``run_offline`` for every level, in a fresh spawned process (not a Ray driver; nothing else running)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_offline_peer_main, args=(model, engine, workloads, output_len, queue))
    proc.start()
    try:
        while True:
            try:
                return queue.get(timeout=5)
            except Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the offline peer's process exited with {proc.exitcode}") from None
    finally:
        proc.join()


# The server, in a process of its own ------------------------------------------------------------


def _server_main(server_args: dict) -> None:
    from deploy import launch
    from deploy.config import DsrayServeArgs

    try:
        # launch.start runs Ray's workers at nice 0, as the client and the offline peer run
        # (launch.worker_env): what `dsray serve` runs.
        launch.start(DsrayServeArgs.model_validate(server_args), include_dashboard=False, log_to_driver=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # stop_server's SIGINT, or Ctrl-C at the terminal
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second one must not cut launch.stop() short
        launch.stop()


def start_server(server_args: dict, url: str, timeout_s: float = 300.0):
    """Spawn ``_server_main`` and wait until ``url`` answers /health; returns the process."""
    proc = multiprocessing.get_context("spawn").Process(target=_server_main, args=(server_args,))
    proc.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError(f"the server process exited with {proc.exitcode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"the server did not answer {url}/health within {timeout_s:.0f}s")


def stop_server(proc) -> None:
    # SIGINT, as Ctrl-C stops `dsray serve`: after ray.init a SIGTERM meets Ray's fatal-signal handler,
    # which ends the process before launch.stop() and leaves Ray's agent processes behind.
    os.kill(proc.pid, signal.SIGINT)
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
        proc.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (http://host:port); default: start one here")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--served-model-name", default=None, help="model name the server answers to")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", default="1,64,1000", help="comma-separated client counts")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per level (default max(32, 2C))")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads of the engine (both sides)")
    parser.add_argument("--stream-interval-ms", type=float, help="LLMServer: least gather time (default: the server's)")
    parser.add_argument(
        "--stream-chunks-per-s", type=float, help="LLMServer: chunk rate target (default: the server's)"
    )
    parser.add_argument(
        "--front-end-cores", type=int, default=None, help="server's engine.front_end_cores (default: the server's, 1)"
    )
    parser.add_argument("--no-offline", action="store_true", help="skip the offline peer")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--deadline", action="store_true", help="deadline-aware scheduling under overload instead")
    parser.add_argument("--overload", type=float, default=2.0, help="--deadline: offered load / capacity")
    parser.add_argument("--duration-s", type=float, default=20.0, help="--deadline: how long requests arrive")
    parser.add_argument("--deadline-share", type=float, default=0.3, help="--deadline: share of requests with one")
    parser.add_argument(
        "--deadline-factor", type=float, default=4.0, help="--deadline: deadline_s as a multiple of E2E at capacity"
    )
    args = parser.parse_args(argv)

    from deploy import launch
    from deploy.config import DsrayServeArgs
    from dsray.make_model import ensure_default_model

    for field in ("stream_interval_ms", "stream_chunks_per_s"):  # unset: what `dsray serve` runs with
        if getattr(args, field) is None:
            setattr(args, field, DsrayServeArgs.model_fields[field].default)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one socket per concurrent client
    model = args.model or str(ensure_default_model())
    served = args.served_model_name or model.rstrip("/").rsplit("/", 1)[-1]
    engine = {"dtype": args.dtype, "max_num_seqs": args.max_num_seqs, "num_threads": args.num_threads}
    levels = [int(c) for c in args.concurrency.split(",")]
    vocab = json.load(open(f"{model}/config.json"))["vocab_size"]
    if args.deadline:
        if args.url:
            parser.error("--deadline starts its own servers (one per scheduling policy): drop --url")
        from serve_deadline import deadline_main  # beside this file

        report = deadline_main(args, model, served, vocab)
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return 0
    workloads = {c: make_prompts(args.num_prompts or max(32, 2 * c), args.input_len, vocab, seed=c) for c in levels}

    offline_before = offline_after = None
    if not args.no_offline:
        offline_before = offline_peer(model, engine, workloads, args.output_len)
    url, server = args.url, None
    if url is None:
        port = launch.free_port()
        url = f"http://127.0.0.1:{port}"
        server_args = {
            "model": model,
            "served_model_name": served,
            "api_key": args.api_key or "",
            "engine": engine if args.front_end_cores is None else {**engine, "front_end_cores": args.front_end_cores},
            "stream_interval_ms": args.stream_interval_ms,
            "stream_chunks_per_s": args.stream_chunks_per_s,
            "port": port,
            # Every client here is 127.0.0.1: HAProxy's per-address limit (512) would refuse the rest.
            "front_door": {"max_connections_per_client": 0},
        }
        server = start_server(server_args, url)
    try:
        asyncio.run(run_serving(url, served, workloads[levels[0]][:4], args.output_len, 4, args.api_key))  # warm-up
        serving = {
            c: asyncio.run(run_serving(url, served, workloads[c], args.output_len, c, args.api_key)) for c in levels
        }
    finally:
        if server is not None:
            stop_server(server)
    if not args.no_offline:
        offline_after = offline_peer(model, engine, workloads, args.output_len)  # a fresh process: empty prefix cache

    results = []
    for c in levels:
        row: dict[str, Any] = {"concurrency": c, "serving": serving[c]}
        if offline_before is not None:
            before, after = offline_before[c], offline_after[c]
            mean = (before["output_tok_s"] + after["output_tok_s"]) / 2
            row["offline"] = {"before": before, "after": after, "output_tok_s": mean}
            row["ratio_serving_over_offline"] = serving[c]["output_tok_s"] / mean
        results.append(row)
    report = {
        "benchmark": "serve",
        "model": model,
        "engine": engine,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "stream_interval_ms": args.stream_interval_ms,
        "stream_chunks_per_s": args.stream_chunks_per_s,
        "server_front_end_cores": args.front_end_cores,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
