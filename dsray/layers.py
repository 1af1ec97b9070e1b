"""Layers every role shares: the decode-friendly linear, RMSNorm and the dense SwiGLU MLP.

``linear`` exists for one CPU fact: torch routes every bf16 matmul to oneDNN, whose kernels for
a decode batch (one to a few dozen rows) read weights far below the memory bandwidth: its GEMV
reaches about half of it, and its GEMM re-packs the weights on every call. Where the CPU has
AVX512-BF16 or AVX2 (``dsray/cpu_kernels.py``), up to ``GEMM_MAX_ROWS`` (64) rows go to dsray's
register-tiled kernel; without the kernels, two rows or fewer go to torch's own ``cpublas`` GEMV.
Where the CPU has AMX tiles, oneDNN's GEMM on them beats the kernel from 8 rows
(``dsray/onednn.py``), so those go to oneDNN, on all the step's threads.
Prefills stay on oneDNN, in fp32 where the CPU lacks AVX512-BF16 (torch's bf16 matmul there is
5x slower than fp32's: ``cpu_kernels.torch_bf16_widens``). All accumulate in fp32 (measured on
``small``'s shapes; see ``benchmarks/model_decode.py``). A one-token ``MLP`` runs as one fused
kernel call where the kernels are available, a decode batch's rows as another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsray import cpu_kernels, fp8_gemm, kernel_threads, onednn

GEMV_MAX_ROWS = 2


def native_gemv(x: torch.Tensor, rows: int) -> bool:
    """Whether a bf16 CPU matmul of ``rows`` rows per product should bypass oneDNN."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= GEMV_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that sends bf16 GEMVs (``x [..., in]`` of a few rows) around oneDNN."""
    rows = x.numel() // x.shape[-1]
    cpu_bf16 = x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu"
    if cpu_bf16 and onednn.takes(rows):
        with kernel_threads.all_threads():  # AMX tiles: oneDNN on every thread the step has
            return onednn.linear(x, weight, bias)
    if rows <= cpu_kernels.GEMM_MAX_ROWS and weight.dtype == torch.bfloat16 and cpu_kernels.usable(x, rows):
        y = cpu_kernels.gemm(x, weight)
        return y if bias is None else y + bias
    if not native_gemv(x, rows):
        if cpu_bf16 and cpu_kernels.torch_bf16_widens():
            # fp32 sums rounded once either way; sgemm runs ~5x faster than bf16 here, widening included
            fp32_bias = None if bias is None else bias.float()
            return F.linear(x.float(), weight.float(), fp32_bias).to(torch.bfloat16)
        return onednn.linear(x, weight, bias) if cpu_bf16 else F.linear(x, weight, bias)
    # The private setters, not the context manager: a decode step makes ~300 of these calls.
    was_enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(was_enabled)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameter names, so checkpoints load unchanged) computed by ``linear``;
    holding an FP8 weight (``hold_fp8``), by the FP8 block-scaled GEMM (``dsray/fp8_gemm.py``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float8_e4m3fn:
            return fp8_gemm.fp8_linear(x, self.weight, self.weight_scale_inv, self.fp8_block_size, self.bias)
        return linear(x, self.weight, self.bias)

    def hold_fp8(self, weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int]) -> None:
        """Keep ``weight`` (float8_e4m3fn ``[out, in]``) and its block scales as they are stored."""
        self.weight.data = weight
        self.register_buffer("weight_scale_inv", scale_inv, persistent=False)
        self.fp8_block_size = tuple(block_size)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (as DeepSeek does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.bfloat16 and cpu_kernels.usable(x, max_rows=x.numel()):
            return cpu_kernels.rmsnorm(x, self.weight, self.eps)  # the same steps and roundings, one call
        # F.rms_norm is x * rsqrt(mean(x²) + eps), bit for bit, in one dispatch instead of five.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts use it."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, bias=False)
        self.up_proj = Linear(dim, inter_dim, bias=False)
        self.down_proj = Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj.weight.dtype == x.dtype and x.dim() == 2 and cpu_kernels.usable(x):
            if x.shape[0] == 1 and self.gate_proj.out_features % 4 == 0:
                return cpu_kernels.swiglu_experts(x, [], [self.swiglu_weights()])
            if x.shape[0] > 1 and not onednn.takes(x.shape[0]):  # a decode batch: one call
                return cpu_kernels.swiglu_rows(x, *self.swiglu_weights())
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, D]

    def swiglu_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [I, D], up [I, D], down [D, I])`` for ``cpu_kernels.swiglu_experts``."""
        return self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
