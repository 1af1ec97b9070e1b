"""Sequence: one request's tokens, progress through the KV cache, block table and finish state.

Progress is counted in tokens. A sequence holds ``num_tokens`` tokens (prompt, then generated);
the first ``num_computed_tokens`` of them have their KV in the cache. Each step computes the
next ``num_new_tokens`` of the rest. When a step computes up to the last token, its logits
give the next token, which is appended uncomputed; so between steps a live sequence always
has at least one token left to compute:

* prefill: more than one token left (a whole prompt, the rest of a chunked prompt, or a
  preempted sequence recomputing everything it had);
* decode: exactly one token left, the one sampled last step (or a one-token prompt).
"""

from __future__ import annotations

import enum
import itertools
import time

from dsray.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life: queued, scheduled, or finished for one of three reasons."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style reason ("stop", "length", "abort"); None while not finished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}

# Arrival order for FCFS; wall-clock times can tie, a counter cannot.
_arrival_counter = itertools.count()


class Sequence:
    """One request as the scheduler and block manager see it.

    ``block_table[i]`` is the KV block holding tokens ``i * block_size`` to
    ``(i + 1) * block_size - 1``. ``block_hashes`` caches the prefix-cache hashes of the full
    blocks of ``all_token_ids``; the BlockManager fills it lazily (tokens are only ever
    appended, so a hash once computed stays valid).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self._all_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.arrival_index = next(_arrival_counter)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.stop_reason: int | str | None = None
        # When the request must be done (monotonic seconds), from its arrival; None: no deadline.
        deadline_s = self.sampling_params.deadline_s
        self.deadline: float | None = None if deadline_s is None else self.arrival_time + deadline_s

    @property
    def priority(self) -> int:
        """Lower runs first (vLLM's convention); 0 by default."""
        return self.sampling_params.priority

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens. The live list: read it, do not mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet; a step may compute up to this many."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def last_token_id(self) -> int:
        return self._all_token_ids[-1]

    @property
    def is_prefill(self) -> bool:
        """More than one token left to compute (see the module docstring); else decoding."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """ "stop", "length" or "abort" once finished, else None."""
        return self.status.finish_reason

    def append_token(self, token_id: int) -> None:
        """Append a sampled token (uncomputed: its KV is written by the next step)."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
