"""dsray: expert-parallel inference for DeepSeek-architecture models on Ray.

``from dsray import LLM, SamplingParams`` is the offline API. Heavy modules load lazily so
that the model-math packages can import the ``dsray`` foundation without the engine.
"""

from dsray.sampling_params import SamplingParams

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
