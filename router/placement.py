"""A placement of logical experts on expert ranks (slots per layer and rank), and how well it balances a load.

``slots[layer][rank]`` lists the logical expert ids that rank hosts in that layer. A logical expert
with several slots (replicas) has its tokens split evenly over them. Every rank has the same number
of slots, every expert has at least one, and no rank holds an expert twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


def as_history(load) -> torch.Tensor:
    """Token counts as a float64 tensor ``[windows, layers, experts]``.

    ``load`` is ``[layers][experts]`` (one window) or ``[windows][layers][experts]``, as nested
    lists or a tensor.
    """
    try:
        hist = torch.as_tensor(load, dtype=torch.float64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"load must be a rectangular [layers][experts] or [windows][layers][experts]: {exc}") from exc
    if hist.dim() == 2:
        hist = hist.unsqueeze(0)
    if hist.dim() != 3 or hist.numel() == 0:
        raise ValueError(f"load must be [layers][experts] or [windows][layers][experts], got shape {list(hist.shape)}")
    if not torch.isfinite(hist).all() or (hist < 0).any():
        raise ValueError("load must hold finite, non-negative token counts")
    return hist


@dataclass(frozen=True)
class Placement:
    """Logical experts on expert ranks, per MoE layer.

    ``home[layer][expert]`` is the node the expert's group is placed on when the plan was made for
    several nodes (``num_nodes > 1``); rows a replica off that node serves are cross-node rows.
    """

    slots: list[list[list[int]]]  # [layer][rank] -> logical expert ids
    num_experts: int
    num_nodes: int = 1
    home: list[list[int]] | None = None  # [layer][expert] -> node

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def num_ranks(self) -> int:
        return len(self.slots[0])

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0][0])

    @property
    def num_slots(self) -> int:
        return self.num_layers * self.num_ranks * self.slots_per_rank

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, num_ranks: int) -> Placement:
        """The baseline without redundancy: experts in contiguous blocks, ``num_experts / num_ranks`` per rank."""
        if num_ranks <= 0 or num_experts % num_ranks:
            raise ValueError(
                f"{num_experts} experts do not split evenly over {num_ranks} ranks; "
                "use a number of ranks that divides the number of experts"
            )
        per_rank = num_experts // num_ranks
        layer = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(num_ranks)]
        return cls([[list(rank) for rank in layer] for _ in range(num_layers)], num_experts)

    def check(self) -> None:
        """Raise ValueError unless the invariants hold (equal slots per rank, every expert placed, no duplicates)."""
        if not self.slots or not self.slots[0] or not self.slots[0][0]:
            raise ValueError("a placement needs at least one layer, one rank and one slot per rank")
        for i, layer in enumerate(self.slots):
            if len(layer) != self.num_ranks or any(len(rank) != self.slots_per_rank for rank in layer):
                raise ValueError(f"layer {i}: every layer needs {self.num_ranks} ranks of {self.slots_per_rank} slots")
            for r, rank in enumerate(layer):
                if len(set(rank)) != len(rank):
                    raise ValueError(f"layer {i} rank {r} holds an expert twice: {rank}")
                if any(not 0 <= e < self.num_experts for e in rank):
                    raise ValueError(f"layer {i} rank {r}: expert ids must be in [0, {self.num_experts})")
            missing = set(range(self.num_experts)) - {e for rank in layer for e in rank}
            if missing:
                raise ValueError(f"layer {i}: experts {sorted(missing)[:8]} have no slot")

    def replicas(self) -> list[list[int]]:
        """Number of slots of each logical expert, ``[layer][expert]``."""
        out = []
        for layer in self.slots:
            counts = [0] * self.num_experts
            for rank in layer:
                for e in rank:
                    counts[e] += 1
            out.append(counts)
        return out

    def rank_loads(self, load) -> list[list[float]]:
        """Tokens each rank serves, ``[layer][rank]``, with each expert's tokens split evenly over its replicas."""
        per_layer = self._layer_load(load)
        out = []
        for weights, counts, layer in zip(per_layer, self.replicas(), self.slots):
            out.append([sum(weights[e] / counts[e] for e in rank) for rank in layer])
        return out

    def imbalance(self, load) -> list[float]:
        """Hottest rank ÷ mean rank per layer (1.0 for a layer with no tokens)."""
        out = []
        for loads in self.rank_loads(load):
            mean = sum(loads) / len(loads)
            out.append(max(loads) / mean if mean > 0 else 1.0)
        return out

    def mean_imbalance(self, load) -> float:
        """Per-layer imbalance averaged over the layers that have tokens."""
        layers = self._layer_load(load)
        values = [v for v, weights in zip(self.imbalance(load), layers) if sum(weights) > 0]
        return sum(values) / len(values) if values else 1.0

    def cross_node_rows(self, load) -> list[float]:
        """Fraction of each layer's rows served by a replica off its expert's home node (all 0 on one node)."""
        if self.num_nodes == 1 or self.home is None:
            return [0.0] * self.num_layers
        ranks_per_node = self.num_ranks // self.num_nodes
        out = []
        for weights, counts, layer, home in zip(self._layer_load(load), self.replicas(), self.slots, self.home):
            away = sum(
                weights[e] / counts[e] for r, rank in enumerate(layer) for e in rank if home[e] != r // ranks_per_node
            )
            total = sum(weights)
            out.append(away / total if total > 0 else 0.0)
        return out

    def moved(self, other: Placement) -> int:
        """Slots that hold a different expert than in ``other`` (what a switch from ``other`` must load)."""
        if (other.num_layers, other.num_ranks) != (self.num_layers, self.num_ranks):
            raise ValueError("placements differ in layers or ranks; they cannot be compared slot by slot")
        moved = 0
        for mine, theirs in zip(self.slots, other.slots):
            for rank, old in zip(mine, theirs):
                moved += sum((Counter(rank) - Counter(old)).values())
        return moved

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "num_nodes": self.num_nodes, "slots": self.slots, "home": self.home}

    def _layer_load(self, load) -> list[list[float]]:
        hist = as_history(load).sum(0)  # [layers, experts]; a history counts as its total
        if tuple(hist.shape) != (self.num_layers, self.num_experts):
            raise ValueError(
                f"load is {list(hist.shape)} [layers, experts] but the placement has "
                f"{self.num_layers} layers of {self.num_experts} experts"
            )
        return hist.tolist()
