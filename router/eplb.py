"""The expert-placement planner (EPLB): which logical experts each expert rank hosts, from load statistics.

``plan_placement`` is a pure function of token counts. How it plans, per MoE layer:

1. **Scenarios.** Each window of a history is normalised (every window counts the same, whatever
   its token count). The plan balances the mean window and every window pulled halfway toward the
   mean, all at once: the hottest rank over all scenarios is what it minimises. Balancing only the
   mean overfits to it; balancing every raw window chases one workload's quirks. Load the plan
   never saw lies near this set far more often than near any single window.
2. **Groups to nodes** (``num_nodes > 1``, as DeepSeek's EPLB): whole expert groups go to nodes,
   equal numbers per node, balanced by group load; group-limited routing then sends each token to
   few nodes. Replicas stay on their group's node unless the hottest rank is over ``SPILL_ABOVE``
   times the mean and only a replica on another node helps (those rows are cross-node rows).
3. **Replicas.** Each redundant slot goes to the expert with the highest per-replica load in its
   worst scenario (at most one replica per rank).
4. **Packing.** Replicas, heaviest first, go to the rank whose worst scenario stays lowest (LPT with
   equal slot counts and no expert twice on a rank).
5. **Refinement.** Local search on the hottest rank: swap two slots between ranks, or re-point one
   slot to a replica of an expert on the hottest rank; apply the best move until none helps.

With ``current``, the plan starts from that placement and applies the moves with the best gain per
slot moved, stopping once each layer is within ``INCREMENTAL_SLACK`` of a from-scratch plan: a
rebalance loads few new slots, and gets nearly all of the gain.
"""

from __future__ import annotations

import torch

from router.placement import Placement, as_history

__all__ = ["Placement", "as_history", "plan_placement"]

HISTORY_BLEND = 1.0  # a window's scenario: this much of the window, the rest the history's mean
SPILL_ABOVE = 1.05  # cross-node replicas only while the hottest rank is over this × the mean
INCREMENTAL_SLACK = 0.02  # an incremental plan stops this close to the from-scratch imbalance, per layer
PAIR_ROUNDS = 200  # rounds of pairwise swaps after packing
MIN_SWAP_GAIN = 0.005  # an incremental swap loads two slots: it must cut the excess by this much
MAX_MOVES_PER_RANK = 2  # hottest-rank search moves per rank of a layer, at most (it is the slow part)
_EPS = 1e-9


def plan_placement(
    load,
    num_ranks: int,
    num_redundant: int,
    num_nodes: int = 1,
    current: Placement | None = None,
    *,
    num_groups: int | None = None,
) -> Placement:
    """Place ``experts + num_redundant`` slots on ``num_ranks`` ranks, balancing ``load``.

    ``load``: tokens per expert, ``[layers][experts]`` or a history ``[windows][layers][experts]``
    (nested lists or a tensor). ``num_nodes``: ranks are split evenly over nodes, in order.
    ``num_groups``: expert groups of the model's group-limited routing (DeepSeek-V3: ``n_group`` 8);
    default one group per node. ``current``: plan incrementally from this placement.
    """
    hist = as_history(load)
    _, num_layers, num_experts = hist.shape
    num_groups = num_groups or num_nodes
    slots_per_rank = _check_sizes(num_experts, num_ranks, num_redundant, num_nodes, num_groups)
    weights = _scenarios(hist, num_ranks)  # [L, K, E], a rank's load is its multiple of the mean
    nodes = torch.arange(num_ranks) // (num_ranks // num_nodes)  # [R] node of each rank
    slots, home = _plan_from_scratch(weights, num_ranks, slots_per_rank, num_nodes, num_groups)
    layers = [_LayerSearch(weights[i], slots[i], home[i], nodes) for i in range(num_layers)]
    if num_nodes > 1:
        for layer in layers:
            layer.improve(target=SPILL_ABOVE)  # a node too hot for its ranks spills replicas to others
    if current is not None:
        _check_current(current, num_layers, num_experts, num_ranks, slots_per_rank)
        if current.home is not None and current.num_nodes == num_nodes:
            home = torch.tensor(current.home)
        layers = _plan_incremental(weights, torch.tensor(current.slots), layers, home, nodes, num_nodes)
    return Placement(
        [layer.slots.tolist() for layer in layers],
        num_experts,
        num_nodes,
        home.tolist() if num_nodes > 1 else None,
    )


