"""Dispatch plans: the (token, k) pairs of a batch sorted by the expert that serves them.

Rows of one expert are contiguous in the sorted order, so an expert shard computes each
expert with one matmul, and the combine step scatters results back by ``token_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    """Where every (token, k) pair of a batch goes, sorted by destination expert."""

    token_ids: torch.Tensor  # [T*K] token of each sorted pair
    pair_ids: torch.Tensor  # [T*K] flat index into topk_ids / topk_weights of each sorted pair
    expert_counts: torch.Tensor  # [E] rows per expert (int64, on CPU)


def build_plan(topk_ids: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the pairs of ``topk_ids [T, K]`` by expert id (stable, so token order is kept)."""
    flat = topk_ids.reshape(-1)  # [T*K]
    pair_ids = torch.argsort(flat, stable=True)
    token_ids = torch.div(pair_ids, topk_ids.shape[1], rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_experts).cpu()  # [E]
    return DispatchPlan(token_ids=token_ids, pair_ids=pair_ids, expert_counts=counts)
