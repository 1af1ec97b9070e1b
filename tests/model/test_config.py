"""ModelArgs from config.json: both rope spellings, defaults per model type, clear refusals."""

from __future__ import annotations

import pytest

from dsray.config import ModelArgs
from dsray.testing import hf_config

V3_HUB = {  # the fields of DeepSeek-V3's own config.json that matter here
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "eos_token_id": 1,
}


def test_deepseek_v3_hub_config():
    args = ModelArgs.from_hf_config(V3_HUB)
    assert args.kv_cache_dim == 576
    assert args.rope_scaling.factor == 40 and args.rope_scaling.original_max_position_embeddings == 4096
    assert args.quantization.weight_block_size == (128, 128)
    assert args.moe_layer_ids[0] == 3 and len(args.moe_layer_ids) == 58
    # softmax scale = (128 + 64)^-0.5 * mscale², mscale = 0.1 * ln 40 + 1
    assert args.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 3.6888794541 + 1) ** 2)


def test_old_and_new_rope_spellings_agree():
    new = dict(V3_HUB)
    del new["rope_scaling"], new["rope_theta"]
    params = dict(V3_HUB["rope_scaling"])
    params["rope_type"] = params.pop("type")
    new["rope_parameters"] = params | {"rope_theta": 10000.0}
    assert ModelArgs.from_hf_config(new) == ModelArgs.from_hf_config(V3_HUB)


@pytest.mark.parametrize("name", ["v2", "v2-lite", "v3", "v3-halves"])
def test_hf_saved_configs_parse(name):
    cfg = hf_config(name).to_dict()
    args = ModelArgs.from_hf_config(cfg)
    if name.startswith("v2"):
        assert args.scoring_func == "softmax" and args.rope_interleave
        assert args.topk_method == cfg["topk_method"]
    else:  # HF's V3 config omits scoring_func/topk_method: V3 means sigmoid + noaux_tc
        assert (args.scoring_func, args.topk_method) == ("sigmoid", "noaux_tc")
        assert args.rope_interleave == (name != "v3-halves")
    assert args.q_lora_rank == cfg["q_lora_rank"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "random"}, "topk_method"),
        ({"n_group": 7}, "n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope type"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "fmt"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ],
)
def test_unsupported_values_name_the_field(change, field):
    with pytest.raises(ValueError, match=field) as info:
        ModelArgs.from_hf_config(V3_HUB | change)
    assert "supported" in str(info.value) or "differs" in str(info.value) or "must" in str(info.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelArgs.from_pretrained(tmp_path)
