"""FP8 (e4m3) block quantisation: DeepSeek-V3's 128×128 weight scales, both directions.

A block-quantised weight is a float8_e4m3fn matrix ``[out, in]`` plus a float32
``scale_inv`` of shape ``[ceil(out/bo), ceil(in/bi)]``; the real weight is the fp8 value
times the scale of its block. Edge blocks are partial when ``out``/``in`` are not multiples
of the block size. Both functions work on whole tensors (no Python loop over blocks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
DEFAULT_BLOCK_SIZE = (128, 128)


def scale_shape(weight_shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, int]:
    """Shape of the ``scale_inv`` that goes with a ``[out, in]`` weight: one entry per block."""
    (out_features, in_features), (bo, bi) = weight_shape, block_size
    return math.ceil(out_features / bo), math.ceil(in_features / bi)


def _to_blocks(weight: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a 2-D float tensor to whole blocks and view it as ``[Bo, bo, Bi, bi]``."""
    (out_features, in_features), (bo, bi) = weight.shape, block_size
    num_bo, num_bi = scale_shape(weight.shape, block_size)
    # F.pad takes (left, right) pairs starting from the last dim.
    padded = F.pad(weight, (0, num_bi * bi - in_features, 0, num_bo * bo - out_features))  # [Bo*bo, Bi*bi]
    return padded.view(num_bo, bo, num_bi, bi)  # [Bo, bo, Bi, bi]


def dequantize_fp8_blocks(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Return ``weight × scale_inv[block]`` as ``dtype``, same shape as ``weight``.

    ``weight`` is float8_e4m3fn ``[out, in]``, ``scale_inv`` float32 ``[ceil(out/bo), ceil(in/bi)]``.
    The product is formed in fp32 so that bf16 rounding happens once, at the end.
    """
    if weight.dim() != 2:
        raise ValueError(f"fp8 block dequantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    want = scale_shape(weight.shape, block_size)
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)} but a weight of shape {tuple(weight.shape)} "
            f"with block size {tuple(block_size)} needs {want}; check weight_block_size in "
            "quantization_config"
        )
    out_features, in_features = weight.shape
    blocks = _to_blocks(weight.to(torch.float32), block_size)  # [Bo, bo, Bi, bi]
    # Broadcasting one scale per block avoids materialising a full [out, in] scale matrix.
    blocks.mul_(scale_inv.to(torch.float32)[:, None, :, None])  # [Bo, bo, Bi, bi]
    full = blocks.view(blocks.shape[0] * blocks.shape[1], -1)  # [Bo*bo, Bi*bi]
    return full[:out_features, :in_features].to(dtype)  # [out, in]


def quantize_fp8_blocks(
    weight: torch.Tensor, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to (float8_e4m3fn ``[out, in]``, float32 scale_inv ``[Bo, Bi]``).

    Each block's scale is its absolute maximum / 448, as in DeepSeek's own quantiser, so the
    largest value of every block lands on the edge of the e4m3 range. Used by tests and by
    tooling that writes FP8 test checkpoints.
    """
    if weight.dim() != 2:
        raise ValueError(f"fp8 block quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    blocks = _to_blocks(weight.to(torch.float32), block_size)  # [Bo, bo, Bi, bi]
    amax = blocks.abs().amax(dim=(1, 3))  # [Bo, Bi]
    # An all-zero block would give scale 0 and 0/0 = NaN; any positive scale encodes it exactly.
    scale_inv = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))  # [Bo, Bi]
    scaled = blocks / scale_inv[:, None, :, None]  # [Bo, bo, Bi, bi]
    # e4m3fn has no infinity: an fp32 rounding error past 448 must not become NaN.
    scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    full = scaled.view(scaled.shape[0] * scaled.shape[1], -1)  # [Bo*bo, Bi*bi]
    fp8 = full[:out_features, :in_features].to(torch.float8_e4m3fn)  # [out, in]
    return fp8.contiguous(), scale_inv.contiguous()
