"""EngineConfig: everything that shapes one model instance — model, dtype, cache, batching, executor."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsray import envs
from dsray.autoscaler import AutoscalingConfig
from dsray.engine.scheduler import SchedulerConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="Checkpoint directory (safetensors + config.json + tokenizer files).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights and KV cache dtype.")
    kv_cache_memory_gb: float = Field(
        1.0, gt=0, description="Memory for the paged latent KV cache, in GiB; the block count follows from it."
    )
    max_num_blocks: int | None = Field(
        None, ge=1, description="Cap on KV blocks regardless of memory (small values force preemption in tests)."
    )
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig,
        description="Batching and KV blocks: max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, "
        "block_size, enable_prefix_caching. Also taken at the top level (LLM keyword arguments, serve.yaml's "
        "engine section, the CLI): EngineConfig(max_num_seqs=8) is EngineConfig(scheduler={'max_num_seqs': 8}).",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + output; default the model's max_position_embeddings."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where weights, the latent KV cache, activations and sampling live: auto (cuda when torch sees "
        "a GPU, else cpu), cpu, cuda or cuda:N. Ray workers use the GPU Ray gives them; with executor='ray', "
        "cuda adds GPU: 1 to worker resources that name no GPU.",
    )
    mla_mode: Literal["auto", "absorbed", "naive", "triton"] = Field(
        "auto",
        description="MLA path: absorbed (torch, fast), naive (the reference) or triton (the Triton decode kernel; "
        "CUDA). auto: triton on a CUDA device when Triton is installed, else absorbed.",
    )
    expert_mode: Literal["auto", "grouped", "loop", "triton"] = Field(
        "auto",
        description="Routed experts: grouped (torch), loop (the reference) or triton (the fused Triton MoE; CUDA). "
        "auto: triton on a CUDA device when Triton is installed, else grouped.",
    )
    fp8_weights: Literal["auto", "dequantize", "keep"] = Field(
        "auto",
        description="An FP8 (e4m3, block-scaled) checkpoint's linear weights: dequantize at load to dtype, or keep "
        "them FP8 in device memory and multiply with the FP8 Triton GEMM (CUDA, compute capability 8.9+). "
        "auto: keep where the GEMM runs, else dequantize. Routed experts stay FP8 too (the fused MoE reads them), "
        "on the ray executor's expert workers as well.",
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="Where the model runs: in-process ('local') or attention/expert Ray actors ('ray')."
    )
    num_attention_workers: int = Field(1, ge=1, description="Data-parallel attention workers (ray executor).")
    num_expert_workers: int = Field(
        1,
        ge=0,
        description="Expert workers sharing the routed experts (ray executor). 0: the attention workers hold the "
        "experts themselves, each a share, and serve each other's rows (data-parallel attention with expert "
        "parallelism on the same workers); faster when workers are few, but the pools cannot scale.",
    )
    num_redundant_experts: int = Field(
        0,
        ge=0,
        description="Extra expert slots beyond one per routed expert (ray executor): replicas of experts on other "
        "expert workers, which share their expert's rows. Placed round-robin unless expert_placement says where.",
    )
    expert_placement: list[list[int]] | None = Field(
        None,
        description="Which routed experts each expert worker holds (one list of expert ids per worker, the same for "
        "every MoE layer); default contiguous ranges plus num_redundant_experts replicas spread over the workers.",
    )
    local_expert_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Ray executor: the share of each MoE layer's routed experts that every attention worker also "
        "holds (copies, evenly spread over the expert ids). Pairs routed to them are computed on the attention "
        "worker while the other rows are at the expert workers, so both compute at once; costs their memory again "
        "per attention worker.",
    )
    overlap_shared_experts: bool = Field(
        True, description="Compute the shared experts while routed rows are at the expert workers (ray executor)."
    )
    micro_batch_overlap: bool | None = Field(
        None,
        description="Split a step's batch in two micro-batches so one's attention runs while the other's rows are at "
        "the experts (ray executor with expert workers; only for steps of at least micro_batch_min_tokens tokens "
        "on some rank). None (default): on, except where the attention workers compute routed experts themselves "
        "(local_expert_share > 0, or no expert workers): a second round would read those experts again.",
    )
    micro_batch_min_tokens: int = Field(
        8, ge=2, description="Smallest per-rank batch (tokens) that micro_batch_overlap splits in two."
    )
    eplb_window_steps: int = Field(
        100, ge=1, description="Ray executor: steps per expert-load window the balancer keeps."
    )
    eplb_num_windows: int = Field(8, ge=1, description="Load windows the balancer plans from (the newest ones).")
    eplb_interval_steps: int = Field(
        0, ge=0, description="Rebalance the expert placement every this many steps (0: not periodically)."
    )
    eplb_imbalance_threshold: float | None = Field(
        None,
        gt=1.0,
        description="Rebalance when the placement's imbalance on the newest load window (hottest expert worker "
        "over the mean) passes this; None: never on imbalance.",
    )
    expert_worker_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Ray executor: most memory one expert worker's slots may take, in GiB. A lost worker's experts "
        "go to survivors only while they fit (else the step waits for its replacement), and a scale-down only "
        "removes workers whose experts fit on the rest. None: what the worker's device has free.",
    )
    autoscaling: AutoscalingConfig | None = Field(
        None,
        description="Ray executor: grow and shrink the attention and expert worker pools with the load, within "
        "min/max per pool (dsray/autoscaler.py); None: the pools keep their size unless scale() is called.",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join; default RAY_ADDRESS, else a local cluster is started."
    )
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = Field(
        "SPREAD", description="How the placement group spreads workers over nodes."
    )
    attention_worker_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources per attention worker, e.g. {'CPU': 4, 'GPU': 1, 'dsray_attention': 1}.",
    )
    expert_worker_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources per expert worker, e.g. {'CPU': 4, 'GPU': 1, 'dsray_expert': 1}.",
    )
    placement_timeout_s: float = Field(60.0, gt=0, description="Wait this long for the cluster to place workers.")
    step_timeout_s: float = Field(
        60.0, gt=0, description="A step (and each collective) failing to finish in this time fails the engine."
    )
    num_threads: int | None = Field(
        default_factory=envs.num_threads,
        ge=1,
        description="Torch CPU threads; default DSRAY_NUM_THREADS, else torch's choice.",
    )
    front_end_cores: int = Field(
        0,
        ge=0,
        description="Cores a step of more than 64 sequences (local executor) leaves to the serving front end while "
        "other processes keep that many cores busy (measured every half second, dsray/cpu_load.py): its torch and "
        "kernel threads are num_threads less these. Such a step streams to as many clients, whose chunks and "
        "requests need CPU of their own; the OpenAI server sets 1 (as vLLM's CPU backend reserves one) unless given.",
    )
    engine_process: bool = Field(
        False,
        description="AsyncLLM runs the engine loop in a child process of its own (with the ray executor, that "
        "process drives the workers), so the serving side and the engine do not share one GIL. The OpenAI server "
        "turns it on.",
    )

    @model_validator(mode="before")
    @classmethod
    def _scheduler_fields_at_top_level(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        flat = {name: data[name] for name in SchedulerConfig.model_fields if name in data}
        if not flat:
            return data
        nested = data.get("scheduler") or {}
        if isinstance(nested, SchedulerConfig):
            nested = nested.model_dump(exclude_unset=True)
        if isinstance(nested, dict) and (twice := sorted(flat.keys() & nested.keys())):
            raise ValueError(f"{', '.join(twice)} given both at the top level and in scheduler: give each once")
        rest = {name: value for name, value in data.items() if name not in flat}
        return {**rest, "scheduler": {**nested, **flat} if isinstance(nested, dict) else nested}

    @model_validator(mode="after")
    def _placement_needs_expert_workers(self) -> EngineConfig:
        if self.executor == "local" and (self.num_redundant_experts or self.expert_placement is not None):
            raise ValueError(
                "num_redundant_experts/expert_placement place experts on expert workers: they need executor='ray' "
                "and num_expert_workers >= 2 (dsray serve: --expert-workers N); the local executor holds every "
                "expert once"
            )
        if self.num_expert_workers == 0 and self.local_expert_share:
            raise ValueError(
                "local_expert_share gives attention workers copies of experts held by expert workers; with "
                "num_expert_workers=0 the attention workers hold every expert already: drop one of the two"
            )
        if self.executor == "local" and self.local_expert_share:
            raise ValueError(
                "local_expert_share gives attention workers copies of experts: it needs executor='ray' (dsray serve: "
                "--attention-workers/--expert-workers); the local executor holds every expert already"
            )
        return self

    def resolved_device(self) -> torch.device:
        """``device`` on this process's hardware; raises naming the option when it asks for a GPU that is not here."""
        return resolve_device(self.device)

    @model_validator(mode="after")
    def _gpu_workers(self) -> EngineConfig:
        if self.executor == "ray" and self.device.startswith("cuda"):
            # Ray shows an actor only the GPUs it reserved: device='cuda' means each worker reserves one.
            for resources in (self.attention_worker_resources, self.expert_worker_resources):
                resources.setdefault("GPU", 1.0)
        return self

    @model_validator(mode="after")
    def _autoscaling_bounds_hold_the_start(self) -> EngineConfig:
        a = self.autoscaling
        if a is None:
            return self
        if self.executor != "ray":
            raise ValueError("autoscaling grows and shrinks worker pools: it needs executor='ray'")
        if self.num_expert_workers == 0:
            raise ValueError(
                "autoscaling grows and shrinks worker pools, and with num_expert_workers=0 the attention workers hold "
                "the experts, so the pools cannot change: give expert workers (num_expert_workers >= 1)"
            )
        for pool, n in (("attention", self.num_attention_workers), ("experts", self.num_expert_workers)):
            low, high = getattr(a, f"{pool}_min"), getattr(a, f"{pool}_max")
            if not low <= n <= high:
                raise ValueError(
                    f"autoscaling: start with {pool} workers within [{pool}_min, {pool}_max] = [{low}, {high}]; got {n}"
                )
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_cache_memory_bytes(self) -> int:
        return int(self.kv_cache_memory_gb * 2**30)


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; ``cuda``/``cuda:N`` checked against the GPUs here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device={device!r} (command line: --device) but torch sees no CUDA device here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): use device='cpu' or 'auto', "
                "or run on a machine with an NVIDIA GPU and a CUDA build of torch"
            )
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device={device!r} (command line: --device) but this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}: pick one of those, or 'cuda' / 'auto'"
            )
    return resolved
