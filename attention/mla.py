"""Multi-head Latent Attention over the paged latent cache, in two switchable forms.

* ``naive`` — decompress per-head keys and values from the cached latent (``W_UK c_kv``,
  ``W_UV c_kv``) and run ordinary attention. Readable; the oracle.
* ``absorbed`` — fold ``W_UK`` into the query and ``W_UV`` into the output, and attend over the
  latent directly: MQA with C + R wide keys and C wide values, the cache read once for all
  heads. Decode steps batch all sequences into one gathered read. A prompt's span where that
  costs more (many new tokens over a context not much longer: the score and value products are
  C + R and C wide instead of d_nope + R and d_v) is *expanded* instead, as DeepSeek and vLLM
  prefill: keys and values decompressed from the latent by ``kv_b_proj`` for its context, then
  fused (flash) attention. The choice is by multiply-adds (``expanding_is_cheaper``).
* ``triton`` — ``absorbed`` with its decode rows (one new token per sequence) in the Triton
  flash-decoding kernel of ``attention/triton_mla.py``, which reads the paged cache in place;
  prefill rows keep the torch path. A call the kernel does not take falls back to torch (logged
  once per reason).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from attention import triton_mla
from attention.metadata import AttentionMetadata
from attention.rope import RotaryEmbedding
from dsray import cpu_kernels
from dsray.config import ModelArgs
from dsray.layers import Linear, RMSNorm

MLA_MODES = ("naive", "absorbed", "triton")

logger = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """The MLA path for ``device``: ``auto`` → ``triton`` on CUDA when Triton is installed, else ``absorbed``.

    ``triton`` where Triton cannot run (not installed; CPU tensors without ``TRITON_INTERPRET=1``)
    fails here, at start, naming the option.
    """
    device = torch.device(device)
    if mode == "auto":
        return "triton" if device.type == "cuda" and triton_mla.unavailable_reason(device) is None else "absorbed"
    if mode not in MLA_MODES:
        raise ValueError(f"mla_mode {mode!r} is not supported; supported: {('auto', *MLA_MODES)}")
    if mode == "triton" and (reason := triton_mla.unavailable_reason(device)) is not None:
        raise ValueError(f"mla_mode='triton' cannot run: {reason}; or choose mla_mode='absorbed' (the torch path)")
    return mode


def _log_fallback_once(reason: str) -> None:
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        logger.warning("mla_mode='triton': %s; these calls take the torch absorbed path", reason)


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, rope: RotaryEmbedding, mode: str = "absorbed"):
        super().__init__()
        if mode not in MLA_MODES:
            raise ValueError(f"mla mode {mode!r} is not supported; supported: {MLA_MODES}")
        self.mode = mode
        self.n_heads = args.num_attention_heads
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.q_lora_rank = args.q_lora_rank
        self.softmax_scale = args.softmax_scale
        self.rope = rope
        dim, H = args.hidden_size, self.n_heads
        if self.q_lora_rank:
            self.q_a_proj = Linear(dim, self.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = Linear(self.q_lora_rank, H * args.qk_head_dim, bias=False)
        else:
            self.q_proj = Linear(dim, H * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(dim, args.kv_cache_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = Linear(H * self.v_head_dim, dim, bias=args.attention_bias)
        self._kernel_shapes = self.kv_lora_rank % 16 == 0 and self.v_head_dim % 16 == 0  # cpu_kernels.mla_decode
        self._copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # see _weight_copies
        self._copies_key: tuple | None = None

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [H, d_nope, C]`` and ``W_UV [H, d_v, C]``, views into ``kv_b_proj``."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [H, d_nope, C]`` and ``W_UVᵀ [H, C, d_v]``, contiguous for ``bmm``."""
        return self._weight_copies("bmm")

    def _kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UKᵀ [H, C, d_nope]`` and ``W_UV [H, d_v, C]``, contiguous, for ``cpu_kernels.mla_decode_step``
        (it takes dot products with their rows)."""
        return self._weight_copies("rows")

    def _weight_copies(self, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj``'s up-projections copied contiguous in ``layout`` ("bmm" or "rows"), once, and kept:
        sliced views of it make every product copy them first. Rebuilt when ``kv_b_proj``'s weight is
        replaced (loading assigns a new tensor); an in-place edit of that weight is not seen."""
        weight = self.kv_b_proj.weight
        key = (weight.data_ptr(), weight.dtype, weight.device)
        if self._copies_key != key:
            self._copies, self._copies_key = {}, key
        if layout not in self._copies:
            w_uk, w_uv = self._up_weights()
            if layout == "bmm":
                self._copies[layout] = (w_uk.contiguous(), w_uv.transpose(1, 2).contiguous())
            else:
                self._copies[layout] = (w_uk.transpose(1, 2).contiguous(), w_uv.contiguous())
        return self._copies[layout]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """``x [T, D]`` → ``[T, D]``; writes this step's latents into ``kv_cache [slots, C + R]`` first."""
        T, H = x.shape[0], self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(T, H, -1)  # [T, H, d_nope + R]
        kv = self.kv_a_proj_with_mqa(x)  # [T, C + R]
        cis = meta.rope_cis if meta.rope_cis is not None else self.rope.cis(meta.positions)
        kernel = self._kernel_takes(x, kv_cache)
        split = meta.one_row_split() if kernel and not meta.is_decode_only else None
        if kernel and meta.is_decode_only:
            out = self._kernel_attend(
                q, kv, cis, meta.slot_mapping, meta.block_tables, meta.context_lens_t, meta.block_size, kv_cache
            )
        elif split is not None:
            out = self._split_attend(q, kv, cis, meta, kv_cache, *split)
        else:
            out = self._torch_attend(q, kv, cis, meta.slot_mapping, meta, kv_cache, list(_spans(meta)))
        return self.o_proj(out.reshape(T, -1))

    def _kernel_takes(self, x: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether ``cpu_kernels.mla_decode_step`` can take this module's decode rows (absorbed mode, bf16
        on CPU).

        It takes them in a step that also carries prompt spans too (``meta.one_row_split``): a one-row
        span is a decode row whatever brought it (a decode, a one-token chunk), its query the last
        position seeing the whole context. One serving step admits a few prompts beside hundreds of
        decodes, and attending those one by one in torch cost a third of the step.
        """
        return (
            self.mode == "absorbed"
            and self._kernel_shapes
            and kv_cache.dtype == torch.bfloat16
            and cpu_kernels.usable(x, max_rows=x.shape[0])
        )

    def _kernel_attend(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        cis: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Decode rows in one kernel call: latent write, rope, absorbed attention and W_UV (same rounding
        as the torch path). ``q [n, H, d_nope + R]``, ``kv [n, C + R]`` → ``[n, H, d_v]``."""
        w_uk_t, w_uv = self._kernel_weights()
        return cpu_kernels.mla_decode_step(
            q, kv, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cis, self.rope.interleaved, slot_mapping,
            w_uk_t, w_uv, kv_cache, block_tables, context_lens, block_size, self.softmax_scale,
        )  # fmt: skip

    def _split_attend(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        cis: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        seqs: torch.Tensor,
        rows: torch.Tensor,
        rest: torch.Tensor,
        packed: list,
    ) -> torch.Tensor:
        """A mixed step (``meta.one_row_split``): the one-row spans ``rows`` (of sequences ``seqs``)
        through the decode kernel, the ``rest`` rows through the torch path, their spans ``packed``.
        → ``[T, H, d_v]``."""
        out = q.new_empty(q.shape[0], self.n_heads, self.v_head_dim)
        out[rows] = self._kernel_attend(
            q[rows], kv[rows], cis[rows], meta.slot_mapping[rows], meta.block_tables[seqs],
            meta.context_lens_t[seqs], meta.block_size, kv_cache,
        )  # fmt: skip
        out[rest] = self._torch_attend(q[rest], kv[rest], cis[rest], meta.slot_mapping[rest], meta, kv_cache, packed)
        return out

    def _torch_attend(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        cis: torch.Tensor,
        slot_mapping: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        spans: list,
    ) -> torch.Tensor:
        """The torch path over rows ``q [n, H, d_nope + R]`` / ``kv [n, C + R]`` (``spans``: sequence
        i's rows ``[a, b)`` of them): rope, latent write, then the mode's attention. → ``[n, H, d_v]``."""
        C, H = self.kv_lora_rank, self.n_heads
        q_nope = q[..., : self.qk_nope_head_dim]  # [n, H, d_nope]
        # Query and key rope dims rotate at the same positions: one rotation for both.
        pe = torch.cat([q[..., self.qk_nope_head_dim :], kv[:, None, C:]], dim=1)  # [n, H + 1, R]
        pe = self.rope.rotate(pe, cis)
        q_pe, k_pe = pe[:, :H], pe[:, H]  # [n, H, R], [n, R]
        c_kv = self.kv_a_layernorm(kv[:, :C])  # [n, C]
        kv_cache[slot_mapping] = torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype)
        if self.mode in ("absorbed", "triton"):
            wide = set()
            if not meta.is_decode_only:
                wide = {i for i, a, b in spans if self._expands(b - a, meta.context_lens[i])}
            if wide:
                return self._mixed_attend(q_nope, q_pe, meta, kv_cache, spans, wide)
            return self._latent_attend(q_nope, q_pe, meta, kv_cache, spans)
        return torch.cat(
            [self._naive_seq(q_nope[a:b], q_pe[a:b], kv_cache[meta.context_slots(i)]) for i, a, b in spans]
        )

    def _mixed_attend(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        spans: list,
        wide: set,
    ) -> torch.Tensor:
        """The sequences in ``wide`` expanded, one by one; the rest absorbed in one call over their
        rows packed together. → ``[T, H, d_v]``."""
        out = q_nope.new_empty(*q_nope.shape[:2], self.v_head_dim)
        rest, packed, start = [], [], 0  # the rest's rows, and their spans over the packed rows
        for i, a, b in spans:
            if i in wide:
                out[a:b] = self._expanded_seq(q_nope[a:b], q_pe[a:b], kv_cache[meta.context_slots(i)])
            else:
                rest.append(torch.arange(a, b, device=q_nope.device))
                packed.append((i, start, start + b - a))
                start += b - a
        if rest:
            rows = torch.cat(rest)
            out[rows] = self._latent_attend(q_nope[rows], q_pe[rows], meta, kv_cache, packed)
        return out

    def _latent_attend(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor, spans: list
    ) -> torch.Tensor:
        """Absorbed attention of rows ``q_nope [n, H, d_nope]`` / ``q_pe [n, H, R]`` over the latent
        cache: ``spans`` gives sequence i's rows ``[a, b)`` of them. → ``[n, H, d_v]``."""
        w_uk, w_uv_t = self._absorb_weights()
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [n, H, C]
        q_full = torch.cat([q_lat, q_pe], dim=-1)  # [n, H, C + R]
        reason = triton_mla.unsupported_reason(q_full, kv_cache, self.kv_lora_rank) if self.mode == "triton" else "off"
        if reason is None:
            o_lat = self._triton_attend(q_full, meta, kv_cache, spans)
        else:
            if self.mode == "triton":
                _log_fallback_once(reason)
            o_lat = self._absorbed_attend(q_full, meta, kv_cache, spans)
        return torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [n, H, d_v]

    def _absorbed_attend(
        self, q_full: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor, spans: list
    ) -> torch.Tensor:
        """The torch absorbed path: ``q_full [n, H, C + R]`` → ``o_lat [n, H, C]``."""
        if meta.is_decode_only:
            return self._absorbed_decode(q_full, meta, kv_cache)
        if _pads_cheaply(spans, meta.context_lens, self.n_heads):
            return self._absorbed_padded(q_full, meta, kv_cache, spans)
        return torch.cat([self._absorbed_seq(q_full[a:b], kv_cache[meta.context_slots(i)]) for i, a, b in spans])

    def _absorbed_padded(
        self, q_full: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor, spans: list
    ) -> torch.Tensor:
        """Several spans at once, each padded to the longest span and context: ``q_full [n, H, C + R]``
        → ``o_lat [n, H, C]``, as ``_absorbed_seq`` gives span by span. A padded query row repeats its
        span's last row and is dropped; a padded key is masked for every real row."""
        S, device = len(spans), q_full.device
        q_lens = [b - a for _, a, b in spans]
        lens = [meta.context_lens[i] for i, _, _ in spans]
        Q, L = max(q_lens), max(lens)
        rows = torch.tensor([a + min(j, b - a - 1) for _, a, b in spans for j in range(Q)], device=device)
        q = q_full[rows].view(S, Q, *q_full.shape[1:])  # [S, Q, H, C + R]
        slots = torch.stack([F.pad(meta.context_slots(i), (0, L - n), value=0) for (i, _, _), n in zip(spans, lens)])
        latent = kv_cache[slots].to(q_full.dtype)  # [S, L, C + R]
        scores = torch.einsum("sqhc,slc->shql", q, latent)  # [S, H, Q, L]
        # Query j of span s sits at position lens[s] - q_lens[s] + j and sees the keys up to it.
        last = torch.tensor(lens, device=device) - torch.tensor(q_lens, device=device)
        mask = torch.arange(L, device=device) > (last[:, None] + torch.arange(Q, device=device))[:, :, None]
        o_lat = self._scores_to_output(scores, mask[:, None], latent[:, None, :, : self.kv_lora_rank])  # [S, H, Q, C]
        keep = torch.tensor([s * Q + j for s, n in enumerate(q_lens) for j in range(n)], device=device)
        return o_lat.transpose(1, 2).reshape(S * Q, q_full.shape[1], -1)[keep]

    def _triton_attend(
        self, q_full: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor, spans: list
    ) -> torch.Tensor:
        """Decode rows (one new token of a sequence) through the Triton kernel, prefill rows through torch."""
        C = self.kv_lora_rank
        if meta.is_decode_only:
            return triton_mla.mla_decode(
                q_full, kv_cache, meta.block_tables, meta.context_lens_t, meta.block_size, C, self.softmax_scale
            )
        decode = [(i, a) for i, a, b in spans if b - a == 1]
        o_lat = torch.empty(*q_full.shape[:2], C, dtype=q_full.dtype, device=q_full.device)
        for i, a, b in spans:
            if b - a > 1:
                o_lat[a:b] = self._absorbed_seq(q_full[a:b], kv_cache[meta.context_slots(i)])
        if decode:
            seqs, rows = (torch.tensor(v, device=q_full.device) for v in zip(*decode))
            o_lat[rows] = triton_mla.mla_decode(
                q_full[rows], kv_cache, meta.block_tables[seqs], meta.context_lens_t[seqs], meta.block_size, C,
                self.softmax_scale,
            )  # fmt: skip
        return o_lat

    def _scores_to_output(self, scores: torch.Tensor, mask: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
        scores = scores.float() * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)

    def _absorbed_seq(self, q_full: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """One sequence: ``q_full [q, H, C + R]`` over ``latent [L, C + R]`` → ``o_lat [q, H, C]``."""
        q, L = q_full.shape[0], latent.shape[0]
        scores = torch.einsum("qhc,lc->hql", q_full, latent.to(q_full.dtype))  # [H, q, L]
        o_lat = self._scores_to_output(
            scores, _causal_mask(q, L, q_full.device), latent[:, : self.kv_lora_rank].to(q_full.dtype)
        )
        return o_lat.transpose(0, 1)  # [q, H, C]

    def _absorbed_decode(self, q_full: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """All sequences at once, one new token each: ``q_full [N, H, C + R]`` → ``[N, H, C]``.

        One gather of every sequence's blocks (padded to the longest table; ``meta.decode_pad`` masks
        the padding). Whole blocks, not exact lengths: oneDNN builds a kernel per matmul shape, and
        a length that grows each step would pay that build every step in every layer.
        """
        N, width = meta.block_tables.shape
        latent = kv_cache.view(-1, meta.block_size, kv_cache.shape[-1])[meta.block_tables]  # [N, B, bs, C + R]
        latent = latent.view(N, width * meta.block_size, -1).to(q_full.dtype)  # [N, S, C + R]
        scores = torch.bmm(q_full, latent.transpose(1, 2))  # [N, H, S]
        return self._scores_to_output(scores, meta.decode_pad, latent[..., : self.kv_lora_rank])  # [N, H, C]

    def _expands(self, q: int, L: int) -> bool:
        """Whether ``q`` new tokens over a context of ``L`` take fewer multiply-adds expanded (``kv_b_proj``
        over the context, then d_nope + R wide scores and d_v wide values) than absorbed (W_UK into the
        queries, C + R wide scores and C wide values, W_UV out)."""
        return expanding_is_cheaper(
            q, L, self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        )

    def _expanded_seq(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """One sequence's span the prefill way: keys and values decompressed from ``latent [L, C + R]``,
        then torch's fused attention (causal, the queries the last ``q`` positions) → ``[q, H, d_v]``.
        Values are zero-padded to the key width where narrower: torch's flash kernel on CPU wants
        equal widths (at 2,048 tokens it is ~5x the unfused path); the padding's outputs are dropped."""
        q, L, H, C = q_nope.shape[0], latent.shape[0], self.n_heads, self.kv_lora_rank
        latent = latent.to(q_nope.dtype)
        kv = self.kv_b_proj(latent[:, :C]).view(L, H, -1)  # [L, H, d_nope + d_v]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, latent[:, None, C:].expand(L, H, self.qk_rope_head_dim)], dim=-1)
        query = torch.cat([q_nope, q_pe], dim=-1)  # [q, H, d_nope + R]
        width = query.shape[-1]
        if self.v_head_dim < width:
            v = F.pad(v, (0, width - self.v_head_dim))
        causal = dict(is_causal=True) if q == L else dict(attn_mask=~_causal_mask(q, L, q_nope.device))
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=self.softmax_scale, **causal
        )  # [H, q, width]
        return out[..., : self.v_head_dim].transpose(0, 1)

    def _naive_seq(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Oracle: decompress per-head K/V from ``latent [L, C + R]`` → attention output ``[q, H, d_v]``."""
        q, L = q_nope.shape[0], latent.shape[0]
        latent = latent.to(q_nope.dtype)
        kv = self.kv_b_proj(latent[:, : self.kv_lora_rank]).view(L, self.n_heads, -1)  # [L, H, d_nope + d_v]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = latent[:, self.kv_lora_rank :]  # [L, R], shared by all heads
        scores = torch.einsum("qhd,lhd->hql", q_nope, k_nope) + torch.einsum("qhr,lr->hql", q_pe, k_pe)
        out = self._scores_to_output(scores, _causal_mask(q, L, q_nope.device), v.transpose(0, 1))  # [H, q, d_v]
        return out.transpose(0, 1)


def expanding_is_cheaper(q: int, L: int, H: int, C: int, d_nope: int, R: int, d_v: int) -> bool:
    """MLA over ``q`` new tokens of an ``L``-token context: whether the expanded form (decompress the
    context's keys and values, attend per head) takes fewer multiply-adds than the absorbed one. For
    ``small`` (H 16, C 256) a whole 128-token prompt is ~2x cheaper expanded; one token over any
    context, or a short chunk over a long one, is far cheaper absorbed."""
    expanded = L * C * H * (d_nope + d_v) + q * L * H * (d_nope + R + d_v)
    absorbed = q * H * d_nope * C + q * L * H * (2 * C + R) + q * H * C * d_v
    return expanded < absorbed


PADDED_SCORES_MAX = 1 << 24  # fp32 scores of one padded product (64 MiB); past it, span by span


def _pads_cheaply(spans: list, context_lens: list[int], heads: int) -> bool:
    """Whether padding ``spans`` (``(i, start, end)``) to the longest span and context costs at most
    twice the score products of attending them one by one (and there is more than one), in scores
    that fit ``PADDED_SCORES_MAX``: chunks of long prompts attend one at a time, as before."""
    if len(spans) < 2:
        return False
    Q = max(b - a for _, a, b in spans)
    L = max(context_lens[i] for i, _, _ in spans)
    padded = len(spans) * Q * L
    return padded * heads <= PADDED_SCORES_MAX and padded <= 2 * sum((b - a) * context_lens[i] for i, a, b in spans)


def _spans(meta: AttentionMetadata):
    """``(i, start, end)``: the token span of each sequence in the flattened batch."""
    start = 0
    for i, n in enumerate(meta.query_lens):
        yield i, start, start + n
        start += n


def _causal_mask(q: int, L: int, device: torch.device) -> torch.Tensor:
    """True where query j (the last q of L positions) must not see key l: ``l > L - q + j``."""
    rows = torch.arange(L - q, L, device=device)[:, None]
    return torch.arange(L, device=device)[None, :] > rows  # [q, L]
