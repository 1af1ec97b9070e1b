"""Checkpoint tensor names per role, and loading them into a ``Transformer``.

A role reads only its own tensors: the attention side (everything but routed experts) or the
experts in an expert rank's slots, per MoE layer. HF checkpoints store each routed expert's
``gate_proj``/``up_proj``/``down_proj`` separately; we stack them per shard.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attention.mla import resolve_mode as resolve_mla_mode
from dsray.checkpoint import SCALE_SUFFIX, Checkpoint
from dsray.config import ModelArgs
from dsray.fp8 import scale_shape
from dsray.fp8_gemm import resolve_fp8_weights
from dsray.model import Transformer
from experts import triton_moe
from experts.shard import ExpertShard

FP32_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
# MLA reads kv_b_proj as a matrix (absorbed into the query and the output), so it is dequantised.
FP8_DEQUANTIZED = (".self_attn.kv_b_proj.weight",)


def attention_tensor_specs(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor but the routed experts: what an attention worker (or the full model) reads."""
    D, H = args.hidden_size, args.num_attention_heads
    specs: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab_size, D), "model.norm.weight": (D,)}
    if not args.tie_word_embeddings:
        specs["lm_head.weight"] = (args.vocab_size, D)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        specs[p + "input_layernorm.weight"] = (D,)
        specs[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if args.q_lora_rank:
            specs[a + "q_a_proj.weight"] = (args.q_lora_rank, D)
            specs[a + "q_a_layernorm.weight"] = (args.q_lora_rank,)
            specs[a + "q_b_proj.weight"] = (H * args.qk_head_dim, args.q_lora_rank)
            if args.attention_bias:
                specs[a + "q_a_proj.bias"] = (args.q_lora_rank,)
        else:
            specs[a + "q_proj.weight"] = (H * args.qk_head_dim, D)
        specs[a + "kv_a_proj_with_mqa.weight"] = (args.kv_cache_dim, D)
        specs[a + "kv_a_layernorm.weight"] = (args.kv_lora_rank,)
        specs[a + "kv_b_proj.weight"] = (H * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank)
        specs[a + "o_proj.weight"] = (D, H * args.v_head_dim)
        if args.attention_bias:
            specs[a + "kv_a_proj_with_mqa.bias"] = (args.kv_cache_dim,)
            specs[a + "o_proj.bias"] = (D,)
        if args.is_moe_layer(i):
            specs[p + "mlp.gate.weight"] = (args.n_routed_experts, D)
            if args.topk_method == "noaux_tc":
                specs[p + "mlp.gate.e_score_correction_bias"] = (args.n_routed_experts,)
            if args.n_shared_experts:
                _mlp_specs(specs, p + "mlp.shared_experts.", D, args.moe_intermediate_size * args.n_shared_experts)
        else:
            _mlp_specs(specs, p + "mlp.", D, args.intermediate_size)
    return specs


def expert_tensor_specs(args: ModelArgs, experts: dict[int, list[int] | range]) -> dict[str, tuple[int, ...]]:
    """The routed experts ``experts[layer_id]`` of each MoE layer: what an expert worker reads."""
    specs: dict[str, tuple[int, ...]] = {}
    for i, ids in experts.items():
        for e in ids:
            _mlp_specs(specs, f"model.layers.{i}.mlp.experts.{e}.", args.hidden_size, args.moe_intermediate_size)
    return specs


def _mlp_specs(specs: dict[str, tuple[int, ...]], prefix: str, dim: int, inter: int) -> None:
    specs[prefix + "gate_proj.weight"] = (inter, dim)
    specs[prefix + "up_proj.weight"] = (inter, dim)
    specs[prefix + "down_proj.weight"] = (dim, inter)


def keep_fp32(name: str) -> bool:
    """The gate scores experts in fp32 whatever the model dtype (as HF and DeepSeek do)."""
    return name.endswith(FP32_SUFFIXES)


def keep_fp8(name: str) -> bool:
    """With ``fp8_weights="keep"``, the FP8 tensors that stay FP8: the ``Linear`` weights and the
    routed experts (stacked per shard with their scales)."""
    return name.endswith("proj.weight") and not name.endswith(FP8_DEQUANTIZED)


def load_expert_shard_fp8(
    shard: ExpertShard, tensors: dict[str, torch.Tensor], layer_id: int, block_size: tuple[int, int], device
) -> None:
    """Stack FP8 experts of ``shard``'s slots of one layer as stored (float8_e4m3fn) with their block
    scales: ``w13`` gate rows then up rows, and their scales likewise (see ``triton_moe.Fp8Scales``)."""

    def stack(names: tuple[str, ...], suffix: str) -> torch.Tensor:
        prefix = f"model.layers.{layer_id}.mlp.experts."
        parts = [torch.cat([tensors.pop(f"{prefix}{e}.{n}.{suffix}") for n in names]) for e in shard.expert_ids]
        return torch.stack(parts).to(device)

    gate_up, down, scale = ("gate_proj", "up_proj"), ("down_proj",), "weight" + SCALE_SUFFIX
    scales = triton_moe.Fp8Scales(stack(gate_up, scale), stack(down, scale), block_size)
    shard.hold_fp8(stack(gate_up, "weight"), stack(down, "weight"), scales)


def fill_expert_slots_fp8(
    shard: ExpertShard,
    tensors: dict[str, torch.Tensor],
    layer_id: int,
    block_size: tuple[int, int],
    previous: ExpertShard | None = None,
    check: bool = True,
) -> list[int]:
    """``fill_expert_slots`` for FP8 experts kept FP8 (an expert worker with ``fp8_weights="keep"``):
    ``shard`` comes to hold float8_e4m3fn stacks with their block scales (``hold_fp8``, the layout of
    ``load_expert_shard_fp8``). Experts ``previous`` holds are copied from it, scales with weights;
    the others come from ``tensors`` (read with ``keep_fp8``: weights as stored, scales beside them)
    and, with ``check``, are compared bit for bit with them after stacking. Returns the experts taken
    from the checkpoint."""
    num, inter, dim = shard.num_local_experts, shard.inter_dim, shard.w13.shape[2]
    if previous is not None and previous.num_local_experts and previous.fp8_scales is None:
        raise ValueError(f"layer {layer_id}: FP8 slots cannot be copied from a shard holding {previous.w13.dtype}")
    gate_rows = scale_shape((inter, dim), block_size)[0]
    w13 = torch.empty(num, 2 * inter, dim, dtype=torch.float8_e4m3fn)
    w2 = torch.empty(num, dim, inter, dtype=torch.float8_e4m3fn)
    s13 = torch.empty(num, 2 * gate_rows, scale_shape((inter, dim), block_size)[1])
    s2 = torch.empty(num, *scale_shape((dim, inter), block_size))
    parts = ((w13, s13, "gate_proj", slice(0, inter), slice(0, gate_rows)),)
    parts += ((w13, s13, "up_proj", slice(inter, None), slice(gate_rows, None)),)
    parts += ((w2, s2, "down_proj", slice(None), slice(None)),)
    loaded = []
    for local, e in enumerate(shard.expert_ids):
        if previous is not None and e in previous.local_of:
            held, scales = previous.local_of[e], previous.fp8_scales
            w13[local].copy_(previous.w13.data[held])
            w2[local].copy_(previous.w2.data[held])
            s13[local].copy_(scales.w13[held])
            s2[local].copy_(scales.w2[held])
            continue
        p = f"model.layers.{layer_id}.mlp.experts.{e}."
        for weight, scale, name, rows, scale_rows in parts:
            want, want_scale = tensors[p + name + ".weight"], tensors[p + name + ".weight" + SCALE_SUFFIX]
            if want.dtype != torch.float8_e4m3fn:
                raise ValueError(f"expert {e} of layer {layer_id}: {name} was read as {want.dtype}, not FP8")
            weight[local, rows].copy_(want)
            scale[local, scale_rows].copy_(want_scale)
            if check and not (
                torch.equal(weight[local, rows].view(torch.uint8), want.view(torch.uint8))
                and torch.equal(scale[local, scale_rows], want_scale.float())
            ):
                raise ValueError(f"expert {e} of layer {layer_id}: {name} in its new slot differs from the checkpoint")
        loaded.append(e)
    shard.hold_fp8(w13, w2, triton_moe.Fp8Scales(s13, s2, tuple(block_size)))
    return loaded


def load_expert_shard(shard: ExpertShard, tensors: dict[str, torch.Tensor], layer_id: int) -> None:
    """Stack the experts of ``shard``'s slots of one layer into ``w13``/``w2``."""
    fill_expert_slots(shard, tensors, layer_id, previous=None, check=False)


def fill_expert_slots(
    shard: ExpertShard,
    tensors: dict[str, torch.Tensor],
    layer_id: int,
    previous: ExpertShard | None = None,
    check: bool = True,
) -> list[int]:
    """Fill ``shard``'s slots of one layer: experts ``previous`` holds are copied from it, the others
    come from ``tensors`` (read from the checkpoint) and, with ``check``, are compared with them
    after stacking (a rebalance never serves a slot that differs from its checkpoint expert).
    Returns the experts taken from the checkpoint."""
    inter, loaded = shard.inter_dim, []
    for local, e in enumerate(shard.expert_ids):
        if previous is not None and e in previous.local_of:
            shard.w13.data[local].copy_(previous.w13.data[previous.local_of[e]])
            shard.w2.data[local].copy_(previous.w2.data[previous.local_of[e]])
            continue
        p = f"model.layers.{layer_id}.mlp.experts.{e}."
        shard.w13.data[local, :inter].copy_(tensors[p + "gate_proj.weight"])
        shard.w13.data[local, inter:].copy_(tensors[p + "up_proj.weight"])
        shard.w2.data[local].copy_(tensors[p + "down_proj.weight"])
        loaded.append(e)
        if not check:
            continue
        checks = (
            (shard.w13.data[local, :inter], "gate_proj"),
            (shard.w13.data[local, inter:], "up_proj"),
            (shard.w2.data[local], "down_proj"),
        )
        for got, name in checks:
            want = tensors[p + name + ".weight"].to(got.dtype)
            if not torch.equal(got.cpu(), want):
                raise ValueError(f"expert {e} of layer {layer_id}: {name} in its new slot differs from the checkpoint")
    return loaded


def load_transformer(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    mla_mode: str = "absorbed",
    expert_mode: str = "grouped",
    progress: bool = True,
    with_experts: bool = True,
    fp8_weights: str = "dequantize",
) -> Transformer:
    """Build the model from a checkpoint directory: the attention side and, ``with_experts``, every
    routed expert (without them, it reads no expert tensor: an attention worker's role). With
    ``fp8_weights="keep"`` an FP8 checkpoint's ``Linear`` weights stay FP8 (``keep_fp8``)."""
    fp8_weights = resolve_fp8_weights(fp8_weights, device)  # auto → keep on a GPU with FP8; keep checked
    mla_mode = resolve_mla_mode(mla_mode, device)  # auto → this device's fast path; triton checked here
    expert_mode = triton_moe.resolve_mode(expert_mode, device)  # auto → this device's path; triton checked
    args = ModelArgs.from_pretrained(path)
    with torch.device("meta"):
        model = Transformer(args, mla_mode, expert_mode, with_experts)
    model = model.to_empty(device=device).to(dtype)
    for moe in model.moe_layers.values():
        moe.gate.float()
        moe.expert_load.zero_()
    specs = attention_tensor_specs(args)
    if with_experts:
        specs |= expert_tensor_specs(args, {i: range(args.n_routed_experts) for i in args.moe_layer_ids})
    checkpoint = Checkpoint(path)
    keep = keep_fp8 if fp8_weights == "keep" else None
    tensors = checkpoint.load(specs, dtype=dtype, keep_fp32=keep_fp32, progress=progress, keep_fp8=keep)
    params = dict(model.named_parameters())
    for name in attention_tensor_specs(args):
        tensor = tensors.pop(name).to(device)  # take the loaded tensor; no second copy on CPU
        if tensor.dtype == torch.float8_e4m3fn:
            scale_inv = tensors.pop(name + SCALE_SUFFIX).to(device)
            model.get_submodule(name.removesuffix(".weight")).hold_fp8(tensor, scale_inv, checkpoint.block_size)
        else:
            params[name].data = tensor
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if with_experts:
        for layer_id, moe in model.moe_layers.items():
            first = f"model.layers.{layer_id}.mlp.experts.0.gate_proj.weight"
            if tensors[first].dtype == torch.float8_e4m3fn:
                load_expert_shard_fp8(moe.experts, tensors, layer_id, checkpoint.block_size, device)
            else:
                load_expert_shard(moe.experts, tensors, layer_id)
        model.set_exchange()
    return model.eval()
