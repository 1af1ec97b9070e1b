"""The MoE exchange: dispatch and combine of one MoE layer, for every rank of a step group.

This module is the one owner of the wire protocol of a MoE layer. Per layer and micro-batch,
every rank runs one *round*, three collectives in this order:

1. counts — ``[world, max_local_slots]`` int64: rows this rank sends to each (rank, slot);
2. rows out — the (token, k) rows, sorted by global slot (so by destination rank, then slot),
   with uneven splits;
3. rows back — each expert rank returns its results on the reverse splits, in the order the
   rows came.

An attention rank sends its tokens' rows and combines what comes back; an expert rank computes
the rows it receives with its slots; a rank may be both (the local executor: a group of one that
is its own expert rank); an attention rank with no tokens and an expert rank take part with
zero rows of their own. So attention ranks, idle ranks and expert ranks all run the same
``round``; which of them compute is a matter of whether they hold slots.

An attention rank may also hold *local experts* (``LocalExperts``: copies of some experts, beside
the expert ranks' slots): the pairs routed to them never leave the rank — they are computed there
while the other rows are at the expert ranks, so both kinds of worker compute at once.

``start_round`` returns once the rows are posted: the caller can compute something else (the
shared experts, the other micro-batch's attention) while the rows travel and the experts
compute, then ``Combine.wait()`` for the weighted sum. A rank that holds no slots (an attention
rank) receives no rows, so it posts its rows without waiting for the counts round: it blocks
only when it combines, and two micro-batches' rounds can be in flight at once. A rank that holds
slots posts only its counts in ``start_round``; the rest of its round (rows out, its slots'
compute, rows back) runs in ``wait()``, so the caller's work in between hides the other ranks'
lateness. Every rank still issues the collectives in the same order, as long as the ranks with
slots run the same program: expert ranks run one round at a time, and attention ranks that hold
slots themselves (``num_expert_workers=0``) all start and wait their rounds alike. Combining sums
each token's K results in k order, so the result does not depend on which replica or rank served
a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from dsray import cpu_kernels
from dsray.comm import Pending, Transport
from router.expert_map import ExpertMap

# An expert rank's compute for one layer: rows sorted by local slot, rows per local slot → results.
SlotCompute = Callable[[torch.Tensor, list[int]], torch.Tensor]


class LocalExperts:
    """Experts an attention rank holds itself, per MoE layer: ``ids[layer]`` and their ``compute[layer]``
    (a ``SlotCompute`` over local slots in ``ids`` order). Pairs routed to them are computed on the rank."""

    def __init__(self, num_experts: int, ids: list[list[int]], compute: list[SlotCompute]):
        if len(ids) != len(compute):
            raise ValueError(f"local experts: {len(ids)} layers of ids but {len(compute)} of compute")
        self.ids = [list(layer) for layer in ids]
        self.compute = compute
        self._slot = []  # per layer: [num_experts] local slot of each expert, -1 where not held
        for layer in self.ids:
            slot = torch.full((num_experts,), -1, dtype=torch.int64)
            slot[torch.tensor(layer, dtype=torch.int64)] = torch.arange(len(layer))
            self._slot.append(slot)

    def slot_of(self, layer: int, expert_ids: torch.Tensor) -> torch.Tensor:
        """Local slot of every expert id in ``expert_ids``, -1 for those the rank does not hold."""
        table = self._slot[layer]
        if table.device != expert_ids.device:
            table = self._slot[layer] = table.to(expert_ids.device)
        return table[expert_ids]

    @staticmethod
    def spread(num_experts: int, share: float) -> list[int]:
        """``round(num_experts * share)`` experts evenly spaced over the ids, so that with contiguous
        placements every expert rank gives up about the same share of its rows."""
        k = min(num_experts, round(num_experts * share))
        return [i * num_experts // k for i in range(k)] if k else []


class Combine:
    """One round's results in flight; ``wait()`` → ``sum_k w[t, k] * expert(x[t])`` as ``[T, D]``.

    ``local`` holds the results of the pairs computed on this rank: they follow the returned rows in
    sorted-pair order (``order`` lists the remote pairs, then the local ones)."""

    def __init__(
        self,
        exchange: MoEExchange,
        back: Pending | Callable[[], Pending],
        order: torch.Tensor,
        weights: torch.Tensor,
        x_dtype,
        counts: Pending,
        local: torch.Tensor | None = None,
    ):
        self._exchange, self._back, self._order, self._weights, self._dtype = exchange, back, order, weights, x_dtype
        self._counts, self._local = counts, local

    def wait(self) -> torch.Tensor:
        if callable(self._back):  # a rank with slots: the rest of its round (``MoEExchange._serve_round``)
            self._back = self._back()
        start = time.perf_counter()
        back = self._back.wait()  # [T*K, D] in sorted-pair order
        self._counts.wait()  # long done (collectives complete in order); a posted op is always waited
        self._exchange.waited("combine", time.perf_counter() - start)
        if self._local is not None:
            back = torch.cat([back, self._local])
        T, K = self._weights.shape
        if self._dtype == torch.bfloat16 and T and cpu_kernels.usable(back, max_rows=back.shape[0]):
            return cpu_kernels.combine(back, self._order, self._weights)  # the same sums, one pass
        rows = torch.empty_like(back).index_copy_(0, self._order, back)  # back to (token, k) order
        out = (rows.view(T, K, back.shape[1]).float() * self._weights.unsqueeze(-1)).sum(dim=1)  # [T, D]
        return out.to(self._dtype)


class MoEExchange:
    """One rank's side of every MoE layer's exchange.

    ``transport`` is the step group; ``expert_map`` says which group ranks are expert ranks and
    what their slots hold. ``compute[layer]`` (an expert rank's, or the local executor's) runs
    one layer's slots; attention-only ranks pass none. ``replica_offset`` (the attention rank)
    staggers which replica each attention rank starts with. ``local`` (an attention rank's) are the
    experts it computes itself.
    """

    def __init__(
        self,
        transport: Transport,
        expert_map: ExpertMap,
        compute: list[SlotCompute] | None = None,
        replica_offset: int = 0,
        local: LocalExperts | None = None,
    ):
        if compute is not None and local is not None:
            raise ValueError("local experts are for attention ranks, which hold no slots of the expert map")
        self.transport = transport
        self.map = expert_map
        self.compute = compute
        self.replica_offset = replica_offset
        self.local = local
        self.local_rows = 0  # pairs computed by this rank's local experts
        self.wait_seconds = 0.0  # blocked in the exchange (waiting on experts included)
        self.wait_by_phase = {"counts": 0.0, "rows": 0.0, "combine": 0.0}
        self.compute_seconds = 0.0  # expert compute on this rank
        self.rows_computed = 0
        self.num_rounds = 0

    def start_round(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Combine:
        """Send ``x [T, D]``'s rows to the slots the gate picked (``topk_ids``/``topk_weights [T, K]``;
        T may be 0), serve this rank's slots, and return the combine in flight."""
        m, world = self.map, self.transport.world_size
        self.num_rounds += 1
        slots = m.route(layer, topk_ids, self.replica_offset)  # [T*K] global slot per pair
        local_slot = num_local = None
        if self.local is not None and topk_ids.numel():
            local_slot = self.local.slot_of(layer, topk_ids.reshape(-1))  # [T*K], -1: remote
            # Local pairs sort after every remote one, by local slot.
            slots = torch.where(local_slot >= 0, m.num_slots + local_slot, slots)
        order = torch.argsort(slots, stable=True)  # pairs by destination rank, then slot
        send = torch.zeros(world, m.max_local_slots, dtype=torch.int64)
        per_slot = torch.bincount(slots, minlength=m.num_slots).cpu()
        if local_slot is not None:
            num_local = per_slot[m.num_slots :].tolist()  # rows per local slot
            per_slot = per_slot[: m.num_slots]
        send[m.first_rank : m.first_rank + m.num_ranks] = per_slot.view(m.num_ranks, m.max_local_slots)
        counts = self.transport.exchange_counts(send.to(x.device))
        send_splits = send.sum(dim=1).tolist()
        is_expert_rank = m.first_rank <= self.transport.rank < m.first_rank + m.num_ranks
        if is_expert_rank and self.compute is None:
            raise RuntimeError(f"rank {self.transport.rank} holds slots in the expert map but has no expert compute")
        # index_select, not x[...]: advanced indexing gathers rows ~7x slower on CPU (1,024 of 1,024: 0.36 ms)
        token = torch.div(order, topk_ids.shape[1], rounding_mode="floor")
        rows = x.index_select(0, token) if x.shape[0] else x[:0]  # [T*K, D]
        remote = sum(send_splits)
        if self.compute is not None:
            # The rest waits on the other ranks' counts: the caller's work (the shared experts) runs first.
            def rest() -> Pending:
                return self._serve_round(layer, rows, send_splits, counts)

            return Combine(self, rest, order, topk_weights, x.dtype, counts)
        # Holds no slots: receives no rows, so it posts rows and the (empty) results at once.
        self.transport.exchange_rows(rows[:remote], send_splits, [0] * world)
        back = self.transport.exchange_rows(x.new_empty((0, x.shape[1])), [0] * world, send_splits)
        local = None
        if num_local is not None and remote < rows.shape[0]:  # while the other rows are away
            start = time.perf_counter()
            local = self.local.compute[layer](rows[remote:], num_local)
            self.compute_seconds += time.perf_counter() - start
            self.local_rows += rows.shape[0] - remote
        return Combine(self, back, order, topk_weights, x.dtype, counts, local)

    def _serve_round(self, layer: int, rows: torch.Tensor, send_splits: list[int], counts: Pending) -> Pending:
        """A rank with slots: learn what every rank sends it, send its rows, compute those it receives and
        post the results back; returns the pending rows back."""
        start = time.perf_counter()
        recv = counts.wait().cpu()  # [world, M] from each source
        self.waited("counts", time.perf_counter() - start)
        recv_splits = recv.sum(dim=1).tolist()
        rows_in = self.transport.exchange_rows(rows, send_splits, recv_splits)
        start = time.perf_counter()
        received = rows_in.wait()
        self.waited("rows", time.perf_counter() - start)
        results = self._serve(layer, received, recv)
        return self.transport.exchange_rows(results, recv_splits, send_splits)

    def waited(self, phase: str, seconds: float) -> None:
        self.wait_seconds += seconds
        self.wait_by_phase[phase] += seconds

    def round(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """``start_round`` and wait: the routed experts' weighted sum for ``x``."""
        return self.start_round(layer, x, topk_ids, topk_weights).wait()

    def idle_round(self, layer: int, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        """Take part in one round with no tokens of this rank's own (an expert rank, or an idle attention rank)."""
        x = torch.empty((0, dim), dtype=dtype, device=device)
        ids = torch.empty((0, 1), dtype=torch.int64, device=device)
        self.round(layer, x, ids, torch.empty((0, 1), dtype=torch.float32, device=device))

    def _serve(self, layer: int, rows: torch.Tensor, recv: torch.Tensor) -> torch.Tensor:
        """Run this rank's slots over ``rows`` (from each source, sorted by local slot); results in arrival order."""
        if not rows.shape[0]:
            return rows
        start = time.perf_counter()
        per_slot = recv.sum(dim=0).tolist()  # [M]
        if int((recv.sum(dim=1) > 0).sum()) == 1:  # one source: rows already sorted by slot
            out = self.compute[layer](rows, per_slot)
        else:
            # Rows of each source arrive sorted by local slot; merge the sources by slot.
            num_slots = recv.shape[1]
            local = torch.repeat_interleave(torch.arange(num_slots).repeat(recv.shape[0]), recv.reshape(-1))
            order = torch.argsort(local, stable=True).to(rows.device)
            merged = self.compute[layer](rows.index_select(0, order), per_slot)
            out = torch.empty_like(rows).index_copy_(0, order, merged)
        self.compute_seconds += time.perf_counter() - start
        self.rows_computed += rows.shape[0]
        return out
