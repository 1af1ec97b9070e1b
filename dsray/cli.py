"""The ``dsray`` command: make-model, generate (and later serve)."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_PROMPTS = [
    "The weather today is",
    "Inference on many machines works best when",
    "A good recipe for bread starts with",
]


def _generate(args: argparse.Namespace) -> int:
    from dsray import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype)
    prompts = args.prompt or DEFAULT_PROMPTS
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(
                json.dumps(
                    {"prompt": prompt, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
                )
            )
        else:
            print(f"--- {prompt!r}\n{out.text!r}  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    num = sum(len(o.token_ids) for o in outputs)
    print(f"dsray: {num} tokens in {elapsed:.2f}s ({num / elapsed:.1f} tok/s) on {llm.config.model}", file=sys.stderr)
    return 0


def _make_model(argv: list[str]) -> int:
    from dsray.make_model import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-model"]:
        return _make_model(argv[1:])
    parser = argparse.ArgumentParser(prog="dsray", description="Expert-parallel DeepSeek inference on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make-model", help="write a deterministic small DeepSeek-V3 checkpoint (tiny, small)")
    gen = sub.add_parser("generate", help="generate offline from prompts (default model: the embedded tiny one)")
    gen.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: embedded tiny model)")
    gen.add_argument("-p", "--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    args = parser.parse_args(argv)
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dsray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
