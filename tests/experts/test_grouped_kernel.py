"""An expert rank's grouped compute (``ExpertShard.run_sorted``) with the grouped CPU kernel (on each
instruction set the CPU runs), against the torch path it replaces (one ``expert_ffn`` per slot) and
the per-expert loop.

The kernel rounds every product as the torch reference does; only the order of the fp32 additions
inside a dot product differs, so results agree to a bf16 step of the output's scale.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dsray import cpu_kernels, kernel_build
from experts import shard as shard_module
from experts.shard import GROUPED_MAX_ROWS, ExpertShard

pytestmark = [
    pytest.mark.skipif(
        not cpu_kernels.available(), reason="needs an x86-64 CPU with AVX512-BF16 or AVX2 and a C compiler"
    ),
    pytest.mark.usefixtures("kernel_isa"),  # every instruction set the CPU runs them on
]
BF16_STEP = 2.0**-7


def _randn(*shape, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def _shard(num_slots: int, dim: int, inter: int) -> ExpertShard:
    shard = ExpertShard(list(range(100, 100 + num_slots)), dim, inter)
    shard.w13.data = _randn(num_slots, 2 * inter, dim, scale=dim**-0.5, seed=1)
    shard.w2.data = _randn(num_slots, dim, inter, scale=inter**-0.5, seed=2)
    return shard


def _assert_each_slot_is_its_expert_ffn(shard: ExpertShard, rows: torch.Tensor, slots: list[int], spans: list) -> None:
    got = cpu_kernels.swiglu_grouped(rows, slots, spans, shard.w13.data, shard.w2.data)
    with cpu_kernels.disabled():
        for slot, (begin, end) in zip(slots, spans):
            want = shard.expert_ffn(slot, rows[begin:end])
            scale = want.float().abs().max()
            assert (got[begin:end].float() - want.float()).abs().max() <= BF16_STEP * scale, (slot, begin, end)


def test_grouped_kernel_equals_each_slots_expert_ffn():
    shard = _shard(6, 160, 48)  # D, I not multiples of the kernel's 32-wide blocks: tails too
    rows = _randn(23, 160, seed=3)
    spans = [(0, 1), (1, 5), (9, 23), (5, 9)]  # any order; rows in no span are not touched
    slots = [4, 0, 5, 2]
    _assert_each_slot_is_its_expert_ffn(shard, rows, slots, spans)


@pytest.mark.parametrize(
    ("dim", "inter"),
    [(256, 64), (160, 48), (97, 38), (64, 21)],  # odd D and odd I: a last pair with one half
)
def test_wide_tiles_equal_each_slots_expert_ffn(dim, inter):
    """Slots past ``NARROW_MAX_ROWS`` (8) rows take the wide tiles: one 16-row block part full, exactly
    full, and several blocks with a part-full last one, beside narrow slots, in any order."""
    shard = _shard(5, dim, inter)
    sizes = {0: 9, 1: 16, 2: 3, 3: 41, 4: 17}
    order = [3, 2, 0, 4, 1]
    spans, start = [], 0
    for slot in order:
        spans.append((start, start + sizes[slot]))
        start += sizes[slot]
    rows = _randn(start, dim, seed=4)
    _assert_each_slot_is_its_expert_ffn(shard, rows, order, spans)


@pytest.mark.skipif(not kernel_build.has_amx_bf16(), reason="needs a CPU with AMX-BF16 tiles")
def test_amx_tiles_equal_each_slots_expert_ffn(kernel_isa):
    """Where the CPU has AMX, slots of 2 rows or more take the AMX tiles (D and I multiples of 32;
    `small`'s D 1024, I 256 here): one row (narrow), a part-full block, a full one, and several with a
    part-full last one."""
    if kernel_isa != "avx512bf16":
        pytest.skip("the AMX tiles are part of the AVX512-BF16 build")
    dim = 1024
    shard = _shard(7, dim, 256)
    sizes = [1, 2, 5, 16, 17, 41, 9]
    spans = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
    slots = [6, 0, 3, 1, 5, 2, 4]
    rows = _randn(sum(sizes), dim, seed=5)
    with cpu_kernels.amx_tiles(True) as on:
        assert on and cpu_kernels.amx()
        _assert_each_slot_is_its_expert_ffn(shard, rows, slots, spans)
        tiles = cpu_kernels.swiglu_grouped(rows, slots, spans, shard.w13.data, shard.w2.data)
    with cpu_kernels.amx_tiles(False) as on:
        assert not on and not cpu_kernels.amx()
        _assert_each_slot_is_its_expert_ffn(shard, rows, slots, spans)
        wide = cpu_kernels.swiglu_grouped(rows, slots, spans, shard.w13.data, shard.w2.data)
    # The tiles ran: past 8 rows both sides pack the rows, and the tiles' fp32 sums round differently.
    packed = torch.cat([torch.arange(b, e) for b, e in spans if e - b > 8])
    assert not torch.equal(tiles[packed], wide[packed])


def test_amx_tiles_are_off_with_DSRAY_CPU_AMX_0(kernel_isa):
    if kernel_isa != kernel_build.chosen_isa():
        pytest.skip("a new process runs the build chosen for the CPU")
    probe = "from dsray import cpu_kernels; print(cpu_kernels.amx())"
    default = kernel_build.has_amx_bf16() and kernel_isa == "avx512bf16"
    for env, want in (({}, default), ({"DSRAY_CPU_AMX": "0"}, False)):
        done = subprocess.run(
            [sys.executable, "-c", probe], env=os.environ | env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == str(want), (env, done.stderr)


def test_kernel_pieces_cut_wide_slots_into_even_whole_blocks():
    assert shard_module._kernel_pieces(3, 10, 10 + GROUPED_MAX_ROWS) == [(3, 10, 10 + GROUPED_MAX_ROWS)]
    pieces = shard_module._kernel_pieces(3, 10, 10 + GROUPED_MAX_ROWS + 5)
    assert [e - b for _, b, e in pieces] == [80, GROUPED_MAX_ROWS + 5 - 80]  # not 128 + 5
    assert pieces[0][1] == 10 and pieces[-1][2] == 10 + GROUPED_MAX_ROWS + 5
    assert all(b == e0 for (_, _, e0), (_, b, _) in zip(pieces, pieces[1:]))
    n = 3 * GROUPED_MAX_ROWS + 1
    pieces = shard_module._kernel_pieces(0, 0, n)
    assert len(pieces) == 4 and all((e - b) % 16 == 0 and e - b <= GROUPED_MAX_ROWS for _, b, e in pieces[:-1])


@pytest.mark.parametrize("seed", range(3))
def test_run_sorted_with_the_kernel_equals_torch_and_the_loop(monkeypatch, seed):
    """Slots with no rows, a few rows and more than ``GROUPED_MAX_ROWS`` (cut into pieces, all in the
    one kernel call), and counts padded past the shard's slots with zeros, as the exchange sends them."""
    num_slots, dim, inter = 9, 256, 64
    shard = _shard(num_slots, dim, inter)
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 7, (num_slots,), generator=g)
    counts[seed] = 0
    counts[seed + 3] = GROUPED_MAX_ROWS + 5
    counts = counts.tolist() + [0, 0]
    rows = _randn(sum(counts), dim, seed=10 + seed)
    calls = []
    real = cpu_kernels.swiglu_grouped
    monkeypatch.setattr(shard_module.cpu_kernels, "swiglu_grouped", lambda *a: calls.append(a[1]) or real(*a))

    got = shard.run_sorted(rows, counts)
    big = seed + 3
    assert calls == [[s for s, n in enumerate(counts) for _ in range(2 if s == big else 1) if n]]
    with cpu_kernels.disabled():
        want = shard.run_sorted(rows, counts)
        # the loop oracle: each row is its slot's expert with weight 1
        ids = torch.tensor([shard.expert_ids[s] for s, n in enumerate(counts) for _ in range(n)])[:, None]
        oracle = shard.forward_loop(rows, ids, torch.ones(len(ids), 1))
    assert len(calls) == 1  # the reference ran without the kernel
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= BF16_STEP * scale
    assert (got.float() - oracle.float()).abs().max() <= 2 * BF16_STEP * scale


def test_grouped_kernel_refuses_what_it_cannot_run():
    shard = _shard(2, 64, 32)
    rows = _randn(4, 64)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.swiglu_grouped(rows, [2], [(0, 4)], shard.w13.data, shard.w2.data)  # no slot 2
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.swiglu_grouped(rows, [0], [(2, 5)], shard.w13.data, shard.w2.data)  # past the rows
    with pytest.raises(ValueError, match="contiguous bf16"):
        cpu_kernels.swiglu_grouped(rows.float(), [0], [(0, 4)], shard.w13.data, shard.w2.data)
    with pytest.raises(ValueError, match="stack one expert each"):
        cpu_kernels.swiglu_grouped(rows, [0], [(0, 4)], shard.w13.data, shard.w2.data[:1])
