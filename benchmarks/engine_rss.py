"""The engine's resident memory over rounds of load: what grows, and whether the allocator gives it back.

Runs ``dsray.LLM`` (the engine a served model instance runs in its engine process) in this
process: RSS after start, after each of ``--rounds`` rounds of ``--requests`` distinct random
prompts generating ``--max-tokens`` each, and at the end after ``malloc_trim(0)`` (glibc returning
freed heap to the system). Growth that trimming takes back is freed memory the allocator kept,
not a leak. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import time

from dsray import LLM, SamplingParams


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def malloc_trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    began = rss_mb()
    llm = LLM(args.model, kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=256)
    report = {
        "kv_cache_memory_gb": args.kv_cache_memory_gb,
        "rss_before_engine_mb": round(began, 1),
        "rss_after_start_mb": round(rss_mb(), 1),
        "rounds": [],
    }
    vocab = llm.engine.args.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for _ in range(args.rounds):
        prompts = [[rng.randrange(10, vocab) for _ in range(args.input_len)] for _ in range(args.requests)]
        start = time.perf_counter()
        llm.generate(prompts, params)
        report["rounds"].append({"seconds": round(time.perf_counter() - start, 1), "rss_mb": round(rss_mb(), 1)})
    malloc_trim()
    report["rss_after_malloc_trim_mb"] = round(rss_mb(), 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
