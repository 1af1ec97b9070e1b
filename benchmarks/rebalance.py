"""A live expert rebalance under decode load: how long steps take while it runs, and what it buys.

The Ray executor (A attention, E expert workers, R redundant slots) decodes a batch step by step.
After a warm-up it plans a placement from the load the workers saw (``router/eplb.py``,
incrementally from the current one) and starts ``RayExecutor.rebalance``; stepping goes on while
the expert workers load their new slots in the background, and every rank switches at one step.
Reported: the median step (before and after), the slowest step from the rebalance's start to its switch (the
issue's bound: 1.5x a normal step), seconds to switch, slots moved, and the busiest expert worker's
rows over the mean before and after.

    python benchmarks/rebalance.py                       # the `small` bench model, bf16, E=2, 2 redundant
    python benchmarks/rebalance.py --model DIR --expert-workers 4 --redundant 4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from dsray import LLM, SamplingParams
from router.eplb import plan_placement
from router.expert_map import ExpertMap


def _rows(llm: LLM) -> list[int]:
    return [t["rows"] for t in llm.engine.executor.timings()["expert"]]


def _imbalance(before: list[int], after: list[int]) -> float:
    work = [a - b for a, b in zip(after, before)]
    return max(work) / (sum(work) / len(work)) if sum(work) else 1.0


def run(args) -> dict:
    llm = LLM(
        args.model,
        dtype=args.dtype,
        executor="ray",
        num_attention_workers=args.attention_workers,
        num_expert_workers=args.expert_workers,
        num_redundant_experts=args.redundant,
    )
    engine, executor = llm.engine, llm.engine.executor
    rng = random.Random(0)
    vocab = engine.args.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    for _ in range(args.num_seqs):
        engine.add_request([rng.randrange(4, vocab) for _ in range(32)], params)

    def step() -> float:
        start = time.perf_counter()
        engine.step()
        return time.perf_counter() - start

    for _ in range(args.warmup_steps):
        step()
    rows = _rows(llm)
    normal = [step() for _ in range(args.steps)]
    before = _imbalance(rows, rows := _rows(llm))
    load = executor.expert_load()
    plan_start = time.perf_counter()
    plan = plan_placement(load, executor.map.num_ranks, args.redundant, current=executor.map.as_placement())
    plan_s = time.perf_counter() - plan_start
    new_map = ExpertMap(executor.map.num_experts, plan.slots, first_rank=executor.map.first_rank)
    started = time.perf_counter()
    executor.rebalance(new_map)
    during = []
    while executor.rebalancing:
        during.append(step())
        if time.perf_counter() - started > args.timeout:
            break
    switched_s = time.perf_counter() - started
    stats = dict(executor.rebalance_stats)
    rows = _rows(llm)
    after_steps = [step() for _ in range(args.steps)]
    after = _imbalance(rows, _rows(llm))
    llm.shutdown()
    # A normal step: the median of the steps before and after (this machine's speed drifts over minutes).
    median = statistics.median(normal + after_steps)
    return {
        "benchmark": "rebalance",
        "model": args.model,
        "workload": f"{args.num_seqs} sequences decoding, {args.steps} steps measured before and after",
        "attention_workers": args.attention_workers,
        "expert_workers": args.expert_workers,
        "redundant_experts": args.redundant,
        "plan_seconds": plan_s,
        "normal_step_s_median": median,
        "step_s_median_before": statistics.median(normal),
        "steps_during_rebalance": len(during),
        "worst_step_during_rebalance_s": max(during) if during else None,
        "worst_step_ratio": max(during) / median if during else None,
        "steps_during_rebalance_s": during,  # the last one is the step that switched
        "rebalance_seconds_to_switch": switched_s,
        "rebalance_stats": stats,
        "step_s_median_after": statistics.median(after_steps),
        "busiest_expert_worker_over_mean_before": before,
        "busiest_expert_worker_over_mean_after": after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: the `small` bench model, made once)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention-workers", type=int, default=1)
    parser.add_argument("--expert-workers", type=int, default=2)
    parser.add_argument("--redundant", type=int, default=2)
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.model is None:
        from dsray.make_model import ensure_default_model

        args.model = str(ensure_default_model("small"))
    text = json.dumps(run(args), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
