"""The DeepSeek-V2/V3 transformer on one device: embed → blocks (MLA + MLP/MoE) → norm → head.

Plain single-device code; expert parallelism is applied after construction by giving the MoE
layers an exchange over a step group (``router/exchange.py``) instead of the local one. Parameter names are those of the
Hugging Face checkpoints, except routed experts, which are stacked per shard (``weights.py``
maps the names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from attention.metadata import AttentionMetadata
from attention.mla import MLA
from attention.mla import resolve_mode as resolve_mla_mode
from attention.rope import RotaryEmbedding
from dsray import cpu_kernels
from dsray.comm import SelfTransport
from dsray.config import ModelArgs
from dsray.layers import MLP, Linear, RMSNorm, linear
from experts import triton_moe
from experts.shard import ExpertShard
from router.exchange import Combine, MoEExchange
from router.expert_map import ExpertMap
from router.gate import Gate

EXPERT_MODES = ("grouped", "loop", "triton")


class Ready:
    """A routed result that is already computed (the same ``wait()`` as a ``Combine`` in flight)."""

    def __init__(self, value: torch.Tensor, includes_shared: bool = False):
        self.value = value
        self.includes_shared = includes_shared  # the fused single-token kernel adds the shared experts itself

    def wait(self) -> torch.Tensor:
        return self.value


def local_exchange(moes: list[MoE]) -> MoEExchange:
    """The local executor's exchange: a group of one that is its own expert rank, all experts in its slots."""
    num_experts = moes[0].gate.num_experts
    expert_map = ExpertMap.contiguous(num_experts, 1, len(moes))
    return MoEExchange(SelfTransport(), expert_map, compute=[moe.experts.run_sorted for moe in moes])


class MoE(nn.Module):
    """Gate, routed experts (through the MoE exchange) and the always-on shared experts.

    ``start`` scores the tokens and puts their rows on their way to the experts; ``finish`` runs
    the shared experts while they are away (``overlap_shared``), then adds the routed result. The
    exchange (``self.exchange``) is set after construction: the local one (``local_exchange``) or an
    attention worker's over the step group. ``expert_mode="loop"`` runs the readable per-expert
    loop on local experts instead (the oracle); ``"triton"`` runs a model's own experts as one fused
    Triton MoE (``experts/triton_moe.py``), and an expert rank's slots likewise (``run_sorted``).
    """

    def __init__(self, args: ModelArgs, moe_index: int, expert_mode: str = "grouped", with_experts: bool = True):
        super().__init__()
        if expert_mode not in EXPERT_MODES:
            raise ValueError(f"expert mode {expert_mode!r} is not supported; supported: {EXPERT_MODES}")
        self.moe_index = moe_index  # this layer's index among the MoE layers (the expert map's layer)
        self.gate = Gate(args)
        # Without local experts (an attention worker) the exchange sends rows to expert ranks.
        self.experts = (
            ExpertShard(range(args.n_routed_experts), args.hidden_size, args.moe_intermediate_size)
            if with_experts
            else None
        )
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts) if args.n_shared_experts else None
        )
        self.expert_mode = expert_mode  # also sets the shard's mode (the property below)
        self.exchange: MoEExchange | None = None
        self.overlap_shared = True
        # Tokens routed to each expert since start: the load the metrics export and placement reads.
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts, dtype=torch.int64), persistent=False)

    @property
    def expert_mode(self) -> str:
        return self._expert_mode

    @expert_mode.setter
    def expert_mode(self, mode: str) -> None:
        self._expert_mode = mode
        if self.experts is not None:
            self.experts.mode = "triton" if mode == "triton" else "grouped"

    def _fused_single_token(self, x: torch.Tensor) -> bool:
        return (
            x.shape[0] == 1
            and self.experts is not None
            and self.experts.inter_dim % 4 == 0
            and self.experts.w13.dtype == x.dtype  # not FP8
            and (self.shared_experts is None or self.shared_experts.gate_proj.out_features % 4 == 0)
            and (self.shared_experts is None or self.shared_experts.gate_proj.weight.dtype == x.dtype)  # not fp8
            and self.expert_mode == "grouped"
            and cpu_kernels.usable(x, max_rows=1)
        )

    def start(self, x: torch.Tensor) -> Ready | Combine:
        """Gate ``x [T, D]`` (T may be 0: an idle micro-batch still takes part in the exchange) and
        start the routed experts; with the fused single-token kernel, the shared experts too."""
        if not x.shape[0]:
            ids = torch.empty((0, self.gate.top_k), dtype=torch.int64, device=x.device)
            return self.exchange.start_round(self.moe_index, x, ids, ids.float())
        topk_weights, topk_ids = self.gate(x)  # [T, K]
        self.expert_load.add_(torch.bincount(topk_ids.reshape(-1), minlength=self.expert_load.shape[0]))
        if self._fused_single_token(x):
            # Batch-1 decode with local experts: routed and shared experts in one kernel call.
            shared = [self.shared_experts.swiglu_weights()] if self.shared_experts is not None else []
            routed = self.experts.single_token_experts(topk_ids, topk_weights)
            return Ready(cpu_kernels.swiglu_experts(x, routed, shared, checked=True), includes_shared=True)
        if self.expert_mode == "loop" and self.experts is not None:
            return Ready(self.experts.forward_loop(x, topk_ids, topk_weights))
        if self.expert_mode == "triton" and self.experts is not None:
            fused = self.experts.forward_fused(x, topk_ids, topk_weights)
            if fused is not None:
                return Ready(fused)
        return self.exchange.start_round(self.moe_index, x, topk_ids, topk_weights)

    def finish(self, x: torch.Tensor, routed: Ready | Combine) -> torch.Tensor:
        """The layer's output: routed result (waited for) plus the shared experts."""
        if self.shared_experts is None or not x.shape[0] or getattr(routed, "includes_shared", False):
            return routed.wait()
        if self.overlap_shared:
            shared = self.shared_experts(x)  # runs while the routed rows are away
            return routed.wait() + shared
        out = routed.wait()
        return out + self.shared_experts(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.start(x))


