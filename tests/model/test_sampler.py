"""The sampler's penalties and seeded draws, against values worked out by hand.

A row's request holds its sequence's own token list (prompt, then output): these pin down that the
penalties read the right part of it and that a seeded draw keys on the output count alone.
"""

from __future__ import annotations

import torch

from dsray.sampler import SampleRequest, sample
from dsray.sampling_params import SamplingParams


def test_repetition_penalty_covers_prompt_and_output_presence_and_frequency_the_output_only():
    logits = torch.tensor([[2.0, 6.0, 4.0, 1.0, 7.0, 0.5]])
    tokens = [0, 1, 3, 3, 4]  # prompt 0, 1; output 3, 3, 4
    params = SamplingParams(temperature=0, repetition_penalty=2.0, max_tokens=8)
    [result] = sample(logits, [SampleRequest(params, tokens, num_prompt_tokens=2)])
    # 0 -> 1.0, 1 -> 3.0 (prompt), 3 -> 0.5, 4 -> 3.5 (output); 2 (4.0) is unseen and wins
    assert result.token_id == 2
    params = SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=1.5, max_tokens=8)
    logits = torch.tensor([[5.0, 0.0, 4.0, 8.0, 6.0, 0.0]])
    # 3 (twice) -> 8 - 2 * 1.5 - 1 = 4.0; 4 -> 6 - 1.5 - 1 = 3.5; the prompt's 0 keeps 5.0 and wins
    [result] = sample(logits, [SampleRequest(params, tokens, num_prompt_tokens=2)])
    assert result.token_id == 0
    [result] = sample(logits, [SampleRequest(params, tokens, num_prompt_tokens=5)])  # no output yet: no penalty
    assert result.token_id == 3


def test_a_seeded_draw_depends_on_the_output_count_not_the_prompt():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=8)

    def draw(prompt_len: int, num_out: int) -> int:
        tokens = list(range(prompt_len + num_out))
        return sample(logits, [SampleRequest(params, tokens, num_prompt_tokens=prompt_len)])[0].token_id

    assert draw(3, 2) == draw(11, 2)
    assert len({draw(3, n) for n in range(8)}) > 1  # a new key per output token
