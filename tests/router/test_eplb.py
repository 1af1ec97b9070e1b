"""The expert-placement planner: invariants, refusals, replicas for hot experts, incremental and multi-node plans."""

from __future__ import annotations

import json

import pytest
import torch

from dsray.cli import main as dsray_main
from router.eplb import Placement, plan_placement


def create_load(num_layers: int = 4, num_experts: int = 64, seed: int = 0, skew: float = 1.2) -> list[list[float]]:
    """Zipf-like token counts: a few hot experts per layer, which ones differs by layer and seed."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    rows = []
    for _ in range(num_layers):
        weights = (1.0 / ranks**skew)[torch.randperm(num_experts, generator=gen)]
        rows.append((weights * 100_000).round().tolist())
    return rows


def assert_valid(placement: Placement, num_experts: int, num_ranks: int, slots_per_rank: int) -> None:
    placement.check()
    for layer in placement.slots:
        assert len(layer) == num_ranks
        assert all(len(rank) == slots_per_rank and len(set(rank)) == slots_per_rank for rank in layer)
        assert {e for rank in layer for e in rank} == set(range(num_experts))


@pytest.mark.parametrize("num_redundant", [0, 8, 16])
def test_plan_keeps_the_invariants_and_beats_contiguous(num_redundant):
    load = create_load()
    placement = plan_placement(load, 8, num_redundant)
    assert_valid(placement, 64, 8, (64 + num_redundant) // 8)
    assert sum(placement.replicas()[0]) == 64 + num_redundant
    contiguous = Placement.contiguous(4, 64, 8).mean_imbalance(load)
    assert placement.mean_imbalance(load) < contiguous
    if num_redundant >= 8:
        assert placement.mean_imbalance(load) < 1.05


@pytest.mark.parametrize("num_redundant", [8, 16])
def test_hottest_expert_gets_a_replica(num_redundant):
    load = create_load(skew=0.6)  # mild skew: the hottest expert alone does not fill a rank
    placement = plan_placement(load, 8, num_redundant)
    for weights, counts in zip(load, placement.replicas()):
        assert counts[max(range(64), key=weights.__getitem__)] >= 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_ranks=8, num_redundant=5), "num_redundant 0 or 8"),
        (dict(num_ranks=0, num_redundant=0), "positive"),
        (dict(num_ranks=8, num_redundant=-8), "non-negative"),
        (dict(num_ranks=8, num_redundant=8, num_nodes=3), "nodes"),
        (dict(num_ranks=8, num_redundant=8, num_nodes=2, num_groups=3), "num_groups"),
        (dict(num_ranks=2, num_redundant=2, num_nodes=2), "twice"),
    ],
)
def test_plan_refuses_sizes_that_do_not_fit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(create_load(), **kwargs)


@pytest.mark.parametrize("load", [[1.0, 2.0], [[[[1.0]]]], [[1.0, -1.0]], [[1.0, 2.0], [3.0]]])
def test_plan_refuses_bad_loads(load):
    with pytest.raises(ValueError, match="load"):
        plan_placement(load, 1, 0)


def test_history_as_nested_lists_or_a_tensor():
    history = [create_load(seed=s) for s in range(3)]
    from_lists = plan_placement(history, 8, 8)
    from_tensor = plan_placement(torch.tensor(history), 8, 8)
    assert from_lists.slots == from_tensor.slots
    assert_valid(from_lists, 64, 8, 9)
    # A history counts as its total wherever a load is evaluated.
    total = torch.tensor(history).sum(0)
    assert from_lists.imbalance(history) == pytest.approx(from_lists.imbalance(total))
    assert from_lists.mean_imbalance(total) < Placement.contiguous(4, 64, 8).mean_imbalance(total)


def test_history_plan_holds_up_on_a_window_it_did_not_see():
    windows = [create_load(seed=s, skew=0.8) for s in range(4)]
    mixed = [[sum(w[i][e] for w in windows[:2]) for e in range(64)] for i in range(4)]  # between seen windows
    placement = plan_placement(windows, 8, 8)
    assert placement.mean_imbalance(mixed) < 1.15


def test_incremental_plan_moves_fewer_slots_than_a_fresh_one():
    before_load, after_load = create_load(seed=1), create_load(seed=2)
    before = plan_placement(before_load, 8, 8)
    scratch = plan_placement(after_load, 8, 8)
    after = plan_placement(after_load, 8, 8, current=before)
    assert_valid(after, 64, 8, 9)
    assert after.moved(before) < scratch.moved(before)
    assert after.mean_imbalance(after_load) <= scratch.mean_imbalance(after_load) + 0.05
    assert after.mean_imbalance(after_load) < before.mean_imbalance(after_load)
    # Nothing to gain, nothing moved.
    assert plan_placement(before_load, 8, 8, current=before).moved(before) == 0


def test_incremental_plan_refuses_a_current_of_another_shape():
    current = plan_placement(create_load(), 8, 8)
    with pytest.raises(ValueError, match="current placement"):
        plan_placement(create_load(), 8, 16, current=current)


def test_multi_node_plan_keeps_groups_on_nodes():
    load = create_load(num_layers=3, skew=0.8)
    placement = plan_placement(load, 8, 8, num_nodes=2, num_groups=4)
    assert_valid(placement, 64, 8, 9)
    for layer, home in zip(placement.slots, placement.home):
        for group in range(4):
            assert len({home[e] for e in range(group * 16, (group + 1) * 16)}) == 1  # a group lives on one node
        assert sorted(home).count(0) == sorted(home).count(1) == 32  # two groups per node
        on_home = {e for r, rank in enumerate(layer) for e in rank if home[e] == r // 4}
        assert on_home == set(range(64))  # every expert has a replica on its group's node
    cross = placement.cross_node_rows(load)
    assert len(cross) == 3 and all(0.0 <= c < 0.5 for c in cross)


def test_multi_node_plan_needs_no_cross_node_rows_when_nodes_are_balanced():
    load = [[100.0] * 64 for _ in range(2)]
    placement = plan_placement(load, 8, 8, num_nodes=2, num_groups=4)
    assert placement.cross_node_rows(load) == [0.0, 0.0]
    assert placement.mean_imbalance(load) == pytest.approx(1.0, abs=0.02)
    assert plan_placement(load, 8, 8).cross_node_rows(load) == [0.0, 0.0]  # one node: never cross-node


def test_placement_helpers():
    contiguous = Placement.contiguous(1, 4, 2)
    assert contiguous.slots == [[[0, 1], [2, 3]]]
    load = [[3.0, 1.0, 1.0, 1.0]]
    assert contiguous.imbalance(load) == [pytest.approx(4.0 / 3.0)]
    replicated = Placement([[[0, 1, 2], [0, 3, 1]]], 4)
    assert replicated.replicas() == [[2, 2, 1, 1]]
    # Experts 0 and 1 have their tokens split over their two replicas.
    assert replicated.rank_loads([[2.0, 0.0, 1.0, 3.0]]) == [[2.0, 4.0]]
    assert replicated.moved(Placement([[[0, 1, 3], [0, 3, 1]]], 4)) == 1
    with pytest.raises(ValueError, match="twice"):
        Placement([[[0, 0], [1, 2]]], 3).check()
    with pytest.raises(ValueError, match="no slot"):
        Placement([[[0, 1], [1, 2]]], 4).check()
    with pytest.raises(ValueError, match="divides"):
        Placement.contiguous(1, 5, 2)


def test_cli_plans_a_load_file(tmp_path, capsys):
    layers = [[0.0] * 64] + create_load()  # a dense layer without tokens, as in SGLang's dumps
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"logical_count": layers}))
    assert dsray_main(["eplb", "plan", str(path), "--ranks", "8", "--redundant", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == 4 and report["slots_per_rank"] == 9
    assert report["imbalance"] < report["contiguous_imbalance"]
    Placement(**report["placement"]).check()
    assert dsray_main(["eplb", "plan", str(path), "--ranks", "8", "--redundant", "8", "--nodes", "2"]) == 0
    assert "cross-node rows" in capsys.readouterr().out
    assert dsray_main(["eplb", "plan", str(path), "--ranks", "8", "--redundant", "3"]) == 2
    assert "num_redundant" in capsys.readouterr().err


def test_cli_plots_the_load_and_the_rank_load_before_and_after(tmp_path, capsys):
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"logical_count": create_load()}))
    png = tmp_path / "load.png"
    assert dsray_main(["eplb", "plot", str(path), "--ranks", "8", "--redundant", "8", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert dsray_main(["eplb", "plot", str(tmp_path / "missing.json"), "--ranks", "8", "-o", str(png)]) == 2
    assert "missing.json" in capsys.readouterr().err
