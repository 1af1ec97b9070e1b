"""Rotary position embedding for MLA's rope dims, with YaRN scaling and both pair layouts.

DeepSeek checkpoints rotate *interleaved* pairs (x0, x1), (x2, x3), …; some V3 configs say
``rope_interleave: false`` and rotate the two halves instead (HF's ``rotate_half``). Query and
key always use the same layout, so attention scores do not depend on how pairs are stored.
"""

from __future__ import annotations

import math

import torch

from dsray.config import ModelArgs, YarnScaling, yarn_mscale


def _yarn_correction_range(scaling: YarnScaling, dim: int, base: float) -> tuple[float, float]:
    """Dimension range [low, high] over which YaRN ramps from extrapolation to interpolation."""

    def dim_for(num_rotations: float) -> float:
        orig = scaling.original_max_position_embeddings
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(dim_for(scaling.beta_fast))
    high = math.ceil(dim_for(scaling.beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[R/2]`` (fp32) and the factor applied to cos/sin."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    low, high = _yarn_correction_range(scaling, dim, base)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the dimension keeps its original frequency
    inv_freq = inv_freq / scaling.factor * (1 - extrapolate) + inv_freq * extrapolate
    if scaling.mscale and scaling.mscale_all_dim:
        attention_factor = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    else:
        attention_factor = yarn_mscale(scaling.factor)
    return inv_freq, attention_factor


class RotaryEmbedding:
    """Precomputed cos/sin tables for every position up to ``max_position_embeddings``."""

    def __init__(self, args: ModelArgs):
        inv_freq, attention_factor = rope_frequencies(args)
        positions = torch.arange(args.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq)  # [P, R/2]
        self.cos = freqs.cos() * attention_factor
        self.sin = freqs.sin() * attention_factor
        self.interleaved = args.rope_interleave

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, ..., R]`` at ``positions [T]``; computed in fp32, returned in x's dtype."""
        if self.cos.device != x.device:
            self.cos, self.sin = self.cos.to(x.device), self.sin.to(x.device)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        cos = self.cos[positions].view(shape)  # [T, 1.., R/2]
        sin = self.sin[positions].view(shape)
        x32 = x.float()
        if self.interleaved:
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = x32.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
