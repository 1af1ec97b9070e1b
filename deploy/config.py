"""DsrayServeArgs: the typed arguments of the Serve application (what ``build_app`` and serve.yaml take)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsray import envs
from dsray.engine_config import EngineConfig

# Serve's default max_ongoing_requests (5) would let a replica stream only five responses at a
# time; a model instance batches hundreds, so both deployments take far more.
DEFAULT_INGRESS_MAX_ONGOING = 4096
# Stats, health and model-list calls ride the same handle as generate and count as ongoing.
_CONTROL_CALLS_HEADROOM = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LLMServerDeploymentArgs(_Strict):
    """How many model instances (LLMServer replicas) run, and how much each takes."""

    min_replicas: int = Field(1, ge=0, description="Fewest LLMServer replicas (autoscaling lower bound).")
    max_replicas: int = Field(1, ge=1, description="Most LLMServer replicas; equal to min_replicas: no autoscaling.")
    target_ongoing_requests: float = Field(
        256, gt=0, description="Autoscaling target of concurrent requests per replica (about one full batch)."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Concurrent calls one replica accepts from Serve; default max_num_seqs + "
        "max_waiting_requests + headroom, so the replica's own queue limit (429) decides first.",
    )
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Calls Serve's router may hold while no replica has room (-1: no limit; beyond it: 503). "
        "Bursts queue there briefly even when replicas have room, so keep it well above the burst size; "
        "the replica's own limit (max_waiting_requests, 429) is the real queue bound.",
    )
    num_cpus: float = Field(
        1.0,
        ge=0,
        description="Ray CPUs reserved per replica (logical, for placement). The engine's torch threads are "
        "engine.num_threads, default every physical core as offline: set it when replicas share a node.",
    )
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="Ray GPUs reserved per replica (Ray shows a replica only the GPUs it reserved); default 1 when "
        "the model runs in the replica on a GPU (engine.device cuda, local executor), else 0.",
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Autoscaling: load must persist this long to add a replica.")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Autoscaling: load must stay low this long to remove a replica."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve calls check_health().")
    health_check_timeout_s: float = Field(30.0, gt=0, description="How long a health check may take.")

    @model_validator(mode="after")
    def _bounds(self) -> LLMServerDeploymentArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class IngressDeploymentArgs(_Strict):
    """The stateless OpenAI front door."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas (HTTP parsing, SSE framing, metrics).")
    max_ongoing_requests: int = Field(
        DEFAULT_INGRESS_MAX_ONGOING, ge=1, description="Concurrent HTTP requests one ingress replica handles."
    )
    num_cpus: float = Field(0.0, ge=0, description="Ray CPUs reserved per ingress replica (logical).")
    batch_requests: bool = Field(
        True,
        description="Send the requests that arrive in one turn of the event loop to the LLMServer as one call "
        "(deploy/mux.py); used only while the LLMServer deployment has exactly one replica.",
    )


class FrontDoorArgs(_Strict):
    """The HAProxy in front of the ingress on a cluster that ``dsray serve`` starts (deploy/haproxy.py).

    Slow or idle clients cost HAProxy a connection each, and a connection over ``max_connections``
    waits for one to close: these bound how long a client may take and how many connections one
    address may hold, so thousands of slow connections cannot lock a normal request out.
    """

    header_timeout_s: int = Field(
        10,
        ge=1,
        description="A client must send a request's headers within this many seconds (HAProxy "
        "`timeout http-request`), else 408 and the connection closes.",
    )
    client_timeout_s: int = Field(
        120,
        ge=1,
        description="Longest a client may stay silent while it should send or read (HAProxy "
        "`timeout client`); an idle keep-alive connection closes after Serve's keep_alive_timeout_s.",
    )
    max_connections: int = Field(
        16384,
        ge=64,
        description="Connections HAProxy holds at once (its `maxconn`; fewer where the open-file limit "
        "allows fewer); more wait in the kernel.",
    )
    max_connections_per_client: int = Field(
        512,
        ge=0,
        description="Connections one client address may hold at once; more are refused at "
        "connect (0: no limit — set that when a load balancer in front makes every client one address).",
    )


