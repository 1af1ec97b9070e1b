"""Typed messages between the engine and the workers that run a step (small, picklable).

Workers keep each running sequence's state — its tokens, sampling parameters and block table —
so a step carries only what changed: sequences new to the worker (their tokens once, at
admission or re-admission after preemption), per scheduled sequence how many tokens to compute
and the blocks appended since the last step, and the ids the worker may forget (finished,
aborted, preempted). Its size grows with the batch, never with the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsray.sampler import SampleResult
from dsray.sampling_params import SamplingParams


@dataclass
class NewSeq:
    """A sequence the worker does not know yet: every token it has so far (prompt, then outputs)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams


@dataclass
class SeqStep:
    """One sequence's work in a step: compute ``num_new_tokens`` tokens at positions ``num_computed …``."""

    request_id: str
    num_new_tokens: int
    num_computed: int
    new_block_ids: list[int]  # appended to the worker's block table for this sequence
    needs_sample: bool  # this chunk ends the sequence's known tokens: sample the next one


@dataclass
class StepInput:
    seqs: list[SeqStep] = field(default_factory=list)
    new: list[NewSeq] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # forget these before running the step
    num_micro_batches: int = 1  # the same on every rank of a step: each runs this many exchange rounds per layer
    expert_map: Any = None  # a router.expert_map.ExpertMap to switch to before this step (a rebalance), or None
    step_id: int = 0  # the executor's step number: a step re-run after a lost worker is not applied twice (0: none)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


@dataclass
class StepOutput:
    results: list[SampleResult | None]  # aligned with StepInput.seqs; None where nothing was sampled
