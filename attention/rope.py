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
    """Precomputed rotations for every position up to ``max_position_embeddings``.

    A rotation by angle θ of the pair (x1, x2) is the complex product ``(x1 + i·x2) · e^{iθ}``,
    so the table holds ``attention_factor · e^{iθ}`` per position and pair: one complex multiply
    rotates a whole tensor. ``cis(positions)`` looks the rows up once per step (every layer
    rotates at the same positions), ``rotate`` applies them.
    """

    def __init__(self, args: ModelArgs):
        inv_freq, attention_factor = rope_frequencies(args)
        positions = torch.arange(args.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq)  # [P, R/2]
        self.table = torch.complex(freqs.cos() * attention_factor, freqs.sin() * attention_factor)  # [P, R/2]
        self.interleaved = args.rope_interleave

    def cis(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotations ``[T, 1, R/2]`` (complex64) at ``positions [T]``, broadcastable over heads."""
        if self.table.device != positions.device:
            self.table = self.table.to(positions.device)
        return self.table[positions].unsqueeze(1)

    def rotate(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, H, R]`` by ``cis [T, 1, R/2]``; computed in fp32, returned in x's dtype."""
        if self.interleaved:  # pairs (x0, x1), (x2, x3), … are already (real, imag) in memory
            pairs = x.float().contiguous().view(*x.shape[:-1], -1, 2)  # [T, H, R/2, 2]
            return torch.view_as_real(torch.view_as_complex(pairs) * cis).flatten(-2).to(x.dtype)  # [T, H, R]
        # Halves layout: pair i is (x[i], x[i + R/2]); make the pairs adjacent, rotate, and put back.
        pairs = torch.stack(x.float().chunk(2, dim=-1), dim=-1)  # [T, H, R/2, 2]
        out = torch.view_as_real(torch.view_as_complex(pairs) * cis)  # [T, H, R/2, 2]
        return out.transpose(-1, -2).reshape(x.shape).to(x.dtype)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, ..., R]`` at ``positions [T]``."""
        shape = x.shape
        return self.rotate(x.reshape(shape[0], -1, shape[-1]), self.cis(positions)).view(shape)
