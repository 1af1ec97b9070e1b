"""The MoE exchange in one process: loopback ranks (threads) against the plain MoE.

Attention ranks send their tokens' rows, expert ranks compute them with their slots, results come
back and are combined — the whole expert-parallel data path of ``router/exchange.py``, without Ray.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dsray.comm import LoopbackGroup, SelfTransport, free_address
from dsray.comm_socket import SocketTransport
from experts.shard import ExpertShard
from router.exchange import LocalExperts, MoEExchange
from router.expert_map import ExpertMap, contiguous_slots

D, I, NUM_EXPERTS, TOP_K = 32, 16, 16, 4


def full_shard(seed: int = 0) -> ExpertShard:
    g = torch.Generator().manual_seed(seed)
    shard = ExpertShard(range(NUM_EXPERTS), D, I)
    shard.w13.data = torch.randn(NUM_EXPERTS, 2 * I, D, generator=g) * D**-0.5
    shard.w2.data = torch.randn(NUM_EXPERTS, D, I, generator=g) * I**-0.5
    return shard


def slot_shard(full: ExpertShard, expert_ids: list[int]) -> ExpertShard:
    """An expert rank's shard: copies of the full layer's experts in its slots."""
    shard = ExpertShard(expert_ids, D, I)
    shard.w13.data = full.w13.data[expert_ids].clone()
    shard.w2.data = full.w2.data[expert_ids].clone()
    return shard


def routing(num_tokens: int, seed: int, hot: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, D, generator=g)
    scores = torch.rand(num_tokens, NUM_EXPERTS, generator=g)
    if hot:
        scores[:, :2] += 1.0  # two experts take a share of every token, as in a skewed workload
    ids = scores.topk(TOP_K, dim=-1).indices
    weights = torch.rand(num_tokens, TOP_K, generator=g)
    return x, ids, weights


def socket_group(world: int, timeout_s: float = 20):
    """``rank → SocketTransport``: ranks as threads of this process, over real TCP connections."""
    _, port = free_address("127.0.0.1")
    stores = {}

    def transport(rank: int) -> SocketTransport:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
        stores[rank] = store
        return SocketTransport(store, rank, world, timeout_s, "127.0.0.1")

    return transport


def run_ep(
    expert_map: ExpertMap,
    full: ExpertShard,
    token_splits: list[int],
    x,
    ids,
    weights,
    layers: int = 1,
    transport: str = "loopback",
    local: list[list[int]] | None = None,
    stats: list | None = None,
):
    """Run ``layers`` rounds on A attention + E expert ranks (threads: loopback, or sockets); returns each
    attention rank's output. ``local[layer]``: experts every attention rank also holds. ``stats`` gets
    each rank's exchange."""
    A, E = expert_map.first_rank, expert_map.num_ranks
    make = LoopbackGroup(A + E, timeout_s=20).transport if transport == "loopback" else socket_group(A + E)
    outs: list = [None] * A
    errors: list = []
    bounds = [sum(token_splits[:r]) for r in range(A + 1)]

    def attention(rank: int) -> None:
        held = None
        if local is not None:
            shards = [slot_shard(full, ids) for ids in local]
            held = LocalExperts(NUM_EXPERTS, local, [s.run_sorted for s in shards])
        exchange = MoEExchange(make(rank), expert_map, replica_offset=rank, local=held)
        if stats is not None:
            stats.append(exchange)
        lo, hi = bounds[rank], bounds[rank + 1]
        outs[rank] = [exchange.round(layer, x[lo:hi], ids[lo:hi], weights[lo:hi]) for layer in range(layers)]

    def expert(rank: int) -> None:
        shards = [slot_shard(full, slots) for slots in expert_map.rank_slots(rank)]
        exchange = MoEExchange(make(A + rank), expert_map, compute=[s.run_sorted for s in shards])
        if stats is not None:
            stats.append(exchange)
        for layer in range(layers):
            exchange.idle_round(layer, D, x.dtype)

    def guard(fn, *args):
        try:
            fn(*args)
        except BaseException as exc:  # surfaced below: a failed rank must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(attention, r)) for r in range(A)]
    threads += [threading.Thread(target=guard, args=(expert, r)) for r in range(E)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return outs


@pytest.mark.parametrize(("A", "E"), [(1, 1), (1, 2), (1, 3), (2, 2), (3, 5), (2, 16)])
def test_loopback_ep_equals_the_plain_moe(A, E):
    full = full_shard()
    x, ids, weights = routing(23, seed=A * 10 + E)
    reference = full.forward_loop(x, ids, weights)
    expert_map = ExpertMap.contiguous(NUM_EXPERTS, E, 1, first_rank=A)
    splits = [23 // A + (1 if r < 23 % A else 0) for r in range(A)]
    outs = run_ep(expert_map, full, splits, x, ids, weights)
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("A", "E", "redundant"), [(1, 1, 0), (1, 3, 0), (2, 3, 5), (3, 2, 0)])
def test_socket_ep_equals_the_plain_moe(A, E, redundant):
    """The CPU workers' transport: the same rounds over TCP, several layers (so rounds overlap)."""
    full = full_shard()
    x, ids, weights = routing(29, seed=A + E + redundant, hot=True)
    reference = full.forward_loop(x, ids, weights)
    expert_map = ExpertMap.contiguous(NUM_EXPERTS, E, 3, num_redundant=redundant, first_rank=A)
    splits = [29 // A + (1 if r < 29 % A else 0) for r in range(A)]
    outs = run_ep(expert_map, full, splits, x, ids, weights, layers=3, transport="socket")
    for layer in range(3):
        torch.testing.assert_close(torch.cat([o[layer] for o in outs]), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("A", "E", "redundant", "transport"), [(1, 1, 0, "socket"), (2, 3, 0, "loopback"), (3, 2, 4, "socket")]
)
@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_attention_ranks_local_experts_equal_the_plain_moe(A, E, redundant, transport, share):
    """Attention ranks that hold copies of some experts compute those pairs themselves, the rest go to
    the expert ranks: the same sums, and the expert ranks get only the remote rows."""
    full = full_shard()
    x, ids, weights = routing(31, seed=A + E + int(share * 4), hot=True)
    reference = full.forward_loop(x, ids, weights)
    # A different set per layer, as the placement may give: evenly spread, and shifted by one.
    local = [LocalExperts.spread(NUM_EXPERTS, share), [(e + 1) % NUM_EXPERTS for e in LocalExperts.spread(16, share)]]
    expert_map = ExpertMap.contiguous(NUM_EXPERTS, E, 2, num_redundant=redundant, first_rank=A)
    splits = [31 // A + (1 if r < 31 % A else 0) for r in range(A)]
    stats: list = []
    outs = run_ep(expert_map, full, splits, x, ids, weights, layers=2, transport=transport, local=local, stats=stats)
    for layer in range(2):
        torch.testing.assert_close(torch.cat([o[layer] for o in outs]), reference, rtol=1e-5, atol=1e-5)
    pairs_local = sum(int(torch.isin(ids, torch.tensor(held)).sum()) for held in local)
    assert sum(e.local_rows for e in stats if e.local is not None) == pairs_local > 0
    assert sum(e.rows_computed for e in stats if e.compute is not None) == 2 * ids.numel() - pairs_local


def run_colocated(
    expert_map: ExpertMap, full: ExpertShard, token_splits: list[int], x, ids, weights, layers: int, transport: str
) -> tuple[list, list[MoEExchange]]:
    """Every rank both sends its tokens' rows and serves its slots (``num_expert_workers=0``): per layer it
    starts the round, does other work (as the shared experts run there), then waits."""
    world = expert_map.num_ranks
    make = LoopbackGroup(world, timeout_s=20).transport if transport == "loopback" else socket_group(world)
    outs: list = [None] * world
    exchanges: list = [None] * world
    errors: list = []
    bounds = [sum(token_splits[:r]) for r in range(world + 1)]

    def rank(r: int) -> None:
        try:
            shards = [slot_shard(full, slots) for slots in expert_map.rank_slots(r)]
            exchange = exchanges[r] = MoEExchange(make(r), expert_map, [s.run_sorted for s in shards], replica_offset=r)
            lo, hi = bounds[r], bounds[r + 1]
            outs[r] = []
            for layer in range(layers):
                combine = exchange.start_round(layer, x[lo:hi], ids[lo:hi], weights[lo:hi])
                torch.randn(64, 64) @ torch.randn(64, 64)  # the caller's work between start and wait
                outs[r].append(combine.wait())
        except BaseException as exc:  # surfaced below: a failed rank must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return outs, exchanges


@pytest.mark.parametrize(
    ("world", "redundant", "splits", "transport"),
    [
        (1, 0, [19], "loopback"),
        (2, 0, [10, 9], "socket"),
        (3, 4, [12, 0, 7], "loopback"),
        (4, 6, [5, 5, 5, 4], "socket"),
    ],
)
def test_ranks_that_send_and_serve_equal_the_plain_moe(world, redundant, splits, transport):
    """Without expert workers each rank holds a share of the experts and serves the others' rows: the same
    sums, an idle rank still serves, and every pair is computed once."""
    full = full_shard()
    x, ids, weights = routing(19, seed=world + redundant, hot=True)
    reference = full.forward_loop(x, ids, weights)
    expert_map = ExpertMap.contiguous(NUM_EXPERTS, world, 3, num_redundant=redundant, first_rank=0)
    outs, exchanges = run_colocated(expert_map, full, splits, x, ids, weights, 3, transport)
    for layer in range(3):
        torch.testing.assert_close(torch.cat([o[layer] for o in outs]), reference, rtol=1e-5, atol=1e-5)
    served = [e.rows_computed for e in exchanges]
    assert sum(served) == 3 * ids.numel()
    if world > 1:
        assert all(n > 0 for n in served)  # the idle rank (no tokens of its own) serves too


def test_local_experts_are_spread_over_the_ids():
    assert LocalExperts.spread(16, 0.25) == [0, 4, 8, 12]
    assert LocalExperts.spread(64, 0.5) == list(range(0, 64, 2))
    assert LocalExperts.spread(16, 1.0) == list(range(16))
    assert LocalExperts.spread(16, 0.01) == []


@pytest.mark.parametrize(("A", "E", "redundant"), [(1, 2, 2), (2, 3, 5), (2, 4, 16), (1, 2, 16)])
def test_replicas_give_the_same_result_and_share_their_expert_rows(A, E, redundant):
    full = full_shard()
    x, ids, weights = routing(40, seed=redundant, hot=True)
    reference = full.forward_loop(x, ids, weights)
    expert_map = ExpertMap.contiguous(NUM_EXPERTS, E, 2, num_redundant=redundant, first_rank=A)
    assert sum(len(s) for s in expert_map.placement[0]) == NUM_EXPERTS + redundant
    splits = [40 // A + (1 if r < 40 % A else 0) for r in range(A)]
    outs = run_ep(expert_map, full, splits, x, ids, weights, layers=2)
    for layer in range(2):
        torch.testing.assert_close(torch.cat([o[layer] for o in outs]), reference, rtol=1e-5, atol=1e-5)
    # Rows of a replicated expert are split evenly over its replicas.
    slots = expert_map.route(0, ids)
    hot = 0  # expert 0 is hot and has a replica whenever redundant > 0
    hot_slots = slots[ids.reshape(-1) == hot]
    counts = torch.bincount(hot_slots, minlength=expert_map.num_slots)
    used = counts[counts > 0]
    assert len(used) == int(expert_map.num_replicas(0)[hot]) >= 2
    assert int(used.max() - used.min()) <= 1


def test_uneven_and_user_given_placements():
    full = full_shard()
    x, ids, weights = routing(17, seed=3)
    reference = full.forward_loop(x, ids, weights)
    placement = [[15, 3, 0, 7], [1, 2, 4, 5, 6, 8, 9], [10, 11, 12, 13, 14, 0, 3]]  # any order, replicas of 0 and 3
    expert_map = ExpertMap.from_rank_slots(NUM_EXPERTS, placement, 1, first_rank=1)
    outs = run_ep(expert_map, full, [17], x, ids, weights)
    torch.testing.assert_close(outs[0][0], reference, rtol=1e-5, atol=1e-5)


def test_an_idle_attention_rank_takes_part_with_no_rows():
    full = full_shard()
    x, ids, weights = routing(9, seed=5)
    expert_map = ExpertMap.contiguous(NUM_EXPERTS, 2, 3, first_rank=2)
    outs = run_ep(expert_map, full, [9, 0], x, ids, weights, layers=3)
    assert outs[1][0].shape == (0, D)
    torch.testing.assert_close(outs[0][2], full.forward_loop(x, ids, weights), rtol=1e-5, atol=1e-5)


def test_self_transport_is_the_local_grouped_path():
    """A group of one that is its own expert rank: what the local executor runs for T > 1."""
    full = full_shard()
    x, ids, weights = routing(31, seed=8)
    exchange = MoEExchange(SelfTransport(), ExpertMap.contiguous(NUM_EXPERTS, 1, 1), compute=[full.run_sorted])
    torch.testing.assert_close(exchange.round(0, x, ids, weights), full.forward_loop(x, ids, weights))
    assert exchange.rows_computed == 31 * TOP_K


def test_a_rank_that_never_joins_fails_the_round_instead_of_hanging():
    expert_map = ExpertMap.contiguous(NUM_EXPERTS, 1, 1, first_rank=1)
    group = LoopbackGroup(2, timeout_s=0.5)
    exchange = MoEExchange(group.transport(0), expert_map)
    x, ids, weights = routing(3, seed=1)
    with pytest.raises(TimeoutError, match="never joined"):
        exchange.round(0, x, ids, weights)


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]], r"experts \[15\] have no slot"),
        ([[0, 1, 2, 3, 4, 5, 6, 7, 7], list(range(8, 16))], r"holds experts \[7\] twice"),
        ([list(range(16)), []], "holds no slot"),
        ([list(range(15)) + [16], [15]], "outside"),
    ],
)
def test_bad_placements_are_refused_saying_what_to_change(placement, message):
    with pytest.raises(ValueError, match=message):
        ExpertMap.from_rank_slots(NUM_EXPERTS, placement, 1)


