"""Where the CPU has AMX tiles, bf16 matmuls of a few rows or more go to torch's oneDNN instead of
dsray's kernels (``dsray/onednn.py``): dense linears, decode-batch MLPs and routed-expert
slots of many rows. The rule and the routing are tested on any CPU by saying it has AMX; each route
is held to the torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsray import cpu_kernels, kernel_build, kernel_threads, onednn
from dsray.layers import MLP, linear
from dsray.onednn import bucket_rows
from dsray.onednn import linear as onednn_linear
from experts import shard as shard_module
from experts.shard import ExpertShard

BF16_STEP = 2.0**-7


def _randn(*shape, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


@pytest.fixture
def amx(monkeypatch):
    """oneDNN on AMX tiles takes what it is faster for, as on an AMX CPU."""
    monkeypatch.setattr(onednn, "amx", lambda: True)


@pytest.fixture
def fresh_amx_check():
    onednn.amx.cache_clear()
    yield
    onednn.amx.cache_clear()


@pytest.mark.usefixtures("fresh_amx_check")
def test_onednn_takes_batches_from_a_few_rows_only_where_the_cpu_has_amx(monkeypatch):
    monkeypatch.setattr(kernel_build, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_tile", "amx_bf16"}))
    monkeypatch.delenv("DSRAY_ONEDNN_AMX", raising=False)
    assert onednn.amx() == torch.backends.mkldnn.is_available()
    if onednn.amx():
        assert not onednn.takes(onednn.MIN_ROWS - 1)
        assert onednn.takes(onednn.MIN_ROWS)
        assert not onednn.takes(23, onednn.GROUPED_MIN_ROWS)
        assert onednn.takes(onednn.GROUPED_MIN_ROWS, onednn.GROUPED_MIN_ROWS)
    onednn.amx.cache_clear()
    monkeypatch.setenv("DSRAY_ONEDNN_AMX", "0")  # the user keeps the kernels
    assert not onednn.amx() and not onednn.takes(64)
    onednn.amx.cache_clear()
    monkeypatch.delenv("DSRAY_ONEDNN_AMX")
    monkeypatch.setattr(kernel_build, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_tile"}))  # no bf16 tiles
    assert not onednn.amx() and not onednn.takes(64)


@pytest.mark.usefixtures("amx")
def test_linear_sends_amx_sized_batches_to_onednn_on_every_thread_of_the_step(monkeypatch):
    """Inside a decode step torch runs on one thread (``torch_single_threaded``); the oneDNN GEMM gets
    the step's threads back for its call, and only for it."""
    seen, kernel_rows = [], []
    real_linear, real_gemm = F.linear, cpu_kernels.gemm
    monkeypatch.setattr(
        F, "linear", lambda x, w, b=None: seen.append((x.shape[0], torch.get_num_threads())) or real_linear(x, w, b)
    )
    monkeypatch.setattr(cpu_kernels, "gemm", lambda x, w: kernel_rows.append(x.shape[0]) or real_gemm(x, w))
    w, b = _randn(48, 96, scale=0.1, seed=1), _randn(48, seed=2)
    was = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernel_threads.torch_single_threaded():
            small = linear(_randn(onednn.MIN_ROWS - 1, 96, seed=3), w)
            x = _randn(onednn.MIN_ROWS, 96, seed=4)
            got = linear(x, w, b)
            assert torch.get_num_threads() == 1  # back for the step's small torch ops
    finally:
        torch.set_num_threads(was)
    assert seen == [(bucket_rows(onednn.MIN_ROWS), 2)]
    assert kernel_rows == ([onednn.MIN_ROWS - 1] if cpu_kernels.available() else [])
    assert small.shape == (onednn.MIN_ROWS - 1, 48)
    exact = real_linear(x.float(), w.float(), b.float())
    assert torch.all((got.float() - exact).abs() <= 2 * BF16_STEP * exact.abs() + 1e-3)


def test_onednn_gemms_run_on_a_few_row_counts_and_equal_the_unpadded_product(monkeypatch):
    """oneDNN builds a GEMM per new shape (~2 ms): rows are padded to buckets, so a server meets few."""
    got = [bucket_rows(r) for r in (1, 7, 8, 16, 17, 100, 128, 129, 255, 256, 257, 1000)]
    assert got == [1, 7, 16, 16, 32, 112, 128, 144, 256, 256, 288, 1024]
    assert all(r <= bucket_rows(r) <= r * 9 / 8 for r in range(128, 5000))
    assert len({bucket_rows(r) for r in range(8, 4097)}) <= 8 * 9  # ~8 per doubling
    seen = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen.append(tuple(x.shape)) or real(x, w, b))
    x, w, b = _randn(3, 33, 64, seed=9), _randn(48, 64, scale=0.1, seed=10), _randn(48, seed=11)
    out = onednn_linear(x, w, b)
    assert seen == [(112, 64)]  # 99 rows, padded
    assert out.shape == (3, 33, 48)
    exact = real(x.float(), w.float(), b.float())
    assert torch.all((out.float() - exact).abs() <= 2 * BF16_STEP * exact.abs() + 1e-3)


