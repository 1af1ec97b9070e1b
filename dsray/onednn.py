"""bf16 GEMMs on torch's oneDNN: when they go there instead of dsray's kernels, and with which shapes.

On a CPU with AMX tiles (Sapphire Rapids and later) oneDNN, which torch's bf16 matmuls run on,
computes on the tiles; dsray's kernels (``dsray/cpu_kernels.py``) do not. There oneDNN is faster
from a few rows (``takes``): ``layers.linear`` and ``MLP`` send it batches of ``MIN_ROWS`` rows or
more, ``ExpertShard.run_sorted`` slots of ``grouped_min_rows()`` rows or more (few where the grouped
kernel computes on AVX512, only slots past 128 rows where it has AMX tiles too). ``DSRAY_ONEDNN_AMX=0``
keeps them on the kernels. Every bf16 CPU GEMM dsray gives oneDNN goes through ``linear``, which
pads the rows to a few sizes (``bucket_rows``). ``benchmarks/cpu_gemm.py`` measures both sides.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dsray import cpu_kernels, envs, kernel_build

# Where the CPU has AMX (``amx``), oneDNN's bf16 GEMM on its tiles beats dsray's kernels from
# about this many rows (``benchmarks/cpu_gemm.py``). 2 AMX Xeon cores, kernel time over oneDNN's on
# `small`'s nine weight shapes: 4 rows 0.59-1.18, 8 rows 0.91-1.54, 16 rows 1.54-2.73, 64 rows 3.5-6.0.
MIN_ROWS = 8
# The same for one routed expert's rows (``ExpertShard.run_sorted``): the grouped kernel runs every
# slot in one call, oneDNN one slot at a time. 64 slots of `small`, weights from memory, kernel over
# oneDNN: 16 rows a slot 0.83, 24 rows 1.44, 64 rows 2.18, 128 rows 2.99.
GROUPED_MIN_ROWS = 24
# Where the grouped kernel itself computes on AMX tiles (``cpu_kernels.amx``), it beats oneDNN up to
# ``experts.shard.GROUPED_MAX_ROWS`` (128) rows a slot and loses past it. Same 64 slots, AMX kernel
# time over oneDNN's: 16 rows 0.45, 64 rows 0.62, 128 rows 0.77, 256 rows 1.21, 512 rows 1.20.
GROUPED_MIN_ROWS_AMX_KERNEL = 129


@functools.cache
def amx() -> bool:
    """Whether torch's bf16 matmuls run on AMX tiles here: an AMX-BF16 CPU, torch built with oneDNN,
    and ``DSRAY_ONEDNN_AMX`` not off. There oneDNN beats the kernels from a few rows (``MIN_ROWS``)."""
    return envs.onednn_amx() and kernel_build.has_amx_bf16() and torch.backends.mkldnn.is_available()


def takes(rows: int, min_rows: int = MIN_ROWS) -> bool:
    """Whether a bf16 CPU matmul of ``rows`` rows per weight goes to oneDNN rather than the kernels."""
    return rows >= min_rows and amx()


def grouped_min_rows() -> int:
    """From how many rows a routed-expert slot goes to oneDNN rather than the grouped kernel
    (``takes(rows, grouped_min_rows())``): more where the kernel has AMX tiles of its own."""
    return GROUPED_MIN_ROWS_AMX_KERNEL if cpu_kernels.amx() else GROUPED_MIN_ROWS


def bucket_rows(rows: int) -> int:
    """The rows a bf16 CPU GEMM of ``rows`` rows runs with: from 8 rows, rounded up to a multiple of 16
    (an AMX tile's rows) or of an eighth of the power of two below, whichever is larger (at most 1/8
    more work past 128 rows), so that a server meets ~8 GEMM shapes per doubling of the rows."""
    if rows < 8:
        return rows
    step = max(16, 1 << (rows.bit_length() - 4))
    return -(-rows // step) * step


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of bf16 CPU rows on oneDNN, the rows zero-padded to ``bucket_rows``. oneDNN can build
    and JIT-compile a GEMM for each shape it has not seen (2 AMX Xeon cores, 512 x 1,024 weight: ~2.4 ms
    per new row count against 0.19 ms per cached call, ``benchmarks/cpu_gemm.py``). Routed-expert slots
    of a prefill meet dozens of new row counts a layer: unbucketed, a 512-token prefill's experts took
    628 ms on oneDNN against 261 ms bucketed (490 ms on the grouped kernel)."""
    K = x.shape[-1]
    rows = x.numel() // K
    padded = bucket_rows(rows)
    if padded == rows:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, K)
    out = F.linear(torch.cat([flat, flat.new_zeros(padded - rows, K)]), weight, bias)
    return out[:rows].view(*x.shape[:-1], weight.shape[0])
