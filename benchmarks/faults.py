"""Losing a worker under load: the pause in output, failed requests, and how long a replacement takes.

For each scenario a fresh model instance (``AsyncLLM``, Ray executor, A attention and E expert
workers) serves ``--streams`` concurrent greedy streams of ``--output-len`` tokens. Once every
stream is producing tokens, one worker's process gets SIGKILL (found in Ray's actor table by its
class, as an operator would). Per stream every token's arrival time is kept, and the figures are:

* ``pause_s`` — the longest gap between two tokens of any stream from the kill on (the issue's
  figure: how long output stopped);
* ``steady_max_gap_s`` / ``steady_median_itl_s`` — the same before the kill, for scale;
* ``failed`` — streams that ended with an error (target 0) or whose tokens, as streamed, repeat or
  skip one; ``wrong`` (``--check-tokens``) — finished streams whose tokens differ from the same
  prompt's greedy tokens in a run without the fault (after an attention worker's loss its sequences
  are recomputed: in bf16 a batched prefill may round differently from the decode steps it
  replaces and flip a near-tie, as after any preemption; float32 gives identical tokens);
* ``replacement_join_s`` — from the kill until the executor serves with every worker again.

The ``scale`` scenario kills nothing: under the same load it grows and shrinks each pool in turn
(``AsyncLLM.scale``; experts 2 → 3 → 2, then attention 1 → 2 → 1) and reports, per change, the
seconds until it has taken effect (new workers started, loaded and joined; removed ones gone) and
the longest gap of any stream meanwhile.

    python benchmarks/faults.py --model small --streams 64 --output-len 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time

import ray

from dsray.async_llm import AsyncLLM
from dsray.engine_config import EngineConfig
from dsray.sampling_params import SamplingParams

SCENARIOS = {
    # name: (attention workers, expert workers, redundant experts, class of the worker killed)
    "expert": (1, 2, 0, "ExpertWorker"),
    "expert_with_replicas": (1, 2, None, "ExpertWorker"),  # every expert on both workers
    "attention": (2, 2, 0, "AttentionWorker"),
    "scale": (1, 2, 0, None),  # no kill: each pool grows by one and shrinks back under load
}
SCALE_STEPS = [("experts", 3), ("experts", 2), ("attention", 2), ("attention", 1)]


def _victim(class_name: str) -> int:
    """The pid of a live actor of ``class_name`` (the newest)."""
    import ray._private.state

    pids = [
        info["Pid"]
        for info in ray._private.state.actors().values()
        if info["ActorClassName"] == class_name and info["State"] == "ALIVE"
    ]
    return max(pids)


async def _stream(llm: AsyncLLM, prompt: list[int], params: SamplingParams, times: list[float]) -> list[int]:
    """The stream's tokens as a client sees them (the deltas, in order); ValueError if they do not add
    up to the request's final tokens (a token repeated or skipped)."""
    seen: list[int] = []
    async for out in llm.generate(prompt, params):
        times.extend([time.perf_counter()] * len(out.new_token_ids))
        seen += out.new_token_ids
    if seen != out.token_ids or len(seen) != params.max_tokens:
        raise ValueError(f"stream not continuous: {len(seen)} tokens seen, final {len(out.token_ids)}")
    return seen


