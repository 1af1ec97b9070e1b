"""Named model presets (`tiny`, `small`) as data, and the HF-style ``config.json`` each one makes.

Shapes are the project's bench models (``tiny`` for tests, ``small`` ~671M parameters for
benchmarks, both listed in ``PRESETS`` below); everything else copies
DeepSeek-V3's own ``config.json`` (sigmoid / noaux_tc routing, YaRN rope, interleaved rope dims)
so a preset directory looks like a scaled-down real checkpoint to any loader.
"""

from __future__ import annotations

import copy
from typing import Any

from dsray.tokenizer_builder import BOS_ID, EOS_ID

# Per-preset shapes, with DeepSeek's field names so they map 1:1 onto config.json.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 1000,
        "hidden_size": 256,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "moe_intermediate_size": 64,
        "intermediate_size": 512,
    },
    "small": {
        "vocab_size": 32000,
        "hidden_size": 1024,
        "num_hidden_layers": 12,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 64,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "n_group": 8,
        "topk_group": 4,
        "moe_intermediate_size": 256,
        "intermediate_size": 2816,
    },
}

ROPE_THETA = 10000.0
# DeepSeek-V3's YaRN settings, scaled to a 1024-token pretraining window stretched 4x.
YARN = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 4.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 1024,
}

# Fields shared by every preset, as spelled in DeepSeek-V3's config.json.
COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 4096,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "ep_size": 1,
    # The real file says 1 and ships layer 61 as the MTP module; we write no MTP weights.
    "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-6,
    "rope_interleave": True,
    "tie_word_embeddings": False,
    "use_cache": True,
}


def preset_names() -> list[str]:
    """The preset names, in table order."""
    return list(PRESETS)


def preset_config(name: str, dtype: str = "bfloat16") -> dict[str, Any]:
    """The full HF-style ``config.json`` dict for preset ``name``, weights stored in ``dtype``.

    Rope is written twice, consistently: DeepSeek's own ``rope_theta`` + ``rope_scaling``
    (``type: yarn``) and transformers v5's ``rope_parameters`` (``rope_type: yarn``), so both
    old and new readers see the same YaRN settings.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    shapes = PRESETS[name]
    config = {**copy.deepcopy(COMMON), **shapes}
    config["num_key_value_heads"] = shapes["num_attention_heads"]
    config["bos_token_id"] = BOS_ID
    config["eos_token_id"] = EOS_ID
    config["rope_theta"] = ROPE_THETA
    config["rope_scaling"] = {"type": "yarn", **YARN}
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": ROPE_THETA, **YARN}
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    return dict(sorted(config.items()))