class Block(nn.Module):
    """One transformer layer in three steps, so micro-batches can interleave around the MoE exchange:
    ``attend`` (attention and residual, then the MLP's norm), ``start_mlp``, ``finish_mlp``."""

    def __init__(
        self,
        args: ModelArgs,
        layer_id: int,
        rope: RotaryEmbedding,
        mla_mode: str,
        expert_mode: str,
        with_experts: bool,
        moe_index: int | None,
    ):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args, rope, mla_mode)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(args, moe_index, expert_mode, with_experts)
            if moe_index is not None
            else MLP(args.hidden_size, args.intermediate_size)
        )

    def attend(
        self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` after attention (the residual stream) and the MLP's normed input."""
        if x.shape[0]:
            x = x + self.self_attn(self.input_layernorm(x), meta, kv_cache)
        return x, self.post_attention_layernorm(x)

    def start_mlp(self, h: torch.Tensor) -> Ready | Combine:
        return self.mlp.start(h) if isinstance(self.mlp, MoE) else Ready(self.mlp(h) if h.shape[0] else h)

    def finish_mlp(self, x: torch.Tensor, h: torch.Tensor, pending: Ready | Combine) -> torch.Tensor:
        return x + (self.mlp.finish(h, pending) if isinstance(self.mlp, MoE) else pending.wait())

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        x, h = self.attend(x, meta, kv_cache)
        return self.finish_mlp(x, h, self.start_mlp(h))


class Decoder(nn.Module):
    """HF's ``model.*`` submodule: embeddings, blocks and the final norm."""

    def __init__(self, args: ModelArgs, mla_mode: str, expert_mode: str, with_experts: bool = True):
        super().__init__()
        self.rope = RotaryEmbedding(args)  # tables only, no parameters: shared by every layer's MLA
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        moe_index = {layer_id: i for i, layer_id in enumerate(args.moe_layer_ids)}
        self.layers = nn.ModuleList(
            Block(args, i, self.rope, mla_mode, expert_mode, with_experts, moe_index.get(i))
            for i in range(args.num_hidden_layers)
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
        if expert_mode is not None:
            expert_mode = triton_moe.resolve_mode(expert_mode, self.lm_head.weight.device)
        if mla_mode is not None:
            mla_mode = resolve_mla_mode(mla_mode, self.lm_head.weight.device)
        for blk in self.model.layers:
            if mla_mode is not None:
                blk.self_attn.mode = mla_mode
            if expert_mode is not None and isinstance(blk.mlp, MoE):
                if expert_mode not in EXPERT_MODES:
                    raise ValueError(f"expert mode {expert_mode!r} is not supported; supported: {EXPERT_MODES}")
                blk.mlp.expert_mode = expert_mode

    def set_exchange(self, exchange: MoEExchange | None = None, overlap_shared: bool = True) -> None:
        """Route every MoE layer through ``exchange``; None: the local one (needs the local experts)."""
        moes = list(self.moe_layers.values())
        if moes:
            exchange = exchange or local_exchange(moes)
        for moe in moes:
            moe.exchange = exchange
            moe.overlap_shared = overlap_shared

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """``input_ids [T]`` → hidden ``[T, D]``; ``kv_cache [layers, slots, C + R]`` is read and written."""
        return self.forward_micro_batches([(input_ids, meta)], kv_cache)[0]

    def forward_micro_batches(
        self,
        batches: list[tuple[torch.Tensor, AttentionMetadata | None]],
        kv_cache: torch.Tensor,
        each: Callable[[int, torch.Tensor], None] | None = None,
    ) -> list[torch.Tensor]:
        """Run micro-batches ``[(input_ids [T_i], meta_i)]`` interleaved layer by layer → hidden ``[T_i, D]`` each.

        While one micro-batch's rows are at the experts, the next one's attention runs (two
        micro-batches: DeepSeek's overlap of computation and communication). Every layer starts
        each micro-batch's MLP in order and finishes it just before that micro-batch's next
        attention, so every rank issues its exchanges in the same order: layer by layer, micro-batch
        by micro-batch. A micro-batch may be empty (T_i = 0, meta None): it only takes part in the
        exchanges. ``each(i, hidden_i)`` runs as soon as micro-batch i's hidden is ready, while the later
        ones' last rows are still at the experts (the runner computes that micro-batch's logits there).
        """
        xs, metas = [], []
        for input_ids, meta in batches:
            if meta is not None:
                # Every layer rotates at the same positions: look the rotations up once per forward.
                meta = dataclasses.replace(meta, rope_cis=self.model.rope.cis(meta.positions))
            xs.append(self.model.embed_tokens(input_ids))  # [T_i, D]
            metas.append(meta)
        hs: list[torch.Tensor | None] = [None] * len(xs)
        pending: list = [None] * len(xs)
        prev: Block | None = None
        for i, blk in enumerate(self.model.layers):
            for b in range(len(xs)):
                if prev is not None:
                    xs[b] = prev.finish_mlp(xs[b], hs[b], pending[b])
                xs[b], hs[b] = blk.attend(xs[b], metas[b], kv_cache[i])
                pending[b] = blk.start_mlp(hs[b])
            prev = blk
        out = []
        for b, (x, h, p) in enumerate(zip(xs, hs, pending)):
            out.append(self.model.norm(prev.finish_mlp(x, h, p)))
            if each is not None:
                each(b, out[-1])
        return out

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert of each MoE layer since start: ``[num_moe_layers][E]``."""
        return [moe.expert_load.tolist() for moe in self.moe_layers.values()]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [N, D]`` → fp32 logits ``[N, V]``."""
        return linear(hidden, self.lm_head.weight).float()
