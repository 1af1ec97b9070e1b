"""Probe `dsray serve --api-key` the way an unfriendly or careless client would; one JSON object out.

Starts its own ``dsray serve`` (tiny model unless ``--model``) on a free loopback port, runs the
probes of issue 17 against it, stops it with SIGINT and reports:

* ``listeners``: every TCP socket the server and its Ray opened, its address, and what it answers
  without credentials (HTTP status of a few paths, or that it does not speak HTTP/1);
* ``admin_socket``: HAProxy's admin socket (path and mode) and whether its folder outlives the run;
* ``reused_id``: a stream runs with id X; a second request with id X disconnects at once (and
  another waits for its answer): does the first stream still finish, what did the second get;
* ``slow_connections``: N connections (from 127.0.0.2.. so per-client limits can tell them apart
  from the normal client on 127.0.0.1) send their headers a few bytes at a time and reconnect when
  closed; meanwhile normal requests are timed;
* ``big_bodies``: time to refuse a 10 MB and a 50 MB prompt, the longest gap of a concurrent stream
  meanwhile, and /health answers that were not 200;
* ``dropped``: N non-streaming clients drop their requests after 1.5 s; requests still running 5 s
  later (the server's own gauge) and HAProxy's CLOSE-WAIT sockets on the port.

Every load stays on loopback and is bounded. ``--skip`` leaves probes out. Run it against another
checkout with ``PYTHONPATH=/that/checkout`` (the server process inherits it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from deploy.launch import free_port
from dsray.testing import descendants, listening

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import API_KEY, Server  # noqa: E402

PROBES = ("listeners", "reused_id", "slow_connections", "big_bodies", "dropped")


# Probes ----------------------------------------------------------------------------------------


def _http_status(host: str, port: int, path: str, timeout: float = 3.0) -> str:
    """Status of ``GET path`` without credentials, or why there is none."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = sock.recv(64)
    except OSError as exc:
        return type(exc).__name__
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    if match:
        return match.group(1).decode()
    return f"gRPC: {_grpc_code(host, port)}" if data else "closed"


def _grpc_code(host: str, port: int) -> str:
    """The status of a gRPC call without credentials (UNAUTHENTICATED: Ray's token guards the port)."""
    import grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def probe_listeners(server: Server) -> list[dict[str, Any]]:
    rows = []
    for addr, port, proc in sorted(listening(descendants(server.proc.pid)), key=lambda r: r[1]):
        host = "127.0.0.1" if addr in ("0.0.0.0", "*", "::") else addr
        if port == server.port:
            paths = ["/health", "/v1/models", "/metrics", "/docs", "/redoc", "/openapi.json"]
        elif proc in ("haproxy", "ray-haproxy"):
            paths = ["/", "/stats", "/metrics"]
        else:
            paths = ["/", "/metrics"]
        answers = {path: _http_status(host, port, path) for path in paths}
        rows.append({"address": addr, "port": port, "process": proc, "answers_without_key": answers})
    return rows