class DsrayServeArgs(_Strict):
    """Everything that shapes one dsray Serve application.

    ``engine`` holds ``EngineConfig`` fields other than ``model`` (dtype, kv_cache_memory_gb,
    max_num_seqs, …). ``host``/``port``/``grpc_port`` apply where dsray starts Serve itself
    (``dsray serve``); under ``serve run deploy/serve.yaml`` the YAML's ``http_options`` and
    ``grpc_options`` set them.
    """

    model: str | None = Field(None, description="Checkpoint directory; None uses the embedded tiny model.")
    served_model_name: str | None = Field(
        None, description="Model name clients send and /v1/models lists; default the checkpoint directory's name."
    )
    engine: dict[str, Any] = Field(
        default_factory=dict, description="EngineConfig fields (except model) for every model instance."
    )
    api_key: str | None = Field(
        None, description="Bearer token required on every route but /health; default env DSRAY_API_KEY; None: open."
    )
    max_waiting_requests: int = Field(
        1024,
        ge=0,
        description="Requests a replica queues beyond a full batch (max_num_seqs); more are refused with 429.",
    )
    stream_interval_ms: float = Field(
        50.0,
        ge=0,
        description="Streaming: after the first token, gather tokens at least this long per chunk (the last token "
        "never waits; 0: a chunk per engine step). Every chunk costs the replicas, HTTP and the client the same CPU "
        "whatever it carries; 50 ms (20 chunks a second, Ray Serve LLM's default too) halves it at one client.",
    )
    stream_chunks_per_s: float = Field(
        500.0,
        ge=0,
        description="Streaming: chunks a replica aims to send per second over all its streams; under load "
        "each stream's chunks carry more tokens instead (0: no target, a chunk per engine step).",
    )
    stream_keepalive_s: float = Field(
        15.0,
        ge=0,
        description="Streaming: a request still waiting for its first token after this many seconds gets its 200 "
        "and an SSE comment line (': queued') every this many seconds until the token, so clients' and proxies' "
        "read timeouts see bytes while it queues; a later failure is then an SSE error event. Requests with "
        "deadline_s keep their status until the first token (a 504 when the deadline passes). 0: off.",
    )
    max_request_body_bytes: int | None = Field(
        None,
        ge=1024,
        description="Largest request body; a larger one gets 413 before it is read whole. None: 32 bytes "
        "per token of the model's context, at least 1 MiB.",
    )
    expert_metrics: Literal["auto", "full", "bounded"] = Field(
        "auto",
        description="Expert-load series at /metrics: 'full' one per (MoE layer, expert); 'bounded' each layer's "
        "hottest experts, per-layer totals and per-expert-worker load; 'auto' full up to 2,048 series.",
    )
    host: str = Field("127.0.0.1", description="HTTP bind address when dsray starts Serve.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port when dsray starts Serve.")
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="gRPC port (service dsray.v1.Dsray, deploy/dsray.proto) when dsray starts Serve; None: no gRPC.",
    )
    llm_server: LLMServerDeploymentArgs = Field(
        default_factory=LLMServerDeploymentArgs, description="LLMServer deployment options."
    )
    ingress: IngressDeploymentArgs = Field(
        default_factory=IngressDeploymentArgs, description="Ingress deployment options."
    )
    front_door: FrontDoorArgs = Field(
        default_factory=FrontDoorArgs,
        description="HAProxy limits where dsray starts the cluster (dsray serve); a joined cluster keeps its own.",
    )
    attention_workers: int | None = Field(
        None, ge=1, description="Attention worker actors per model instance; set → engine.executor 'ray'."
    )
    expert_workers: int | None = Field(
        None,
        ge=0,
        description="Expert worker actors per model instance; set → engine.executor 'ray'. 0: the attention "
        "workers hold the experts themselves.",
    )

    @field_validator("engine")
    @classmethod
    def _engine_fields(cls, engine: dict[str, Any]) -> dict[str, Any]:
        if "model" in engine:
            raise ValueError("give the checkpoint as the top-level 'model' argument, not engine.model")
        return engine

    @model_validator(mode="after")
    def _resolve(self) -> DsrayServeArgs:
        if self.attention_workers is not None or self.expert_workers is not None:
            # Worker counts mean expert parallelism: the Ray executor with that many actors per instance.
            self.engine = {
                **self.engine,
                "executor": "ray",
                "num_attention_workers": self.attention_workers or self.engine.get("num_attention_workers", 1),
                "num_expert_workers": (
                    self.expert_workers if self.expert_workers is not None else self.engine.get("num_expert_workers", 1)
                ),
            }
        # Fail here, naming the bad field, not in a replica (after the worker counts chose the executor).
        EngineConfig(model="<checkpoint>", **self.engine)
        if self.api_key is None:
            self.api_key = envs.api_key()
        if self.served_model_name is None:
            self.served_model_name = Path(self.model).name if self.model else "tiny"
        if self.llm_server.num_gpus is None:
            config = self.engine_config("<checkpoint>")
            self.llm_server.num_gpus = 1.0 if config.executor == "local" and config.device.startswith("cuda") else 0.0
        if self.llm_server.max_ongoing_requests is None:
            limit = self.engine_config("<checkpoint>").scheduler.max_num_seqs + self.max_waiting_requests
            self.llm_server.max_ongoing_requests = limit + _CONTROL_CALLS_HEADROOM
        return self

    @property
    def batches_requests(self) -> bool:
        """Whether the ingress multiplexes requests over batch calls: asked for, and one LLMServer replica.

        An abort goes to the deployment, not to a chosen replica, so it reaches the request's
        replica only when there is one; with more, each request keeps a handle call of its own.
        """
        return self.ingress.batch_requests and self.llm_server.min_replicas == self.llm_server.max_replicas == 1

    def engine_config(self, model: str) -> EngineConfig:
        """The EngineConfig of one model instance, for the checkpoint at ``model``."""
        return EngineConfig(model=model, **self.engine)