@pytest.mark.usefixtures("amx")
def test_a_decode_batch_mlp_of_amx_size_is_three_onednn_gemms(monkeypatch):
    calls = []
    real = cpu_kernels.swiglu_rows
    monkeypatch.setattr(cpu_kernels, "swiglu_rows", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    torch.manual_seed(0)
    mlp = MLP(128, 64).bfloat16()
    for p in mlp.parameters():
        p.data = (torch.randn_like(p, dtype=torch.float32) * 0.1).bfloat16()
    x = _randn(16, 128, seed=5)
    got = mlp(x)
    if cpu_kernels.available():
        mlp(x[:4])  # below the rule: the kernel's one call
    assert calls == ([4] if cpu_kernels.available() else [])
    xf = x.float()
    exact = (
        F.silu(xf @ mlp.gate_proj.weight.float().T) * (xf @ mlp.up_proj.weight.float().T)
    ) @ mlp.down_proj.weight.float().T
    assert (got.float() - exact).abs().max() <= 4 * BF16_STEP * exact.abs().max()


def test_grouped_min_rows_is_higher_where_the_kernel_has_amx_tiles_itself(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "amx", lambda: False)
    assert onednn.grouped_min_rows() == onednn.GROUPED_MIN_ROWS == 24
    monkeypatch.setattr(cpu_kernels, "amx", lambda: True)
    assert onednn.grouped_min_rows() == onednn.GROUPED_MIN_ROWS_AMX_KERNEL == shard_module.GROUPED_MAX_ROWS + 1


@pytest.mark.usefixtures("amx")
@pytest.mark.parametrize("kernel_tiles", [False, True], ids=["kernel-avx512", "kernel-amx"])
def test_run_sorted_sends_wide_slots_to_onednn_and_the_rest_to_one_kernel_call(monkeypatch, kernel_tiles):
    """A prefill's slots of many rows go to oneDNN one at a time (from ``grouped_min_rows()``: 24 rows,
    or 129 where the grouped kernel has AMX tiles itself); the other slots still share one
    grouped-kernel call; together they equal the torch path slot by slot."""
    num_slots, dim, inter = 6, 128, 64
    shard = ExpertShard(range(num_slots), dim, inter)
    g = torch.Generator().manual_seed(7)
    shard.w13.data = (torch.randn(shard.w13.shape, generator=g) * dim**-0.5).bfloat16()
    shard.w2.data = (torch.randn(shard.w2.shape, generator=g) * inter**-0.5).bfloat16()
    # The routing as where the kernel has (or lacks) tiles; the kernel's own state to match where it can.
    monkeypatch.setattr(cpu_kernels, "amx", lambda: kernel_tiles)
    wide = onednn.grouped_min_rows()
    assert wide == (onednn.GROUPED_MIN_ROWS_AMX_KERNEL if kernel_tiles else onednn.GROUPED_MIN_ROWS)
    counts = [3, wide + 6, 0, wide, 1, 2 * wide, 0]  # padded past the shard's slots, as the exchange sends
    rows = _randn(sum(counts), dim, seed=8)
    grouped, on_onednn = [], []
    real_grouped, real_linear = cpu_kernels.swiglu_grouped, F.linear
    monkeypatch.setattr(shard_module.cpu_kernels, "swiglu_grouped", lambda *a: grouped.append(a[1]) or real_grouped(*a))
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: on_onednn.append(x.shape[0]) or real_linear(x, w, b))

    with cpu_kernels.amx_tiles(kernel_tiles):
        got = shard.run_sorted(rows, counts)
    if cpu_kernels.available():
        assert grouped == [[0, 4]]
        padded = [bucket_rows(n) for n in (wide + 6, wide + 6, wide, wide, 2 * wide, 2 * wide)]
        assert on_onednn == padded  # w13 then w2, per wide slot
    with cpu_kernels.disabled():
        monkeypatch.setattr(onednn, "amx", lambda: False)
        want = shard.run_sorted(rows, counts)
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= 2 * BF16_STEP * scale
