"""Layers every role shares: the decode-friendly linear, RMSNorm and the dense SwiGLU MLP.

``linear`` exists for one CPU fact: torch routes every bf16 matmul to oneDNN, whose kernel for
one or two rows (the GEMV of a batch-1 decode step) reads weights at about half the memory
bandwidth, while torch's own ``cpublas`` GEMV reaches it. Two rows or fewer go to the native
kernel; wider batches stay on oneDNN, which wins from four rows on (measured on ``small``'s
shapes; see ``benchmarks/model_decode.py``). Both accumulate in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GEMV_MAX_ROWS = 2


def native_gemv(x: torch.Tensor, rows: int) -> bool:
    """Whether a bf16 CPU matmul of ``rows`` rows per product should bypass oneDNN."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= GEMV_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that sends bf16 GEMVs (``x [..., in]`` of at most ``GEMV_MAX_ROWS`` rows) around oneDNN."""
    if not native_gemv(x, x.numel() // x.shape[-1]):
        return F.linear(x, weight, bias)
    # The private setters, not the context manager: a decode step makes ~300 of these calls.
    was_enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(was_enabled)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameter names, so checkpoints load unchanged) computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (as DeepSeek does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, D]
