"""Factories for engine tests: schedulers, requests, and a fake model over a simulated KV cache."""

from __future__ import annotations

import pytest

from dsray.engine.block_manager import BlockManager
from dsray.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from dsray.engine.sequence import Sequence
from dsray.sampling_params import SamplingParams

EOS = 1


def _create_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    enable_chunked_prefill: bool = True,
    enable_prefix_caching: bool = True,
    eos_token_id: int | None = EOS,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
        block_size=block_size,
        enable_prefix_caching=enable_prefix_caching,
    )
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(config, block_manager, eos_token_id)


def _create_requests(
    num_requests: int,
    num_tokens: int = 10,
    prefix: list[int] | None = None,
    id_prefix: str = "req",
    first_token_id: int = 100,
    **sampling: object,
) -> list[Sequence]:
    """``num_requests`` sequences of ``num_tokens`` prompt tokens each, distinct unless ``prefix``
    is given (then they share it and differ after). Token ids count up from ``first_token_id``
    (keep it clear of EOS); calls with the same one make prompts that share a prefix."""
    prefix = prefix or []
    params = SamplingParams(**sampling)
    return [
        Sequence(
            f"{id_prefix}-{i}",
            prefix + [first_token_id + 1000 * i + j for j in range(num_tokens - len(prefix))],
            params,
        )
        for i in range(num_requests)
    ]


class FakeModel:
    """Stands in for the model runner over a simulated paged KV cache.

    A step first writes every scheduled token into its slot (block_table[p // bs], p % bs),
    then for each sequence reads its whole context back from the cache, checks it against the
    sequence's tokens, and samples a token that depends only on what the cache holds. A
    scheduler or block-manager bug that loses, shares or overwrites KV wrongly therefore fails
    the check or changes the output.
    """

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 64) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]

    def next_token(self, context: list[int]) -> int:
        return hash(tuple(context)) % self.vocab_size

    def step(self, out: SchedulerOutput) -> list[int | None]:
        bs = self.block_size
        for s in out.scheduled:
            table, tokens = s.seq.block_table, s.seq.all_token_ids
            end = s.num_computed_tokens + s.num_new_tokens
            assert end <= len(table) * bs, f"{s.seq} has no slot for position {end - 1}"
            assert end <= len(tokens)
            for p in range(s.num_computed_tokens, end):
                self.kv[table[p // bs]][p % bs] = tokens[p]
        sampled: list[int | None] = []
        for s in out.scheduled:
            end = s.num_computed_tokens + s.num_new_tokens
            table = s.seq.block_table
            context = [self.kv[table[p // bs]][p % bs] for p in range(end)]
            assert context == s.seq.all_token_ids[:end], f"KV cache of {s.seq} is corrupt"
            sampled.append(self.next_token(context) if s.needs_sample else None)
        return sampled


def _run_to_completion(scheduler: Scheduler, model: FakeModel, max_steps: int = 100_000) -> int:
    """Drive schedule → model → postprocess until nothing is left; returns the step count."""
    for step in range(max_steps):
        if not scheduler.has_unfinished():
            return step
        out = scheduler.schedule()
        assert not out.is_empty, "scheduler made no progress"
        scheduler.postprocess(out, model.step(out))
    raise AssertionError("requests did not finish")


@pytest.fixture
def create_scheduler():
    return _create_scheduler


@pytest.fixture
def create_requests():
    return _create_requests


@pytest.fixture
def fake_model():
    return FakeModel


@pytest.fixture
def run_to_completion():
    return _run_to_completion
