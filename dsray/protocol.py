"""Typed messages between the engine and the workers that run a step (small, picklable)."""

from __future__ import annotations

from dataclasses import dataclass

from dsray.sampler import SampleRequest, SampleResult


@dataclass
class SeqStep:
    """One sequence's work in a step: compute ``token_ids`` at positions ``num_computed …``."""

    request_id: str
    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    sample: SampleRequest | None  # set when this chunk ends the sequence's known tokens


@dataclass
class StepInput:
    seqs: list[SeqStep]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class StepOutput:
    results: list[SampleResult | None]  # aligned with StepInput.seqs; None where nothing was sampled
