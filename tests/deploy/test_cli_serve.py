"""`dsray serve` as a user runs it: starts, prints the URL, answers a chat completion and a gRPC call, exits
cleanly on SIGINT."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import openai

from deploy import launch
from deploy.launch import free_port
from deploy.proto_gen import dsray_pb2 as pb
from deploy.proto_gen.dsray_pb2_grpc import DsrayStub
from dsray import cpu_sched


def _dsray_serve(model, *options: str, **env: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a `dsray serve` that starts its own local cluster."""
    cmd = [sys.executable, "-m", "dsray.cli", "serve", str(model), *options]
    return cmd, {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}


def test_dsray_serve_starts_serves_and_stops_on_sigint(tiny_model, tmp_path):
    import socket

    with socket.socket() as http_sock, socket.socket() as grpc_sock:  # both open at once: two different ports
        http_sock.bind(("127.0.0.1", 0))
        grpc_sock.bind(("127.0.0.1", 0))
        port, grpc_port = http_sock.getsockname()[1], grpc_sock.getsockname()[1]
    options = ("--port", str(port), "--max-model-len", "128", "--grpc-port", str(grpc_port))
    cmd, env = _dsray_serve(tiny_model, *options, DSRAY_API_KEY="cli-key")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:  # keep draining the pipe so the server never blocks on a full one
        for line in proc.stdout:
            lines.append(line)
            if "dsray: serving" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(timeout=180), "".join(lines[-40:])
        banner = next(line for line in lines if "dsray: serving" in line)
        url = re.search(r"(http://\S+/v1)", banner).group(1)
        assert url == f"http://127.0.0.1:{port}/v1"
        time.sleep(0.5)  # the curl example follows the banner
        assert any("curl" in line and "Bearer cli-key" in line for line in lines)
        with openai.OpenAI(base_url=url, api_key="cli-key", max_retries=0, timeout=60) as client:
            out = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
            )
        assert out.choices[0].message.content is not None and out.usage.completion_tokens <= 4
        # The server's processes run at nice 0 like the client, not at Ray's worker niceness (15).
        replicas = [pid for pid in _parents() if "ServeReplica:dsray:LLMServer" in _cmdline(pid)]
        assert replicas, "no LLMServer replica process found"
        for pid in replicas + [child for r in replicas for child in _descendants(r)]:  # the engine process too
            assert _nice(pid) == 0, (pid, _cmdline(pid), _nice(pid))
        if cpu_sched.supported():  # Ray's processes run SCHED_BATCH, the engine process SCHED_OTHER
            engines = [child for r in replicas for child in _descendants(r) if "spawn_main" in _cmdline(child)]
            daemons = [pid for pid in _descendants(proc.pid) if "gcs_server" in _cmdline(pid)]
            assert engines and daemons, (engines, daemons)
            assert {_policy(pid) for pid in replicas + daemons} == {os.SCHED_BATCH}
            assert {_policy(pid) for pid in engines} == {os.SCHED_OTHER}
        # Serve's controller reconciles every 0.5 s, not 0.1 s (launch.worker_env).
        controllers = [pid for pid in _parents() if "ServeController" in _cmdline(pid)]
        assert controllers, "no ServeController process found"
        interval = f"{launch.CONTROL_LOOP_ENV}={launch.CONTROL_LOOP_INTERVAL_S}"
        assert all(interval in _environ(pid) for pid in controllers), [_environ(pid) for pid in controllers]
        assert any("gRPC: dsray.v1.Dsray" in line and str(grpc_port) in line for line in lines)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_tokens=2))
            reply = DsrayStub(channel).Generate(request, metadata=[("authorization", "Bearer cli-key")], timeout=60)
        assert reply.usage.completion_tokens == len(reply.token_ids) <= 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert any("shutting down" in line for line in lines)


def _parents() -> dict[int, int]:
    """pid → parent pid of every live process (from /proc), zombies left out."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    return parents


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return ""


def _environ(pid: int) -> list[str]:
    try:
        return open(f"/proc/{pid}/environ").read().split("\0")
    except OSError:
        return []


def _nice(pid: int) -> int | None:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19 of stat: nice


def _policy(pid: int) -> int | None:
    try:
        return os.sched_getscheduler(pid)
    except OSError:
        return None


def _descendants(pid: int) -> set[int]:
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_sigterm_while_deploying_stops_and_leaves_no_ray_process(tiny_model):
    """A supervisor's SIGTERM while the app deploys (Ray is up, the model loading) cleans up like Ctrl-C."""
    cmd, env = _dsray_serve(tiny_model, "--port", str(free_port()))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deploying = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "dsray: Ray is up; deploying" in line:
                deploying.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert deploying.wait(timeout=120), "".join(lines[-40:])
        ray_processes = _descendants(proc.pid)
        assert ray_processes, "ray.init started no node processes under dsray serve"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while (left := ray_processes & set(_parents())) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left after SIGTERM: {left}"
    if any("dsray: serving" in line for line in lines):  # the app won the race to the signal: a normal stop
        assert code == 0, "".join(lines[-40:])
    else:
        assert code == 128 + signal.SIGTERM, "".join(lines[-40:])
        assert any("interrupted while starting" in line for line in lines)


def _raylets() -> set[int]:
    found = set()
    for pid in _parents():
        try:
            if "raylet" in open(f"/proc/{pid}/cmdline").read().split("\0")[0]:
                found.add(pid)
        except OSError:
            pass
    return found


def test_a_checkpoint_that_cannot_load_is_a_clear_error_and_leaves_no_ray_process(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])  # a truncated download
    before = _raylets()
    cmd, env = _dsray_serve(broken, "--port", str(free_port()))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr[done.stderr.index("dsray serve: error: deploying 'broken' failed") :]
    assert "LLMServer" in error and "It is missing or corrupt" in error and str(shard) in error
    assert "dsray: serving" not in done.stdout
    deadline = time.monotonic() + 30
    while (left := _raylets() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"a raylet outlived dsray serve: {left}"
