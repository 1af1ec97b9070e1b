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

import logging
import os
import threading
import time

import torch

from dsray import cpu_sched
from dsray.checkpoint import SCALE_SUFFIX, Checkpoint
from dsray.comm import Transport, free_address, init_group
from dsray.config import ModelArgs
from dsray.engine_config import EngineConfig
from dsray.fp8_gemm import resolve_fp8_weights
from dsray.model_runner import ModelRunner
from dsray.protocol import StepInput, StepOutput
from dsray.weights import (
    expert_tensor_specs,
    fill_expert_slots,
    fill_expert_slots_fp8,
    keep_fp8,
    keep_fp32,
    load_transformer,
)
from experts import triton_moe
from experts.shard import ExpertShard
from router.exchange import LocalExperts, MoEExchange
from router.expert_map import ExpertMap

logger = logging.getLogger(__name__)


def worker_device(device: str = "auto") -> torch.device:
    """The GPU Ray assigned to this actor (it sees only its own, as ``cuda:0``), else the CPU.

    ``device`` is ``EngineConfig.device``: ``auto`` takes the GPU when Ray gave one; ``cpu`` keeps
    the worker on CPU even then; ``cuda``/``cuda:N`` need one (give the workers ``GPU`` resources).
    """
    import ray

    has_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    if device == "cpu" or (device == "auto" and not has_gpu):
        return torch.device("cpu")
    if not has_gpu:
        raise ValueError(
            f"device={device!r} (command line: --device) but Ray gave this worker no GPU: add 'GPU': 1 to "
            "attention_worker_resources / expert_worker_resources (and run on GPU nodes), or use device='auto'/'cpu'"
        )
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _free_bytes(device: torch.device) -> float:
    """Memory the device has free: the GPU's, or the machine's available memory (``/proc/meminfo``)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")  # unknown: not a reason to refuse


def _lowest_thread_priority() -> None:
    """Nice 19 for the calling thread only (Linux schedules threads separately); a no-op elsewhere."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class _Worker:
    def __init__(self, config: EngineConfig, rank: int, world_size: int, expert_map: ExpertMap, num_threads: int):
        cpu_sched.as_compute()  # a Ray worker of a cluster dsray started runs SCHED_BATCH; this one computes
        torch.set_num_threads(max(1, num_threads))
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.map = expert_map
        self.args = ModelArgs.from_pretrained(config.model)
        self.device = worker_device(config.device)
        self.comm: Transport | None = None
        self.step_seconds = 0.0

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 names the address every rank joins (found at run time, never a fixed port)."""
        import ray

        return free_address(ray.util.get_node_ip_address())

    def join_group(self, address: str, port: int, timeout_s: float) -> None:
        self.comm = init_group(address, port, self.rank, self.world_size, self.device, timeout_s)

    def _rejoin(self, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        """Join a new step group as ``rank`` of ``world_size`` (the old one is abandoned: a worker was
        lost, or one joins); the exchange keeps its state and talks over the new group."""
        self.rank, self.world_size = rank, world_size
        self.comm = self.exchange.transport = init_group(address, port, rank, world_size, self.device, timeout_s)

    def location(self) -> dict[str, str | int]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "rank": self.rank,
            "device": str(self.device),
        }

    def _fp8_experts(self) -> tuple[int, int] | None:
        """The checkpoint's FP8 block size if the experts stay FP8 here (``fp8_weights`` keeps them and
        the checkpoint stores them so), else None: they are dequantised at load."""
        if resolve_fp8_weights(self.config.fp8_weights, self.device) != "keep" or not self.args.moe_layer_ids:
            return None  # auto → keep on a GPU with FP8; keep where the kernels cannot run fails here
        checkpoint = Checkpoint(self.config.model)
        first = f"model.layers.{self.args.moe_layer_ids[0]}.mlp.experts.0.gate_proj.weight{SCALE_SUFFIX}"
        return tuple(checkpoint.block_size) if first in checkpoint.weight_map else None

    def _read_experts(self, experts: dict[int, list[int]]) -> dict[str, torch.Tensor]:
        if not any(experts.values()):
            return {}
        c = self.config
        specs = expert_tensor_specs(self.args, experts)
        keep = keep_fp8 if self.fp8_block_size is not None else None  # FP8 weights as stored, scales beside
        return Checkpoint(c.model).load(specs, dtype=c.torch_dtype, keep_fp32=keep_fp32, progress=False, keep_fp8=keep)

    def _layer_shard(
        self,
        layer_id: int,
        ids: list[int],
        tensors: dict[str, torch.Tensor],
        previous: ExpertShard | None,
        check: bool = True,
    ) -> ExpertShard:
        """One MoE layer's shard: experts ``previous`` holds are copied from it, the rest come from
        ``tensors`` and (in a rebalance) are checked against the checkpoint; FP8 experts stay FP8, their
        block scales copied and checked with them."""
        args = self.args
        mode = "triton" if self.expert_mode == "triton" else "grouped"
        if self.fp8_block_size is not None:  # hold_fp8 replaces the (untouched) empty stacks
            shard = ExpertShard(ids, args.hidden_size, args.moe_intermediate_size, mode)
            check = check and previous is not None
            fill_expert_slots_fp8(shard, tensors, layer_id, self.fp8_block_size, previous, check=check)
            return shard.to(self.device)
        shard = ExpertShard(ids, args.hidden_size, args.moe_intermediate_size, mode, self.config.torch_dtype)
        fill_expert_slots(shard, tensors, layer_id, previous, check=check and previous is not None)
        return shard.to(self.device)


class _Slots:
    """An expert rank's slots (a mix-in for ``_Worker``s): its shards of every MoE layer, and a rebalance's
    background load (``prepare``) and switch at a step boundary (``_switch``). The expert workers hold
    slots; so do the attention workers when there are no expert workers (``num_expert_workers=0``)."""

    def _load_slots(self, expert_rank: int) -> None:
        self.expert_rank = expert_rank
        self.expert_mode = triton_moe.resolve_mode(self.config.expert_mode, self.device)  # auto; triton checked
        self.fp8_block_size = self._fp8_experts()
        self.shards = self._build_shards(self.map)
        self._prepared: tuple[int, ExpertMap, list] | None = None
        self._preparing: int | None = None
        self._prepare_failed: tuple[int, str] | None = None

    def _build_shards(self, expert_map: ExpertMap) -> list[ExpertShard]:
        """This rank's shards under ``expert_map``, read from the checkpoint (only its experts' tensors)."""
        slots = dict(zip(self.args.moe_layer_ids, expert_map.rank_slots(self.expert_rank)))
        tensors = self._read_experts(slots)
        return [self._layer_shard(layer_id, ids, tensors, None) for layer_id, ids in slots.items()]

    def held_dtypes(self) -> list[dict[str, str | None]]:
        """Per MoE layer, the dtypes of this rank's slots: ``w13``, ``w2`` and their block scales (None
        unless the slots hold FP8). Read-only: for tests and checks."""
        out = []
        for shard in self.shards:
            scales = shard.fp8_scales
            out.append(
                {
                    "w13": str(shard.w13.dtype),
                    "w2": str(shard.w2.dtype),
                    "scales": None if scales is None else str(scales.w13.dtype),
                }
            )
        return out

    def held(self) -> list[list[int]]:
        """The experts in this rank's slots, per MoE layer (what a new map built after a loss keeps)."""
        return [list(shard.expert_ids) for shard in self.shards]

    def room_for(self, expert_map: ExpertMap, expert_rank: int) -> str | None:
        """None when this worker can hold the slots ``expert_map`` gives expert rank ``expert_rank``; else
        why not: more than ``expert_worker_memory_gb``, or (without it) more than its device has free —
        counting the one layer's new shard that lives beside the old while it is built."""
        targets = expert_map.rank_slots(expert_rank)
        if targets == [s.expert_ids for s in self.shards]:
            return None  # nothing changes here
        slots = sum(s.num_local_experts for s in self.shards)
        tensors = [t for s in self.shards for t in (*s.parameters(), *s.buffers())]  # FP8 scales too
        per_slot = sum(t.numel() * t.element_size() for t in tensors) / slots
        total = sum(len(ids) for ids in targets) * per_slot
        cap = self.config.expert_worker_memory_gb
        if cap is not None and total > cap * 2**30:
            return (
                f"expert rank {expert_rank} would hold {sum(map(len, targets))} slots ({total / 2**30:.3f} GiB), more "
                f"than expert_worker_memory_gb={cap:g}"
            )
        extra = max(0.0, total - slots * per_slot) + max(len(ids) for ids in targets) * per_slot
        if cap is None and extra > (free := _free_bytes(self.device)):
            return (
                f"expert rank {expert_rank} needs {extra / 2**30:.2f} GiB more, its device has {free / 2**30:.2f} free"
            )
        return None

    def _apply_staged(self, staged: list, layers: list[int]) -> None:
        """Write staged changes (``_stage_layer``'s) of MoE layers ``layers`` into the live shards."""
        for i, change in zip(layers, staged, strict=True):
            if isinstance(change, ExpertShard):
                self.shards[i] = change
            elif isinstance(change, int):
                self.shards[i].keep_first(change)
            else:
                self.shards[i].write_slots(*change)
        self.exchange.compute = [s.run_sorted for s in self.shards]

    def prepare(self, version: int, expert_map: ExpertMap) -> None:
        """Start loading ``expert_map``'s slots for this rank on a background thread; returns at once."""
        self._prepared, self._prepare_failed, self._preparing = None, None, version
        previous = self.shards
        threading.Thread(target=self._prepare, args=(version, expert_map, previous), daemon=True).start()

    def _prepare(self, version: int, expert_map: ExpertMap, previous: list[ExpertShard]) -> None:
        """Stage the next placement's changed slots without slowing the steps served meanwhile: at the
        lowest CPU priority (it runs on cores the step leaves idle, e.g. while this rank waits in an
        exchange), one MoE layer at a time, resting as long as each layer took (at most half a core).
        Only slots whose expert changes are staged (the executor aligned the map so held experts keep
        their slots); the switch writes them in place."""
        _lowest_thread_priority()
        staged: list[tuple[list[int], ExpertShard] | ExpertShard] = []
        try:
            with torch.inference_mode():
                layers = zip(self.args.moe_layer_ids, expert_map.rank_slots(self.expert_rank), previous)
                for layer_id, ids, held in layers:
                    start = time.perf_counter()
                    staged.append(self._stage_layer(layer_id, ids, held))
                    if self._preparing != version:
                        return  # cancelled: stop loading
                    time.sleep(time.perf_counter() - start)
        except Exception as exc:  # reported to the executor, which keeps the old placement
            logger.warning("dsray: expert rank %d could not load placement %d: %r", self.expert_rank, version, exc)
            if self._preparing == version:
                self._prepare_failed = (version, f"{type(exc).__name__}: {exc}")
            return
        if self._preparing == version:
            self._prepared = (version, expert_map, staged)

    def _stage_layer(
        self, layer_id: int, ids: list[int], held: ExpertShard, check: bool = True
    ) -> tuple[list[int], ExpertShard] | ExpertShard | int:
        """One layer's change: ``(slots, staged)`` — the slots to overwrite and a small shard holding their
        new experts (copied from ``held`` or read from the checkpoint and, with ``check``, checked) — or,
        if the number of slots changes, the whole new shard; or, when ``ids`` are ``held``'s first slots,
        just how many to keep (no copy)."""
        if len(ids) < held.num_local_experts and ids == held.expert_ids[: len(ids)]:
            return len(ids)
        if len(ids) != held.num_local_experts:
            missing = [e for e in ids if e not in held.local_of]
            return self._layer_shard(layer_id, ids, self._read_experts({layer_id: missing}), held, check)
        positions = [i for i, e in enumerate(ids) if held.expert_ids[i] != e]
        incoming = [ids[i] for i in positions]
        tensors = self._read_experts({layer_id: [e for e in incoming if e not in held.local_of]})
        return positions, self._layer_shard(layer_id, incoming, tensors, held, check)

    def cancel(self, version: int) -> None:
        """Drop a prepared (or still loading) placement: the executor keeps the current one."""
        if self._preparing == version:
            self._prepared, self._preparing, self._prepare_failed = None, None, None

    def _take_slots(self, expert_map: ExpertMap, expert_rank: int) -> None:
        """Bring the slots to what ``expert_map`` gives expert rank ``expert_rank`` (a regroup: copying
        experts held, reading the others from the checkpoint; nothing when they are the same). A rebalance
        being loaded is dropped."""
        self._prepared = self._preparing = self._prepare_failed = None
        targets = expert_map.rank_slots(expert_rank)
        changed = [i for i, ids in enumerate(targets) if ids != self.shards[i].expert_ids]
        with torch.inference_mode():  # the steps wait: no second read of what was just read (check=False)
            layer_ids = self.args.moe_layer_ids
            staged = [self._stage_layer(layer_ids[i], targets[i], self.shards[i], check=False) for i in changed]
            self._apply_staged(staged, changed)
        self.expert_rank = expert_rank

    def _switch(self, version: int) -> None:
        """Write the prepared placement ``version``'s staged slots and serve under its map from now on."""
        prepared, expert_map, staged = self._prepared
        assert prepared == version, (prepared, version)
        self._apply_staged(staged, list(range(len(staged))))
        self.map = self.exchange.map = expert_map
        self._prepared = self._preparing = None

    def rebalance_status(self) -> dict:
        """Where a rebalance stands here: the version loaded (``prepared``) and a failed load (``failed``)."""
        return {
            "prepared": self._prepared[0] if self._prepared is not None else None,
            "failed": self._prepare_failed,
        }


