"""The two worker roles of expert parallelism, as plain classes (the Ray executor makes them actors).

* ``AttentionWorker`` — a data-parallel attention rank: embeddings, MLA over its own latent KV
  cache, dense layers, shared experts, gate, LM head and sampling. It keeps its sequences' state
  between steps (``ModelRunner``) and sends its MoE layers' rows to the expert ranks through the
  MoE exchange (``router/exchange.py``).
* ``ExpertWorker`` — holds the slots the expert map gives its rank, for every MoE layer, and
  serves one exchange round per MoE layer and micro-batch each step.

Group ranks: attention ranks ``0 … A-1``, expert ranks ``A … A+E-1``. A worker that Ray gave a
GPU runs on it, and the group is NCCL; otherwise CPU and gloo.
"""

from __future__ import annotations

import os
import time

import torch

from dsray.checkpoint import Checkpoint
from dsray.comm import Transport, free_address, init_group
from dsray.config import ModelArgs
from dsray.engine_config import EngineConfig
from dsray.model_runner import ModelRunner
from dsray.protocol import StepInput, StepOutput
from dsray.weights import expert_tensor_specs, keep_fp32, load_expert_shard, load_transformer
from experts.shard import ExpertShard
from router.exchange import MoEExchange
from router.expert_map import ExpertMap


def worker_device() -> torch.device:
    """The GPU Ray assigned to this actor (it sees only its own, as ``cuda:0``), else the CPU."""
    import ray

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class _Worker:
    def __init__(self, config: EngineConfig, rank: int, world_size: int, expert_map: ExpertMap, num_threads: int):
        torch.set_num_threads(max(1, num_threads))
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.map = expert_map
        self.args = ModelArgs.from_pretrained(config.model)
        self.device = worker_device()
        self.comm: Transport | None = None
        self.step_seconds = 0.0

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 names the address every rank joins (found at run time, never a fixed port)."""
        import ray

        return free_address(ray.util.get_node_ip_address())

    def join_group(self, address: str, port: int, timeout_s: float) -> None:
        self.comm = init_group(address, port, self.rank, self.world_size, self.device, timeout_s)

    def location(self) -> dict[str, str | int]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "rank": self.rank,
            "device": str(self.device),
        }


class AttentionWorker(_Worker):
    def load(self) -> int:
        """Load the attention-side tensors and allocate the KV cache; returns its block count."""
        c = self.config
        model = load_transformer(
            c.model, c.torch_dtype, self.device, mla_mode=c.mla_mode, with_experts=False, progress=False
        )
        self.exchange = MoEExchange(self.comm, self.map, replica_offset=self.rank)
        model.set_exchange(self.exchange, overlap_shared=c.overlap_shared_experts)
        self.runner = ModelRunner(model, c.kv_cache_memory_bytes, c.block_size, c.max_num_blocks)
        return self.runner.num_blocks

    def execute(self, step: StepInput) -> StepOutput:
        start = time.perf_counter()
        out = self.runner.execute(step)  # with no sequences: only the step's exchange rounds
        self.step_seconds += time.perf_counter() - start
        return out

    def timings(self) -> dict[str, float]:
        """Seconds since start: whole steps, and the part blocked in MoE exchanges (waiting on experts included)."""
        return {"step_seconds": self.step_seconds, "exchange_seconds": self.exchange.wait_seconds}

    def expert_load(self) -> list[list[int]]:
        return self.runner.model.expert_load()


class ExpertWorker(_Worker):
    def load(self, expert_rank: int) -> list[list[int]]:
        """Read only the experts of this rank's slots from the checkpoint; returns them per MoE layer."""
        args, c = self.args, self.config
        slots = self.map.rank_slots(expert_rank)  # [moe layer] → logical expert ids
        wanted = dict(zip(args.moe_layer_ids, slots))
        tensors = Checkpoint(c.model).load(
            expert_tensor_specs(args, wanted), dtype=c.torch_dtype, keep_fp32=keep_fp32, progress=False
        )
        self.shards: list[ExpertShard] = []
        for layer_id, ids in wanted.items():
            shard = ExpertShard(ids, args.hidden_size, args.moe_intermediate_size).to(c.torch_dtype)
            load_expert_shard(shard, tensors, layer_id)
            self.shards.append(shard.to(self.device))
        self.exchange = MoEExchange(self.comm, self.map, compute=[s.run_sorted for s in self.shards])
        return slots

    @torch.inference_mode()
    def serve_step(self, num_micro_batches: int = 1) -> int:
        """Serve one step's rounds (layer by layer, micro-batch by micro-batch); returns rows computed."""
        start = time.perf_counter()
        before = self.exchange.rows_computed
        for layer in range(self.map.num_layers):
            for _ in range(num_micro_batches):
                self.exchange.idle_round(layer, self.args.hidden_size, self.config.torch_dtype, self.device)
        self.step_seconds += time.perf_counter() - start
        return self.exchange.rows_computed - before

    def timings(self) -> dict[str, float]:
        """Seconds since start: whole steps, and expert compute within them (the rest is exchanges/waiting)."""
        return {
            "step_seconds": self.step_seconds,
            "compute_seconds": self.exchange.compute_seconds,
            "rows": self.exchange.rows_computed,
            "rounds": self.exchange.num_rounds,
        }