def probe_admin_socket() -> dict[str, Any]:
    """Where HAProxy's admin socket is (from its config on the command line) and who may use it."""
    out = subprocess.run(["pgrep", "-a", "haproxy"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        match = re.search(r"-f (\S+)", line)
        if not match:
            continue
        config = Path(match.group(1)).read_text()
        sock = re.search(r"stats socket (\S+) (.*)", config)
        if not sock:
            continue
        path = Path(sock.group(1))
        info: dict[str, Any] = {"path": str(path), "config_line": sock.group(0).strip()}
        for p in (path, path.parent, path.parent.parent):
            try:
                info[f"mode {p}"] = oct(p.stat().st_mode & 0o777)
            except OSError:
                pass
        info["folder"] = str(path.parent)
        return info
    return {"path": None}


def _stream(server: Server, request_id: str | None, max_tokens: int, gaps: list[float] | None = None) -> str:
    """Run one streaming completion; the finish reason, or what ended it instead."""
    headers = {**server.auth, **({"x-request-id": request_id} if request_id else {})}
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    try:
        with requests.post(
            server.url + "/v1/completions", json=body, headers=headers, stream=True, timeout=300
        ) as resp:
            if resp.status_code != 200:
                return f"HTTP {resp.status_code}"
            last = time.perf_counter()
            for line in resp.iter_lines():
                now = time.perf_counter()
                if gaps is not None:
                    gaps.append(now - last)
                last = now
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return f"error event: {event['error'].get('message')}"
                reason = event["choices"][0].get("finish_reason") if event.get("choices") else None
                if reason:
                    return reason
            return "ended without a finish reason"
    except requests.RequestException as exc:
        return f"{type(exc).__name__}"


def _send_and_drop(server: Server, request_id: str, stream: bool) -> None:
    body = json.dumps({"prompt": "Hello", "max_tokens": 16, "stream": stream}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"x-request-id: {request_id}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + body)


def _reuse_once(server: Server, rid: str) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    first = threading.Thread(target=lambda: outcome.update(first=_stream(server, rid, 300)))
    first.start()
    time.sleep(1.0)  # the first request is streaming
    _send_and_drop(server, rid, stream=False)  # same id, the client leaves at once
    _send_and_drop(server, rid, stream=True)
    second = requests.post(
        server.url + "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 4},
        headers={**server.auth, "x-request-id": rid},
        timeout=60,
    )
    first.join(timeout=300)
    outcome["second_waiting_client_got"] = second.status_code
    return outcome


def probe_reused_id(server: Server, tries: int = 3) -> list[dict[str, Any]]:
    return [_reuse_once(server, f"probe-reused-{i}-{time.time_ns()}") for i in range(tries)]


async def _slow_client(source: str, port: int, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Send headers a few bytes every 2 s; reconnect when the server closes (a slowloris)."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(1.0)
            continue
        counts["open"] += 1
        counts["opened"] += 1
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set():
                await asyncio.wait_for(writer.drain(), 5)
                try:
                    data = await asyncio.wait_for(reader.read(1024), 2.0)
                    if not data:  # closed by the server
                        counts["closed_by_server"] += 1
                        break
                    counts["answered"] += 1
                    break
                except asyncio.TimeoutError:
                    writer.write(b"X-Slow: a\r\n")
        except (OSError, asyncio.TimeoutError):
            counts["closed_by_server"] += 1
        finally:
            counts["open"] -= 1
            writer.close()
        await asyncio.sleep(0.2)


def probe_slow_connections(server: Server, num: int, hold_s: float, per_source: int = 100) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counts = {"open": 0, "opened": 0, "closed_by_server": 0, "answered": 0, "connect_failed": 0}
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def attack() -> None:
        tasks = []
        for i in range(num):
            source = f"127.0.0.{2 + i // per_source}"
            tasks.append(asyncio.ensure_future(_slow_client(source, server.port, stop, counts)))
            if i % 200 == 199:
                await asyncio.sleep(0.05)
        await stop.wait()
        await asyncio.gather(*tasks, return_exceptions=True)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(attack())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(5.0)  # the connections are open
    latencies, statuses, open_counts = [], [], []
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        open_counts.append(counts["open"])
        began = time.perf_counter()
        try:
            status = requests.post(
                server.url + "/v1/completions",
                json={"prompt": "Hello", "max_tokens": 8},
                headers=server.auth,
                timeout=120,
            ).status_code
        except requests.RequestException as exc:
            status = type(exc).__name__
        latencies.append(round(time.perf_counter() - began, 3))
        statuses.append(status)
        time.sleep(2.0)
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=60)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "slow_connections": num,
        "sources": (num + per_source - 1) // per_source,
        "normal_request_latency_s": latencies,
        "normal_request_latency_max_s": max(latencies) if latencies else None,
        "normal_request_latency_median_s": statistics.median(latencies) if latencies else None,
        "normal_request_statuses": statuses,
        "slow_connections_open_while_timing": open_counts,
        **{k: v for k, v in counts.items() if k != "open"},
    }


def _post_big(server: Server, size: int) -> dict[str, Any]:
    """Send a ``size``-byte completion body over a raw socket; time until the status line comes back."""
    prompt_len = size - 64
    body = b'{"prompt": "' + b"a " * (prompt_len // 2) + b'", "max_tokens": 4}'
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    began = time.perf_counter()
    sent = 0
    data = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=300) as sock:
        sock.setblocking(False)
        payload = memoryview(head + body)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and b"\r\n\r\n" not in data:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                continue
            except BlockingIOError:
                pass
            except OSError:
                break
            if sent < len(payload):
                try:
                    sent += sock.send(payload[sent : sent + (1 << 20)])
                except BlockingIOError:
                    time.sleep(0.001)
                except OSError:  # the server closed its side: read what it said
                    sent = len(payload)
            else:
                time.sleep(0.01)
        elapsed = time.perf_counter() - began
        match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return {
        "bytes": len(body),
        "status": int(match.group(1)) if match else None,
        "seconds_to_answer": round(elapsed, 3),
        "bytes_sent_before_answer": sent,
    }


def _big_body_once(server: Server, size_mb: int) -> dict[str, Any]:
    """One big body, with a stream running and /health polled meanwhile."""
    stop = threading.Event()
    gaps: list[float] = []
    health: list[tuple[float, Any]] = []

    def stream_loop() -> None:
        while not stop.is_set():
            _stream(server, None, 3000, gaps)

    def poll_health() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                status = requests.get(server.url + "/health", timeout=30).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            health.append((round(time.perf_counter() - began, 3), status))
            time.sleep(0.5)

    streamer = threading.Thread(target=stream_loop, daemon=True)
    poller = threading.Thread(target=poll_health, daemon=True)
    streamer.start()
    poller.start()
    time.sleep(3.0)  # the stream is flowing
    num_gaps_before = len(gaps)
    result = _post_big(server, size_mb << 20)
    time.sleep(2.0)
    during = gaps[num_gaps_before:]
    stop.set()
    poller.join(timeout=60)
    streamer.join(timeout=120)
    result.update(
        size_mb=size_mb,
        longest_stream_gap_s=round(max(during), 3) if during else None,
        health_not_200=[h for h in health if h[1] != 200],
        health_slowest_s=max((h[0] for h in health), default=None),
    )
    return result


def probe_big_bodies(server: Server, sizes_mb: list[int]) -> list[dict[str, Any]]:
    return [_big_body_once(server, size_mb) for size_mb in sizes_mb]


def _close_wait(port: int) -> int:
    """Sockets of ``port`` whose client has closed while the server side has not (HAProxy's, here)."""
    out = subprocess.run(["ss", "-tnH", "state", "close-wait", f"( sport = :{port} )"], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.strip()])


def probe_dropped(server: Server, num: int, max_tokens: int) -> dict[str, Any]:
    def drop() -> None:
        try:
            requests.post(
                server.url + "/v1/completions",
                json={"prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True},
                headers=server.auth,
                timeout=1.5,
            )
        except requests.RequestException:
            pass

    baseline = server.running()
    threads = [threading.Thread(target=drop) for _ in range(num)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(5.0)
    result = {
        "clients": num,
        "max_tokens": max_tokens,
        "running_before": baseline,
        "running_5s_after_drop": server.running(),
        "close_wait_5s_after_drop": _close_wait(server.port),
    }
    time.sleep(10.0)
    result["running_15s_after_drop"] = server.running()
    result["close_wait_15s_after_drop"] = _close_wait(server.port)
    return result


# Main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `dsray serve` argument (repeatable)")
    parser.add_argument("--skip", action="append", default=[], choices=PROBES)
    parser.add_argument("--slow-connections", type=int, default=4200)
    parser.add_argument("--slow-hold-s", type=float, default=30.0, help="how long the slow connections stay")
    parser.add_argument("--body-mb", type=int, action="append", default=None, help="big body sizes (10, 50)")
    parser.add_argument("--dropped", type=int, default=100, help="non-streaming clients that drop their requests")
    parser.add_argument("--dropped-max-tokens", type=int, default=4000)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    report: dict[str, Any] = {"probe": "benchmarks/hostile.py", "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    server = Server(args.model, free_port(), args.serve_arg)
    # In this order: the big bodies once got the model instance restarted, and the slow connections
    # linger in the kernel for a while after the probe lets go of them.
    probes = {
        "listeners": lambda: probe_listeners(server),
        "admin_socket": probe_admin_socket,
        "reused_id": lambda: probe_reused_id(server),
        "dropped": lambda: probe_dropped(server, args.dropped, args.dropped_max_tokens),
        "big_bodies": lambda: probe_big_bodies(server, args.body_mb or [10, 50]),
        "slow_connections": lambda: probe_slow_connections(server, args.slow_connections, args.slow_hold_s),
    }
    try:
        server.wait_ready(300)
        time.sleep(3.0)  # Ray's agents finish binding their ports
        for name, probe in probes.items():
            if name in args.skip or (name == "admin_socket" and "listeners" in args.skip):
                continue
            try:
                report[name] = probe()
            except Exception as exc:  # one failed probe still leaves the others' figures
                report[name] = {"probe_failed": repr(exc)}
            print(f"hostile: {name} done", file=sys.stderr, flush=True)
    finally:
        report["exit_code"] = server.stop()
        folder = (report.get("admin_socket") or {}).get("folder")
        if folder:
            report["admin_socket"]["folder_left_after_exit"] = Path(folder).exists()
        report["haproxy_serve_tmp_left"] = sorted(str(p) for p in Path("/tmp").glob("haproxy-serve*"))
        report["server_log_tail"] = "".join(server.lines[-15:])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
