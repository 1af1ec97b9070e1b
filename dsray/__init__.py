"""dsray: expert-parallel inference for DeepSeek-architecture models on Ray.

``from dsray import LLM, SamplingParams`` is the offline API. Heavy modules load lazily so
that the model-math packages can import the ``dsray`` foundation without the engine.
"""

import os

# oneDNN (torch's CPU matmuls) caches a primitive per matmul shape, 1,024 by default: serving, whose
# prefill shapes vary per request, grew the engine's RSS by ~650 MB over five rounds of mixed prompts
# and kept growing; at 256 it levels off after ~230 MB (a miss costs a primitive build, well under a
# millisecond). Read at the first matmul, so set before any; a value in the environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")

from dsray import openmp  # noqa: E402, F401  (before torch loads: see its docstring)
from dsray.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestOutput"]

_LAZY = {
    "LLM": "dsray.llm",
    "AsyncLLM": "dsray.async_llm",
    "EngineConfig": "dsray.engine_config",
    "RequestOutput": "dsray.outputs",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsray' has no attribute {name!r}")
