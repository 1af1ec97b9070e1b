"""Scheduler: continuous batching with chunked prefill, prefix reuse and preemption by recompute.

The engine loop is ``out = scheduler.schedule()`` → the model runs ``out.scheduled`` →
``scheduler.postprocess(out, sampled)``. Each step has one token budget
(``max_num_batched_tokens``) shared by decodes and prefill chunks:

1. RUNNING sequences in order (see *Order*): a decode takes 1 token, an unfinished prefill takes
   what is left of it, cut to the budget and to the free KV blocks. When not even one token
   fits in the blocks, the last running sequence in that order (maybe this one) is
   preempted: its blocks are freed, its ``num_computed_tokens`` reset, and it goes back to
   the waiting queue, ahead of every later arrival of its priority and deadline. It keeps its
   generated tokens and later recomputes them all, so its output is the same as if it had
   never been preempted.
2. WAITING sequences in order (only in a step that preempted nothing): prefix-match,
   then take the rest of the sequence, cut to the budget and the free blocks when chunked
   prefill is on (otherwise the whole rest must fit). Admission stops at the first sequence
   that does not fit, so nobody overtakes a request ahead of it.

Order. Both queues are kept sorted by ``(priority, deadline, arrival)`` (lower priority number
first, then the earliest deadline, a request without one last, then arrival): admission takes
the waiting queue in that order and the running list gets the token budget in that order, so the
sequence preempted first (the last) is the lowest-priority, latest-deadline, latest arrival one.
When all ``max_num_seqs`` slots are taken, a waiting request of higher priority than the last
running one preempts it (as vLLM's priority policy does); an earlier deadline takes the next slot
that frees.
With ``deadline_aware`` off the order is ``(priority, arrival)``: deadlines are still enforced,
they just do not reorder anything (the benchmark's baseline). With every priority 0 and no
deadline, both are first come, first served, as above.

Deadlines. Each ``schedule`` first ends every sequence whose deadline has passed: one that has
not produced a token yet (waiting, or part way through a chunked prefill, holding blocks) is
finished as "abort" with ``stop_reason="deadline"`` (the engine refuses it with
``DeadlineExceededError``), one that has is finished as "length" with ``stop_reason="deadline"``,
keeping its tokens. Both free their blocks at once and are listed in ``SchedulerOutput.expired``.

Liveness: a sequence that alone fits in the whole cache (and, without chunked prefill, in one
step's budget) can always run once the others are done, so the scheduler never spins. ``add``
rejects longer prompts, and a sequence that grows past that size is finished with "length".
The engine is expected to reject requests whose prompt + max_tokens cannot fit up front.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping
from collections.abc import Sequence as ListLike
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from dsray.engine.block_manager import BlockManager
from dsray.engine.sequence import Sequence, SequenceStatus


class SchedulerConfig(BaseModel):
    """How many sequences and tokens one step may carry. The KV block count is not here: it
    follows from the memory left for the cache and is given to the BlockManager."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(256, ge=1, description="Most sequences running at once (batch size).")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget of one step, shared by decodes and prefill chunks."
    )
    enable_chunked_prefill: bool = Field(
        True, description="Split long prefills over steps so decodes keep running beside them."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per paged KV block.")
    enable_prefix_caching: bool = Field(
        True, description="Share the KV blocks of identical prompt prefixes between requests."
    )
    deadline_aware: bool = Field(
        True,
        description="Order admission and preemption by (priority, deadline, arrival); off: (priority, arrival), "
        "deadlines still enforced.",
    )


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's work in a step: compute positions ``[num_computed_tokens,
    num_computed_tokens + num_new_tokens)``. ``needs_sample`` when this chunk reaches the
    sequence's last token: only then are logits needed and a token sampled."""

    seq: Sequence
    num_new_tokens: int
    num_computed_tokens: int
    needs_sample: bool


