"""A whole decode step of a local model in one C call (``csrc/decode_step.c``).

On a CPU with dsray's kernels (``dsray/cpu_kernels.py``: AVX512-BF16 or AVX2), a decode step of a few tokens is
the same dozen kernel calls per layer; from Python they cost ~5 ms per step on ``small`` at one
token (module calls, argument checks, allocations) and another ~15 ms at 16 tokens (the MoE
dispatch's small torch ops), next to ~13 ms and ~80 ms of kernel work. ``DecodeStep`` collects a
``Transformer``'s weight pointers once; each step then passes only the token rows and attention
metadata, and C runs every layer with the same kernels and roundings as the Python path.

It takes a step when the model runs every layer here: absorbed MLA, every expert local with the
grouped kernels (the local executor's exchange), bf16 weights without biases, and the step is a
decode of 1 to ``MAX_TOKENS`` sequences. Everything else, and the reference it is tested against,
is ``Transformer.forward``, which gives the same bits: an expert of a decode batch has at most
``MAX_TOKENS`` rows, never past ``experts.shard.GROUPED_MAX_ROWS``, so it takes the grouped kernel on
both paths.
"""

from __future__ import annotations

import ctypes

import torch

from attention.metadata import AttentionMetadata
from dsray import cpu_kernels
from dsray.comm import SelfTransport
from dsray.model import MoE, Transformer
from router.gate import KERNEL_MAX_TOKENS

MAX_TOKENS = min(cpu_kernels.GEMM_MAX_ROWS, KERNEL_MAX_TOKENS)

_p = ctypes.c_void_p
_f = ctypes.c_float
_i = ctypes.c_int


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _p) for name in ("input_norm", "post_norm", "q_a", "q_a_norm", "q_b", "kv_a", "kv_norm")),
        *((name, _p) for name in ("w_uk_t", "w_uv", "o_proj", "mlp_gate", "mlp_up", "mlp_down")),
        *((name, _p) for name in ("router", "router_bias", "w13", "w2", "expert_load")),
        *((name, _f) for name in ("input_eps", "post_eps", "q_a_eps", "kv_eps")),
        ("mlp_inter", _i),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.POINTER(_Layer)),
        ("final_norm", _p),
        *((name, _f) for name in ("final_eps", "softmax_scale", "routed_scaling")),
        *((name, _i) for name in ("num_layers", "D", "H", "d_nope", "R", "C", "d_v", "q_rank")),
        *((name, _i) for name in ("E", "K", "moe_inter", "n_group", "topk_group", "scoring", "method", "norm_topk")),
        ("interleaved", _i),
        ("block_size", _i),
    ]


def _bf16(*tensors: torch.Tensor | None) -> bool:
    return all(t is not None and t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)


def why_not(model: Transformer) -> str | None:
    """Why ``model`` cannot take ``DecodeStep`` (None: it can)."""
    if not cpu_kernels.available():
        return "the CPU kernels are not available"
    if model.lm_head.weight.device.type != "cpu":
        return "the model is not on the CPU"
    for blk in model.model.layers:
        attn = blk.self_attn
        if attn.mode != "absorbed" or not attn._kernel_shapes:
            return f"layer {blk.layer_id}: MLA mode {attn.mode!r} or shapes the decode kernel does not take"
        projections = [attn.q_a_proj, attn.q_b_proj] if attn.q_lora_rank else [attn.q_proj]
        projections += [attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj]
        norms = [blk.input_layernorm, blk.post_attention_layernorm, attn.kv_a_layernorm]
        norms += [attn.q_a_layernorm] if attn.q_lora_rank else []
        if any(p.bias is not None for p in projections) or not _bf16(*(m.weight for m in projections + norms)):
            return f"layer {blk.layer_id}: attention weights with a bias, or not contiguous bf16"
        mlp = blk.mlp
        if isinstance(mlp, MoE):
            experts, num_experts = mlp.experts, mlp.gate.num_experts
            if experts is None or mlp.expert_mode != "grouped" or experts.expert_ids != list(range(num_experts)):
                return f"layer {blk.layer_id}: experts not all here, or not in the grouped mode"
            if not isinstance(mlp.exchange.transport, SelfTransport) or mlp.exchange.map.num_slots != num_experts:
                return f"layer {blk.layer_id}: the MoE exchange is not the local one"
            if not _bf16(experts.w13, experts.w2) or experts.inter_dim % 4:
                return f"layer {blk.layer_id}: expert weights not contiguous bf16, or an odd intermediate size"
            gate = mlp.gate
            bias = gate.e_score_correction_bias
            if gate.weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
                return f"layer {blk.layer_id}: the gate is not fp32"
            mlp = mlp.shared_experts
        if mlp is not None and (
            not _bf16(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight) or mlp.gate_proj.out_features % 4
        ):
            return f"layer {blk.layer_id}: MLP weights not contiguous bf16, or an odd intermediate size"
    return None


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


