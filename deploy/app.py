"""build_app: typed args in, a Serve application (OpenAI + gRPC ingress → LLMServer) out.

The one place where ``serve.deployment`` is applied and deployment options are set, so the
server stays a plain class. Usable as ``import_path: deploy.app:build_app`` with ``args:`` in a
Serve config (see ``deploy/serve.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from deploy.config import DsrayServeArgs
from deploy.grpc_service import DsrayServicer
from deploy.ingress import OpenAIIngress
from deploy.server import LLMServer
from dsray.async_llm import AsyncLLM
from dsray.engine_config import EngineConfig


class Ingress(OpenAIIngress, DsrayServicer):
    """The application's front door: the OpenAI routes and the dsray.v1 gRPC rpcs on one deployment.

    Serve's HTTP and gRPC proxies both send an application's requests to its one ingress
    deployment, so both protocols live on it; they share its LLMServer handle and metrics.
    """


def _check_model(model: str | None) -> None:
    if model is not None and not (Path(model) / "config.json").is_file():
        raise ValueError(
            f"model {model!r} is not a checkpoint directory (no config.json there); "
            "give a Hugging Face DeepSeek-V2/V3 directory, make one with `dsray make-model tiny DIR`, "
            "or leave model unset for the embedded tiny model"
        )


def llm_server_options(args: DsrayServeArgs) -> dict[str, Any]:
    """Serve options of the LLMServer deployment (fixed replicas, or autoscaling when min < max)."""
    opts = args.llm_server
    options: dict[str, Any] = {
        "name": "LLMServer",
        "max_ongoing_requests": opts.max_ongoing_requests,
        "max_queued_requests": opts.max_queued_requests,
        "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus or 0},
        "health_check_period_s": opts.health_check_period_s,
        "health_check_timeout_s": opts.health_check_timeout_s,
    }
    if opts.min_replicas == opts.max_replicas:
        options["num_replicas"] = opts.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": opts.min_replicas,
            "max_replicas": opts.max_replicas,
            "target_ongoing_requests": opts.target_ongoing_requests,
            "upscale_delay_s": opts.upscale_delay_s,
            "downscale_delay_s": opts.downscale_delay_s,
        }
    return options


def build_app(args: dict[str, Any] | DsrayServeArgs | None = None) -> Application:
    """The dsray Serve application for ``args`` (a ``DsrayServeArgs`` or its fields).

    Serve calls import-path builders with exactly one argument, so this one takes only ``args``.
    """
    return build_app_with_engine(args, AsyncLLM)


def build_app_with_engine(
    args: dict[str, Any] | DsrayServeArgs | None, engine_cls: Callable[[EngineConfig], AsyncLLM]
) -> Application:
    """``build_app`` with the engine each LLMServer replica builds from its config (tests inject slow ones)."""
    args = DsrayServeArgs.model_validate(args or {})
    _check_model(args.model)
    engine_config = {"model": args.model, **args.engine}  # model None: the replica makes the tiny one
    server = serve.deployment(LLMServer).options(**llm_server_options(args))
    server_app = server.bind(
        engine_config,
        served_model_name=args.served_model_name,
        max_waiting_requests=args.max_waiting_requests,
        stream_interval_ms=args.stream_interval_ms,
        stream_chunks_per_s=args.stream_chunks_per_s,
        engine_cls=engine_cls,
    )
    ingress = serve.deployment(Ingress).options(
        name="OpenAIIngress",  # its name from before it served gRPC too, kept for scripts and dashboards
        num_replicas=args.ingress.num_replicas,
        max_ongoing_requests=args.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.ingress.num_cpus},
    )
    return ingress.bind(server_app, args.model_dump())
