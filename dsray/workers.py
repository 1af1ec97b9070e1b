"""The two worker roles of expert parallelism, as plain classes (the Ray executor makes them actors).

* ``AttentionWorker`` — a data-parallel attention rank: embeddings, MLA over its own latent KV
  cache, dense layers, shared experts, gate, LM head and sampling. Its MoE layers send rows to
  the expert ranks through an ``AllToAllDispatcher``.
* ``ExpertWorker`` — hosts routed experts ``[first, end)`` of every MoE layer and serves one
  dispatch/combine round per MoE layer per step.

Group ranks: attention ranks ``0 … A-1``, expert ranks ``A … A+E-1``.
"""

from __future__ import annotations

import os
import time

import torch

from dsray.checkpoint import Checkpoint
from dsray.comm import AllToAll, free_address, init_group
from dsray.config import ModelArgs
from dsray.engine_config import EngineConfig
from dsray.model_runner import ModelRunner
from dsray.protocol import StepInput, StepOutput
from dsray.weights import expert_tensor_specs, keep_fp32, load_expert_shard, load_transformer
from experts.remote import serve_round
from experts.shard import ExpertShard
from router.dispatcher import AllToAllDispatcher, idle_round
from router.expert_map import ExpertMap


class _Worker:
    def __init__(self, config: EngineConfig, rank: int, world_size: int, expert_map: ExpertMap, num_threads: int):
        torch.set_num_threads(max(1, num_threads))
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.map = expert_map
        self.args = ModelArgs.from_pretrained(config.model)
        self.comm: AllToAll | None = None

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 names the address every rank joins (found at run time, never a fixed port)."""
        import ray

        return free_address(ray.util.get_node_ip_address())

    def join_group(self, address: str, port: int, timeout_s: float) -> None:
        self.comm = init_group(address, port, self.rank, self.world_size, "gloo", timeout_s)

    def location(self) -> dict[str, str | int]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "rank": self.rank}


class AttentionWorker(_Worker):
    def load(self) -> int:
        """Load the attention-side tensors and allocate the KV cache; returns its block count."""
        c = self.config
        model = load_transformer(c.model, c.torch_dtype, mla_mode=c.mla_mode, with_experts=False, progress=False)
        for moe in model.moe_layers.values():
            moe.routed = AllToAllDispatcher(self.comm, self.map)
        self.runner = ModelRunner(model, c.kv_cache_memory_bytes, c.block_size, c.max_num_blocks)
        self.dtype = c.torch_dtype
        self.step_seconds = 0.0
        return self.runner.num_blocks

    def execute(self, step: StepInput) -> StepOutput:
        start = time.perf_counter()
        if not step.seqs:
            for _ in self.args.moe_layer_ids:  # nothing to run, but every collective needs this rank
                idle_round(self.comm, self.map.max_local_experts, self.args.hidden_size, self.dtype)
            out = StepOutput([])
        else:
            out = self.runner.execute(step)
        self.step_seconds += time.perf_counter() - start
        return out

    def timings(self) -> dict[str, float]:
        """Seconds since start: whole steps, and the part spent in MoE exchanges (incl. waiting on experts)."""
        comm = sum(m.routed.comm_seconds for m in self.runner.model.moe_layers.values())
        return {"step_seconds": self.step_seconds, "exchange_seconds": comm}

    def expert_load(self) -> list[list[int]]:
        return self.runner.model.expert_load()


class ExpertWorker(_Worker):
    def load(self, shard_index: int) -> tuple[int, int]:
        """Read only this shard's experts from the checkpoint; returns its expert range."""
        first, end = self.map.ranges[shard_index]
        args, c = self.args, self.config
        tensors = Checkpoint(c.model).load(
            expert_tensor_specs(args, first, end), dtype=c.torch_dtype, keep_fp32=keep_fp32, progress=False
        )
        self.shards: dict[int, ExpertShard] = {}
        for layer_id in args.moe_layer_ids:
            shard = ExpertShard(first, end - first, args.hidden_size, args.moe_intermediate_size).to(c.torch_dtype)
            load_expert_shard(shard, tensors, layer_id)
            self.shards[layer_id] = shard
        self.dtype = c.torch_dtype
        self.rows_served = 0
        self.compute_seconds = 0.0
        self.step_seconds = 0.0
        return first, end

    @torch.inference_mode()
    def serve_step(self) -> int:
        """Serve every MoE layer of one forward step; returns rows computed."""
        start = time.perf_counter()
        rows = 0
        for layer_id in self.args.moe_layer_ids:
            n, compute = serve_round(
                self.comm, self.shards[layer_id], self.map.max_local_experts, self.args.hidden_size, self.dtype
            )
            rows += n
            self.compute_seconds += compute
        self.rows_served += rows
        self.step_seconds += time.perf_counter() - start
        return rows

    def timings(self) -> dict[str, float]:
        """Seconds since start: whole steps, and expert compute within them (the rest is exchanges/waiting)."""
        return {"step_seconds": self.step_seconds, "compute_seconds": self.compute_seconds, "rows": self.rows_served}
