"""FP8 weights kept in FP8: a Triton GEMM of activations by a block-scaled e4m3 weight.

DeepSeek-V3 checkpoints store linear weights as float8_e4m3fn ``[out, in]`` with one fp32 scale
per 128×128 block (``dsray/fp8.py``). Dequantising at load doubles their memory (bf16) and the
bytes every decode step reads; with ``fp8_weights="keep"`` (the default on CUDA for an FP8
checkpoint) the weights stay fp8 on the GPU and ``Linear`` layers holding them call
``fp8_linear``: each tile of the weight is widened to the activation dtype in registers (exact),
multiplied in fp32, and scaled per (output block, K block) — weight-only FP8, activations stay
bf16. ``fp8_linear_reference`` (dequantise, then matmul) is the readable oracle; shapes the kernel
does not take go there, logged once. The kernel (``dsray/fp8_gemm_kernel.py``) is imported at
first use, so Triton stays optional and ``TRITON_INTERPRET=1`` runs it on CPU tensors in tests.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch
import torch.nn.functional as F

from dsray.fp8 import dequantize_fp8_blocks

logger = logging.getLogger(__name__)

FP8_WEIGHTS = ("dequantize", "keep")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_logged_reasons: set[str] = set()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why FP8 weights cannot be kept on ``device`` (None: they can)."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed: pip install 'dsray[gpu]' (triton>=3.0)"
    if device.type != "cuda":
        if interpreting():
            return None
        return (
            f"the FP8 GEMM runs on CUDA tensors, and this model is on {device.type} "
            "(set TRITON_INTERPRET=1 to run it on CPU, slowly, in tests)"
        )
    if torch.cuda.get_device_capability(device) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has no float8_e4m3 support (needs compute capability 8.9+)"
    return None


def resolve_fp8_weights(mode: str, device: torch.device | str) -> str:
    """``auto`` → ``keep`` where the GEMM runs (CUDA with FP8 support), else ``dequantize``; ``keep``
    where it cannot run fails here, at start, naming the option."""
    if mode == "auto":
        device = torch.device(device)
        return "keep" if device.type == "cuda" and unavailable_reason(device) is None else "dequantize"
    if mode not in FP8_WEIGHTS:
        raise ValueError(f"fp8_weights {mode!r} is not supported; supported: {('auto', *FP8_WEIGHTS)}")
    if mode == "keep" and (reason := unavailable_reason(device)) is not None:
        raise ValueError(f"fp8_weights='keep' cannot run: {reason}; or choose fp8_weights='dequantize'")
    return mode


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: dequantise ``weight`` to ``x``'s dtype, then ``F.linear``."""
    return F.linear(x, dequantize_fp8_blocks(weight, scale_inv, block_size, x.dtype), bias)


def _block_k(quant_k: int) -> int | None:
    """The widest K tile that divides the quantisation block (each K step under one scale)."""
    return next((b for b in (128, 64, 32, 16) if quant_k % b == 0), None)


def fallback_reason(x: torch.Tensor, weight: torch.Tensor, block_size: tuple[int, int]) -> str | None:
    """Why this product goes to the reference path (None: the kernel takes it)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {x.dtype} (the kernel takes float32, bfloat16, float16)"
    if _block_k(block_size[1]) is None:
        return f"weight block size {tuple(block_size)} (the K block must be a multiple of 16)"
    if unavailable_reason(x.device) is not None:
        return f"tensors on {x.device.type} where the kernel cannot run"
    if weight.stride(-1) != 1:
        return "a weight whose rows are not contiguous"
    return None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., in] · dequant(weight [out, in])ᵀ (+ bias)`` in ``x``'s dtype, fp32 accumulation."""
    if (reason := fallback_reason(x, weight, block_size)) is not None:
        if reason not in _logged_reasons:
            _logged_reasons.add(reason)
            logger.warning("dsray: the FP8 GEMM falls back to dequantise-then-matmul for %s", reason)
        return fp8_linear_reference(x, weight, scale_inv, block_size, bias)
    triton, kernel = _kernel()
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m, block_n, block_k = _blocks(m, x.device, block_size[1])
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        kernel[grid](
            x2, weight, scale_inv, out, m, n, k,
            x2.stride(0), weight.stride(0), scale_inv.stride(0), out.stride(0),
            QBLOCK_N=block_size[0], QBLOCK_K=block_size[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            # Triton 3.8's interpreter gets bf16 tl.dot wrong and truncates fp32 → bf16: operands go to
            # fp32 there (exact) and the bf16 result is rounded by hand.
            UPCAST=interpreting() and x.dtype == torch.bfloat16,
        )  # fmt: skip
    out = out.view(*lead, n)
    return out if bias is None else out + bias


def _blocks(m: int, device: torch.device, quant_k: int) -> tuple[int, int, int]:
    """Tiles: narrow rows for decode-sized batches; small tiles under the interpreter."""
    block_k = _block_k(quant_k)
    if device.type != "cuda":
        return 16, 32, min(block_k, 32)
    return (16 if m <= 16 else 32 if m <= 32 else 64), 64 if m <= 32 else 128, block_k


@functools.cache
def _kernel():
    """The kernel, decorated under the current ``TRITON_INTERPRET`` (re-imported if it changed since:
    tests switch between the interpreter and compiled kernels with ``_kernel.cache_clear()``)."""
    import triton

    from dsray import fp8_gemm_kernel as k

    if k.INTERPRETED != interpreting():
        k = importlib.reload(k)
    return triton, k.fp8_gemm
