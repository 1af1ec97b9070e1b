"""The Triton kernels of the fused MoE (``experts/triton_moe.py`` builds their inputs and launches them).

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
def gate_up(
    x, w13, h, sorted_ids, block_expert, num_pairs, inter, dim,
    stride_xm, stride_we, stride_wn, stride_hm,
    scale, stride_se, stride_sn, up_scale_row,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr, QBLOCK_N: tl.constexpr,
    QBLOCK_K: tl.constexpr,
):  # fmt: skip
    """With ``FP8``, ``w13`` is float8_e4m3fn and ``scale [E, gate rows then up rows, K blocks]`` holds
    its block scales (the up half's from row ``up_scale_row``): each K step's partial product is
    scaled per output column, as in ``dsray/fp8_gemm_kernel.py`` (``BLOCK_K`` divides ``QBLOCK_K``)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert + pid_m)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    row_ok = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x + (pairs // TOP_K)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    g_ptrs = w13 + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]: W1ᵀ
    u_ptrs = g_ptrs + inter * stride_wn  # the up rows follow the gate rows
    sg_ptrs = scale + expert * stride_se + (offs_n // QBLOCK_N) * stride_sn  # [BN]; used with FP8 only
    su_ptrs = sg_ptrs + up_scale_row * stride_sn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(dim, BLOCK_K)):
        k_ok = offs_k < dim - k * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        elif FP8:
            g, u = g.to(a.dtype), u.to(a.dtype)
        if FP8:
            kb = (k * BLOCK_K) // QBLOCK_K
            sg = tl.load(sg_ptrs + kb, mask=n_ok, other=0.0)
            su = tl.load(su_ptrs + kb, mask=n_ok, other=0.0)
            acc_g += tl.dot(a, g, input_precision=PRECISION) * sg[None, :]
            acc_u += tl.dot(a, u, input_precision=PRECISION) * su[None, :]
        else:
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dt = h.dtype.element_ty
    gate = rounded(acc_g, dt, UPCAST).to(tl.float32)  # rounded where the reference's linear rounds
    up = rounded(acc_u, dt, UPCAST).to(tl.float32)
    act = rounded(gate * tl.sigmoid(gate), dt, UPCAST).to(tl.float32)
    out = rounded(act * up, dt, UPCAST)
    tl.store(h + pairs[:, None] * stride_hm + offs_n[None, :], out, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def down(
    h, w2, out, weights, sorted_ids, block_expert, num_pairs, dim, inter,
    stride_hm, stride_we, stride_wn, stride_om,
    scale, stride_se, stride_sn,
    MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr, QBLOCK_N: tl.constexpr,
    QBLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert + pid_m)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < dim
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h + pairs[:, None] * stride_hm + offs_k[None, :]
    w_ptrs = w2 + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]: W2ᵀ
    s_ptrs = scale + expert * stride_se + (offs_n // QBLOCK_N) * stride_sn  # [BN]; used with FP8 only
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        k_ok = offs_k < inter - k * BLOCK_K
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        elif FP8:
            b = b.to(a.dtype)
        if FP8:
            s = tl.load(s_ptrs + (k * BLOCK_K) // QBLOCK_K, mask=n_ok, other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = rounded(acc, h.dtype.element_ty, UPCAST)
    if MUL_WEIGHT:  # the routing weight, in fp32 on the rounded expert output (as the reference)
        y = y.to(tl.float32) * tl.load(weights + pairs, mask=row_ok, other=0.0)[:, None]
    o_ptrs = out + pairs[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, y.to(out.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