class AttentionWorker(_Slots, _Worker):
    """Without expert workers (``num_expert_workers=0``) an attention worker is also expert rank ``rank``
    of the map: it holds slots and serves the other attention workers' rows as they serve its own (data-
    parallel attention with expert parallelism over the same workers, as DeepSeek deploys V3)."""

    def load(self, expert_rank: int | None = None) -> int:
        """Load the attention-side tensors (and the slots of expert rank ``expert_rank``, default its own
        rank, or ``local_expert_share`` of the routed experts) and allocate the KV cache; returns its block
        count."""
        c = self.config
        model = load_transformer(
            c.model,
            c.torch_dtype,
            self.device,
            mla_mode=c.mla_mode,
            with_experts=False,
            progress=False,
            fp8_weights=c.fp8_weights,
        )
        if self.holds_slots:
            self._load_slots(self.rank if expert_rank is None else expert_rank)
            compute = [s.run_sorted for s in self.shards]
            self.exchange = MoEExchange(self.comm, self.map, compute=compute, replica_offset=self.rank)
        else:
            self.exchange = MoEExchange(self.comm, self.map, replica_offset=self.rank, local=self._local_experts())
        model.set_exchange(self.exchange, overlap_shared=c.overlap_shared_experts)
        self.runner = ModelRunner(model, c.kv_cache_memory_bytes, c.scheduler.block_size, c.max_num_blocks)
        return self.runner.num_blocks

    @property
    def holds_slots(self) -> bool:
        """No expert workers: the expert map's ranks are the attention workers."""
        return self.config.num_expert_workers == 0

    def _local_experts(self) -> LocalExperts | None:
        """The experts this rank computes itself (the same evenly spread ids in every MoE layer), or None."""
        ids = LocalExperts.spread(self.args.n_routed_experts, self.config.local_expert_share)
        if not ids or not self.args.moe_layer_ids:
            return None
        self.expert_mode = triton_moe.resolve_mode(self.config.expert_mode, self.device)
        self.fp8_block_size = self._fp8_experts()
        held = {layer_id: ids for layer_id in self.args.moe_layer_ids}
        tensors = self._read_experts(held)
        self.local_shards = [self._layer_shard(layer_id, ids, tensors, None) for layer_id in held]
        return LocalExperts(self.args.n_routed_experts, [ids] * len(held), [s.run_sorted for s in self.local_shards])

    def regroup(self, address: str, port: int, rank: int, world_size: int, timeout_s: float, expert_map: ExpertMap):
        """Serve on in a new step group under ``expert_map`` (expert ranks gone or added); the KV cache
        and the sequences' state stay. Holding slots, it first takes those the map gives its new rank."""
        if self.holds_slots:
            self._take_slots(expert_map, rank)
        self._rejoin(address, port, rank, world_size, timeout_s)
        self.map = self.exchange.map = expert_map

    def execute(self, step: StepInput) -> StepOutput:
        start = time.perf_counter()
        if step.expert_map is not None:  # a rebalance: every rank switches at this step's start
            if self.holds_slots:  # to the slots it loaded for that placement (every rank has them)
                assert self._prepared is not None and self._prepared[1].placement == step.expert_map.placement
                self._switch(self._prepared[0])
            else:
                self.map = self.exchange.map = step.expert_map
        out = self.runner.execute(step)  # with no sequences: only the step's exchange rounds
        self.step_seconds += time.perf_counter() - start
        return out

    def timings(self) -> dict[str, float]:
        """Seconds since start: whole steps, the part blocked in MoE exchanges (waiting on experts included),
        and the part computing experts here (``local_expert_share``, or this rank's slots)."""
        return {
            "step_seconds": self.step_seconds,
            "exchange_seconds": self.exchange.wait_seconds,
            "local_expert_seconds": self.exchange.compute_seconds,
            "local_rows": self.exchange.local_rows,
            "rows_served": self.exchange.rows_computed,  # its slots' rows (num_expert_workers=0)
            **{f"wait_{k}_seconds": v for k, v in self.exchange.wait_by_phase.items()},
        }

    def expert_load(self) -> list[list[int]]:
        return self.runner.model.expert_load()


