"""The paged latent KV cache: per layer one pool of slots of C + R values (``c_kv`` ‖ roped ``k_pe``).

Nothing per head is cached: MLA rebuilds keys and values from the latent, so a token costs
``(kv_lora_rank + qk_rope_head_dim) × layers × dtype size`` bytes — 576 values per layer for
the released models.
"""

from __future__ import annotations

import torch


def allocate_latent_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    cache_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[layers, num_blocks * block_size, C + R]`` zeros; layer ``l``'s pool is ``cache[l]``."""
    return torch.zeros(num_layers, num_blocks * block_size, cache_dim, dtype=dtype, device=device)


def cache_bytes_per_token(cache: torch.Tensor) -> int:
    """Bytes one token occupies across all layers, measured from the allocated tensor."""
    return cache.numel() * cache.element_size() // cache.shape[1]


def num_blocks_for_budget(
    budget_bytes: int, num_layers: int, block_size: int, cache_dim: int, dtype: torch.dtype
) -> int:
    """How many blocks of ``block_size`` tokens fit in ``budget_bytes`` of cache."""
    per_block = num_layers * block_size * cache_dim * torch.empty((), dtype=dtype).element_size()
    return budget_bytes // per_block
