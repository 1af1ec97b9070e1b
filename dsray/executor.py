"""The executor seam: how a step reaches the workers that run the model.

``local`` runs the model in the engine's process (the reference, and the fastest path on one
small machine). The Ray executor, with attention and expert workers, implements the same
interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dsray.engine_config import EngineConfig
from dsray.model_runner import ModelRunner
from dsray.protocol import StepInput, StepOutput
from dsray.weights import load_transformer


class Executor(ABC):
    """Runs steps on the model. ``num_blocks`` is the KV cache size the scheduler may hand out."""

    num_blocks: int

    @abstractmethod
    def execute(self, step: StepInput) -> StepOutput:
        """Run one step; results align with ``step.seqs``. Raises if a worker fails."""

    def check_health(self) -> None:
        """Raise when the executor cannot serve (e.g. a worker died). In-process: always healthy."""
        return None

    def shutdown(self) -> None:
        """Release workers and memory. In-process: nothing to release."""
        return None


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model = load_transformer(
            config.model, config.torch_dtype, mla_mode=config.mla_mode, expert_mode=config.expert_mode
        )
        self.runner = ModelRunner(model, config.kv_cache_memory_bytes, config.block_size, config.max_num_blocks)
        self.num_blocks = self.runner.num_blocks

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)


def create_executor(config: EngineConfig) -> Executor:
    if config.executor == "local":
        return LocalExecutor(config)
    raise ValueError(f"executor {config.executor!r} is not supported; supported: 'local'")
