"""Per-step attention metadata over the paged latent cache: where each token reads and writes.

A step runs a ragged batch of sequences flattened to ``T`` tokens. Sequence ``i`` brings
``query_lens[i]`` new tokens, the last ones of its ``context_lens[i]`` tokens; token at
position ``p`` of a sequence lives in cache slot ``block_table[p // block_size] * block_size +
p % block_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64 absolute position of each token
    slot_mapping: torch.Tensor  # [T] int64 cache slot each token's latent is written to
    block_tables: torch.Tensor  # [N, max_blocks] int64, padded with 0
    query_lens: list[int]  # [N] new tokens per sequence; sum = T
    context_lens: list[int]  # [N] tokens in the cache per sequence once this step's are written
    context_lens_t: torch.Tensor  # [N] int64, same values as context_lens
    block_size: int
    # Decode-only steps read whole blocks (S = max_blocks * block_size slots per sequence): where
    # that read is padding, or None when no sequence has any. Built once per step for every layer.
    decode_pad: torch.Tensor | None = None  # [N, 1, S] bool, True on padding
    # Rotary rotations at ``positions``, attached by the model once per forward (see Transformer).
    rope_cis: torch.Tensor | None = None  # [T, 1, R/2] complex64
    is_decode_only: bool = field(init=False)
    _context_slots: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _one_row_split: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.is_decode_only = all(q == 1 for q in self.query_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        num_computed: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences with ``num_computed[i]`` cached tokens and ``query_lens[i]`` new ones."""
        positions: list[int] = []
        slots: list[int] = []
        for table, start, n in zip(block_tables, num_computed, query_lens):
            for p in range(start, start + n):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        context_lens = [c + q for c, q in zip(num_computed, query_lens)]
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        meta = cls(
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device),
            query_lens=list(query_lens),
            context_lens=context_lens,
            context_lens_t=torch.tensor(context_lens, dtype=torch.int64, device=device),
            block_size=block_size,
        )
        if meta.is_decode_only and min(context_lens, default=0) < width * block_size:
            pos = torch.arange(width * block_size, device=device)  # [S]
            meta.decode_pad = (pos >= meta.context_lens_t[:, None])[:, None, :]  # [N, 1, S]
        return meta

    def context_slots(self, i: int) -> torch.Tensor:
        """Cache slots ``[context_lens[i]]`` holding sequence i's tokens in position order (cached per step)."""
        slots = self._context_slots.get(i)
        if slots is None:
            pos = torch.arange(self.context_lens[i], device=self.block_tables.device)
            slots = self.block_tables[i, pos // self.block_size] * self.block_size + pos % self.block_size
            self._context_slots[i] = slots
        return slots

    def one_row_split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list] | None:
        """The sequences with one new token apart from the others, built once per step for every layer:
        ``(seqs, rows)`` of the one-row spans, then ``rows`` of the other spans packed together and
        their ``(i, start, end)`` over those packed rows. None when no span has exactly one row."""
        if self._one_row_split is None:
            one, rest, packed, start, end = [], [], [], 0, 0
            for i, n in enumerate(self.query_lens):
                if n == 1:
                    one.append((i, end))
                elif n > 1:
                    rest.extend(range(end, end + n))
                    packed.append((i, start, start + n))
                    start += n
                end += n
            device = self.block_tables.device
            self._one_row_split = (
                (
                    *(torch.tensor(v, device=device) for v in zip(*one)),
                    torch.tensor(rest, dtype=torch.int64, device=device),
                    packed,
                )
                if one
                else ()
            )
        return self._one_row_split or None