class DecodeStep:
    """``model``'s decode steps of 1 to ``MAX_TOKENS`` tokens as one kernel call (check ``why_not`` first)."""

    def __init__(self, model: Transformer):
        reason = why_not(model)
        if reason is not None:
            raise ValueError(f"DecodeStep: {reason}")
        self.model = model
        self._watched_modules = self._watched(model)
        self.key = self._key(self._watched_modules)
        args = model.args
        self._keep: list[torch.Tensor] = []  # tensors whose pointers the tables hold, made here
        layers = (_Layer * args.num_hidden_layers)()
        moe_inter = 0
        for blk, layer in zip(model.model.layers, layers):
            self._fill(blk, layer)
            if isinstance(blk.mlp, MoE):
                moe_inter = blk.mlp.experts.inter_dim
        first_moe = next(iter(model.moe_layers.values()), None)
        gate = first_moe.gate if first_moe is not None else None
        self._layers = layers
        self._model = _Model(
            layers=layers,
            final_norm=model.model.norm.weight.data_ptr(),
            final_eps=model.model.norm.eps,
            softmax_scale=args.softmax_scale,
            routed_scaling=gate.routed_scaling_factor if gate else 1.0,
            num_layers=args.num_hidden_layers,
            D=args.hidden_size,
            H=args.num_attention_heads,
            d_nope=args.qk_nope_head_dim,
            R=args.qk_rope_head_dim,
            C=args.kv_lora_rank,
            d_v=args.v_head_dim,
            q_rank=args.q_lora_rank or 0,
            E=gate.num_experts if gate else 0,
            K=gate.top_k if gate else 0,
            moe_inter=moe_inter,
            n_group=(gate.n_group or 1) if gate else 1,
            topk_group=(gate.topk_group or 1) if gate else 1,
            scoring=cpu_kernels.GATE_SCORING[gate.scoring_func] if gate else 0,
            method=cpu_kernels.GATE_METHODS[gate.topk_method] if gate else 0,
            norm_topk=int(gate.norm_topk_prob) if gate else 0,
            interleaved=int(model.model.rope.interleaved),
            block_size=0,
        )

    def _fill(self, blk, layer: _Layer) -> None:
        attn = blk.self_attn
        pre, post = blk.input_layernorm, blk.post_attention_layernorm
        layer.input_norm, layer.input_eps = pre.weight.data_ptr(), pre.eps
        layer.post_norm, layer.post_eps = post.weight.data_ptr(), post.eps
        if attn.q_lora_rank:
            layer.q_a, layer.q_b = attn.q_a_proj.weight.data_ptr(), attn.q_b_proj.weight.data_ptr()
            layer.q_a_norm, layer.q_a_eps = attn.q_a_layernorm.weight.data_ptr(), attn.q_a_layernorm.eps
        else:
            layer.q_b = attn.q_proj.weight.data_ptr()
        layer.kv_a = attn.kv_a_proj_with_mqa.weight.data_ptr()
        layer.kv_norm, layer.kv_eps = attn.kv_a_layernorm.weight.data_ptr(), attn.kv_a_layernorm.eps
        w_uk_t, w_uv = attn._kernel_weights()
        self._keep += [w_uk_t, w_uv]
        layer.w_uk_t, layer.w_uv = w_uk_t.data_ptr(), w_uv.data_ptr()
        layer.o_proj = attn.o_proj.weight.data_ptr()
        mlp = blk.mlp
        if isinstance(mlp, MoE):
            layer.router, layer.router_bias = mlp.gate.weight.data_ptr(), _ptr(mlp.gate.e_score_correction_bias)
            layer.w13, layer.w2 = mlp.experts.w13.data_ptr(), mlp.experts.w2.data_ptr()
            layer.expert_load = mlp.expert_load.data_ptr()
            mlp = mlp.shared_experts
        if mlp is not None:
            layer.mlp_gate, layer.mlp_up = mlp.gate_proj.weight.data_ptr(), mlp.up_proj.weight.data_ptr()
            layer.mlp_down, layer.mlp_inter = mlp.down_proj.weight.data_ptr(), mlp.gate_proj.out_features

    @staticmethod
    def _watched(model: Transformer) -> list[tuple]:
        """Per layer, what ``_key`` reads: the attention module, the parameter dicts of ``kv_b_proj`` and
        ``o_proj``, and the MoE (with its shard's parameters) or the dense MLP's ``down_proj`` parameters.
        Found once: ``nn.Module`` attribute lookups cost ~0.2 ms a step for ``small`` when made each time."""
        watched = []
        for blk in model.model.layers:
            attn, mlp = blk.self_attn, blk.mlp
            if isinstance(mlp, MoE):
                tail = (mlp, mlp.experts._parameters if mlp.experts is not None else None)
            else:
                tail = (None, mlp.down_proj._parameters)
            watched.append((attn, attn.kv_b_proj._parameters, attn.o_proj._parameters, *tail))
        return watched

    @staticmethod
    def _key(watched: list[tuple]) -> tuple:
        """What the tables were built from: every weight storage and mode they depend on."""
        return tuple(
            (
                attn.mode,
                kv_b["weight"].data_ptr(),
                o_proj["weight"].data_ptr(),
                *(
                    (moe.expert_mode, moe.exchange, params and params["w13"].data_ptr())
                    if moe is not None
                    else (params["weight"].data_ptr(),)
                ),
            )
            for attn, kv_b, o_proj, moe, params in watched
        )

    def valid_for(self, model: Transformer) -> bool:
        """Whether the tables still describe ``model`` (no weights reloaded, no mode or exchange switched)."""
        return model is self.model and cpu_kernels.available() and self._key(self._watched_modules) == self.key

    @staticmethod
    def takes(meta: AttentionMetadata | None, input_ids: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether a micro-batch is a decode step this path runs."""
        return (
            meta is not None
            and meta.is_decode_only
            and 1 <= input_ids.shape[0] <= MAX_TOKENS
            and kv_cache.dtype == torch.bfloat16
            and kv_cache.is_contiguous()
            and kv_cache.device.type == "cpu"
        )

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """``input_ids [N]`` (one new token per sequence) → final-normed hidden ``[N, D]``, as ``model.forward``."""
        N = input_ids.shape[0]
        model = self.model
        x = model.model.embed_tokens(input_ids)  # [N, D]
        cis = torch.view_as_real(model.model.rope.cis(meta.positions)).reshape(N, -1).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        tables = meta.block_tables.to(torch.int64).contiguous()
        lens = meta.context_lens_t.to(torch.int64).contiguous()
        self._model.block_size = meta.block_size
        out = torch.empty_like(x)
        failed = cpu_kernels.decode_step(
            ctypes.byref(self._model), N, x.data_ptr(), cis.data_ptr(), slots.data_ptr(), kv_cache.data_ptr(),
            kv_cache.stride(0), tables.data_ptr(), tables.stride(0), lens.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        if failed:
            raise MemoryError(f"decode step of {N} tokens: no memory for its scratch buffers")
        return out
