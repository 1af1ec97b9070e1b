"""The fused Triton MoE (``expert_mode="triton"``) against the readable references. Without a GPU the
kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set for this module
before the kernels are built); on a GPU the same tests run the compiled kernels on CUDA tensors.

The kernel rounds the gate/up products, the SwiGLU and the down product to the activation dtype
where ``ExpertShard.expert_ffn`` does; only the order of fp32 additions inside a dot product
differs. fp32 agrees to rounding noise; bf16/fp16 to a few steps of the dtype at the output's scale
(a gate/up value that lands on the other side of a rounding boundary moves the SwiGLU by a step).
"""

from __future__ import annotations

import logging

import pytest
import torch

from dsray.simple_generate import greedy_generate
from dsray.testing import make_hf_checkpoint, triton_as_this_machine_runs_it
from dsray.weights import load_transformer
from experts import triton_moe
from experts.shard import ExpertShard

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11}  # × output scale


@pytest.fixture(scope="module", autouse=True)
def triton_runs_here():
    """CPU: the interpreter; GPU: compiled kernels, whatever another module set. Rebuilt after."""
    with triton_as_this_machine_runs_it(triton_moe._kernels):
        yield


def test_the_kernels_are_interpreted_on_cpu_and_compiled_on_gpu():
    _, gate_up, down = triton_moe._kernels()
    kind = "JITFunction" if CUDA else "InterpretedFunction"
    assert type(gate_up).__name__ == type(down).__name__ == kind


def _shard(num_slots: int, dim: int, inter: int, dtype: torch.dtype, mode: str = "grouped", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shard = ExpertShard(range(num_slots), dim, inter, mode)
    shard.w13.data = (torch.randn(num_slots, 2 * inter, dim, generator=g) * dim**-0.5).to(dtype)
    shard.w2.data = (torch.randn(num_slots, dim, inter, generator=g) * inter**-0.5).to(dtype)
    return shard.to(DEVICE)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, (err, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim, inter, tokens, top_k", [(64, 32, 7, 1), (72, 40, 13, 2), (96, 48, 21, 4)])
def test_fused_moe_equals_loop_and_grouped(dtype, dim, inter, tokens, top_k):
    """Uneven expert loads with idle experts (ids drawn from a subset), top-k ≥ 1, dims that are not
    multiples of the kernel's blocks (partial tiles on every edge)."""
    num_experts = 6
    shard = _shard(num_experts, dim, inter, dtype, seed=dim)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, dim, generator=g).to(dtype).to(DEVICE)
    used = torch.tensor([0, 2, 3, 5])  # experts 1 and 4 get no rows
    ids = torch.stack([used[torch.randperm(len(used), generator=g)[:top_k]] for _ in range(tokens)]).to(DEVICE)
    weights = torch.rand(tokens, top_k, generator=g).to(DEVICE)
    loop = shard.forward_loop(x, ids, weights)
    got = triton_moe.fused_moe(x, ids, weights, shard.w13.data, shard.w2.data)
    _close(got, loop, dtype)
    fused_via_shard = _shard(num_experts, dim, inter, dtype, "triton", seed=dim).forward_fused(x, ids, weights)
    assert torch.equal(fused_via_shard, got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_run_sorted_in_triton_mode_equals_grouped(dtype):
    """The exchange's entry point on an expert rank: rows sorted by slot, slots with 0, 1 and many
    rows, counts padded past the shard's slots with zeros (as the exchange sends them)."""
    dim, inter = 80, 48
    grouped = _shard(7, dim, inter, dtype)
    triton = _shard(7, dim, inter, dtype, "triton")
    counts = [3, 0, 17, 1, 0, 40, 2] + [0, 0]
    rows = torch.randn(sum(counts), dim, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    _close(triton.run_sorted(rows, counts), grouped.run_sorted(rows, counts), dtype)
    assert triton.run_sorted(rows[:0], [0] * 7).shape == (0, dim)


def test_an_unsupported_dtype_falls_back_to_grouped_with_one_log_line(caplog):
    grouped = _shard(3, 64, 32, torch.float64)
    triton = _shard(3, 64, 32, torch.float64, "triton")
    rows = torch.randn(5, 64, dtype=torch.float64, device=DEVICE)
    triton_moe._logged_reasons.clear()
    with caplog.at_level(logging.WARNING, logger="experts.triton_moe"):
        for _ in range(3):
            assert torch.equal(triton.run_sorted(rows, [2, 0, 3]), grouped.run_sorted(rows, [2, 0, 3]))
    lines = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert len(lines) == 1 and "float64" in lines[0].getMessage()


def test_align_pads_each_expert_to_whole_blocks():
    slots = torch.tensor([2, 0, 2, 2, 0])
    slot_sorted, order = torch.sort(slots, stable=True)
    sorted_ids, block_expert = triton_moe.align(slot_sorted, order, num_slots=4, block_m=2)
    n = len(slots)  # pad value
    assert sorted_ids.tolist()[:6] == [1, 4, 0, 2, 3, n]
    assert set(sorted_ids.tolist()[6:]) == {n}
    assert block_expert.tolist() == [0, 2, 2, -1, -1, -1, -1]


def test_triton_mode_is_refused_at_start_where_it_cannot_run(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="expert_mode='triton'.*TRITON_INTERPRET=1"):
        triton_moe.require("cpu")
    with pytest.raises(ValueError, match="expert_mode='triton'"):
        load_transformer(tmp_path, expert_mode="triton", progress=False)  # before reading anything
    assert triton_moe.resolve_mode("auto", "cpu") == "grouped"


def test_greedy_tokens_match_hf_with_triton_experts(tmp_path):
    """The whole model in fp32 with every MoE layer in the fused kernel: HF's greedy tokens."""
    hf = make_hf_checkpoint("v3", tmp_path)
    model = load_transformer(tmp_path, torch.float32, DEVICE, expert_mode="triton", progress=False)
    prompt = torch.randint(2, hf.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 8:].tolist()
    calls = []
    real = triton_moe.fused_moe
    with pytest.MonkeyPatch.context() as m:
        m.setattr(triton_moe, "fused_moe", lambda *a: calls.append(1) or real(*a))
        assert greedy_generate(model, prompt[0].tolist(), 12) == expected
    assert len(calls) == 12 * len(model.moe_layers)  # every MoE layer of every step ran the kernel
