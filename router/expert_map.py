"""The expert map: logical routed experts → physical slots on expert ranks, per MoE layer.

An expert rank holds a list of slots; each slot is one logical expert's weights. A logical
expert may have several slots (replicas) on different ranks: dispatch spreads its rows over
them (``route``), so a hot expert's work is shared. Slot ``s`` of expert rank ``r`` has the
global slot id ``r * max_local_slots + s``: sorting rows by global slot sorts them by
destination rank, then by the slot that computes them there.

Placement is per MoE layer (a balancer places each layer by its own load). The default is
contiguous — 16 experts over 3 ranks → [0, 6), [6, 11), [11, 16) — and redundant slots, when
asked for, replicate each rank's experts in turn, each replica going to the rank with the fewest
slots that does not hold that expert yet.
"""

from __future__ import annotations

import torch

Placement = list[list[list[int]]]  # [moe layer][expert rank] → logical expert ids, one per slot


def contiguous_slots(num_experts: int, num_ranks: int, num_redundant: int = 0) -> list[list[int]]:
    """One layer's default placement: contiguous ranges, then ``num_redundant`` replicas spread out."""
    if not 1 <= num_ranks <= num_experts:
        raise ValueError(f"num_expert_workers must be in [1, n_routed_experts={num_experts}], got {num_ranks}")
    base, extra = divmod(num_experts, num_ranks)
    sizes = [base + (1 if i < extra else 0) for i in range(num_ranks)]
    starts = [sum(sizes[:i]) for i in range(num_ranks)]
    slots = [list(range(s, s + n)) for s, n in zip(starts, sizes)]
    if num_redundant > num_experts * (num_ranks - 1):
        raise ValueError(
            f"num_redundant_experts={num_redundant} does not fit: with {num_ranks} expert worker(s) each of the "
            f"{num_experts} experts can have at most {num_ranks - 1} extra replica(s) (never two on one worker), "
            f"so at most {num_experts * (num_ranks - 1)}; lower num_redundant_experts or add expert workers"
        )
    # Without load figures any expert may be the hot one: replicate each rank's experts in turn.
    order = [slots[r][i] for i in range(max(sizes)) for r in range(num_ranks) if i < sizes[r]]
    for i in range(num_redundant):
        expert = order[i % num_experts]
        ranks = [r for r in range(num_ranks) if expert not in slots[r]]
        slots[min(ranks, key=lambda r: (len(slots[r]), r))].append(expert)
    return slots


