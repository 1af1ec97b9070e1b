"""An expert shard: the slots of one MoE layer on one rank, each a routed expert's weights, stacked.

``expert_ids[s]`` is the logical expert in slot ``s`` (a contiguous range for the full model; any
set, in any order, on an expert rank whose placement came from the balancer or has replicas).
Weights are stacked per shard — ``w13 [E_local, 2I, D]`` (gate rows then up rows) and
``w2 [E_local, D, I]`` — so grouped compute indexes one tensor instead of E small modules.
Compute paths: ``forward_loop`` (one expert at a time over a token mask; the oracle),
``run_sorted`` (rows pre-sorted by expert; the fast path that the MoE exchange feeds: on x86-64
CPUs every slot runs in one kernel call, in pieces of at most ``GROUPED_MAX_ROWS`` rows; where the
CPU has AMX, slots of ``onednn.grouped_min_rows()`` rows or more go to oneDNN one at a time) and
``forward_single`` (one token: its K experts directly). With ``mode="triton"``
(``expert_mode="triton"``), ``run_sorted`` is one fused Triton MoE over all slots and
``forward_fused`` runs a whole layer's (token, k) pairs with the routing weights in the kernel
(``experts/triton_moe.py``); what the kernel does not take goes to the torch path, logged once.
A shard may hold FP8 weights (``hold_fp8``: float8_e4m3fn with DeepSeek-V3's block scales): the
kernel reads them as they are; the torch paths dequantise a slot's weights when they use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsray import cpu_kernels, onednn
from dsray.fp8 import dequantize_fp8_blocks
from dsray.layers import linear
from experts import triton_moe

# The grouped kernel takes a slot's rows at most this many at a time: a slot with more is cut into
# even pieces of whole 16-row blocks, each reading the slot's weights again. 2 threads, 64 slots of
# `small` (D 1024, I 256), kernel vs one oneDNN expert at a time: 128 rows a slot 345 vs 268 GFLOP/s,
# 256 rows 252 vs 286 (the slot's packed rows no longer stay in L2 across its weight tiles).
# At least decode_step.MAX_TOKENS, so a decode batch's experts all take the kernel on both paths.
GROUPED_MAX_ROWS = 128


class ExpertShard(nn.Module):
    def __init__(
        self,
        expert_ids: list[int] | range,
        dim: int,
        inter_dim: int,
        mode: str = "grouped",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.mode = mode  # "grouped" (torch, CPU kernels) or "triton" (the fused Triton MoE)
        self.expert_ids = list(expert_ids)
        self.num_local_experts = len(self.expert_ids)
        self.local_of = {e: s for s, e in enumerate(self.expert_ids)}
        if len(self.local_of) != self.num_local_experts:
            raise ValueError(f"a shard holds each expert once; got {self.expert_ids}")
        num_local_experts = self.num_local_experts
        self.inter_dim = inter_dim
        # Allocated in their final dtype and place (default: torch's): a shard built while serving (a
        # rebalance, a lost worker's experts) never converts a whole stack of uninitialised memory.
        empty = {"dtype": dtype, "device": device}
        self.w13 = nn.Parameter(torch.empty(num_local_experts, 2 * inter_dim, dim, **empty), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_local_experts, dim, inter_dim, **empty), requires_grad=False)

    def write_slots(self, slots: list[int], staged: ExpertShard) -> None:
        """Overwrite ``slots`` (local indices) with ``staged``'s experts, in order, in place: a rebalance's
        switch rewrites only the slots whose expert changes. FP8 slots take ``staged``'s block scales
        with its weights (both shards FP8, with one block size)."""
        if not slots:
            return
        scales, staged_scales = self.fp8_scales, staged.fp8_scales
        if self._held_format() != staged._held_format():
            raise ValueError(f"slots holding {self._held_format()} cannot take experts in {staged._held_format()}")
        ids = list(self.expert_ids)
        for slot, expert in zip(slots, staged.expert_ids, strict=True):
            ids[slot] = expert
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"a shard holds each expert once; writing {staged.expert_ids} to slots {slots} gives {ids}"
            )
        index = torch.tensor(slots, device=self.w13.device)
        pairs = [(self.w13.data, staged.w13.data), (self.w2.data, staged.w2.data)]
        if scales is not None:
            pairs += [(scales.w13, staged_scales.w13), (scales.w2, staged_scales.w2)]
        for live, new in pairs:
            if live.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernel: copy the bytes
                live, new = live.view(torch.uint8), new.view(torch.uint8)
            live.index_copy_(0, index, new.to(live.device))
        self.expert_ids, self.local_of = ids, {e: s for s, e in enumerate(ids)}

    def keep_first(self, num_slots: int) -> None:
        """Keep only the first ``num_slots`` slots, as views of the stacks (no copy, no new memory): a
        worker giving back experts it took over after a loss, which it had appended, drops them at once."""
        self.w13.data, self.w2.data = self.w13.data[:num_slots], self.w2.data[:num_slots]
        if self.fp8_scales is not None:
            self.w13_scale_inv, self.w2_scale_inv = self.w13_scale_inv[:num_slots], self.w2_scale_inv[:num_slots]
        self.expert_ids = self.expert_ids[:num_slots]
        self.num_local_experts = num_slots
        self.local_of = {e: s for s, e in enumerate(self.expert_ids)}

    def hold_fp8(self, w13: torch.Tensor, w2: torch.Tensor, scales: triton_moe.Fp8Scales) -> None:
        """Keep float8_e4m3fn stacks ``w13``/``w2`` and their block scales as they were stored."""
        self.w13.data, self.w2.data = w13, w2
        self.register_buffer("w13_scale_inv", scales.w13, persistent=False)
        self.register_buffer("w2_scale_inv", scales.w2, persistent=False)
        self.fp8_block_size = tuple(scales.block_size)

    def _held_format(self) -> str:
        scales = self.fp8_scales
        return str(self.w13.dtype) + ("" if scales is None else f" with block size {scales.block_size}")

    @property
    def fp8_scales(self) -> triton_moe.Fp8Scales | None:
        if self.w13.dtype != torch.float8_e4m3fn:
            return None
        return triton_moe.Fp8Scales(self.w13_scale_inv, self.w2_scale_inv, self.fp8_block_size)

    def slot_weights(self, local_id: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13 [2I, D], w2 [D, I])`` of one slot; FP8 weights dequantised to ``dtype``."""
        if (scales := self.fp8_scales) is None:
            return self.w13[local_id], self.w2[local_id]
        inter, half, block = self.inter_dim, scales.w13.shape[1] // 2, scales.block_size
        w13, s13 = self.w13[local_id], scales.w13[local_id]
        gate = dequantize_fp8_blocks(w13[:inter], s13[:half], block, dtype)
        up = dequantize_fp8_blocks(w13[inter:], s13[half:], block, dtype)
        return torch.cat([gate, up]), dequantize_fp8_blocks(self.w2[local_id], scales.w2[local_id], block, dtype)

    def expert_ffn(self, local_id: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of one local expert over rows ``x [M, D]``."""
        w13, w2 = self.slot_weights(local_id, x.dtype)
        gate_up = linear(x, w13)  # [M, 2I]
        gate, up = gate_up.split(self.inter_dim, dim=-1)
        return linear(F.silu(gate) * up, w2)  # [M, D]

    def forward_loop(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Reference: weighted sum over this shard's experts of ``x [T, D]`` (other experts add 0)."""
        out = torch.zeros_like(x, dtype=torch.float32)  # [T, D]
        for local_id, expert in enumerate(self.expert_ids):
            token_ids, k = torch.where(topk_ids == expert)
            if token_ids.numel() == 0:
                continue
            y = self.expert_ffn(local_id, x[token_ids])  # [M, D]
            out.index_add_(0, token_ids, y.float() * topk_weights[token_ids, k, None])
        return out.to(x.dtype)

    def forward_single(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Fast path for one token ``x [1, D]``: its experts straight from the stacked weights.

        A batch-1 decode step has at most K experts to run: no dispatch plan (argsort, bincount,
        gathers, scatter), only K matmul pairs. Sums in expert order in fp32, as ``forward_loop``
        does, so the two agree bit for bit.
        """
        if self.inter_dim % 4 == 0 and self.w13.dtype == x.dtype and cpu_kernels.usable(x, max_rows=1):
            return cpu_kernels.swiglu_experts(x, self.single_token_experts(topk_ids, topk_weights), checked=True)
        out = torch.zeros_like(x, dtype=torch.float32)  # [1, D]
        for expert, weight in sorted(zip(topk_ids[0].tolist(), topk_weights[0].tolist())):
            if expert in self.local_of:
                out += self.expert_ffn(self.local_of[expert], x).float() * weight
        return out.to(x.dtype)

    def single_token_experts(
        self, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """One token's experts on this shard as ``(gate, up, down, weight)`` in expert order (the
        summation order of ``forward_single``), for ``cpu_kernels.swiglu_experts``."""
        views = self._expert_views()
        pairs = sorted(zip(topk_ids[0].tolist(), topk_weights[0].tolist()))
        return [(*views[self.local_of[e]], weight) for e, weight in pairs if e in self.local_of]

    def _expert_views(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per-expert ``(gate, up, down)`` views of the stacked weights, made once per weight storage."""
        key = (self.w13.data_ptr(), self.w2.data_ptr())
        if getattr(self, "_views_key", None) != key:
            if not (self.w13.is_contiguous() and self.w2.is_contiguous() and self.w13.dtype == torch.bfloat16):
                raise ValueError("the single-token kernel needs contiguous bf16 expert weights")
            inter = self.inter_dim
            self._views = [(w13[:inter], w13[inter:], w2) for w13, w2 in zip(self.w13, self.w2)]
            self._views_key = key
        return self._views

    def forward_fused(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor | None:
        """The whole layer in the fused Triton MoE, weights applied in the kernel, or None where it
        does not apply (a shard that is not every expert in order; tensors the kernel does not take)."""
        if self.expert_ids != list(range(self.num_local_experts)) or not self._triton_takes(x):
            return None
        return triton_moe.fused_moe(x, topk_ids, topk_weights, self.w13, self.w2, self.fp8_scales)

    def _triton_takes(self, rows: torch.Tensor) -> bool:
        if (reason := triton_moe.fallback_reason(rows, self.w13, self.w2, self.fp8_scales)) is not None:
            triton_moe.log_fallback(reason)
        return reason is None

    def run_sorted(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Fast path: ``rows [M, D]`` sorted by slot, ``counts[s]`` rows each → ``[M, D]`` (the exchange's
        ``SlotCompute``; ``counts`` may be padded past this shard's slots with zeros)."""
        if self.mode == "triton" and self._triton_takes(rows):
            return triton_moe.run_sorted(rows, counts[: self.num_local_experts], self.w13, self.w2, self.fp8_scales)
        spans, start = [], 0
        for local_id, n in enumerate(counts):
            if n:
                spans.append((local_id, start, start + n))
            start += n
        out, loose = None, spans  # loose: slots computed one at a time (expert_ffn)
        if spans and self._grouped_kernel(rows):
            # Where the CPU has AMX, oneDNN runs a slot of many rows (a prefill's) faster on its own.
            min_rows = onednn.grouped_min_rows()
            wide = [onednn.takes(e - b, min_rows) for _, b, e in spans]
            loose = [span for span, w in zip(spans, wide) if w]
            if grouped := [span for span, w in zip(spans, wide) if not w]:  # every other slot in one call
                pieces = [piece for span in grouped for piece in _kernel_pieces(*span)]
                slots, bounds = [s for s, _, _ in pieces], [(b, e) for _, b, e in pieces]
                out = cpu_kernels.swiglu_grouped(rows, slots, bounds, self.w13, self.w2)
        if out is None:
            out = torch.empty_like(rows)
        for local_id, begin, end in loose:
            out[begin:end] = self.expert_ffn(local_id, rows[begin:end])
        return out

    def _grouped_kernel(self, rows: torch.Tensor) -> bool:
        return (
            cpu_kernels.usable(rows, max_rows=rows.shape[0])
            and rows.is_contiguous()
            and self.w13.dtype == torch.bfloat16
            and self.w13.is_contiguous()
            and self.w2.is_contiguous()
        )


def _kernel_pieces(slot: int, begin: int, end: int) -> list[tuple[int, int, int]]:
    """A slot's rows ``[begin, end)`` for the grouped kernel: whole, or past ``GROUPED_MAX_ROWS`` cut
    into as few even pieces of whole 16-row blocks (the kernel's lanes) as fit under it."""
    n = end - begin
    if n <= GROUPED_MAX_ROWS:
        return [(slot, begin, end)]
    count = -(-n // GROUPED_MAX_ROWS)
    size = -(-n // count // 16) * 16
    return [(slot, b, min(b + size, end)) for b in range(begin, end, size)]
