"""One sequence, no engine: prefill a prompt into the latent cache, then extend it token by token.

The smallest user of the model API, and the oracle the batched engine is compared with.
"""

from __future__ import annotations

import torch

from attention.kv_cache import allocate_latent_cache
from attention.metadata import AttentionMetadata
from dsray.model import Transformer


class SingleSequence:
    """A private latent cache for one sequence of up to ``max_len`` tokens."""

    def __init__(self, model: Transformer, max_len: int, block_size: int = 16):
        args = model.args
        self.model = model
        self.block_size = block_size
        num_blocks = -(-max_len // block_size)
        dtype = model.model.embed_tokens.weight.dtype
        device = model.model.embed_tokens.weight.device
        self.cache = allocate_latent_cache(
            args.num_hidden_layers, num_blocks, block_size, args.kv_cache_dim, dtype, device
        )
        # Blocks in reverse order, so tests exercise a non-trivial block table.
        self.block_table = list(reversed(range(num_blocks)))
        self.num_computed = 0

    @torch.inference_mode()
    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Run ``token_ids`` after what is cached; return fp32 logits ``[len(token_ids), V]``."""
        device = self.cache.device
        meta = AttentionMetadata.build(
            [self.block_table], [self.num_computed], [len(token_ids)], self.block_size, device
        )
        hidden = self.model(torch.tensor(token_ids, device=device), meta, self.cache)
        self.num_computed += len(token_ids)
        return self.model.compute_logits(hidden)


@torch.inference_mode()
def greedy_generate(model: Transformer, prompt: list[int], max_new_tokens: int, block_size: int = 16) -> list[int]:
    """Greedy continuation of ``prompt``: one prefill, then one decode step per new token."""
    seq = SingleSequence(model, len(prompt) + max_new_tokens, block_size)
    next_id = int(seq.extend(prompt)[-1].argmax())
    out = [next_id]
    while len(out) < max_new_tokens:
        next_id = int(seq.extend([next_id])[-1].argmax())
        out.append(next_id)
    return out