class ExpertMap:
    """Where every logical expert of every MoE layer lives, and how rows pick a replica.

    ``placement[layer][rank]`` lists the logical experts of each slot of expert rank ``rank``
    (``layer`` indexes the MoE layers in order). ``first_rank`` is the group rank of expert rank
    0: expert ranks follow the attention ranks in the step group. Refuses placements that leave
    an expert without a slot or put one expert twice on a rank, saying what to change.
    """

    def __init__(self, num_experts: int, placement: Placement, first_rank: int = 0):
        if not placement or not placement[0]:
            raise ValueError("an expert map needs at least one MoE layer and one expert rank")
        self.num_experts = num_experts
        self.num_ranks = len(placement[0])
        self.first_rank = first_rank
        for layer, ranks in enumerate(placement):
            _check_layer(num_experts, self.num_ranks, layer, ranks)
        self.placement = [[list(slots) for slots in ranks] for ranks in placement]
        self.max_local_slots = max(len(slots) for ranks in placement for slots in ranks)
        self.num_slots = self.num_ranks * self.max_local_slots  # global slot ids, padded per rank
        self._tables = [self._replica_table(ranks) for ranks in self.placement]

    @classmethod
    def contiguous(
        cls, num_experts: int, num_ranks: int, num_layers: int, num_redundant: int = 0, first_rank: int = 0
    ) -> ExpertMap:
        slots = contiguous_slots(num_experts, num_ranks, num_redundant)
        return cls(num_experts, [slots] * num_layers, first_rank)

    @classmethod
    def from_rank_slots(cls, num_experts: int, rank_slots: list[list[int]], num_layers: int, first_rank: int = 0):
        """The same user-given placement (``rank_slots[rank]`` = expert ids) for every MoE layer."""
        return cls(num_experts, [rank_slots] * num_layers, first_rank)

    def as_placement(self):
        """This map's slots as a ``router.placement.Placement`` (what the planner takes as ``current``)."""
        from router.placement import Placement

        return Placement(slots=self.placement, num_experts=self.num_experts)

    @classmethod
    def covering(
        cls, num_experts: int, rank_slots: list[list[list[int]]], first_rank: int = 0, balance: bool = False
    ) -> ExpertMap:
        """A map from what each expert rank holds now (``rank_slots[rank][layer]`` = expert ids, in slot
        order), with every expert no rank holds (its only replicas were on ranks that are gone) added
        to the rank with the fewest slots in that layer. Held experts keep their slots, so a survivor
        loads only the orphans it is given; with a replica left for every expert nothing moves.

        ``balance`` then evens out slot counts (new, empty ranks included): experts move one at a time
        from the rank with the most slots to the one with the fewest, until they differ by at most one."""
        if not rank_slots:
            raise ValueError("no expert rank is left to hold the experts")
        num_layers = len(rank_slots[0])
        placement = []
        for layer in range(num_layers):
            ranks = [list(held[layer]) for held in rank_slots]
            orphans = sorted(set(range(num_experts)) - {e for slots in ranks for e in slots})
            for expert in orphans:
                min(ranks, key=len).append(expert)
            while balance:
                small, big = min(ranks, key=len), max(ranks, key=len)
                movable = [e for e in reversed(big) if e not in small]
                if len(big) - len(small) <= 1 or not movable:
                    break
                big.remove(movable[0])
                small.append(movable[0])
            placement.append(ranks)
        return cls(num_experts, placement, first_rank)

    def orphans(self, lost: set[int]) -> int:
        """How many (layer, expert) pairs would have no slot left if expert ranks ``lost`` went away."""
        return sum(
            len(set(range(self.num_experts)) - {e for r, slots in enumerate(ranks) if r not in lost for e in slots})
            for ranks in self.placement
        )

    def aligned_to(self, previous: ExpertMap) -> ExpertMap:
        """This placement with each rank's slots ordered so that experts ``previous`` held on that rank
        keep their slot (the others fill the slots that changed). Same experts per rank, so the same
        routing load; an expert rank switching to it rewrites only the slots that changed."""
        placement = []
        for layer, ranks in enumerate(self.placement):
            aligned = []
            for rank, slots in enumerate(ranks):
                old = previous.placement[layer][rank] if rank < len(previous.placement[layer]) else []
                if len(old) != len(slots):
                    aligned.append(list(slots))
                    continue
                keep = set(slots)
                order = [e if e in keep else None for e in old]
                incoming = iter(e for e in slots if e not in set(old))
                aligned.append([e if e is not None else next(incoming) for e in order])
            placement.append(aligned)
        return ExpertMap(self.num_experts, placement, self.first_rank)

    @property
    def num_layers(self) -> int:
        return len(self.placement)

    @property
    def num_redundant(self) -> int:
        return sum(len(s) for s in self.placement[0]) - self.num_experts

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Per expert rank, ``(first, end)`` of a contiguous placement without replicas (layer 0)."""
        out = []
        for slots in self.placement[0]:
            if slots != list(range(slots[0], slots[0] + len(slots))):
                raise ValueError("this placement is not contiguous")
            out.append((slots[0], slots[0] + len(slots)))
        return out

    def rank_slots(self, rank: int) -> list[list[int]]:
        """Expert rank ``rank``'s slots in every MoE layer: ``[layer] → logical expert ids``."""
        return [ranks[rank] for ranks in self.placement]

    def group_rank(self, rank: int) -> int:
        return self.first_rank + rank

    def num_replicas(self, layer: int) -> torch.Tensor:
        """``[E]`` slots per logical expert in ``layer``."""
        return self._tables[layer][1]

    def _replica_table(self, ranks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[E, max replicas]`` global slot ids (padded with the first replica) and ``[E]`` replica counts."""
        replicas: list[list[int]] = [[] for _ in range(self.num_experts)]
        for rank, slots in enumerate(ranks):
            for local, expert in enumerate(slots):
                replicas[expert].append(rank * self.max_local_slots + local)
        width = max(len(r) for r in replicas)
        table = torch.tensor([r + [r[0]] * (width - len(r)) for r in replicas], dtype=torch.int64)
        return table, torch.tensor([len(r) for r in replicas], dtype=torch.int64)

    def route(self, layer: int, topk_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Global slot of every (token, k) pair of ``topk_ids [T, K]`` → ``[T*K]``.

        Rows of an expert with several replicas go round-robin over them in token order, starting
        at replica ``offset`` (callers pass their attention rank, so ranks start on different
        replicas); the split is even to within one row per rank.
        """
        table, counts = self._tables[layer]
        flat = topk_ids.reshape(-1)  # [T*K]
        if table.device != flat.device:
            table, counts = self._tables[layer] = table.to(flat.device), counts.to(flat.device)
        if table.shape[1] == 1:
            return table[flat, 0]
        order = torch.argsort(flat, stable=True)
        sorted_ids = flat[order]
        group_start = torch.searchsorted(sorted_ids, sorted_ids, right=False)  # first pair of the same expert
        nth = torch.arange(flat.numel(), device=flat.device) - group_start  # [T*K] position within its expert
        pick = torch.empty_like(flat)
        pick[order] = (nth + offset) % counts[sorted_ids]
        return table[flat, pick]


def _check_layer(num_experts: int, num_ranks: int, layer: int, ranks: list[list[int]]) -> None:
    where = f"MoE layer {layer}"
    if len(ranks) != num_ranks:
        raise ValueError(f"{where}: the placement lists {len(ranks)} expert ranks, the others {num_ranks}")
    seen = set()
    for rank, slots in enumerate(ranks):
        if not slots:
            raise ValueError(f"{where}: expert rank {rank} holds no slot; give every expert worker at least one expert")
        bad = [e for e in slots if not isinstance(e, int) or not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"{where}: expert rank {rank} names experts {bad[:5]} outside [0, {num_experts})")
        if len(set(slots)) != len(slots):
            twice = sorted({e for e in slots if slots.count(e) > 1})
            raise ValueError(
                f"{where}: expert rank {rank} holds experts {twice[:5]} twice; a replica must be on another rank"
            )
        seen.update(slots)
    missing = sorted(set(range(num_experts)) - seen)
    if missing:
        raise ValueError(
            f"{where}: experts {missing[:8]}{' …' if len(missing) > 8 else ''} have no slot on any expert rank; "
            "every expert needs at least one"
        )
