"""dsray: expert-parallel inference for DeepSeek-architecture models on Ray."""

__version__ = "0.1.0"