@dataclass
class SchedulerOutput:
    """What one step runs (in a deterministic order: running first, then newly admitted) and
    which sequences this step preempted (their KV is gone; nothing to run for them)."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    expired: list[Sequence] = field(default_factory=list)  # ended by their deadline before this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


_STATUS_OF_REASON = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
}


def _deadline_order(seq: Sequence) -> tuple[int, float, int]:
    return (seq.priority, float("inf") if seq.deadline is None else seq.deadline, seq.arrival_index)


def _arrival_order(seq: Sequence) -> tuple[int, int]:
    return (seq.priority, seq.arrival_index)


class Scheduler:
    """Decides each step which sequences run and how many tokens each computes."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_id: int | None) -> None:
        if block_manager.block_size != config.block_size:
            raise ValueError(
                f"block_manager.block_size ({block_manager.block_size}) must equal "
                f"config.block_size ({config.block_size})"
            )
        self.config = config
        self.block_manager = block_manager
        self.eos_token_id = eos_token_id
        # Both sorted by ``_order`` (see the module docstring); the last running is the first to preempt.
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._order = _deadline_order if config.deadline_aware else _arrival_order
        self._requests: dict[str, Sequence] = {}
        self.num_preemptions = 0
        # Longest sequence that can always run alone (see the module docstring).
        self.max_seq_len = block_manager.num_total_blocks * config.block_size
        if not config.enable_chunked_prefill:
            self.max_seq_len = min(self.max_seq_len, config.max_num_batched_tokens)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def request_ids(self) -> list[str]:
        """The requests this scheduler holds, running or waiting."""
        return list(self._requests)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq: Sequence) -> None:
        """Queue a new request; it can join the batch at the next ``schedule``."""
        if seq.request_id in self._requests:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"only new sequences can be added, got {seq}")
        if seq.num_tokens > self.max_seq_len:
            raise ValueError(
                f"request {seq.request_id!r} has {seq.num_tokens} prompt tokens but at most "
                f"{self.max_seq_len} fit (KV cache of {self.block_manager.num_total_blocks} blocks x "
                f"{self.config.block_size} tokens; without chunked prefill also max_num_batched_tokens); "
                "shorten the prompt or give the cache more memory"
            )
        self._requests[seq.request_id] = seq
        bisect.insort(self.waiting, seq, key=self._order)

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """End the sequences past their deadline at ``now`` (default: ``time.monotonic()``), then pick
        this step's sequences and token counts, allocating their KV slots."""
        out = SchedulerOutput()
        self._expire(out, time.monotonic() if now is None else now)
        self._displace(out)
        displaced = len(out.preempted)
        budget = self.config.max_num_batched_tokens
        self._schedule_running(out, budget)
        budget -= out.num_batched_tokens
        if len(out.preempted) == displaced:  # no sequence ran out of KV blocks
            self._schedule_waiting(out, budget)
        return out

    def _displace(self, out: SchedulerOutput) -> None:
        """With every sequence slot taken, a waiting request of higher priority preempts the last
        running sequence (of lower priority). An earlier deadline alone does not: the displaced
        sequence would recompute its whole context, and those prefill tokens slow every step of
        the batch, the deadlines in it too (benchmarks/serve.py --deadline); at a full batch a
        slot frees every ``1/max_num_seqs`` of a request's run, and the earliest deadline gets it."""
        while (
            self.waiting
            and len(self.running) >= self.config.max_num_seqs
            and self.waiting[0].priority < self.running[-1].priority
        ):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)

    def _expire(self, out: SchedulerOutput, now: float) -> None:
        expired = [s for s in (*self.running, *self.waiting) if s.deadline is not None and s.deadline <= now]
        for seq in expired:
            # No token yet: refused (the client saw nothing); started: ends here, keeping its tokens.
            self.finish(seq, "length" if seq.num_output_tokens else "abort", stop_reason="deadline")
            out.expired.append(seq)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget, bm.num_appendable_tokens(seq))
            while num_new == 0:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return
                num_new = min(seq.num_uncomputed_tokens, budget, bm.num_appendable_tokens(seq))
            bm.append_slots(seq, num_new)
            out.scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new
            i += 1

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.match_prefix(seq)
            num_new = seq.num_tokens - len(cached) * bm.block_size
            num_fit = min(budget, bm.num_allocatable_tokens(cached))
            if self.config.enable_chunked_prefill:
                num_new = min(num_new, num_fit)
            if num_new == 0 or num_new > num_fit:
                break
            self.waiting.pop(0)
            bm.allocate(seq, cached, num_new)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=self._order)
            out.scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new

    @staticmethod
    def _scheduled(seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        return ScheduledSeq(
            seq=seq,
            num_new_tokens=num_new_tokens,
            num_computed_tokens=seq.num_computed_tokens,
            needs_sample=seq.num_computed_tokens + num_new_tokens == seq.num_tokens,
        )

    def release_all(self) -> list[Sequence]:
        """Hand over every unfinished sequence, each freed of its blocks and reset to be recomputed from
        its tokens (prompt and output so far), in scheduling order: this rank's worker, and its KV
        cache, are gone. The scheduler is empty afterwards."""
        for seq in self.running:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.WAITING
            seq.num_computed_tokens = seq.num_cached_tokens = 0
        seqs = sorted(self.running + self.waiting, key=self._order)
        self.running, self.waiting, self._requests = [], [], {}
        return seqs

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        bisect.insort(self.waiting, seq, key=self._order)
        self.num_preemptions += 1

    def postprocess(self, out: SchedulerOutput, sampled: ListLike[int | None] | Mapping[str, int]) -> list[Sequence]:
        """Record a step's results; returns the sequences that got a token (finished or not).

        ``sampled`` is either a list aligned with ``out.scheduled`` or a dict by request id. Only
        entries with ``needs_sample`` are read: in a list put None for the others (any value is
        ignored), in a dict leave them out. A sequence aborted during the step is skipped.
        """
        if not isinstance(sampled, Mapping) and len(sampled) != len(out.scheduled):
            raise ValueError(f"sampled has {len(sampled)} entries for {len(out.scheduled)} scheduled sequences")
        updated = []
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.commit_computed(seq)
            if not s.needs_sample:
                continue
            token_id = sampled.get(seq.request_id) if isinstance(sampled, Mapping) else sampled[i]
            if token_id is None:
                raise ValueError(f"no sampled token for {seq.request_id!r}, whose chunk needs one")
            seq.append_token(token_id)
            self._check_stop(seq, token_id)
            updated.append(seq)
        return updated

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        params = seq.sampling_params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id == self.eos_token_id and not params.ignore_eos:
                self.finish(seq, "stop")
                return
            if token_id in params.stop_token_ids:
                self.finish(seq, "stop", stop_reason=token_id)
                return
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            self.finish(seq, "length")
        elif seq.num_tokens > self.max_seq_len:
            # Its last token would not fit even alone; the engine should have capped max_tokens.
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence ("stop", "length" or "abort"): free its blocks and drop it from the queues.

        The engine calls this itself when a stop string matches after detokenization.
        """
        if reason not in _STATUS_OF_REASON:
            raise ValueError(f"reason must be one of {sorted(_STATUS_OF_REASON)}, got {reason!r}")
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = _STATUS_OF_REASON[reason]
        seq.stop_reason = stop_reason
        self._requests.pop(seq.request_id, None)

    def abort(self, request_id: str) -> bool:
        """Abort a queued or running request; False when it is unknown or already finished."""
        seq = self._requests.get(request_id)
        if seq is None:
            return False
        self.finish(seq, "abort")
        return True
