"""ModelRunner: owns a model and its paged latent cache, and runs one step of a ragged batch."""

from __future__ import annotations

import torch

from attention.kv_cache import allocate_latent_cache, num_blocks_for_budget
from attention.metadata import AttentionMetadata
from dsray.model import Transformer
from dsray.protocol import StepInput, StepOutput
from dsray.sampler import sample


class ModelRunner:
    def __init__(self, model: Transformer, cache_memory_bytes: int, block_size: int, max_num_blocks: int | None = None):
        args = model.args
        self.model = model
        self.block_size = block_size
        self.dtype = model.model.embed_tokens.weight.dtype
        self.device = model.model.embed_tokens.weight.device
        num_blocks = num_blocks_for_budget(
            cache_memory_bytes, args.num_hidden_layers, block_size, args.kv_cache_dim, self.dtype
        )
        if max_num_blocks is not None:
            num_blocks = min(num_blocks, max_num_blocks)
        if num_blocks < 1:
            raise ValueError(
                f"kv cache budget of {cache_memory_bytes} bytes holds no block of {block_size} tokens; raise it"
            )
        self.kv_cache = allocate_latent_cache(
            args.num_hidden_layers, num_blocks, block_size, args.kv_cache_dim, self.dtype, self.device
        )

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.shape[1] // self.block_size

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        """Write the step's latents, run the model, sample for the sequences that need a token."""
        meta = AttentionMetadata.build(
            [s.block_table for s in step.seqs],
            [s.num_computed for s in step.seqs],
            [len(s.token_ids) for s in step.seqs],
            self.block_size,
            self.device,
        )
        input_ids = torch.tensor([t for s in step.seqs for t in s.token_ids], device=self.device)
        hidden = self.model(input_ids, meta, self.kv_cache)  # [T, D]
        last, wanted = [], []
        end = 0
        for i, s in enumerate(step.seqs):
            end += len(s.token_ids)
            if s.sample is not None:
                last.append(end - 1)
                wanted.append(i)
        results: list = [None] * len(step.seqs)
        if wanted:
            logits = self.model.compute_logits(hidden[last])  # [N, V]
            for i, r in zip(wanted, sample(logits, [step.seqs[i].sample for i in wanted])):
                results[i] = r
        return StepOutput(results)
