"""Triton fused MoE: rows grouped by expert, gate/up GEMM with SwiGLU fused, down GEMM, weights.

The design follows vLLM's ``fused_moe`` kernel: the (token, k) pairs are sorted by expert and each
expert's run is padded to whole ``BLOCK_M`` blocks (``sorted_ids``, pad entries point past the
end); ``block_expert[b]`` names the expert of block ``b`` (−1 past the last one), so one launch
covers every expert whatever its row count, zero included. Two launches per layer:

1. ``gate_up``: ``silu(x W1ᵀ) · (x W3ᵀ)`` for a block of rows and of the intermediate dimension —
   both products accumulate in fp32 side by side, so the ``[M, 2I]`` gate/up tensor is never
   written; only ``h [M, I]`` is.
2. ``down``: ``h W2ᵀ``, then (``fused_moe``) the routing weight in the epilogue, stored at the
   pair's (token, k) position; the K results of a token are summed in fp32 afterwards.

Each product is rounded to the activation dtype where the torch reference (``ExpertShard
.expert_ffn``) rounds it, so results agree with it to a step of that dtype. ``run_sorted`` serves
the MoE exchange, whose rows arrive sorted by slot and leave unweighted (the attention rank
weights and sums them); ``fused_moe`` serves a model holding all its experts (the local executor).

The kernels (``experts/triton_moe_kernels.py``) are imported at first use, so Triton stays
optional and ``TRITON_INTERPRET=1`` (CPU tensors, for tests) may be set any time before that.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_logged_reasons: set[str] = set()


class Fp8Scales(NamedTuple):
    """The block scales of float8_e4m3fn expert weights: ``w13 [E, gate blocks + up blocks, D blocks]``
    (the gate's rows of blocks, then the up's) and ``w2 [E, D blocks, I blocks]``."""

    w13: torch.Tensor
    w2: torch.Tensor
    block_size: tuple[int, int]


def _block_k(quant_k: int) -> int | None:
    """The widest K tile that divides the quantisation block (each K step under one scale)."""
    return next((b for b in (128, 64, 32, 16) if quant_k % b == 0), None)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why Triton cannot run kernels on ``device`` here (None: it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed: pip install 'dsray[gpu]' (triton>=3.0), or use expert_mode='grouped'"
    if torch.device(device).type != "cuda" and not interpreting():
        return (
            f"Triton kernels run on CUDA tensors, and this model is on {torch.device(device).type}: use a CUDA "
            "device, or expert_mode='grouped' (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly, in tests)"
        )
    return None


def require(device: torch.device | str) -> None:
    """Fail at start, naming the option, where ``expert_mode='triton'`` cannot run."""
    if (reason := unavailable_reason(device)) is not None:
        raise ValueError(f"expert_mode='triton' cannot run: {reason}")


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """The expert path for ``device``: ``auto`` → ``triton`` on CUDA when Triton is installed, else
    ``grouped``; ``triton`` where it cannot run fails here, at start (as ``mla_mode`` does)."""
    if mode == "auto":
        return "triton" if torch.device(device).type == "cuda" and unavailable_reason(device) is None else "grouped"
    if mode == "triton":
        require(device)
    return mode


def fallback_reason(
    rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, scales: Fp8Scales | None = None
) -> str | None:
    """Why these tensors go to the torch grouped path instead (None: the kernel takes them)."""
    if rows.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {rows.dtype} (the kernel takes float32, bfloat16, float16)"
    if scales is not None:
        if _block_k(scales.block_size[1]) is None:
            return f"FP8 expert weights with block size {scales.block_size} (the K block must be a multiple of 16)"
    elif w13.dtype != rows.dtype or w2.dtype != rows.dtype:
        return f"expert weights in {w13.dtype}/{w2.dtype} with {rows.dtype} activations"
    if unavailable_reason(rows.device) is not None:
        return f"tensors on {rows.device.type} without TRITON_INTERPRET=1"
    if rows.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        return "tensors whose last dimension is not contiguous"
    return None


def log_fallback(reason: str) -> None:
    """One log line per reason, however many layers and steps meet it."""
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning("dsray: expert_mode='triton' falls back to the torch grouped path for %s", reason)


@functools.cache
def _kernels():
    """The kernels, decorated under the current ``TRITON_INTERPRET`` (re-imported if it changed since:
    tests switch between the interpreter and compiled kernels with ``_kernels.cache_clear()``)."""
    import triton

    from experts import triton_moe_kernels as k

    if k.INTERPRETED != interpreting():
        k = importlib.reload(k)
    return triton, k.gate_up, k.down


def _blocks(num_pairs: int, num_slots: int, device: torch.device, scales: Fp8Scales | None) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``: small row blocks for decode-sized batches, wider for prefill;
    small tiles under the interpreter, where every tile costs Python time; with FP8 weights, a K
    tile that divides the quantisation block."""
    rows_per_slot = num_pairs / max(num_slots, 1)
    block_m = 16 if device.type != "cuda" or rows_per_slot <= 16 else 32 if rows_per_slot <= 64 else 64
    block_n, block_k = (32, 32) if device.type != "cuda" else (64, 64)
    if scales is not None:
        block_k = min(block_k, _block_k(scales.block_size[1]))
    return block_m, block_n, block_k