def _plan_incremental(weights, current, scratch, home, nodes, num_nodes) -> list[_LayerSearch]:
    """From ``current`` slots ``[L, R, S]`` toward the from-scratch plan's balance, moving few slots.

    First the replica counts the new load calls for (one slot each), then swaps within pairs of
    ranks while a rank is over the target (two slots each, only for a real cut in the excess), then
    the hottest-rank search for what is left.
    """
    num_layers, num_ranks, per_rank = current.shape
    targets = torch.tensor([layer.objective() + INCREMENTAL_SLACK for layer in scratch], dtype=weights.dtype)
    layers = []
    for i in range(num_layers):
        layer = _LayerSearch(weights[i], current[i], home[i], nodes)
        layer.match_counts(torch.bincount(scratch[i].slots.flatten(), minlength=weights.shape[2]))
        layers.append(layer)
    # Pairs of ranks within a node: every (layer, node) is a batch row of R/N ranks over all experts.
    slots = torch.stack([layer.slots for layer in layers]).view(
        num_layers * num_nodes, num_ranks // num_nodes, per_rank
    )
    counts = torch.stack([torch.bincount(layer.slots.flatten(), minlength=weights.shape[2]) for layer in layers])
    slots = _pair_swaps(
        weights.repeat_interleave(num_nodes, 0),
        counts.repeat_interleave(num_nodes, 0),
        slots,
        PAIR_ROUNDS,
        targets=targets.repeat_interleave(num_nodes),
        min_gain=MIN_SWAP_GAIN,
    ).view(num_layers, num_ranks, per_rank)
    for i, layer in enumerate(layers):
        layer.slots = slots[i].clone()
        layer.improve(target=float(targets[i]), per_slot=True)
    return layers


def _check_sizes(num_experts: int, num_ranks: int, num_redundant: int, num_nodes: int, num_groups: int) -> int:
    """Slots per rank; raise ValueError saying what to change when the sizes do not fit."""
    if num_ranks <= 0 or num_redundant < 0 or num_nodes <= 0:
        raise ValueError("num_ranks and num_nodes must be positive and num_redundant non-negative")
    num_slots = num_experts + num_redundant
    if num_slots % num_ranks:
        lower = num_redundant - num_slots % num_ranks
        options = f"{lower} or {lower + num_ranks}" if lower >= 0 else f"{lower + num_ranks}"
        raise ValueError(
            f"{num_experts} experts + {num_redundant} redundant = {num_slots} slots do not split evenly over "
            f"{num_ranks} ranks; use num_redundant {options}, or a number of ranks that divides {num_slots}"
        )
    if num_ranks % num_nodes:
        raise ValueError(f"{num_ranks} ranks do not split evenly over {num_nodes} nodes; use a divisor of {num_ranks}")
    slots_per_rank = num_slots // num_ranks
    if num_groups % num_nodes or num_experts % num_groups:
        raise ValueError(
            f"{num_experts} experts in {num_groups} groups over {num_nodes} nodes: the groups must split the experts "
            "and the nodes the groups evenly; pass num_groups as the model's n_group (a multiple of num_nodes)"
        )
    if slots_per_rank > num_experts // num_nodes:
        raise ValueError(
            f"{slots_per_rank} slots per rank but only {num_experts // num_nodes} experts per node: a rank would hold "
            "an expert twice; use more ranks or fewer redundant experts"
        )
    return slots_per_rank


def _check_current(current: Placement, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int) -> None:
    current.check()
    have = (current.num_layers, current.num_experts, current.num_ranks, current.slots_per_rank)
    want = (num_layers, num_experts, num_ranks, slots_per_rank)
    if have != want:
        raise ValueError(
            f"current placement has (layers, experts, ranks, slots per rank) {have} but this plan needs {want}; "
            "plan from scratch (current=None) when the shape changes"
        )


