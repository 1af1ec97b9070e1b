"""The front door of a real `dsray serve --api-key` against unfriendly or careless clients (issue 17).

Big bodies are refused with 413 before they are read, and a streaming neighbour goes on; a request id
that is in flight gets 409 and nothing else happens to either request; a dropped non-streaming request
is aborted; slow connections neither lock a normal request out nor stay forever; nothing but /health
answers without the key; every listener is on loopback; HAProxy's files are private and gone at exit,
and Ctrl-C stops it without Serve's noise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import requests

from deploy.launch import free_port, kill_processes_using
from dsray.testing import descendants, stop_process_group

KEY = "door-key"
PER_CLIENT = 40


class Serve:
    """`dsray serve` in a session of its own (so a test can Ctrl-C its whole process group)."""

    def __init__(self, model: Path, *options: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "dsray.cli", "serve", str(model), "--port", str(self.port), "--api-key", KEY]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DSRAY_API_KEY")}
        self.proc = subprocess.Popen(
            [*cmd, *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "dsray: serving" in line:
                self.ready.set()

    def option(self, name: str) -> str:
        return self.proc.args[self.proc.args.index(name) + 1]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def running(self) -> float:
        """Requests the engine runs or queues (its gauges on /metrics)."""
        text = requests.get(self.url + "/metrics", headers=self.auth, timeout=30).text
        found = re.findall(r"^dsray:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$", text, re.M)
        assert found, text[-2000:]
        return sum(float(v) for v in found)

    def haproxy_config(self) -> Path:
        out = subprocess.run(["pgrep", "-a", "-f", "haproxy -db -f"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, path = int(line.split()[0]), re.search(r"-f (\S+)", line).group(1)
            if pid in descendants(self.proc.pid):
                return Path(path)
        raise AssertionError(f"no HAProxy under dsray serve: {out}")


@pytest.fixture(scope="module")
def door(tiny_model):
    server = Serve(
        tiny_model,
        *("--max-connections-per-client", str(PER_CLIENT), "--max-num-seqs", "16"),
        *("--grpc-port", str(free_port())),
    )
    try:
        assert server.ready.wait(timeout=240), "".join(server.lines[-40:])
        yield server
    finally:
        stop_process_group(server.proc, signal.SIGINT, 90)


def _stream(door: Serve, max_tokens: int, request_id: str | None = None) -> dict:
    """A streaming completion run to its end: finish reason, tokens, or what ended it instead."""
    headers = {**door.auth, **({"x-request-id": request_id} if request_id else {})}
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    body["stream_options"] = {"include_usage": True}
    result: dict = {"finish_reason": None, "error": None, "tokens": None}
    with requests.post(door.url + "/v1/completions", json=body, headers=headers, stream=True, timeout=300) as resp:
        result["status"] = resp.status_code
        for line in resp.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result["error"] = event["error"]["message"]
            for choice in event.get("choices") or []:
                result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
            if event.get("usage"):
                result["tokens"] = event["usage"]["completion_tokens"]
    return result


def _in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(fn(*args)))
    thread.start()
    return thread, out


def _raw_post(port: int, body: bytes, headers: str = "", chunked: bool = False) -> tuple[int | None, int]:
    """POST ``body`` over a raw socket, stopping as soon as an answer comes; (status, bytes sent by then)."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n{headers}{framing}\r\n\r\n"
    payload = head.encode() + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and b"\r\n" not in answer:
            try:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
                continue
            except BlockingIOError:
                pass
            except OSError:
                break
            if sent < len(payload):
                try:
                    sent += sock.send(payload[sent : sent + 65536])
                except BlockingIOError:
                    time.sleep(0.001)
                except OSError:
                    sent = len(payload)  # the server closed its side: read what it said
            else:
                time.sleep(0.01)
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return (int(match.group(1)) if match else None), sent


