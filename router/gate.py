"""The MoE gate: scores every routed expert for each token and picks the top-k.

Supports DeepSeek's three selection methods — ``greedy`` (V2-Lite), ``group_limited_greedy``
(V2) and ``noaux_tc`` (V3, with the ``e_score_correction_bias``) — over softmax or sigmoid
scores. Scoring is always fp32, whatever the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsray import cpu_kernels
from dsray.config import ModelArgs

KERNEL_MAX_TOKENS = 64  # beyond a decode batch, torch's batched topk is faster than a per-token loop


class Gate(nn.Module):
    """Returns ``(topk_weights [T, K] fp32, topk_ids [T, K] int64)`` for hidden states ``[T, D]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.num_experts = args.n_routed_experts
        self.n_group = args.n_group
        self.topk_group = args.topk_group
        self.scoring_func = args.scoring_func
        self.topk_method = args.topk_method
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, args.hidden_size), requires_grad=False)
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] <= KERNEL_MAX_TOKENS and self.weight.dtype == torch.float32 and cpu_kernels.usable(x, x.shape[0]):
            # Decode batches: scoring and selection in one kernel call (ties may break differently).
            return cpu_kernels.gate(
                x, self.weight, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                self.scoring_func, self.topk_method, self.norm_topk_prob, self.routed_scaling_factor,
            )  # fmt: skip
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        if self.topk_method == "greedy":
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
        elif self.topk_method == "group_limited_greedy":
            # Group score = best expert of the group; experts outside the kept groups score 0.
            group_scores = scores.view(-1, self.n_group, self.num_experts // self.n_group).amax(dim=-1)
            weights, ids = torch.topk(self._mask_groups(scores, group_scores, 0.0), self.top_k, dim=-1)
        else:
            # noaux_tc: the bias steers the *choice* only; weights come from the unbiased scores.
            choice = scores + self.e_score_correction_bias.float()
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            ids = torch.topk(self._mask_groups(choice, group_scores, float("-inf")), self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids

    def _mask_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        """Keep the experts of the ``topk_group`` best groups; set the others to ``fill``."""
        kept = torch.topk(group_scores, self.topk_group, dim=-1)[1]  # [T, topk_group]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)  # [T, G]
        grouped = scores.view(-1, self.n_group, self.num_experts // self.n_group)  # [T, G, E/G]
        return grouped.masked_fill(dropped[..., None], fill).view_as(scores)  # [T, E]