def run_scenario(name: str, args, prompts: list[list[int]], expected: list[list[int]] | None) -> dict:
    A, E, redundant, victim_class = SCENARIOS[name]
    config_args = dict(
        model=args.model,
        dtype=args.dtype,
        executor="ray",
        num_attention_workers=A,
        num_expert_workers=E,
        max_num_seqs=args.streams,
        step_timeout_s=args.step_timeout_s,
        num_threads=1,
    )
    if redundant is None:
        from dsray.config import ModelArgs

        n = ModelArgs.from_pretrained(args.model).n_routed_experts
        config_args["expert_placement"] = [list(range(n))] * E
    else:
        config_args["num_redundant_experts"] = redundant
    llm = AsyncLLM(EngineConfig(**config_args))
    executor = llm.engine.executor
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    times: list[list[float]] = [[] for _ in prompts]

    async def main() -> tuple[list, float, float | None]:
        tasks = [asyncio.create_task(_stream(llm, p, params, t)) for p, t in zip(prompts, times)]
        while not all(len(t) >= args.kill_after_tokens for t in times):
            if all(task.done() for task in tasks):
                raise RuntimeError("the streams finished before the kill: raise --output-len")
            await asyncio.sleep(0.01)
        if victim_class is None:
            return await _scale_steps(llm, executor, tasks, times)
        killed = time.perf_counter()
        os.kill(_victim(victim_class), signal.SIGKILL)
        joined = None
        results = []
        while joined is None or not all(task.done() for task in tasks):
            if joined is None and executor.losses["replacements_joined"] and executor.degraded is None:
                joined = time.perf_counter() - killed
            if all(task.done() for task in tasks) and time.perf_counter() - killed > args.join_wait_s:
                break
            await asyncio.sleep(0.05)
        for task in tasks:
            try:
                results.append(task.result())
            except Exception as exc:  # a failed request
                results.append(exc)
        return results, killed, joined

    try:
        if victim_class is None:
            report = asyncio.run(main())
            return {"attention_workers": A, "expert_workers": E, **report}
        results, killed, joined = asyncio.run(main())
        losses = dict(executor.losses)
    finally:
        llm.shutdown()
    before = [b - a for t in times for a, b in zip(t, t[1:]) if b <= killed]
    after = [b - a for t in times for a, b in zip(t, t[1:]) if b > killed]
    failed = [r for r in results if isinstance(r, Exception)]
    wrong = sum(1 for r, want in zip(results, expected or []) if not isinstance(r, Exception) and r != want)
    return {
        "attention_workers": A,
        "expert_workers": E,
        "killed": victim_class,
        "pause_s": max(after) if after else None,
        "steady_max_gap_s": max(before) if before else None,
        "steady_median_itl_s": statistics.median(before) if before else None,
        "failed": len(failed),
        "failure_examples": [repr(e)[:200] for e in failed[:3]],
        "wrong": wrong if expected is not None else None,
        "replacement_join_s": joined,
        "losses": losses,
    }


async def _scale_steps(llm: AsyncLLM, executor, tasks: list, times: list[list[float]]) -> dict:
    """Each pool up by one and back, in turn, while the streams run: seconds until each change holds."""
    steps = []
    for pool, size in SCALE_STEPS:
        start = time.perf_counter()
        llm.scale(**{pool: size})
        while (executor.num_attention_ranks if pool == "attention" else len(executor.experts)) != size or (
            executor.rebalancing
        ):
            if all(task.done() for task in tasks):
                raise RuntimeError("the streams finished before the pools were scaled: raise --output-len")
            await asyncio.sleep(0.02)
        took = time.perf_counter() - start
        gaps = [b - a for t in times for a, b in zip(t, t[1:]) if b > start]
        steps.append({"pool": pool, "to": size, "took_s": round(took, 3), "max_gap_s": max(gaps, default=None)})
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    return {"steps": steps, "failed": len(failed), "failure_examples": [repr(e)[:200] for e in failed[:3]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", help="bench model name or checkpoint directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--kill-after-tokens", type=int, default=8, help="kill once every stream has this many")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--step-timeout-s", type=float, default=60.0)
    parser.add_argument(
        "--join-wait-s", type=float, default=30.0, help="after the streams, wait this long for the join"
    )
    parser.add_argument("--check-tokens", action="store_true", help="compare tokens with a run without the fault")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if not os.path.isdir(args.model):
        from dsray.make_model import ensure_default_model

        args.model = str(ensure_default_model(args.model))
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(16 + i % 16)] for i in range(args.streams)]
    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False)
    expected = None
    if args.check_tokens:
        from dsray import LLM

        reference = LLM(args.model, dtype=args.dtype, max_num_seqs=args.streams)
        expected = [
            o.token_ids
            for o in reference.generate(
                prompts, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
            )
        ]
        reference.shutdown()
    report = {"benchmark": "faults", "model": args.model, "streams": args.streams, "output_len": args.output_len}
    try:
        for name in args.scenarios.split(","):
            report[name] = run_scenario(name, args, prompts, expected)
            print(name, json.dumps(report[name]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
