"""Token sampling for a batch in which every request has its own SamplingParams.

Order per row, as in vLLM: penalties (repetition, presence, frequency) → temperature →
top-k → top-p → min-p → draw. Greedy rows take the argmax of the penalised logits. A seeded
request draws from a generator keyed by (seed, number of tokens it has generated), so its
output does not depend on which other requests share the batch, nor on preemption.
Logprobs are those of the model's raw distribution (before any processing). Everything runs on
the logits' device; only the chosen ids and asked-for logprobs come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsray.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    """What the sampler needs of one row: its parameters and its sequence's tokens (prompt, then
    output). The list is the sequence's own, not a copy: only the penalties read it, and copying a
    whole context per row per step cost more than sampling a large batch."""

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None  # top-N and the chosen token, when asked for


def _apply_penalties(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    p = req.params
    if p.repetition_penalty != 1.0:
        seen = set(req.token_ids)  # prompt and output
        seen = torch.tensor(sorted(seen), dtype=torch.long, device=logits.device)
        seen = seen[seen < logits.shape[0]]
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.num_output_tokens:
        ids = torch.tensor(req.output_token_ids, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[0])[: logits.shape[0]]
        logits -= p.frequency_penalty * counts.to(logits.dtype)
        logits -= p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities ``[V]`` after temperature, top-k, top-p and min-p."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p (as vLLM samples).
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return int((probs / noise).argmax())


def _generator_for(req: SampleRequest, device: torch.device) -> torch.Generator | None:
    if req.params.seed is None:
        return None
    return torch.Generator(device).manual_seed((req.params.seed * 1_000_003 + req.num_output_tokens) % 2**63)


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> list[SampleResult]:
    """Sample one token per row of ``logits [N, V]`` (fp32) for ``requests[N]``."""
    logits = logits.float()
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in requests):
        raw_logprobs = logits.log_softmax(-1)
    greedy_ids = None
    if all(r.params.is_greedy and _no_penalties(r.params) for r in requests):
        greedy_ids = logits.argmax(-1).tolist()  # the common case: one vectorised argmax
    results = []
    for i, req in enumerate(requests):
        if greedy_ids is not None:
            token = greedy_ids[i]
        else:
            row = _apply_penalties(logits[i].clone(), req)
            if req.params.is_greedy:
                token = int(row.argmax())
            else:
                token = _draw(_filtered_probs(row, req.params), _generator_for(req, logits.device))
        results.append(SampleResult(token, _logprobs(raw_logprobs, i, token, req.params.logprobs)))
    return results


def _no_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty


def _logprobs(raw: torch.Tensor | None, row: int, token: int, n: int | None) -> dict[int, float] | None:
    if raw is None or n is None:
        return None
    out = {}
    if n:
        values, ids = torch.topk(raw[row], n)
        out = dict(zip(ids.tolist(), values.tolist()))
    out[token] = float(raw[row, token])
    return out