def align(slot_sorted: torch.Tensor, order: torch.Tensor, num_slots: int, block_m: int):
    """Pad each slot's run of pairs to whole ``block_m`` blocks, without a host sync.

    ``slot_sorted [N]`` is each pair's slot in sorted order and ``order [N]`` the pair index there.
    Returns ``sorted_ids [max_blocks·block_m]`` (pads hold N) and ``block_expert [max_blocks]``
    (−1 past the last used block); ``max_blocks`` bounds the padding of every slot.
    """
    n, device = slot_sorted.numel(), slot_sorted.device
    max_blocks = -(-n // block_m) + num_slots
    counts = torch.zeros(num_slots, dtype=torch.int64, device=device).index_add_(
        0, slot_sorted, torch.ones_like(slot_sorted)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    start = counts.cumsum(0) - counts
    dest = (padded_end - padded)[slot_sorted] + torch.arange(n, device=device) - start[slot_sorted]
    sorted_ids = torch.full((max_blocks * block_m,), n, dtype=torch.int64, device=device)
    sorted_ids[dest] = order
    block_start = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_slots, block_expert, -1)
    return sorted_ids, block_expert


def _launch(x, w13, w2, sorted_ids, block_expert, num_pairs, top_k, weights, out, blocks, scales):
    """gate_up then down over the aligned pairs; ``out [num_pairs, D]`` is written in place."""
    triton, gate_up, down = _kernels()
    fp8 = scales is not None
    s13, s2 = (scales.w13, scales.w2) if fp8 else (w13, w2)  # not read without FP8
    qbn, qbk = scales.block_size if fp8 else (1, 1)
    s13_strides = (s13.stride(0), s13.stride(1), s13.shape[1] // 2) if fp8 else (0, 0, 0)
    s2_strides = (s2.stride(0), s2.stride(1)) if fp8 else (0, 0)
    block_m, block_n, block_k = blocks
    inter, dim = w2.shape[2], w2.shape[1]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 applies to fp32 inputs only
    # Triton 3.8's interpreter gets bf16 tl.dot wrong and truncates fp32 → bf16: there the operands go
    # to fp32 (exact, so the product is the same) and bf16 results are rounded by hand.
    upcast = interpreting() and x.dtype == torch.bfloat16
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    grid_m = block_expert.numel()
    gate_up[(grid_m, triton.cdiv(inter, block_n))](
        x, w13, h, sorted_ids, block_expert, num_pairs, inter, dim,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        s13, *s13_strides,
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, UPCAST=upcast,
        FP8=fp8, QBLOCK_N=qbn, QBLOCK_K=qbk,
    )  # fmt: skip
    down[(grid_m, triton.cdiv(dim, block_n))](
        h, w2, out, weights if weights is not None else h, sorted_ids, block_expert, num_pairs, dim, inter,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        s2, *s2_strides,
        MUL_WEIGHT=weights is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=precision, UPCAST=upcast, FP8=fp8, QBLOCK_N=qbn, QBLOCK_K=qbk,
    )  # fmt: skip
    return out


def run_sorted(
    rows: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor, scales: Fp8Scales | None = None
) -> torch.Tensor:
    """``rows [M, D]`` sorted by slot, ``counts[s]`` rows each → each row's expert FFN ``[M, D]``
    (unweighted: the exchange's ``SlotCompute``). ``counts`` covers ``w13``'s slots exactly;
    ``scales`` with float8_e4m3fn weights."""
    m, num_slots = rows.shape[0], w13.shape[0]
    out = torch.empty_like(rows)
    if not m:
        return out
    counts_t = torch.tensor(counts, dtype=torch.int64)
    slot_sorted = torch.repeat_interleave(torch.arange(num_slots), counts_t).to(rows.device)
    blocks = _blocks(m, num_slots, rows.device, scales)
    order = torch.arange(m, device=rows.device)
    sorted_ids, block_expert = align(slot_sorted, order, num_slots, blocks[0])
    return _launch(rows, w13, w2, sorted_ids, block_expert, m, 1, None, out, blocks, scales)


def fused_moe(
    x: torch.Tensor,
    topk_slots: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    scales: Fp8Scales | None = None,
) -> torch.Tensor:
    """``x [T, D]``, each token's K slots ``topk_slots [T, K]`` and weights → the weighted sum of
    its experts' outputs ``[T, D]`` in ``x``'s dtype (summed in fp32, as ``forward_loop``)."""
    t, k = topk_slots.shape
    if not t:
        return torch.zeros_like(x)
    num_pairs, num_slots = t * k, w13.shape[0]
    flat = topk_slots.reshape(-1)
    slot_sorted, order = torch.sort(flat, stable=True)
    blocks = _blocks(num_pairs, num_slots, x.device, scales)
    sorted_ids, block_expert = align(slot_sorted, order, num_slots, blocks[0])
    weights = topk_weights.reshape(-1).float().contiguous()
    out = torch.empty(num_pairs, x.shape[1], dtype=torch.float32, device=x.device)
    _launch(x, w13, w2, sorted_ids, block_expert, num_pairs, k, weights, out, blocks, scales)
    return out.view(t, k, -1).sum(dim=1).to(x.dtype)
