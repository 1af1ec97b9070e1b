"""FP8 weights kept in FP8 (``fp8_weights="keep"``): the block-scaled Triton GEMM against
dequantise-then-matmul, and a whole FP8 checkpoint loaded both ways. Without a GPU the kernel runs
in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set for this module before the
kernel is built); on a GPU the same tests run the compiled kernel on CUDA tensors.

The kernel multiplies the exact fp8 values and scales each K block's partial sum in fp32, where
the reference rounds every dequantised weight to the activation dtype first: fp32 agrees to
rounding noise, bf16/fp16 to a step of the output's dtype.
"""

from __future__ import annotations

import pytest
import torch

from dsray import fp8_gemm
from dsray.fp8 import quantize_fp8_blocks
from dsray.layers import Linear
from dsray.simple_generate import greedy_generate
from dsray.testing import make_fp8_checkpoint, make_hf_checkpoint, triton_as_this_machine_runs_it
from dsray.weights import load_transformer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}  # × output scale


@pytest.fixture(scope="module", autouse=True)
def triton_runs_here():
    """CPU: the interpreter; GPU: compiled kernels, whatever another module set. Rebuilt after."""
    with triton_as_this_machine_runs_it(fp8_gemm._kernel):
        yield


def test_the_kernel_is_interpreted_on_cpu_and_compiled_on_gpu():
    _, kernel = fp8_gemm._kernel()
    assert type(kernel).__name__ == ("JITFunction" if CUDA else "InterpretedFunction")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "rows, out_features, in_features, block",
    [
        (1, 64, 64, (16, 32)),  # one decode row, whole blocks
        (5, 48, 40, (16, 16)),  # partial K block
        (17, 100, 72, (32, 32)),  # partial blocks on both edges, rows past one tile
        (3, 130, 200, (128, 128)),  # DeepSeek-V3's block size, both edges partial
    ],
)
def test_fp8_gemm_equals_dequantize_then_matmul(dtype, rows, out_features, in_features, block):
    g = torch.Generator().manual_seed(rows)
    weight, scale_inv = quantize_fp8_blocks(torch.randn(out_features, in_features, generator=g), block)
    weight, scale_inv = weight.to(DEVICE), scale_inv.to(DEVICE)
    x = torch.randn(2, rows, in_features, generator=g).to(dtype).to(DEVICE)  # leading dims are kept
    got = fp8_gemm.fp8_linear(x, weight, scale_inv, block)
    want = fp8_gemm.fp8_linear_reference(x.float(), weight, scale_inv, block)  # fp32 truth
    assert got.dtype == dtype and got.shape == (2, rows, out_features)
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= TOLERANCE[dtype] * scale


def test_a_linear_holding_fp8_uses_the_gemm_and_its_bias():
    block = (32, 32)
    weight, scale_inv = quantize_fp8_blocks(torch.randn(40, 48), block)
    layer = Linear(48, 40, bias=True).to(DEVICE)
    layer.bias.data = torch.randn(40, device=DEVICE)
    layer.hold_fp8(weight.to(DEVICE), scale_inv.to(DEVICE), block)
    weight, scale_inv = layer.weight, layer.weight_scale_inv
    x = torch.randn(3, 48, device=DEVICE)
    want = fp8_gemm.fp8_linear_reference(x, weight, scale_inv, block, layer.bias)
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert (layer(x) - want).abs().max().item() <= 1e-5


def test_a_block_size_the_kernel_cannot_tile_falls_back_to_the_reference():
    block = (8, 8)  # K block below 16: no K tile fits in one scale block
    weight, scale_inv = quantize_fp8_blocks(torch.randn(24, 40), block)
    weight, scale_inv = weight.to(DEVICE), scale_inv.to(DEVICE)
    x = torch.randn(4, 40, device=DEVICE)
    want = fp8_gemm.fp8_linear_reference(x, weight, scale_inv, block)
    assert torch.equal(fp8_gemm.fp8_linear(x, weight, scale_inv, block), want)


@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_keep_gives_the_greedy_tokens_of_dequantize(tmp_path, block):
    """Linear layers and routed experts kept FP8; the experts both in the fused Triton MoE (weights as
    stored) and on the torch grouped path (each slot dequantised when used)."""
    make_hf_checkpoint("v3", tmp_path / "v3")
    make_fp8_checkpoint(tmp_path / "v3", tmp_path / "fp8", block)
    dequantized = load_transformer(tmp_path / "fp8", torch.float32, DEVICE, fp8_weights="dequantize", progress=False)
    assert dequantized.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float32
    prompt = torch.randint(2, 512, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = greedy_generate(dequantized, prompt, 8)
    for expert_mode in ("triton", "grouped"):
        kept = load_transformer(
            tmp_path / "fp8", torch.float32, DEVICE, expert_mode=expert_mode, fp8_weights="keep", progress=False
        )
        attn, experts = kept.model.layers[0].self_attn, kept.model.layers[1].mlp.experts
        assert attn.q_a_proj.weight.dtype == torch.float8_e4m3fn  # stays fp8 in memory
        assert attn.kv_b_proj.weight.dtype == torch.float32  # MLA reads it as a matrix
        assert kept.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn  # the dense MLP
        assert experts.w13.dtype == experts.w2.dtype == torch.float8_e4m3fn
        assert greedy_generate(kept, prompt, 8) == expected, expert_mode


def test_fp8_experts_in_the_fused_moe_equal_the_dequantised_loop():
    """The fused MoE reading FP8 expert stacks and their scales (gate and up scaled separately; D and I
    not multiples of the blocks) against the loop over the same experts dequantised."""
    from experts import triton_moe
    from experts.shard import ExpertShard

    slots, dim, inter, block = 4, 72, 40, (16, 32)
    g = torch.Generator().manual_seed(0)
    shard = ExpertShard(range(slots), dim, inter, "triton")
    w13, s13, w2, s2 = [], [], [], []
    for _ in range(slots):
        gate, up = (quantize_fp8_blocks(torch.randn(inter, dim, generator=g) * dim**-0.5, block) for _ in "gu")
        down = quantize_fp8_blocks(torch.randn(dim, inter, generator=g) * inter**-0.5, block)
        w13.append(torch.cat([gate[0], up[0]]))
        s13.append(torch.cat([gate[1], up[1]]))
        w2.append(down[0])
        s2.append(down[1])
    scales = triton_moe.Fp8Scales(torch.stack(s13).to(DEVICE), torch.stack(s2).to(DEVICE), block)
    shard.hold_fp8(torch.stack(w13).to(DEVICE), torch.stack(w2).to(DEVICE), scales)
    x = torch.randn(9, dim, generator=g).to(DEVICE)
    ids = torch.tensor([[0, 2], [2, 3], [0, 3]] * 3, device=DEVICE)  # expert 1 idle
    weights = torch.rand(9, 2, generator=g).to(DEVICE)
    want = shard.forward_loop(x, ids, weights)
    got = shard.forward_fused(x, ids, weights)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    counts = [3, 0, 5, 2]
    rows = torch.randn(10, dim, generator=g).to(DEVICE)
    shard.mode = "grouped"
    want = shard.run_sorted(rows, counts)
    shard.mode = "triton"
    assert (shard.run_sorted(rows, counts) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_keep_is_refused_at_start_where_it_cannot_run(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fp8_weights='keep'.*TRITON_INTERPRET=1"):
        load_transformer(tmp_path, fp8_weights="keep", progress=False)  # before reading anything
    assert fp8_gemm.resolve_fp8_weights("auto", "cpu") == "dequantize"