def test_redundant_slots_that_cannot_fit_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        contiguous_slots(NUM_EXPERTS, 2, NUM_EXPERTS + 1)  # 2 ranks: at most one extra replica each
    with pytest.raises(ValueError, match="num_expert_workers must be in"):
        contiguous_slots(NUM_EXPERTS, 17)


def test_default_redundant_slots_are_spread_evenly():
    slots = contiguous_slots(NUM_EXPERTS, 4, 4)
    assert sorted(len(s) for s in slots) == [5, 5, 5, 5]
    assert all(len(set(s)) == len(s) for s in slots)
    slots = contiguous_slots(NUM_EXPERTS, 3, 2)  # 6, 5, 5 → 6, 6, 6
    assert [len(s) for s in slots] == [6, 6, 6]


def test_an_aligned_map_keeps_held_experts_in_their_slots():
    old = ExpertMap(6, [[[0, 1, 2, 3], [4, 5, 0, 1]]])
    new = ExpertMap(6, [[[5, 2, 1, 0], [3, 4, 1, 2]]])
    aligned = new.aligned_to(old)
    # rank 0 keeps 0, 1, 2 where they were and takes 5 in the freed slot; rank 1 keeps 4 and 1
    assert aligned.placement == [[[0, 1, 2, 5], [4, 3, 2, 1]]]
    assert [sorted(r) for r in aligned.placement[0]] == [sorted(r) for r in new.placement[0]]
    # a rank whose slot count changes keeps the new order
    assert ExpertMap(6, [[[0, 1, 2], [3, 4, 5]]]).aligned_to(old).placement == [[[0, 1, 2], [3, 4, 5]]]


