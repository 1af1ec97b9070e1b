"""FP8 routed experts kept FP8 on expert workers (``fp8_weights="keep"``): every path that builds or
changes a worker's slots — the first load, a rebalance's staged slots written in place, a regroup
after a lost worker (slot counts change) — holds float8_e4m3fn weights with their block scales, the
same bytes as the local model's (``load_transformer(fp8_weights="keep")``); the fused Triton MoE
reads them. On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which the Ray
cluster's workers inherit)."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from dsray import LLM, SamplingParams, workers
from dsray.engine_config import EngineConfig
from dsray.testing import make_fp8_checkpoint, make_hf_checkpoint
from dsray.weights import load_transformer
from dsray.workers import ExpertWorker
from experts import triton_moe
from router.expert_map import ExpertMap

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
BLOCK = (16, 32)  # several blocks per expert weight (V3's 128x128 would be one block here)


@pytest.fixture(scope="module")
def interpreted():
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")  # before the cluster starts: its workers inherit it
    triton_moe._kernels.cache_clear()
    yield
    mp.undo()
    triton_moe._kernels.cache_clear()


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory, interpreted):
    path = tmp_path_factory.mktemp("fp8")
    make_hf_checkpoint("v3", path / "v3")
    return make_fp8_checkpoint(path / "v3", path / "fp8", BLOCK)


def _worker(model, monkeypatch, expert_map: ExpertMap, expert_rank: int) -> ExpertWorker:
    """An expert worker outside Ray (no step group): its slots are built as in a Ray actor."""
    monkeypatch.setattr(workers, "worker_device", lambda device: torch.device("cpu"))
    config = EngineConfig(model=str(model), dtype="float32", device="cpu", expert_mode="triton", fp8_weights="keep")
    worker = ExpertWorker(config, 1 + expert_rank, 1 + expert_map.num_ranks, expert_map, torch.get_num_threads())
    worker.load(expert_rank)
    return worker


def _assert_local_models_slots(worker: ExpertWorker, local) -> None:
    """Each shard holds FP8 slots and scales equal to the local model's for the same experts."""
    for dtypes in worker.held_dtypes():
        assert dtypes == {"w13": "torch.float8_e4m3fn", "w2": "torch.float8_e4m3fn", "scales": "torch.float32"}
    for shard, moe in zip(worker.shards, local.moe_layers.values(), strict=True):
        ids, want, scales = torch.tensor(shard.expert_ids, dtype=torch.long), moe.experts, moe.experts.fp8_scales
        assert torch.equal(shard.w13.view(torch.uint8), want.w13.view(torch.uint8)[ids])
        assert torch.equal(shard.w2.view(torch.uint8), want.w2.view(torch.uint8)[ids])
        assert torch.equal(shard.fp8_scales.w13, scales.w13[ids]) and torch.equal(shard.fp8_scales.w2, scales.w2[ids])
        assert shard.fp8_scales.block_size == BLOCK


def test_an_expert_workers_slots_stay_fp8_through_load_rebalance_and_regroup(fp8_model, monkeypatch):
    local = load_transformer(fp8_model, torch.float32, "cpu", fp8_weights="keep", progress=False)
    start = ExpertMap.contiguous(16, num_ranks=2, num_layers=2, first_rank=1)
    worker = _worker(fp8_model, monkeypatch, start, expert_rank=0)
    assert worker.held() == [list(range(8))] * 2
    _assert_local_models_slots(worker, local)

    # a rebalance: 9 and 12 come from the checkpoint (checked), 2 and 3 swap slots (copied); in place
    slots = [[0, 9, 3, 2, 12, 5, 6, 7], [8, 1, 10, 11, 4, 13, 14, 15]]
    storage = [(s.w13.data_ptr(), s.fp8_scales.w13.data_ptr()) for s in worker.shards]
    worker.prepare(1, ExpertMap(16, [slots, slots], first_rank=1))
    deadline = time.monotonic() + 60
    while worker._prepared is None and worker._prepare_failed is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker._prepare_failed is None and worker._prepared is not None
    _, _, staged = worker._prepared
    worker._apply_staged(staged, list(range(len(staged))))  # what serve_step(switch_to=1) does first
    assert worker.held() == [slots[0]] * 2
    assert [(s.w13.data_ptr(), s.fp8_scales.w13.data_ptr()) for s in worker.shards] == storage
    _assert_local_models_slots(worker, local)

    # regroups: expert rank 1 lost (this rank takes its experts: 16 slots), then its replacement back (8)
    monkeypatch.setattr(worker, "_rejoin", lambda *args: None)  # no step group here
    for placement in ([[list(range(16))]] * 2, [slots, slots]):
        worker.regroup("127.0.0.1", 0, 1, 1 + len(placement[0]), 1.0, ExpertMap(16, placement, first_rank=1), 0)
        assert worker.held() == [placement[0][0]] * 2
        _assert_local_models_slots(worker, local)
    rows = torch.randn(6, local.args.hidden_size)
    counts = [2, 0, 3, 1, 0, 0, 0, 0]
    got = worker.shards[0].run_sorted(rows, counts)  # the fused MoE reading the FP8 slots
    want = local.moe_layers[local.args.moe_layer_ids[0]].experts
    experts = [slots[0][0], slots[0][2], slots[0][3]]  # the local model's slot e holds expert e
    reference = torch.cat([want.expert_ffn(e, r) for e, r in zip(experts, rows.split([2, 3, 1]), strict=True)])
    assert (got - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


@pytest.fixture(scope="module")
def interpreted_cluster(fresh_ray, interpreted):
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow  # a Ray cluster and three workers, interpreted kernels
def test_fp8_experts_kept_on_expert_workers_give_dequantizes_tokens(interpreted_cluster, fp8_model):
    params = SamplingParams(temperature=0, max_tokens=8)
    with LLM(str(fp8_model), dtype="float32", device="cpu", fp8_weights="dequantize") as llm:
        expected = [out.token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]
    config = dict(executor="ray", num_expert_workers=2, device="cpu", expert_mode="triton", fp8_weights="keep")
    with LLM(str(fp8_model), dtype="float32", **config) as llm:
        executor = llm.engine.executor
        assert [out.token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)] == expected
        fp8 = {"w13": "torch.float8_e4m3fn", "w2": "torch.float8_e4m3fn", "scales": "torch.float32"}
        for held in ray.get([e.held_dtypes.remote() for e in executor.experts]):
            assert held == [fp8] * 2
        # a rebalance: experts move between the workers, staged in FP8 and switched in place
        slots = [[0, 9, 2, 3, 12, 5, 6, 7], [8, 1, 10, 11, 4, 13, 14, 15]]
        assert executor.rebalance(ExpertMap(16, [slots, slots], first_rank=1)) == 1
        assert [out.token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)] == expected
        assert executor.map_version == 1 and not executor.rebalancing
        assert ray.get([e.held.remote() for e in executor.experts]) == [[slots[0]] * 2, [slots[1]] * 2]
        for held in ray.get([e.held_dtypes.remote() for e in executor.experts]):
            assert held == [fp8] * 2
