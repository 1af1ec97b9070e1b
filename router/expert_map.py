"""The expert map: which expert-worker rank hosts each logical routed expert, and at what local index.

Experts are split into contiguous ranges, as evenly as possible (the first ``E % n`` shards hold
one more): 16 experts over 3 shards → [0, 6), [6, 11), [11, 16).
"""

from __future__ import annotations


class ExpertMap:
    def __init__(self, num_experts: int, num_shards: int, first_rank: int = 0):
        if not 1 <= num_shards <= num_experts:
            raise ValueError(f"num_expert_workers must be in [1, n_routed_experts={num_experts}], got {num_shards}")
        self.num_experts = num_experts
        self.num_shards = num_shards
        self.first_rank = first_rank  # group rank of shard 0 (expert ranks follow the attention ranks)
        base, extra = divmod(num_experts, num_shards)
        sizes = [base + (1 if i < extra else 0) for i in range(num_shards)]
        starts = [sum(sizes[:i]) for i in range(num_shards)]
        self.ranges = [(s, s + n) for s, n in zip(starts, sizes)]
        self.max_local_experts = max(sizes)

    def rank_of_shard(self, shard: int) -> int:
        return self.first_rank + shard
