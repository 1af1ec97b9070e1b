"""Absorbed MLA decode over the paged latent cache as a Triton kernel (``mla_mode="triton"``).

The torch reference is ``MLA._absorbed_decode`` (attention/mla.py): each sequence's one new
token attends, for all heads at once, over its cached latents — scores ``q_lat · c_kv + q_pe ·
k_pe`` (the absorbed query against the C latent and R rope values of each slot), softmax at the
model's ``softmax_scale`` (YaRN's mscale already folded in by ``ModelArgs``), values in latent
space (``c_kv``), so the output is ``o_lat [N, H, C]`` and ``W_UV`` is applied after.

Flash-decoding: the context is cut into splits; one program per (sequence, head group, split)
walks its split block by block through the block table (any block size), keeping a running max,
sum and fp32 accumulator, and writes its normalised partial output and log-sum-exp; a second
kernel combines the splits. Short contexts get one split, long ones enough to fill the device.
Inputs in float32, bfloat16 or float16; scores, softmax and the accumulator in fp32.

The kernels are built on first use, so ``TRITON_INTERPRET=1`` set before then runs them on CPU
tensors (tests, ``benchmarks/kernels.py --interpret``).
"""

from __future__ import annotations

import functools
import math
import os

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_LATENT = 1024  # C (padded to a power of two) a program's accumulator holds; larger falls back
MIN_SPLIT_TOKENS = 256  # fewer tokens than this per split cost more in the reduce than they gain
MAX_SPLITS = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` (a sentence naming what to install or set), or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed: pip install 'dsray[gpu]' (or pip install triton)"
    if device.type == "cuda" or interpreting():
        return None
    return (
        f"Triton kernels need a CUDA device and the model is on {device}: run on a GPU (device='cuda'), "
        "or set TRITON_INTERPRET=1 to run them in Triton's (slow) interpreter on CPU"
    )


def unsupported_reason(q: torch.Tensor, cache: torch.Tensor, kv_lora_rank: int) -> str | None:
    """Why this call must take the torch path instead (one short phrase), or None."""
    if q.dtype not in DTYPES or cache.dtype not in DTYPES:
        return f"dtype {q.dtype}/{cache.dtype} (the kernel takes float32, bfloat16, float16)"
    if triton_next_pow2(kv_lora_rank) > MAX_LATENT:
        return f"kv_lora_rank {kv_lora_rank} > {MAX_LATENT}"
    if q.device != cache.device or (q.device.type != "cuda" and not interpreting()):
        return f"tensors on {q.device} without TRITON_INTERPRET=1"
    return None


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _kernels():
    """Decorate the kernels now (not at import): ``triton.jit`` reads ``TRITON_INTERPRET`` when it runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(
        Q, Cache, Tables, Lens, MidO, MidLse,
        stride_qn, stride_qh, stride_cs, stride_tn,
        stride_mn, stride_mh, stride_ms, stride_ln, stride_lh,
        H, block_size, split_len, qk_scale,
        C: tl.constexpr, R: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        F32_DOTS: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        split = tl.program_id(2)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        hmask = heads < H
        q_rows = Q + n * stride_qn + heads[:, None] * stride_qh
        q_c = tl.load(q_rows + offs_c[None, :], mask=hmask[:, None] & (offs_c[None, :] < C), other=0.0)
        q_r = tl.load(q_rows + C + offs_r[None, :], mask=hmask[:, None] & (offs_r[None, :] < R), other=0.0)

        length = tl.load(Lens + n)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        for s in range(start, end, BLOCK_N):
            pos = s + tl.arange(0, BLOCK_N)
            pmask = pos < end
            block = tl.load(Tables + n * stride_tn + pos // block_size, mask=pmask, other=0).to(tl.int64)
            rows = Cache + (block * block_size + pos % block_size)[:, None] * stride_cs  # [BLOCK_N, 1]
            lat = tl.load(rows + offs_c[None, :], mask=pmask[:, None] & (offs_c[None, :] < C), other=0.0)
            rope = tl.load(rows + C + offs_r[None, :], mask=pmask[:, None] & (offs_r[None, :] < R), other=0.0)
            lat = lat.to(q_c.dtype)
            rope = rope.to(q_c.dtype)
            if F32_DOTS:
                scores = tl.dot(q_c.to(tl.float32), tl.trans(lat.to(tl.float32)), input_precision="ieee")
                scores += tl.dot(q_r.to(tl.float32), tl.trans(rope.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q_c, tl.trans(lat)) + tl.dot(q_r, tl.trans(rope))  # [BLOCK_H, BLOCK_N] fp32
            scores = tl.where(pmask[None, :], scores * qk_scale, float("-inf"))  # log2 domain
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            p = p.to(lat.dtype)  # the reference multiplies probabilities in the values' dtype too
            if F32_DOTS:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), lat.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p, lat)
            m = m_new

        # An empty split (past this sequence's end) writes weight 0: lse -inf, output 0.
        seen = total > 0
        out = acc / tl.where(seen, total, 1.0)[:, None]
        lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
        mid = MidO + n * stride_mn + heads[:, None] * stride_mh + split * stride_ms + offs_c[None, :]
        tl.store(mid, out, mask=hmask[:, None] & (offs_c[None, :] < C))
        tl.store(MidLse + n * stride_ln + heads * stride_lh + split, lse, mask=hmask)

    @triton.jit
    def reduce_kernel(
        MidO, MidLse, Out,
        stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh,
        num_splits,
        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        smask = offs_s < num_splits
        lse = tl.load(MidLse + n * stride_ln + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
        weight = tl.exp2(lse - tl.max(lse, 0))  # [BLOCK_S]; 0 for empty splits
        parts = tl.load(
            MidO + n * stride_mn + h * stride_mh + offs_s[:, None] * stride_ms + offs_c[None, :],
            mask=smask[:, None] & (offs_c[None, :] < C),
            other=0.0,
        )
        out = tl.sum(weight[:, None] * parts, 0) / tl.sum(weight, 0)
        tl.store(Out + n * stride_on + h * stride_oh + offs_c, out.to(Out.dtype.element_ty), mask=offs_c < C)

    return split_kernel, reduce_kernel


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs that fill the device twice over (split count heuristic); a few on CPU (interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def mla_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    kv_lora_rank: int,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One decode token per sequence: ``q [N, H, C + R]`` over ``cache [slots, C + R]`` → ``o_lat [N, H, C]``.

    ``block_tables [N, W]`` (int32 or int64; entries past a sequence's blocks are not read) and
    ``context_lens [N]`` say where sequence ``i``'s ``context_lens[i]`` tokens are: position ``p``
    in slot ``block_tables[i, p // block_size] * block_size + p % block_size``. The output has
    ``q``'s dtype. ``num_splits`` None: chosen from the table width and the device.
    """
    N, H, D = q.shape
    C, R = kv_lora_rank, D - kv_lora_rank
    assert cache.shape[-1] == D and cache.stride(-1) == 1, "cache rows must be C + R contiguous values"
    q = q.contiguous()
    out = torch.empty(N, H, C, dtype=q.dtype, device=q.device)
    if N == 0:
        return out
    split_kernel, reduce_kernel = _kernels()
    block_h = min(64, max(16, triton_next_pow2(H))) if C <= 128 else 16
    block_n = 32 if C <= 256 else 16
    block_c, block_r = max(16, triton_next_pow2(C)), max(16, triton_next_pow2(R))
    head_groups = math.ceil(H / block_h)
    longest = block_tables.shape[1] * block_size  # an upper bound on every context, known without a sync
    if num_splits is None:
        by_work = math.ceil(_target_programs(q.device) / (N * head_groups))
        num_splits = max(1, min(by_work, math.ceil(longest / MIN_SPLIT_TOKENS), MAX_SPLITS))
    split_len = math.ceil(math.ceil(longest / num_splits) / block_n) * block_n
    num_splits = max(1, math.ceil(longest / split_len))
    mid_o = torch.empty(N, H, num_splits, C, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(N, H, num_splits, dtype=torch.float32, device=q.device)
    lens = context_lens.to(torch.int32)
    # fp32 inputs: exact fp32 dots, not TF32. Triton's interpreter gets bfloat16 dots wrong (3.8), so
    # there the operands (already rounded to their dtype) are widened first: the same products.
    f32_dots = q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16)
    split_kernel[(N, head_groups, num_splits)](
        q, cache, block_tables, lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), cache.stride(-2), block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        H, block_size, split_len, softmax_scale * math.log2(math.e),
        C=C, R=R, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=block_r, F32_DOTS=f32_dots,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    reduce_kernel[(N, H)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits,
        C=C, BLOCK_C=block_c, BLOCK_S=max(2, triton_next_pow2(num_splits)),
    )  # fmt: skip
    return out
