"""Expert shards that split experts unevenly, and FP8 block-quantised checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsray.checkpoint import Checkpoint, MissingTensorError
from dsray.config import ModelArgs
from dsray.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from dsray.simple_generate import SingleSequence
from dsray.testing import make_hf_checkpoint
from dsray.weights import expert_tensor_specs, keep_fp32, load_expert_shard, load_transformer
from experts.shard import ExpertShard


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3")
    make_hf_checkpoint("v3", path)
    return path


def _grouped(shard: ExpertShard, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The shard's grouped path (``run_sorted``) over the pairs routed to its experts, combined."""
    token_ids, k = torch.where(torch.isin(ids, torch.tensor(shard.expert_ids)))
    local = torch.tensor([shard.local_of[int(e)] for e in ids[token_ids, k]], dtype=torch.int64)
    order = torch.argsort(local, stable=True)
    counts = torch.bincount(local, minlength=shard.num_local_experts).tolist()
    y = shard.run_sorted(x[token_ids[order]], counts)  # [M, D]
    out = torch.zeros_like(x)
    out.index_add_(0, token_ids[order], y * weights[token_ids[order], k[order], None])
    return out


def test_uneven_expert_shards_sum_to_the_full_layer(v3_dir):
    """16 experts over 3 shards (6, 5, 5), each loaded on its own, add up to all experts."""
    args = ModelArgs.from_pretrained(v3_dir)
    model = load_transformer(v3_dir, torch.float32, progress=False)
    layer_id, moe = next(iter(model.moe_layers.items()))
    x = torch.randn(23, args.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, ids = moe.gate(x)
    full = moe.experts.forward_loop(x, ids, weights)
    ranges = [(0, 6), (6, 11), (11, 16)]
    loop_sum = torch.zeros_like(full)
    grouped_sum = torch.zeros_like(full)
    for first, end in ranges:
        ckpt = Checkpoint(v3_dir)
        specs = expert_tensor_specs(args, {layer_id: range(first, end)})
        tensors = ckpt.load(specs, dtype=torch.float32, progress=False)
        assert not any(".mlp.experts." not in name for name in tensors)  # an expert role reads experts only
        shard = ExpertShard(range(first, end), args.hidden_size, args.moe_intermediate_size)
        load_expert_shard(shard, tensors, layer_id)
        loop_sum += shard.forward_loop(x, ids, weights)
        grouped_sum += _grouped(shard, x, ids, weights)
    assert (loop_sum - full).abs().max().item() <= 1e-6
    assert (grouped_sum - full).abs().max().item() <= 1e-6


def _fake_quantize(w: torch.Tensor, block) -> torch.Tensor:
    return dequantize_fp8_blocks(*quantize_fp8_blocks(w, block), block, torch.float32)


def _quantize_checkpoint(src, dst, block=(128, 128)):
    """Rewrite a checkpoint in the V3 FP8 layout: linear weights e4m3 plus ``weight_scale_inv``."""
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        quantize = t.dim() == 2 and name.endswith("proj.weight") and not keep_fp32(name)
        if quantize:
            out[name], out[name + "_scale_inv"] = quantize_fp8_blocks(t, block)
        else:
            out[name] = t
    dst.mkdir()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_fp8_checkpoint_loads_close_to_the_unquantised_model(v3_dir, tmp_path, block):
    fp8_dir = tmp_path / "fp8"
    _quantize_checkpoint(v3_dir, fp8_dir, block)
    assert ModelArgs.from_pretrained(fp8_dir).quantization.weight_block_size == block
    ids = list(range(2, 40))
    ref = SingleSequence(load_transformer(v3_dir, torch.float32, progress=False), 64).extend(ids)
    ours = SingleSequence(load_transformer(fp8_dir, torch.float32, progress=False), 64).extend(ids)
    # Loading must be exact: the same as dequantising every weight in memory (experts per HF tensor).
    simulated = load_transformer(v3_dir, torch.float32, progress=False)
    for name, param in simulated.named_parameters():
        if param.dim() == 2 and name.endswith("proj.weight"):
            param.data.copy_(_fake_quantize(param.data, block))
    for moe in simulated.moe_layers.values():
        inter = moe.experts.inter_dim
        for w13, w2 in zip(moe.experts.w13.data, moe.experts.w2.data):
            w13[:inter], w13[inter:] = _fake_quantize(w13[:inter], block), _fake_quantize(w13[inter:], block)
            w2.copy_(_fake_quantize(w2, block))
    expected = SingleSequence(simulated, 64).extend(ids)
    assert (ours - expected).abs().max().item() <= 1e-5
    rel = ((ours - ref).norm() / ref.norm()).item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"[fp8] block {block}: relative logit error vs unquantised {rel:.2e}, top-1 agreement {agree:.2f}")
    assert rel <= 0.2


def test_missing_expert_tensor_is_named(v3_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(v3_dir / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.7.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    (broken / "config.json").write_text((v3_dir / "config.json").read_text())
    with pytest.raises(MissingTensorError, match=r"model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight"):
        load_transformer(broken, torch.float32, progress=False)


def test_misshaped_tensor_names_tensor_and_shapes(v3_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(v3_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 5)
    save_file(tensors, broken / "model.safetensors")
    (broken / "config.json").write_text((v3_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"kv_b_proj\.weight.*\(3, 5\)"):
        load_transformer(broken, torch.float32, progress=False)
