"""The Triton kernel of the FP8 block-scaled GEMM (``dsray/fp8_gemm.py`` launches it).

Imported at first use, never at package import: Triton may be absent, and ``TRITON_INTERPRET``
is read when these functions are decorated.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # what the decorators below were built for


@triton.jit
def rounded(v, dt: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``v.to(dt)``; under the interpreter (which truncates fp32 → bf16) bf16 rounds to nearest
    even by hand first, as the GPU and torch do, so the cast after it is exact."""
    if EMULATE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dt)


@triton.jit
def fp8_gemm(
    x, w, scale, out, M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    QBLOCK_N: tl.constexpr, QBLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``out [M, N] = x [M, K] · (w [N, K] ⊙ scale[n // QBLOCK_N, k // QBLOCK_K])ᵀ``.

    ``BLOCK_K`` divides ``QBLOCK_K``, so each K step lies in one scale block: the fp8 tile goes
    to the activation dtype unscaled (exact: e4m3 fits in bf16/fp16/fp32), the product
    accumulates in fp32, and the step's partial sum is scaled per output column before it is added.
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptrs = x + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]: wᵀ
    s_ptrs = scale + (offs_n // QBLOCK_N) * stride_sn  # [BN], the column's scale row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        else:
            b = b.to(a.dtype)
        part = tl.dot(a, b, input_precision=PRECISION)
        s = tl.load(s_ptrs + (k * BLOCK_K) // QBLOCK_K, mask=n_ok, other=0.0)
        acc += part * s[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    o_ptrs = out + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, rounded(acc, out.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])