def test_a_covering_map_keeps_what_survivors_hold_and_gives_orphans_to_the_emptiest():
    # 8 experts, 3 ranks with a replica each of 0 and 5; rank 1 is lost: 3 and 4 had no other replica.
    full = ExpertMap(8, [[[0, 1, 2, 5], [3, 4, 0], [5, 6, 7]]])
    assert full.orphans({1}) == 2 and full.orphans({0}) == 2 and full.orphans(set()) == 0
    survivors = [full.rank_slots(0), full.rank_slots(2)]
    m = ExpertMap.covering(8, survivors, first_rank=1)
    assert m.first_rank == 1 and m.num_ranks == 2
    assert m.placement[0][0][:4] == [0, 1, 2, 5] and m.placement[0][1][:3] == [5, 6, 7]  # held slots unchanged
    assert sorted(m.placement[0][0][4:] + m.placement[0][1][3:]) == [3, 4]  # orphans, one to each (the emptiest)
    assert m.placement[0][1][3:] == [3] and m.placement[0][0][4:] == [4]
    # With a replica of everything left, nothing moves.
    assert ExpertMap.covering(2, [[[0, 1]]]).placement == [[[0, 1]]]
    with pytest.raises(ValueError, match="no expert rank is left"):
        ExpertMap.covering(8, [])
