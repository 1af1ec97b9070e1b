"""The DeepSeek-V2/V3 transformer on one device: embed → blocks (MLA + MLP/MoE) → norm → head.

Plain single-device code; expert parallelism is applied after construction by replacing a
MoE layer's ``routed`` callable (see ``RoutedExperts``). Parameter names are those of the
Hugging Face checkpoints, except routed experts, which are stacked per shard (``weights.py``
maps the names).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

from attention.metadata import AttentionMetadata
from attention.mla import MLA
from attention.rope import RotaryEmbedding
from dsray import cpu_kernels
from dsray.config import ModelArgs
from dsray.layers import MLP, Linear, RMSNorm, linear
from experts.shard import ExpertShard
from router.dispatch import build_plan
from router.gate import Gate

EXPERT_MODES = ("grouped", "loop")


class RoutedExperts(Protocol):
    """The seam between the gate and the routed experts of one MoE layer.

    Given hidden states ``x [T, D]`` and the gate's ``topk_ids``/``topk_weights [T, K]``, return
    ``sum_k weight[t, k] * expert_{id[t, k]}(x[t])`` as ``[T, D]`` in ``x``'s dtype. Local
    compute and the all-to-all dispatcher both implement it.
    """

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor: ...


def combine_sorted(
    shard: ExpertShard, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Grouped path on one shard: dispatch plan → rows sorted by expert → one matmul pair per expert → combine."""
    if x.shape[0] == 1:
        return shard.forward_single(x, topk_ids, topk_weights)  # batch-1 decode: no plan to build
    plan = build_plan(topk_ids, shard.first_expert + shard.num_local_experts)
    first, end = shard.expert_range
    counts = plan.expert_counts[first:end].tolist()
    start = int(plan.expert_counts[:first].sum())
    rows = slice(start, start + sum(counts))
    token_ids = plan.token_ids[rows]
    y = shard.run_sorted(x[token_ids], counts)  # [M, D]
    weights = topk_weights.reshape(-1)[plan.pair_ids[rows]]  # [M]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_ids, y.float() * weights[:, None])
    return out.to(x.dtype)


class MoE(nn.Module):
    """Gate, routed experts (through the ``routed`` seam) and the always-on shared experts."""

    def __init__(self, args: ModelArgs, expert_mode: str = "grouped", with_experts: bool = True):
        super().__init__()
        if expert_mode not in EXPERT_MODES:
            raise ValueError(f"expert mode {expert_mode!r} is not supported; supported: {EXPERT_MODES}")
        self.gate = Gate(args)
        # Without local experts (an attention worker), ``routed`` must be replaced by a dispatcher.
        self.experts = (
            ExpertShard(0, args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
            if with_experts
            else None
        )
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts) if args.n_shared_experts else None
        )
        self.expert_mode = expert_mode
        self.routed: RoutedExperts = self._local_routed
        # Tokens routed to each expert since start: the load the metrics export and placement reads.
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts, dtype=torch.int64), persistent=False)

    def _local_routed(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.expert_mode == "loop":
            return self.experts.forward_loop(x, topk_ids, topk_weights)
        return combine_sorted(self.experts, x, topk_ids, topk_weights)

    def _fused_single_token(self, x: torch.Tensor) -> bool:
        return (
            x.shape[0] == 1
            and self.experts is not None
            and self.experts.inter_dim % 4 == 0
            and (self.shared_experts is None or self.shared_experts.gate_proj.out_features % 4 == 0)
            and self.expert_mode == "grouped"
            and self.routed == self._local_routed
            and cpu_kernels.usable(x, max_rows=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)  # [T, K]
        self.expert_load += torch.bincount(topk_ids.reshape(-1), minlength=self.expert_load.shape[0])
        if self._fused_single_token(x):
            # Batch-1 decode with local experts: routed and shared experts in one kernel call.
            shared = [self.shared_experts.swiglu_weights()] if self.shared_experts is not None else []
            routed = self.experts.single_token_experts(topk_ids, topk_weights)
            return cpu_kernels.swiglu_experts(x, routed, shared, checked=True)
        out = self.routed(x, topk_ids, topk_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Block(nn.Module):
    def __init__(
        self, args: ModelArgs, layer_id: int, rope: RotaryEmbedding, mla_mode: str, expert_mode: str, with_experts: bool
    ):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args, rope, mla_mode)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(args, expert_mode, with_experts)
            if args.is_moe_layer(layer_id)
            else MLP(args.hidden_size, args.intermediate_size)
        )

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's ``model.*`` submodule: embeddings, blocks and the final norm."""

    def __init__(self, args: ModelArgs, mla_mode: str, expert_mode: str, with_experts: bool = True):
        super().__init__()
        self.rope = RotaryEmbedding(args)  # tables only, no parameters: shared by every layer's MLA
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            Block(args, i, self.rope, mla_mode, expert_mode, with_experts) for i in range(args.num_hidden_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """The causal LM. ``forward`` runs a flattened ragged batch and returns final hidden states."""

    def __init__(
        self, args: ModelArgs, mla_mode: str = "absorbed", expert_mode: str = "grouped", with_experts: bool = True
    ):
        super().__init__()
        self.args = args
        self.model = Decoder(args, mla_mode, expert_mode, with_experts)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def moe_layers(self) -> dict[int, MoE]:
        return {blk.layer_id: blk.mlp for blk in self.model.layers if isinstance(blk.mlp, MoE)}

    def set_modes(self, mla_mode: str | None = None, expert_mode: str | None = None) -> None:
        """Switch every layer between the reference and the fast paths."""
        for blk in self.model.layers:
            if mla_mode is not None:
                if mla_mode not in ("naive", "absorbed"):
                    raise ValueError(f"mla mode {mla_mode!r} is not supported; supported: ('naive', 'absorbed')")
                blk.self_attn.mode = mla_mode
            if expert_mode is not None and isinstance(blk.mlp, MoE):
                if expert_mode not in EXPERT_MODES:
                    raise ValueError(f"expert mode {expert_mode!r} is not supported; supported: {EXPERT_MODES}")
                blk.mlp.expert_mode = expert_mode

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """``input_ids [T]`` → hidden ``[T, D]``; ``kv_cache [layers, slots, C + R]`` is read and written."""
        # Every layer rotates at the same positions: look the rotations up once per forward.
        meta = dataclasses.replace(meta, rope_cis=self.model.rope.cis(meta.positions))
        x = self.model.embed_tokens(input_ids)  # [T, D]
        for i, blk in enumerate(self.model.layers):
            x = blk(x, meta, kv_cache[i])
        return self.model.norm(x)

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert of each MoE layer since start: ``[num_moe_layers][E]``."""
        return [moe.expert_load.tolist() for moe in self.moe_layers.values()]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [N, D]`` → fp32 logits ``[N, V]``."""
        return linear(hidden, self.lm_head.weight).float()
