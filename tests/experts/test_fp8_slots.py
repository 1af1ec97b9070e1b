"""FP8 expert slots (``fp8_weights="keep"``) that change: a rebalance's staged slots written in place
(``ExpertShard.write_slots``) take their block scales with their weights, and the shard equals one
built for the new experts from the start — the weights' bytes, the scales, and ``run_sorted`` in the
fused Triton MoE and on the torch path (which dequantises a slot when it uses it). Without a GPU the
kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set for this module)."""

from __future__ import annotations

import pytest
import torch

from dsray.fp8 import quantize_fp8_blocks
from dsray.testing import triton_as_this_machine_runs_it
from dsray.weights import fill_expert_slots_fp8, load_expert_shard_fp8
from experts import triton_moe
from experts.shard import ExpertShard

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LAYER, DIM, INTER, BLOCK = 1, 72, 40, (16, 32)  # D and I not multiples of the blocks


@pytest.fixture(scope="module", autouse=True)
def triton_runs_here():
    """CPU: the interpreter; GPU: compiled kernels, whatever another module set. Rebuilt after."""
    with triton_as_this_machine_runs_it(triton_moe._kernels):
        yield


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    """Eight experts of one layer as an FP8 checkpoint stores them (what ``keep_fp8`` reads)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for e in range(8):
        p = f"model.layers.{LAYER}.mlp.experts.{e}."
        for name, shape in (("gate_proj", (INTER, DIM)), ("up_proj", (INTER, DIM)), ("down_proj", (DIM, INTER))):
            weight = torch.randn(*shape, generator=g) * shape[1] ** -0.5 * (1 + e)  # scales differ per expert
            out[p + name + ".weight"], out[p + name + ".weight_scale_inv"] = quantize_fp8_blocks(weight, BLOCK)
    return out


def _fresh(ids: list[int], tensors: dict[str, torch.Tensor], mode: str = "triton") -> ExpertShard:
    """The local model's way (``load_transformer``): every slot stacked at load."""
    shard = ExpertShard(ids, DIM, INTER, mode)
    load_expert_shard_fp8(shard, dict(tensors), LAYER, BLOCK, DEVICE)
    return shard


def _staged(ids: list[int], tensors: dict[str, torch.Tensor], held: ExpertShard | None) -> ExpertShard:
    """An expert worker's way: experts ``held`` has copied from it, the rest read and checked."""
    shard = ExpertShard(ids, DIM, INTER, "triton")
    read = {k: v for k, v in tensors.items() if held is None or int(k.split(".")[5]) not in held.local_of}
    fill_expert_slots_fp8(shard, read, LAYER, BLOCK, held, check=held is not None)
    return shard.to(DEVICE)


def _same_slots(got: ExpertShard, want: ExpertShard) -> None:
    assert got.expert_ids == want.expert_ids
    assert got.w13.dtype == got.w2.dtype == torch.float8_e4m3fn
    assert torch.equal(got.w13.view(torch.uint8), want.w13.view(torch.uint8))
    assert torch.equal(got.w2.view(torch.uint8), want.w2.view(torch.uint8))
    got_scales, want_scales = got.fp8_scales, want.fp8_scales
    assert got_scales.block_size == want_scales.block_size == BLOCK
    assert torch.equal(got_scales.w13, want_scales.w13) and torch.equal(got_scales.w2, want_scales.w2)


def test_a_worker_built_fp8_shard_equals_the_local_models(tensors):
    _same_slots(_staged([3, 0, 5, 1], tensors, None), _fresh([3, 0, 5, 1], tensors))


def test_writing_staged_fp8_slots_equals_a_shard_built_for_the_new_experts(tensors):
    live = _staged([0, 1, 2, 3], tensors, None)
    storage = (live.w13.data_ptr(), live.fp8_scales.w13.data_ptr())
    staged = _staged([6, 2, 5], tensors, live)  # 2 moves within the shard (copied), 6 and 5 come from the checkpoint
    live.write_slots([1, 2, 3], staged)
    want = _fresh([0, 6, 2, 5], tensors)
    _same_slots(live, want)
    assert (live.w13.data_ptr(), live.fp8_scales.w13.data_ptr()) == storage  # in place
    counts = [3, 0, 5, 2]
    rows = torch.randn(10, DIM, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = live.run_sorted(rows, counts)  # the fused MoE, reading the FP8 slots and their scales
    assert torch.equal(got, want.run_sorted(rows, counts))
    live.mode = want.mode = "grouped"  # the torch path: each slot dequantised when used
    reference = want.run_sorted(rows, counts)
    assert torch.equal(live.run_sorted(rows, counts), reference)
    assert (got - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_fp8_slots_refuse_experts_in_another_format(tensors):
    live = _staged([0, 1, 2, 3], tensors, None)
    plain = ExpertShard([6], DIM, INTER).to(DEVICE)
    with pytest.raises(ValueError, match="float8_e4m3fn with block size .* cannot take experts in torch.float32"):
        live.write_slots([1], plain)
    with pytest.raises(ValueError, match="cannot take experts in torch.float8_e4m3fn"):
        plain.write_slots([0], live)
    assert live.expert_ids == [0, 1, 2, 3]


def test_a_staged_expert_that_differs_from_the_checkpoint_is_refused(tensors, monkeypatch):
    live = _staged([0, 1, 2, 3], tensors, None)
    real_copy = torch.Tensor.copy_

    def corrupt_scales(self, src, *args, **kwargs):  # a copy that goes wrong for the scales
        out = real_copy(self, src, *args, **kwargs)
        return out.mul_(2) if self.dtype == torch.float32 else out

    monkeypatch.setattr(torch.Tensor, "copy_", corrupt_scales)
    with pytest.raises(ValueError, match="expert 6 of layer 1: gate_proj in its new slot differs"):
        _staged([6], tensors, live)