class ExpertWorker(_Slots, _Worker):
    """Serves its slots; a rebalance loads the next placement's slots in the background (``prepare``),
    and the executor switches every rank to it at one step boundary (``serve_step(switch_to=…)``).

    With ``fp8_weights="keep"`` (``auto`` on a GPU with FP8) and an FP8 checkpoint, its slots hold the
    experts as stored, float8_e4m3fn with their block scales (as the local model's ``hold_fp8``), in
    every shard it builds or changes: the first load, a rebalance's staged slots, a regroup."""

    def load(self, expert_rank: int) -> list[list[int]]:
        """Read only the experts of this rank's slots from the checkpoint; returns them per MoE layer."""
        self._load_slots(expert_rank)
        self.exchange = MoEExchange(self.comm, self.map, compute=[s.run_sorted for s in self.shards])
        return self.map.rank_slots(expert_rank)

    def regroup(
        self,
        address: str,
        port: int,
        rank: int,
        world_size: int,
        timeout_s: float,
        expert_map: ExpertMap,
        expert_rank: int,
    ) -> None:
        """Serve as expert rank ``expert_rank`` of ``expert_map`` in a new step group: first bring the slots
        to what the map gives this rank, then join. A rebalance being loaded is dropped."""
        self._take_slots(expert_map, expert_rank)
        self._rejoin(address, port, rank, world_size, timeout_s)
        self.map = self.exchange.map = expert_map

    @torch.inference_mode()
    def serve_step(self, num_micro_batches: int = 1, switch_to: int | None = None) -> dict:
        """Serve one step's rounds (layer by layer, micro-batch by micro-batch), after switching to the
        prepared placement ``switch_to`` if given. Returns rows computed and where a rebalance stands."""
        if switch_to is not None:
            self._switch(switch_to)
        start = time.perf_counter()
        before = self.exchange.rows_computed
        for layer in range(self.map.num_layers):
            for _ in range(num_micro_batches):
                self.exchange.idle_round(layer, self.args.hidden_size, self.config.torch_dtype, self.device)
        self.step_seconds += time.perf_counter() - start
        return {"rows": self.exchange.rows_computed - before, **self.rebalance_status()}

    def timings(self) -> dict[str, float]:
        """Seconds since start: whole steps, and expert compute within them (the rest is exchanges/waiting)."""
        return {
            "step_seconds": self.step_seconds,
            "compute_seconds": self.exchange.compute_seconds,
            **{f"wait_{k}_seconds": v for k, v in self.exchange.wait_by_phase.items()},
            "rows": self.exchange.rows_computed,
            "rounds": self.exchange.num_rounds,
        }
