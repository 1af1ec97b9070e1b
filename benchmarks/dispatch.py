"""Dispatch + combine round trip of one MoE layer over gloo loopback (A attention ranks, E expert ranks).

Expert ranks echo rows back, so the figure is the transport alone (as DeepEP's dispatch/combine
figures are). Output: JSON with µs per round trip and DeepEP-style GB/s (bytes of rows moved
in both directions ÷ time), per token count.

    python benchmarks/dispatch.py --tokens 1 64 512 --hidden 1024 --experts 64 --topk 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from dsray.comm import free_address, init_group
from experts.remote import serve_round
from router.dispatcher import AllToAllDispatcher
from router.expert_map import ExpertMap


class EchoShard:
    """Stands in for an expert shard: returns its rows, so only communication is timed."""

    def __init__(self, num_local_experts: int):
        self.num_local_experts = num_local_experts

    def run_sorted(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return rows


def _rank_main(rank: int, world: int, num_attention: int, port: int, cfg: dict, queue) -> None:
    torch.set_num_threads(1)
    comm = init_group("127.0.0.1", port, rank, world, "gloo", 60)
    emap = ExpertMap(cfg["experts"], world - num_attention, first_rank=num_attention)
    dtype = torch.bfloat16
    results = {}
    for tokens in cfg["tokens"]:
        times = []
        for it in range(cfg["warmup"] + cfg["iters"]):
            torch.distributed.barrier()
            start = time.perf_counter()
            if rank < num_attention:
                gen = torch.Generator().manual_seed(it)
                x = torch.randn(tokens, cfg["hidden"], generator=gen).to(dtype)
                ids = torch.rand(tokens, cfg["experts"], generator=gen).topk(cfg["topk"], dim=-1).indices
                weights = torch.full((tokens, cfg["topk"]), 1.0 / cfg["topk"])
                out = AllToAllDispatcher(comm, emap)(x, ids, weights)
                assert torch.allclose(out.float(), x.float(), atol=1e-2)  # echo × weights summing to 1
            else:
                first, end = emap.ranges[rank - num_attention]
                serve_round(comm, EchoShard(end - first), emap.max_local_experts, cfg["hidden"], dtype)
            if it >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
        results[tokens] = times
    if rank == 0:
        queue.put(results)
    torch.distributed.destroy_process_group()


def run(cfg: dict) -> dict:
    world = cfg["attention"] + cfg["expert_ranks"]
    _, port = free_address("127.0.0.1")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, cfg["attention"], port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = queue.get(timeout=600)
    for p in procs:
        p.join()
    rows = []
    for tokens, times in results.items():
        median = statistics.median(times)
        moved = 2 * tokens * cfg["topk"] * cfg["hidden"] * 2  # dispatch + combine, bf16 rows
        rows.append(
            {
                "tokens": tokens,
                "round_trip_us_median": median * 1e6,
                "round_trip_us_p10": sorted(times)[len(times) // 10] * 1e6,
                "gb_per_s": moved / median / 1e9,
                "bytes_moved": moved,
            }
        )
    return {
        "benchmark": "dispatch",
        "config": cfg,
        "results": rows,
        "anchor": "DeepEP low-latency EP8 on H800, 128 tokens: dispatch 77 us + combine 114 us",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--attention", type=int, default=1, help="attention ranks (A)")
    parser.add_argument("--expert-ranks", type=int, default=2, help="expert ranks (E)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    cfg = {k: getattr(args, k) for k in ("tokens", "hidden", "experts", "topk", "attention", "iters", "warmup")}
    cfg["expert_ranks"] = args.expert_ranks
    report = run(cfg)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
