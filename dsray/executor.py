"""The executor seam: how a step reaches the workers that run the model.

``local`` runs the model in the engine's process (the reference, and the fastest path on one
small machine), on ``config.device``: weights, latent KV cache, activations and sampling. The Ray
executor, with attention and expert workers, implements the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dsray.engine_config import EngineConfig
from dsray.model_runner import ModelRunner
from dsray.protocol import StepInput, StepOutput
from dsray.weights import load_transformer


class Executor(ABC):
    """Runs steps on the model.

    ``num_attention_ranks`` data-parallel attention ranks each own a KV cache of ``num_blocks``
    blocks; the engine keeps one scheduler per rank.
    """

    num_blocks: int
    num_attention_ranks: int = 1

    @abstractmethod
    def execute(self, steps: list[StepInput]) -> list[StepOutput | None]:
        """Run one step on every attention rank (``steps[r]`` may be empty); results align with
        each rank's ``seqs``. None for a rank whose worker was lost in the step: its KV cache is gone,
        the rank is removed (``num_attention_ranks`` drops) and the engine recomputes its sequences
        elsewhere. Raises ``WorkerError`` naming the worker when it cannot serve on."""

    def admit_workers(self) -> bool:
        """At a step boundary, let in workers that are ready to join (replacements of lost ones); new
        attention ranks come last (``num_attention_ranks`` grows). True when some joined. In-process:
        nothing to admit."""
        return False

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each (MoE layer, expert) since start: ``[num_moe_layers][n_routed_experts]``."""
        return []

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
        device = config.resolved_device()  # a GPU asked for and not here fails now, naming the option
        if device.type == "cuda":
            torch.cuda.set_device(device)  # Triton launches and stray allocations go to this GPU too
        model = load_transformer(
            config.model,
            config.torch_dtype,
            device,
            mla_mode=config.mla_mode,
            expert_mode=config.expert_mode,
            fp8_weights=config.fp8_weights,
        )
        self.runner = ModelRunner(
            model,
            config.kv_cache_memory_bytes,
            config.scheduler.block_size,
            config.max_num_blocks,
            config.front_end_cores,
        )
        self.num_blocks = self.runner.num_blocks

    def execute(self, steps: list[StepInput]) -> list[StepOutput]:
        return [self.runner.execute(steps[0])]

    def expert_load(self) -> list[list[int]]:
        return self.runner.model.expert_load()


def create_executor(config: EngineConfig) -> Executor:
    if config.executor == "ray":
        from dsray.ray_executor import RayExecutor  # Ray only when asked for

        return RayExecutor(config)
    if config.num_attention_workers != 1 or config.num_expert_workers != 1:
        raise ValueError("num_attention_workers/num_expert_workers need executor='ray'")
    return LocalExecutor(config)