def _scenarios(hist: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``[W, L, E]`` counts → ``[L, K, E]`` scenario weights, each summing to ``num_ranks`` (mean rank = 1)."""
    totals = hist.sum(-1, keepdim=True)  # [W, L, 1]
    norm = hist / totals.clamp(min=_EPS)
    present = (totals > 0).to(hist.dtype)  # windows without tokens in a layer do not vote there
    count = present.sum(0)  # [L, 1]
    mean = (norm * present).sum(0) / count.clamp(min=1)  # [L, E]
    uniform = torch.full_like(mean, 1.0 / hist.shape[-1])
    mean = torch.where(count > 0, mean, uniform)
    if hist.shape[0] == 1:
        scenarios = mean[:, None]
    else:
        norm = torch.where(present > 0, norm, mean)  # an empty window counts as the mean
        blended = (HISTORY_BLEND * norm + (1 - HISTORY_BLEND) * mean).clamp(min=0)  # [W, L, E]
        scenarios = torch.cat([mean[:, None], blended.transpose(0, 1)], dim=1)  # [L, 1 + W, E]
    return scenarios * num_ranks


def _plan_from_scratch(
    weights: torch.Tensor, num_ranks: int, slots_per_rank: int, num_nodes: int, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial slots ``[L, R, S]`` and home nodes ``[L, E]``: groups to nodes, then replicate and pack per node."""
    num_layers, num_scen, num_experts = weights.shape
    group_size = num_experts // num_groups
    group_w = weights.view(num_layers, num_scen, num_groups, group_size).sum(-1)  # [L, K, G]
    node_groups = _pack(
        group_w, torch.ones(num_layers, num_groups, dtype=torch.long), num_nodes, num_groups // num_nodes
    )
    group_node = torch.empty(num_layers, num_groups, dtype=torch.long)
    group_node.scatter_(
        1,
        node_groups.flatten(1),
        torch.arange(num_nodes).repeat_interleave(num_groups // num_nodes).expand(num_layers, -1),
    )
    home = group_node.repeat_interleave(group_size, dim=1)  # [L, E]
    # Each node's experts, by node then id: [L, N, E/N]; pack every (layer, node) as its own problem.
    experts_per_node = num_experts // num_nodes
    node_experts = home.argsort(dim=1, stable=True).view(num_layers, num_nodes, experts_per_node)
    sub_w = (
        weights[:, :, None, :]
        .expand(-1, -1, num_nodes, -1)
        .gather(3, node_experts[:, None].expand(-1, num_scen, -1, -1))
    )
    sub_w = sub_w.transpose(1, 2).reshape(num_layers * num_nodes, num_scen, experts_per_node)  # [L*N, K, E/N]
    ranks_per_node = num_ranks // num_nodes
    counts = _replicate(sub_w, ranks_per_node * slots_per_rank, ranks_per_node)
    local = _pack(sub_w, counts, ranks_per_node, slots_per_rank)  # [L*N, R/N, S] local expert ids
    local = _pair_swaps(sub_w, counts, local, PAIR_ROUNDS)
    flat_experts = node_experts.reshape(num_layers * num_nodes, experts_per_node)
    slots = flat_experts.gather(1, local.flatten(1)).view(num_layers, num_ranks, slots_per_rank)
    return slots, home


def _replicate(weights: torch.Tensor, num_slots: int, max_replicas: int) -> torch.Tensor:
    """Replica counts ``[B, E]``: each extra slot to the expert with the highest worst-scenario load per replica."""
    worst = weights.amax(1)  # [B, E]
    counts = torch.ones_like(worst, dtype=torch.long)
    rows = torch.arange(worst.shape[0])
    for _ in range(num_slots - worst.shape[1]):
        per_replica = (worst / counts).masked_fill(counts >= max_replicas, -1.0)
        counts[rows, per_replica.argmax(1)] += 1
    return counts


def _pack(weights: torch.Tensor, counts: torch.Tensor, num_bins: int, per_bin: int) -> torch.Tensor:
    """LPT packing of replicas into bins of ``per_bin`` slots, no expert twice in a bin: ``[B, bins, per_bin]`` ids."""
    batch, num_scen, num_experts = weights.shape
    per_replica = weights / counts[:, None]  # [B, K, E]
    items = torch.stack([torch.repeat_interleave(torch.arange(num_experts), c) for c in counts])  # [B, n]
    order = per_replica.amax(1).gather(1, items).argsort(dim=1, descending=True, stable=True)
    items = items.gather(1, order)
    loads = torch.zeros(batch, num_scen, num_bins, dtype=weights.dtype)
    fill = torch.zeros(batch, num_bins, dtype=torch.long)
    holds = torch.zeros(batch, num_bins, num_experts, dtype=torch.bool)
    slots = torch.empty(batch, num_bins, per_bin, dtype=torch.long)
    rows = torch.arange(batch)
    for t in range(items.shape[1]):
        e = items[:, t]  # [B]
        v = per_replica[rows, :, e]  # [B, K]
        after = loads + v[:, :, None]  # [B, K, bins]
        score = after.amax(1) + 1e-6 * after.mean(1)  # worst scenario first, then the total
        blocked = (fill >= per_bin) | holds[rows, :, e]
        score = score.masked_fill(blocked, float("inf"))
        b = score.argmin(1)
        stuck = blocked[rows, b]
        for row in stuck.nonzero().flatten().tolist():
            b[row] = _make_room(slots[row], fill[row], holds[row], loads[row], per_replica[row], int(e[row]), per_bin)
        loads[rows, :, b] += v
        slots[rows, b, fill[rows, b]] = e
        fill[rows, b] += 1
        holds[rows, b, e] = True
    return slots


def _pair_swaps(
    weights: torch.Tensor,
    counts: torch.Tensor,
    slots: torch.Tensor,
    max_rounds: int,
    targets: torch.Tensor | None = None,
    min_gain: float = _EPS,
) -> torch.Tensor:
    """Balance packed slots ``[B, bins, S]`` by swaps within disjoint pairs of bins, all pairs at once.

    Each round pairs the hottest bins with the coolest (rotating the partner when a pairing stalls)
    and applies, in every pair, the swap that lowers the pair's worst scenario most. With
    ``targets [B]`` a swap is worth its gain in load over the target, and must gain ``min_gain``.
    """
    batch, num_scen, _ = weights.shape
    num_bins, per_bin = slots.shape[1:]
    half = num_bins // 2
    if half == 0:
        return slots
    slots = slots.clone()
    rows = torch.arange(batch)[:, None]  # [B, 1]
    per_replica = weights / counts[:, None]  # [B, K, E]
    holds = torch.zeros(batch, num_bins, weights.shape[2], dtype=torch.bool)
    holds[rows[:, :, None], torch.arange(num_bins)[None, :, None], slots] = True
    stalled = 0
    for _ in range(max_rounds):
        slot_w = per_replica.gather(2, slots.view(batch, 1, -1).expand(-1, num_scen, -1)).view(
            batch, num_scen, num_bins, per_bin
        )
        loads = slot_w.sum(-1)  # [B, K, bins]
        order = loads.amax(1).argsort(1, descending=True)
        hot = order[:, :half]  # [B, P]
        cold = order[:, num_bins - half :].flip(1).roll(stalled % half, dims=1)
        wa = slot_w.gather(2, hot[:, None, :, None].expand(-1, num_scen, -1, per_bin))  # [B, K, P, S]
        wb = slot_w.gather(2, cold[:, None, :, None].expand(-1, num_scen, -1, per_bin))
        la, lb = wa.sum(-1), wb.sum(-1)  # [B, K, P]
        new_a = (la[..., None, None] - wa[..., :, None]) + wb[..., None, :]  # [B, K, P, S_i, S_j]
        new_b = (lb[..., None, None] - wb[..., None, :]) + wa[..., :, None]
        if targets is None:
            gain = torch.maximum(la, lb).amax(1)[..., None, None] - torch.maximum(new_a, new_b).amax(1)
        else:
            t = targets[:, None, None, None]
            before = (la.amax(1)[..., None, None] - t).clamp(min=0) + (lb.amax(1)[..., None, None] - t).clamp(min=0)
            gain = before - (new_a.amax(1) - t).clamp(min=0) - (new_b.amax(1) - t).clamp(min=0)
        xa, xb = (
            slots.gather(1, hot[..., None].expand(-1, -1, per_bin)),
            slots.gather(1, cold[..., None].expand(-1, -1, per_bin)),
        )
        a_has_xb = holds[rows[:, :, None], hot[..., None], xb]  # [B, P, S_j]
        b_has_xa = holds[rows[:, :, None], cold[..., None], xa]  # [B, P, S_i]
        valid = ~a_has_xb[:, :, None, :] & ~b_has_xa[..., None] & (xa[..., None] != xb[:, :, None, :])
        gain = gain.masked_fill(~valid, 0.0).flatten(2)
        best_gain, best = gain.max(2)  # [B, P]
        apply = best_gain > min_gain
        if not apply.any():
            stalled += 1
            if stalled >= half:
                break
            continue
        b, p = apply.nonzero(as_tuple=True)
        i, j = best[b, p] // per_bin, best[b, p] % per_bin
        ra, rb = hot[b, p], cold[b, p]
        ea, eb = slots[b, ra, i], slots[b, rb, j]
        slots[b, ra, i], slots[b, rb, j] = eb, ea
        holds[b, ra, ea], holds[b, rb, eb] = False, False
        holds[b, ra, eb], holds[b, rb, ea] = True, True
    return slots


def _make_room(slots, fill, holds, loads, per_replica, e: int, per_bin: int) -> int:
    """Every bin with room holds ``e``: move an expert from a full bin without ``e`` into one with room."""
    free = int((fill < per_bin).nonzero()[0])
    for q in (~holds[:, e]).nonzero().flatten().tolist():
        for j in range(per_bin):
            z = int(slots[q, j])
            if not holds[free, z]:
                slots[free, fill[free]] = z
                fill[free] += 1
                holds[free, z], holds[q, z] = True, False
                loads[:, free] += per_replica[:, z]
                loads[:, q] -= per_replica[:, z]
                fill[q] -= 1
                slots[q, j] = slots[q, fill[q]]  # the caller writes e into slot fill[q]
                return q
    raise AssertionError("no bin can take the expert; sizes were checked before packing")


class _LayerSearch:
    """Local search on one layer's slots ``[R, S]`` against scenario weights ``[K, E]``."""

    def __init__(self, weights: torch.Tensor, slots: torch.Tensor, home: torch.Tensor, nodes: torch.Tensor):
        self.weights = weights
        self.slots = slots.clone()
        self.home = home  # [E] node of each expert's group
        self.nodes = nodes  # [R] node of each rank
        self.num_nodes = int(nodes.max()) + 1

    def objective(self) -> float:
        return float(self._loads()[1].max())

    def improve(self, target: float = 0.0, per_slot: bool = False) -> None:
        """Apply the best move until the objective is at most ``target`` or nothing helps.

        ``per_slot`` ranks moves by gain per slot moved (incremental plans) instead of by gain.
        """
        for _ in range(MAX_MOVES_PER_RANK * self.slots.shape[0]):
            before = self.objective()
            if before <= target:
                return
            move = self._best_move(before, per_slot)
            if move is None:
                return
            kind, h, i, s, j = move
            if kind == "swap":
                self.slots[h, i], self.slots[s, j] = self.slots[s, j].clone(), self.slots[h, i].clone()
            else:
                self.slots[s, j] = self.slots[h, i]
            if self.objective() >= before - _EPS:  # estimates are conservative; this only guards rounding
                return

    def match_counts(self, wanted: torch.Tensor) -> None:
        """Re-point slots of experts with more replicas than ``wanted [E]`` to experts with fewer, one slot each.

        The heaviest replica short goes first, into the slot whose rank ends up lightest; an expert
        keeps a replica on its group's node, and new replicas go to their group's node.
        """
        w = self.weights
        while True:
            counts = torch.bincount(self.slots.flatten(), minlength=w.shape[1])
            short = (counts < wanted).nonzero().flatten()
            if len(short) == 0:
                return
            y = int(short[(w[:, short] / counts[short]).amax(0).argmax()])
            x = self.slots  # [R, S]
            holds = torch.zeros(x.shape[0], w.shape[1], dtype=torch.bool)
            holds[torch.arange(x.shape[0])[:, None], x] = True
            at_home = (self.nodes[:, None] == self.home[x]).to(w.dtype)
            home_count = torch.zeros(w.shape[1], dtype=w.dtype).index_add_(0, x.flatten(), at_home.flatten())
            valid = (counts[x] > wanted[x]) & ~holds[:, y][:, None] & (self.nodes == self.home[y])[:, None]
            valid &= (at_home == 0) | (home_count[x] >= 2)
            if not valid.any():
                return
            loads = self._loads()[1]  # [K, R]
            after = loads[:, :, None] - w[:, x] / counts[x] + w[:, y, None, None] / (counts[y] + 1)
            score = after.amax(0).masked_fill(~valid, float("inf"))
            s, j = divmod(int(score.argmin()), x.shape[1])
            self.slots[s, j] = y

    def _loads(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.bincount(self.slots.flatten(), minlength=self.weights.shape[1])
        per_slot = self.weights[:, self.slots] / counts[self.slots]  # [K, R, S]
        return per_slot, per_slot.sum(-1)  # [K, R, S], [K, R]

    def _best_move(self, obj: float, per_slot: bool):
        slot_w, loads = self._loads()
        num_ranks, per_rank = self.slots.shape
        if num_ranks < 2:
            return None
        h = int(loads.amax(0).argmax())
        holds = torch.zeros(num_ranks, self.weights.shape[1], dtype=torch.bool)
        holds[torch.arange(num_ranks)[:, None], self.slots] = True
        best = None
        for kind, new, valid, cost in (self._swaps(h, slot_w, loads, holds), self._replaces(h, obj, loads, holds)):
            gain = (obj - new).masked_fill(~valid, 0.0)  # [S_i, R, S_j]
            score = gain / cost if per_slot else gain
            flat = int(score.argmax())
            if gain.flatten()[flat] > _EPS and (best is None or score.flatten()[flat] > best[0]):
                i, s, j = (int(v) for v in torch.unravel_index(torch.tensor(flat), gain.shape))
                best = (float(score.flatten()[flat]), (kind, h, i, s, j))
        return None if best is None else best[1]

    def _swaps(self, h: int, slot_w: torch.Tensor, loads: torch.Tensor, holds: torch.Tensor):
        """Swap slot i of the hottest rank h with slot j of rank s (same node): new objective ``[S, R, S]``."""
        num_ranks = loads.shape[1]
        a = slot_w[:, h]  # [K, S]
        new_h = loads[:, h, None, None, None] - a[:, :, None, None] + slot_w[:, None]  # [K, S_i, R, S_j]
        new_s = loads[:, None, :, None] - slot_w[:, None] + a[:, :, None, None]  # [K, S_i, R, S_j]
        rest = self._max_without(loads, h)  # [K, R]: hottest rank other than h and s
        new = torch.maximum(torch.maximum(new_h, new_s), rest[:, None, :, None]).amax(0)
        xi, x = self.slots[h], self.slots
        valid = (xi[:, None, None] != x[None]) & ~holds[:, xi].T[:, :, None] & ~holds[h][x][None]
        valid &= (self.nodes == self.nodes[h])[None, :, None] & (torch.arange(num_ranks) != h)[None, :, None]
        return "swap", new, valid, 2.0

    def _replaces(self, h: int, obj: float, loads: torch.Tensor, holds: torch.Tensor):
        """Slot j of rank s drops its expert x (which keeps a replica) for a new replica of y = slot i of rank h."""
        w = self.weights
        counts = torch.bincount(self.slots.flatten(), minlength=w.shape[1]).to(w.dtype)
        y, x = self.slots[h], self.slots  # [S_i], [R, S_j]
        wy, cy = w[:, y], counts[y]  # [K, S_i], [S_i]
        wx, cx = w[:, x], counts[x]  # [K, R, S_j], [R, S_j]
        dy = wy / (cy + 1) - wy / cy  # every replica of y gets lighter
        dx = wx / (cx - 1).clamp(min=1) - wx / cx  # every other replica of x gets heavier
        # Ranks other than h and s keep their load, except the other holders of x, which get dx heavier.
        other_holders = self._max_other_holder(loads, x, w.shape[1]) + dx  # [K, R, S_j]
        rest = self._max_without(loads, h)[:, :, None]  # [K, R, 1]
        new_s = loads[:, None, :, None] - (wx / cx)[:, None] + (wy / (cy + 1))[:, :, None, None]  # [K, S_i, R, S_j]
        new_h = (loads[:, h, None] + dy)[:, :, None, None]  # [K, S_i, 1, 1]
        new = torch.maximum(torch.maximum(new_s, new_h), torch.maximum(other_holders, rest)[:, None]).amax(0)
        valid = (cx >= 2)[None] & (x[None] != y[:, None, None]) & ~holds[:, y].T[:, :, None]
        # Every expert keeps a replica on its group's node; other nodes get one only while spilling is allowed.
        node_count = torch.zeros(w.shape[1], dtype=w.dtype).index_add_(
            0, x.flatten(), (self.nodes[:, None] == self.home[x]).flatten().to(w.dtype)
        )
        valid &= ((self.nodes[:, None] != self.home[x]) | (node_count[x] >= 2))[None]
        away = self.nodes[None, :] != self.home[y][:, None]  # [S_i, R]
        if obj <= SPILL_ABOVE:
            valid &= ~away[:, :, None]
        cost = 1.0 + 2.0 * away[:, :, None].to(w.dtype)  # a cross-node replica is worth it only for more gain
        return "replace", new, valid, cost

    @staticmethod
    def _max_without(loads: torch.Tensor, h: int) -> torch.Tensor:
        """``[K, R]``: for each rank s, the highest load over ranks other than h and s."""
        masked = loads.clone()
        masked[:, h] = float("-inf")
        top = masked.topk(min(2, loads.shape[1]), dim=1)
        second = top.values[:, 1:2] if loads.shape[1] > 1 else torch.full_like(top.values[:, :1], float("-inf"))
        is_first = torch.arange(loads.shape[1])[None] == top.indices[:, :1]
        return torch.where(is_first, second, top.values[:, :1])

    @staticmethod
    def _max_other_holder(loads: torch.Tensor, slots: torch.Tensor, num_experts: int) -> torch.Tensor:
        """``[K, R, S]``: for the expert in slot (s, j), the highest load over the other ranks holding it."""
        num_scen = loads.shape[0]
        flat = slots.flatten().expand(num_scen, -1)  # [K, R*S]
        slot_loads = loads[:, :, None].expand(-1, -1, slots.shape[1]).reshape(num_scen, -1)  # [K, R*S]
        empty = torch.full((num_scen, num_experts), float("-inf"), dtype=loads.dtype)
        first = empty.scatter_reduce(1, flat, slot_loads, "amax")  # [K, E]
        on_top = slot_loads == first.gather(1, flat)
        num_top = torch.zeros_like(first).scatter_add_(1, flat, on_top.to(loads.dtype))
        second = empty.scatter_reduce(1, flat, slot_loads.masked_fill(on_top, float("-inf")), "amax")
        alone_on_top = on_top & (num_top.gather(1, flat) == 1)
        return torch.where(alone_on_top, second.gather(1, flat), first.gather(1, flat)).view(num_scen, *slots.shape)