def _grpc_code(port: int) -> grpc.StatusCode:
    """What a call of Serve's inter-deployment gRPC service without credentials gets from ``port``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_nothing_but_health_answers_without_the_key(door):
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/metrics"):
        assert requests.get(door.url + path, timeout=30).status_code == 401, path
        assert requests.get(door.url + path, headers=door.auth, timeout=30).status_code == 200, path
    assert requests.get(door.url + "/openapi.json", headers=door.auth, timeout=30).json()["paths"]
    assert requests.get(door.url + "/health", timeout=30).status_code == 200


def test_every_listener_is_on_loopback_and_haproxy_keeps_its_files_private(door):
    pids = descendants(door.proc.pid)
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ours = [line for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    assert ours
    exposed = [line for line in ours if not re.search(r"\s(127\.0\.0\.1|\[::1\]|\[::ffff:127\.0\.0\.1\]):\d+\s", line)]
    assert exposed == []  # Serve's replicas too: Ray 2.60 binds their gRPC servers to [::] (deploy/loopback.py)
    replica_ports = [int(re.search(r":(\d+)\s", line).group(1)) for line in ours if "ray::ServeRepli" in line]
    assert replica_ports
    codes = {port: _grpc_code(port) for port in replica_ports}  # and Ray's token still guards calls between
    assert grpc.StatusCode.UNAUTHENTICATED in codes.values() and grpc.StatusCode.OK not in codes.values(), codes

    config_path = door.haproxy_config()
    config = config_path.read_text()
    assert "timeout http-request" in config and "sc0_conn_cur gt 40" in config
    socket_path = Path(re.search(r"stats socket (\S+) ", config).group(1))
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    run_dir = next(p for p in socket_path.parents if p.name.startswith("dsray-"))
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert not Path("/tmp/haproxy-serve", config_path.parent.name).exists()  # not in Serve's shared default


def test_a_big_body_is_refused_before_it_is_read_and_a_stream_goes_on(door):
    stream, result = _in_thread(_stream, door, 200)
    time.sleep(1.0)
    status, sent = _raw_post(door.port, b'{"prompt": "' + b"a " * (25 << 20) + b'"}')  # 50 MB
    assert status == 413 and sent < 25 << 20  # answered before half of it was through (sockets buffer a few MB)
    status, _ = _raw_post(door.port, b'{"prompt": "' + b"a " * (1 << 20) + b'"}', chunked=True)  # no length given
    assert status == 413
    assert requests.get(door.url + "/health", timeout=30).status_code == 200
    stream.join(timeout=300)
    assert result["finish_reason"] == "length" and result["tokens"] == 200, result

    # Under the body limit but far over the context: refused as such (only a prefix is tokenized).
    resp = requests.post(door.url + "/v1/completions", json={"prompt": "a " * 400_000}, headers=door.auth, timeout=120)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"


def test_a_big_grpc_request_is_refused_from_its_length_and_grpc_goes_on(door):
    from deploy.proto_gen import dsray_pb2 as pb
    from deploy.proto_gen import dsray_pb2_grpc

    grpc_port = int(door.option("--grpc-port"))
    metadata = [("application", "dsray"), ("authorization", f"Bearer {KEY}")]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = dsray_pb2_grpc.DsrayStub(channel)
        small = pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(temperature=0.0, max_tokens=4))
        deadline = time.monotonic() + 60
        while True:  # the proxy learns the app's routes shortly after it is up
            try:
                assert len(stub.Generate(small, metadata=metadata, timeout=30).token_ids) == 4
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb.GenerateRequest(prompt="a " * (25 << 20)), metadata=metadata, timeout=60)  # 50 MB
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert time.monotonic() - start < 20
        assert len(stub.Generate(small, metadata=metadata, timeout=30).token_ids) == 4


def _send_and_leave(port: int, request_id: str, stream: bool) -> None:
    body = json.dumps({"prompt": "Hello", "max_tokens": 8, "stream": stream}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nx-request-id: {request_id}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)


def test_a_reused_request_id_gets_409_and_the_running_request_goes_on(door):
    first, result = _in_thread(_stream, door, 3000, "shared-id")
    time.sleep(1.0)
    for stream in (False, True, False):
        _send_and_leave(door.port, "shared-id", stream)  # the same id, and the client leaves at once
    second = requests.post(
        door.url + "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 4},
        headers={**door.auth, "x-request-id": "shared-id"},
        timeout=60,
    )
    first.join(timeout=300)
    assert second.status_code == 409 and second.json()["error"]["param"] == "x-request-id"
    assert result == {"status": 200, "finish_reason": "length", "error": None, "tokens": 3000}


def test_dropped_non_streaming_requests_are_aborted_and_haproxy_lets_go(door):
    def drop() -> None:
        with pytest.raises(requests.Timeout):
            requests.post(
                door.url + "/v1/completions",
                json={"prompt": "Tell me a story", "max_tokens": 3000, "ignore_eos": True},
                headers=door.auth,
                timeout=1.5,
            )

    clients = [threading.Thread(target=drop) for _ in range(40)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    deadline = time.monotonic() + 30
    while (running := door.running()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running == 0  # 3,000 tokens each would have taken minutes
    out = subprocess.run(
        ["ss", "-tnH", "state", "close-wait", f"( sport = :{door.port} )"], capture_output=True, text=True
    )
    assert not out.stdout.strip(), out.stdout


def test_slow_connections_neither_lock_out_a_normal_request_nor_stay(door):
    slow, refused_at_once = [], 0
    for _ in range(3 * PER_CLIENT):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))  # another client address than the normal request's
        try:
            sock.connect(("127.0.0.1", door.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        except OSError:
            refused_at_once += 1
        slow.append(sock)
    try:
        resp = requests.post(
            door.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, headers=door.auth, timeout=60
        )
        assert resp.status_code == 200

        def closed(sock: socket.socket) -> bool:
            """Whether HAProxy let go of it: an answer (408), EOF or a reset, not silence."""
            sock.settimeout(0.05)
            try:
                sock.recv(1024)
            except TimeoutError:
                return False
            except OSError:
                pass
            return True

        refused = sum(closed(sock) for sock in slow)
        assert refused >= 2 * PER_CLIENT - 1, refused_at_once  # beyond the per-client limit: closed at connect
        deadline = time.monotonic() + 40  # the header timeout (10 s) closes the rest
        while not all(closed(sock) for sock in slow) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert all(closed(sock) for sock in slow)
    finally:
        for sock in slow:
            sock.close()


def test_ctrl_c_stops_cleanly_removing_haproxy_files(door):
    run_dir = next(p for p in door.haproxy_config().parents if p.name.startswith("dsray-"))
    os.killpg(door.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert door.proc.wait(timeout=90) == 0, "".join(door.lines[-40:])
    time.sleep(0.5)  # the reader drains the last lines
    output = "".join(door.lines)
    assert "dsray: shutting down" in output
    assert "Connecting to existing Serve app" not in output
    assert "graceful_shutdown" not in output and "Traceback" not in output, output[-3000:]
    assert not run_dir.exists()
    assert kill_processes_using(run_dir) == []  # no HAProxy (or anything else) left running from it
