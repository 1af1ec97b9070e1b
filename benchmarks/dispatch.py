"""The MoE exchange: one layer's round trip, and the bytes of a step message vs context.

1. Round trip: A attention ranks and E expert ranks (processes on this machine, over loopback)
   run ``router/exchange.py``'s rounds (``--expert-ranks 0``: every attention rank also holds a share
   of the experts and serves the others' rows, as with ``num_expert_workers=0``); expert ranks echo
   rows back, so the figure is the exchange
   alone (as DeepEP's dispatch/combine figures are). µs per round trip and DeepEP-style GB/s (bytes
   of rows moved in both directions ÷ time), per token count, for each CPU transport in the same
   run (``--transports``: dsray's ``SocketTransport``, the default, and gloo), with their ratio.
2. Step bytes: the pickled ``StepInput`` an attention worker receives per decode step (what Ray
   sends), for a batch of sequences at each context length, from the real engine on the tiny
   model. Workers keep sequence state, so it must not grow with the context.

    python benchmarks/dispatch.py --tokens 1 64 512 --hidden 1024 --experts 64 --topk 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# isort: off
import dsray  # noqa: F401  first, so torch's OpenMP threads load with dsray's short spin (dsray/__init__.py)

# isort: on
import torch
import torch.multiprocessing as mp

from dsray.comm import free_address, init_group, leave_group
from router.exchange import MoEExchange
from router.expert_map import ExpertMap


def echo(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Stands in for an expert shard: returns its rows, so only the exchange is timed."""
    return rows


def _rank_main(rank: int, world: int, num_attention: int, port: int, cfg: dict, queue) -> None:
    torch.set_num_threads(1)
    comm = init_group("127.0.0.1", port, rank, world, torch.device("cpu"), 60)
    colocated = world == num_attention  # --expert-ranks 0: every rank sends its tokens and serves its slots
    if colocated:
        emap = ExpertMap.contiguous(cfg["experts"], world, 1, first_rank=0)
    else:
        emap = ExpertMap.contiguous(cfg["experts"], world - num_attention, 1, first_rank=num_attention)
    is_expert = colocated or rank >= num_attention
    exchange = MoEExchange(comm, emap, compute=[echo] if is_expert else None, replica_offset=rank)
    dtype = torch.bfloat16
    results = {}
    for tokens in cfg["tokens"]:
        times = []
        for it in range(cfg["warmup"] + cfg["iters"]):
            comm.exchange_counts(torch.zeros(world, 1, dtype=torch.int64)).wait()  # a barrier
            start = time.perf_counter()
            if rank < num_attention:
                gen = torch.Generator().manual_seed(it)
                x = torch.randn(tokens, cfg["hidden"], generator=gen).to(dtype)
                ids = torch.rand(tokens, cfg["experts"], generator=gen).topk(cfg["topk"], dim=-1).indices
                weights = torch.full((tokens, cfg["topk"]), 1.0 / cfg["topk"])
                out = exchange.round(0, x, ids, weights)
                assert torch.allclose(out.float(), x.float(), atol=1e-2)  # echo × weights summing to 1
            else:
                exchange.idle_round(0, cfg["hidden"], dtype)
            if it >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
        results[tokens] = times
    if rank == 0:
        queue.put(results)
    leave_group()


def run(cfg: dict, transport: str) -> dict:
    world = cfg["attention"] + cfg["expert_ranks"]
    _, port = free_address("127.0.0.1")
    os.environ["DSRAY_CPU_EXCHANGE"] = transport  # read by the spawned ranks' init_group
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
    return rows


def _record(executor, sent: list[bytes]) -> None:
    """Keep the pickled StepInput of every step (what Ray would send the attention worker)."""
    import pickle

    execute = executor.execute

    def recording(steps):
        sent.append(pickle.dumps(steps[0]))
        return execute(steps)

    executor.execute = recording


def step_bytes(contexts: list[int], num_seqs: int) -> list[dict]:
    """Pickled bytes of the decode steps' ``StepInput`` for ``num_seqs`` sequences at each context."""
    from dsray import LLM, SamplingParams
    from dsray.make_model import ensure_default_model

    rows = []
    for context in contexts:
        llm = LLM(
            ensure_default_model(),
            dtype="float32",
            max_model_len=context + 64,
            max_num_batched_tokens=num_seqs * context,  # one prefill step, then decode steps of the whole batch
            kv_cache_memory_gb=0.5,
        )
        engine, sent = llm.engine, []
        _record(engine.executor, sent)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        for i in range(num_seqs):
            engine.add_request([4 + (i + j) % 900 for j in range(context)], params)
        while engine.has_unfinished():
            engine.step()
        decode = [len(b) for b in sent[1:-1]]  # after the prefill step: decode steps of every sequence
        rows.append({"context": context, "num_seqs": num_seqs, "decode_step_bytes": max(decode)})
        llm.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--attention", type=int, default=1, help="attention ranks (A)")
    parser.add_argument(
        "--expert-ranks", type=int, default=2, help="expert ranks (E); 0: the attention ranks hold the experts"
    )
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 4000], help="step-bytes contexts")
    parser.add_argument("--step-seqs", type=int, default=16, help="sequences per step for step bytes")
    parser.add_argument("--transports", nargs="+", default=["socket", "gloo"], choices=["socket", "gloo"])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    cfg = {k: getattr(args, k) for k in ("tokens", "hidden", "experts", "topk", "attention", "iters", "warmup")}
    cfg["expert_ranks"] = args.expert_ranks
    sizes = step_bytes(args.contexts, args.step_seqs)
    results = {t: run(cfg, t) for t in args.transports}
    report = {
        "benchmark": "dispatch",
        "config": cfg,
        "results": results,
        "anchor": "DeepEP low-latency EP8 on H800, 128 tokens: dispatch 77 us + combine 114 us",
        "round_trip_gloo_over_socket": {
            row["tokens"]: gloo["round_trip_us_median"] / row["round_trip_us_median"]
            for row, gloo in zip(results.get("socket", []), results.get("gloo", []))
        },
        "step_bytes": sizes,
        "step_bytes_ratio_longest_to_shortest": sizes[-1]["decode_step_bytes"] / sizes[0]["decode_step_bytes"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
