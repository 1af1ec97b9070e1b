"""Run the OpenAI server from Python or the command line: Ray up, Serve up, wait, clean down.

``start`` brings up (or joins, with ``RAY_ADDRESS``) a Ray cluster and deploys the app;
``stop`` removes what ``start`` made (all of Serve and Ray when it started the cluster, only
its own application when it joined one). ``serve_forever`` is the body of ``dsray serve``:
start, print the URL, wait for SIGINT/SIGTERM, stop.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
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


def start(args: DsrayServeArgs, **ray_init: Any) -> str:
    """Deploy ``args`` on a Ray cluster of its own (or ``RAY_ADDRESS``'s); returns the base URL."""
    import ray
    from ray import serve

    from deploy.app import build_app

    # "local": never attach to some other cluster on this machine unless RAY_ADDRESS says so.
    ray.init(address=envs.ray_address() or "local", **ray_init)
    serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=grpc_options(args))
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    return f"http://{host}:{args.port}"


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
    # Serve's gRPC proxy listens on every interface; there is no host option for it.
    grpc = f"  gRPC: dsray.v1.Dsray (deploy/dsray.proto) on port {args.grpc_port}\n" if args.grpc_port else ""
    return (
        f"dsray: serving {args.served_model_name!r} at {url}/v1 (OpenAI-compatible; /health, /metrics)\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
        f"{grpc}"
        "  Ctrl-C to stop; Serve and replica logs: /tmp/ray/session_latest/logs/serve/"
    )


def serve_forever(args: DsrayServeArgs) -> int:
    """Deploy ``args`` and block until SIGINT or SIGTERM; returns the exit status."""
    stopping = threading.Event()
    try:
        began = time.perf_counter()
        url = start(args, log_to_driver=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        print(f"{_banner(url, args)}\n  (ready in {time.perf_counter() - began:.1f}s)", flush=True)
        while not stopping.wait(timeout=1.0):
            pass
        print("dsray: shutting down", file=sys.stderr, flush=True)
        return 0
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        stop()
