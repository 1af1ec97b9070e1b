"""The offline Python API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from dsray.engine.llm_engine import LLMEngine
from dsray.engine_config import EngineConfig
from dsray.outputs import RequestOutput
from dsray.sampling_params import SamplingParams


class LLM:
    """A model instance for batch generation in this process.

    ``model`` is a checkpoint directory; None uses the embedded default model (made once,
    offline). Keyword arguments are ``EngineConfig`` fields (``dtype``, ``kv_cache_memory_gb``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``enable_prefix_caching``, …).

    ``shutdown()`` — or leaving ``with LLM(...) as llm:`` — releases the workers (Ray actors and
    their placement group with ``executor="ray"``); so does dropping the last reference.
    """

    def __init__(self, model: str | Path | None = None, **engine_args: Any):
        if model is None:
            from dsray.make_model import ensure_default_model

            model = ensure_default_model()
        self.config = EngineConfig(model=str(model), **engine_args)
        self.engine = LLMEngine(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Release the executor's workers (idempotent); the ``LLM`` cannot generate afterwards."""
        self.engine.executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in prompt order.

        Prompts are text or token-id lists. All are validated before any runs: a bad one raises
        ``ValueError`` and nothing is queued.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        token_ids = [self.engine.tokenize(p) for p in prompts]
        checked = [self.engine.validate(ids, p) for ids, p in zip(token_ids, params_list)]
        ids = [self.engine.add_request(p, params, prompt_ids=t) for p, t, params in zip(prompts, token_ids, checked)]
        results: dict[str, RequestOutput] = {}
        while len(results) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if use_tqdm:
                        print(f"\rdsray: {len(results)}/{len(ids)} requests done", end="", file=sys.stderr)
        if use_tqdm:
            print(file=sys.stderr)
        return [results[i] for i in ids]
