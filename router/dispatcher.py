"""All-to-all dispatch and combine for the attention side of a MoE layer.

Dispatch and combine live in one class because they must share one transport and one plan:
rows leave sorted by expert (so by destination rank), and come back in the same order, so the
combine is a weighted scatter-add by the plan's token ids.

Per MoE layer: counts ``[world, M]`` (rows per destination rank and local expert) go out first,
then the rows themselves with uneven splits; expert ranks answer on the reverse splits.
"""

from __future__ import annotations

import time

import torch

from dsray.comm import AllToAll
from router.dispatch import build_plan
from router.expert_map import ExpertMap


class AllToAllDispatcher:
    """Implements the model's ``RoutedExperts`` seam by sending rows to remote expert shards."""

    def __init__(self, comm: AllToAll, expert_map: ExpertMap):
        self.comm = comm
        self.map = expert_map
        self.comm_seconds = 0.0  # time inside the exchanges (waiting on experts included)

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        plan = build_plan(topk_ids, self.map.num_experts)  # pairs sorted by expert → by shard
        counts = torch.zeros(self.comm.world_size, self.map.max_local_experts, dtype=torch.int64)
        for shard, (first, end) in enumerate(self.map.ranges):
            counts[self.map.rank_of_shard(shard), : end - first] = plan.expert_counts[first:end]
        send_splits = counts.sum(dim=1).tolist()
        rows = x[plan.token_ids]  # [T*K, D]
        start = time.perf_counter()
        self.comm.exchange_counts(counts)  # expert ranks learn what comes; we receive zeros
        self.comm.exchange_rows(rows, send_splits, [0] * self.comm.world_size)
        back = self.comm.exchange_rows(rows.new_empty((0, x.shape[1])), [0] * self.comm.world_size, send_splits)
        self.comm_seconds += time.perf_counter() - start
        weights = topk_weights.reshape(-1)[plan.pair_ids]  # [T*K]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, plan.token_ids, back.float() * weights[:, None])
        return out.to(x.dtype)


def idle_round(comm: AllToAll, max_local_experts: int, dim: int, dtype: torch.dtype) -> None:
    """Take part in one MoE layer's exchanges with nothing to send (an attention rank with no tokens)."""
    counts = torch.zeros(comm.world_size, max_local_experts, dtype=torch.int64)
    comm.exchange_counts(counts)
    zeros = [0] * comm.world_size
    empty = torch.empty((0, dim), dtype=dtype)
    comm.exchange_rows(empty, zeros, zeros)
    comm.exchange_rows(empty, zeros, zeros)
