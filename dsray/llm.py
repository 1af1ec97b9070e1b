"""The offline Python API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsray.engine.llm_engine import LLMEngine
from dsray.engine_config import EngineConfig
from dsray.engine_core_client import EngineCoreClient
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
        # The loop runs in this thread, inside generate(): nothing steps the engine between calls.
        self._finished = _Finished()
        self.client = EngineCoreClient(self.config, self._finished, _never_called, background=False)

    @property
    def engine(self) -> LLMEngine:
        return self.client.engine

    @property
    def tokenizer(self):
        return self.client.tokenizer

    def shutdown(self) -> None:
        """Release the executor's workers (idempotent); the ``LLM`` cannot generate afterwards."""
        self.client.shutdown()

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
        token_ids = [self.client.tokenize(p) for p in prompts]
        checked = [self.client.validate(ids, p) for ids, p in zip(token_ids, params_list)]
        ids = [self.client.new_request_id() for _ in prompts]
        for prompt, prompt_ids, params, request_id in zip(prompts, token_ids, checked, ids):
            self.client.add(prompt, prompt_ids, params, request_id)
        finished = self._finished.outputs = {}
        try:
            with _progress_bar(len(ids), use_tqdm) as self._finished.bar:
                self.client.run_until_idle()
        finally:
            self._finished.bar = None
            for request_id in ids:
                if request_id not in finished:
                    self.client.abort(request_id)  # interrupted: the next call's loop drops it first
        return [finished[i] for i in ids]


class _Finished:
    """Collects finished outputs as the loop reports them, ticking a progress bar if there is one."""

    def __init__(self) -> None:
        self.outputs: dict[str, RequestOutput] = {}
        self.bar: Any = None

    def __call__(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            if isinstance(item, BaseException):
                raise item  # refused by the engine after passing our checks
            if item.finished:
                self.outputs[request_id] = item
                if self.bar is not None:
                    self.bar.update(1)


def _never_called(message: str) -> None:
    raise AssertionError(f"an engine loop in the caller's thread raises instead of reporting: {message}")


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="dsray: requests", unit="req", disable=not enabled, dynamic_ncols=True)
