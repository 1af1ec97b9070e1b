"""A rebalance's switch rewrites only the slots whose expert changes (``ExpertShard.write_slots``)."""

from __future__ import annotations

import pytest
import torch

from experts.shard import ExpertShard


def _expert_weights(num_experts: int, dim: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(num_experts, 2 * inter, dim, generator=g), torch.randn(num_experts, dim, inter, generator=g)


def _shard(ids: list[int], w13: torch.Tensor, w2: torch.Tensor) -> ExpertShard:
    shard = ExpertShard(ids, w13.shape[2], w2.shape[2])
    shard.w13.data, shard.w2.data = w13[ids].clone(), w2[ids].clone()
    return shard


def test_writing_changed_slots_equals_a_shard_built_for_the_new_experts():
    w13, w2 = _expert_weights(8, 16, 8)
    live = _shard([0, 1, 2, 3], w13, w2)
    storage = live.w13.data_ptr()
    live.write_slots([1, 3], _shard([6, 5], w13, w2))
    want = _shard([0, 6, 2, 5], w13, w2)
    assert live.expert_ids == [0, 6, 2, 5] and live.local_of == {0: 0, 6: 1, 2: 2, 5: 3}
    assert torch.equal(live.w13, want.w13) and torch.equal(live.w2, want.w2)
    assert live.w13.data_ptr() == storage  # in place: no second copy of the layer
    x = torch.randn(5, 16)
    ids = torch.tensor([[6, 0], [5, 2], [0, 5], [2, 6], [6, 5]])
    weights = torch.rand(5, 2)
    assert torch.equal(live.forward_loop(x, ids, weights), want.forward_loop(x, ids, weights))


def test_writing_an_expert_the_shard_already_holds_elsewhere_is_refused():
    w13, w2 = _expert_weights(8, 16, 8)
    live = _shard([0, 1, 2, 3], w13, w2)
    with pytest.raises(ValueError, match="each expert once"):
        live.write_slots([0], _shard([2], w13, w2))
    assert live.expert_ids == [0, 1, 2, 3]


def test_keeping_the_first_slots_drops_the_rest_without_a_copy():
    """A worker giving back the experts it took over after a loss (appended after its own) narrows its stacks."""
    w13, w2 = _expert_weights(8, 16, 8)
    live = _shard([4, 5, 6, 1, 7], w13, w2)
    storage = live.w13.data_ptr()
    live.keep_first(3)
    want = _shard([4, 5, 6], w13, w2)
    assert live.expert_ids == [4, 5, 6] and live.local_of == {4: 0, 5: 1, 6: 2} and live.num_local_experts == 3
    assert torch.equal(live.w13, want.w13) and torch.equal(live.w2, want.w2) and live.w13.data_ptr() == storage
    x, ids, weights = torch.randn(4, 16), torch.tensor([[4, 6], [5, 4], [6, 5], [4, 5]]), torch.rand(4, 2)
    assert torch.equal(live.forward_loop(x, ids, weights), want.forward_loop(x, ids, weights))
    rows = torch.randn(6, 16)
    assert torch.equal(live.run_sorted(rows, [2, 1, 3]), want.run_sorted(rows, [2, 1, 3]))
