"""The expert side of a MoE layer's all-to-all: receive rows, run the shard, send results back."""

from __future__ import annotations

import time

import torch

from dsray.comm import AllToAll
from experts.shard import ExpertShard


def serve_round(
    comm: AllToAll, shard: ExpertShard, max_local_experts: int, dim: int, dtype: torch.dtype
) -> tuple[int, float]:
    """One dispatch/combine round for ``shard``; returns (rows computed, seconds of expert compute)."""
    world = comm.world_size
    counts = comm.exchange_counts(torch.zeros(world, max_local_experts, dtype=torch.int64))  # [world, M]
    recv_splits = counts.sum(dim=1).tolist()
    zeros = [0] * world
    rows = comm.exchange_rows(torch.empty((0, dim), dtype=dtype), zeros, recv_splits)  # [R, D]
    start = time.perf_counter()
    if rows.shape[0]:
        # Rows from each source arrive sorted by local expert; merge the sources by expert.
        local_ids = torch.repeat_interleave(
            torch.arange(max_local_experts).repeat(world), counts[:, :max_local_experts].reshape(-1)
        )
        order = torch.argsort(local_ids, stable=True)
        per_expert = counts.sum(dim=0).tolist()[: shard.num_local_experts]
        out_sorted = shard.run_sorted(rows[order], per_expert)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
    else:
        out = rows
    compute = time.perf_counter() - start
    comm.exchange_rows(out, recv_splits, zeros)
    return int(rows.shape[0]), compute
