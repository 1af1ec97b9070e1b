"""Tests for the embedded default model: presets, tokenizer builder and checkpoint writer.

transformers is the oracle: it must read our config, load our weights with no missing or
unexpected keys, and read our tokenizer and chat template.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from dsray.make_model import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    checkpoint_specs,
    default_model_dir,
    ensure_default_model,
    make_model,
    plan_shards,
)
from dsray.presets import preset_config
from dsray.tokenizer_builder import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, build_tokenizer

transformers = pytest.importorskip("transformers")

PROMPT_IDS = torch.tensor([[0, 43, 775, 82, 344, 380, 15, 263]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny") / "model")


def file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def hf_logits(model_dir: Path) -> torch.Tensor:
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model(PROMPT_IDS).logits


def test_unknown_preset_is_a_value_error(tmp_path):
    for call in (lambda: preset_config("huge"), lambda: make_model("huge", tmp_path / "m")):
        with pytest.raises(ValueError, match="tiny, small"):
            call()
    with pytest.raises(ValueError, match="tiny"):
        default_model_dir("huge")
    assert not (tmp_path / "m").exists()


def test_tiny_is_byte_for_byte_deterministic(tiny_dir, tmp_path):
    again = make_model("tiny", tmp_path / "again")
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    other_seed = make_model("tiny", tmp_path / "seed1", seed=1)
    assert (other_seed / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_tokenizer_training_is_deterministic_across_processes(tiny_dir):
    # A fresh interpreter gets fresh hash seeds, which is where a trainer would go nondeterministic.
    code = "import sys; from dsray.tokenizer_builder import build_tokenizer as b; sys.stdout.write(b(1000).to_str())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == build_tokenizer(1000).to_str()


def test_tensor_names_and_shapes_match_transformers_checkpoint(tiny_dir, tmp_path):
    config = transformers.DeepseekV3Config.from_pretrained(tiny_dir)
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "hf")
    ours = {name: tuple(t.shape) for name, t in file_tensors(tiny_dir).items()}
    theirs = {name: tuple(t.shape) for name, t in file_tensors(tmp_path / "hf").items()}
    assert ours == theirs
    tensors = file_tensors(tiny_dir)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    assert torch.all(tensors["model.norm.weight"] == 1)


def test_config_is_read_by_transformers(tiny_dir):
    config = transformers.DeepseekV3Config.from_pretrained(tiny_dir)
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["rope_theta"] == 10000.0
    assert rope["original_max_position_embeddings"] == 1024 and rope["mscale_all_dim"] == 1.0
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_group) == (16, 4, 4)
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert raw["rope_scaling"]["type"] == "yarn" and raw["rope_theta"] == 10000.0
    assert (raw["scoring_func"], raw["topk_method"], raw["torch_dtype"]) == ("sigmoid", "noaux_tc", "bfloat16")


def test_transformers_loads_tiny_with_no_missing_keys(tiny_dir):
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model(PROMPT_IDS).logits
    assert logits.shape == (1, PROMPT_IDS.shape[1], 1000) and torch.isfinite(logits).all()
    # The values really came from our file, not from transformers' own initialisation.
    tensors = file_tensors(tiny_dir)
    moe = model.model.layers[1].mlp
    assert torch.equal(moe.gate.e_score_correction_bias, tensors["model.layers.1.mlp.gate.e_score_correction_bias"])
    gate_up = torch.cat([tensors[f"model.layers.1.mlp.experts.3.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(moe.experts.gate_up_proj[3], gate_up)


def test_tokenizer_loads_in_transformers_and_tokenizers(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == (BOS_TOKEN, EOS_TOKEN, 0, 1)
    assert tok.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN]) == [2, 3]
    ids = tok("The weather is mild today.").input_ids
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "The weather is mild today."
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Will it rain?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = f"{USER_TOKEN}Hi{ASSISTANT_TOKEN}Hello.{EOS_TOKEN}{USER_TOKEN}Will it rain?{ASSISTANT_TOKEN}"
    assert text == f"{BOS_TOKEN}Be brief.{turns}"
    no_prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt == f"{BOS_TOKEN}{USER_TOKEN}Hi"

    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert raw.get_vocab_size() == 1000
    for text in ["Bread needs flour, water, salt and yeast.", "Tokens: 1048576 bytes!  ünïcødé 日本 🙂"]:
        encoding = raw.encode(text)
        assert encoding.ids[0] == 0
        assert raw.decode(encoding.ids) == text


def test_sharded_checkpoint_loads_with_same_logits(tiny_dir, tmp_path):
    sharded = make_model("tiny", tmp_path / "sharded", max_shard_bytes=1_000_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 5 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == files
    tensors = file_tensors(sharded)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(torch.equal(t, file_tensors(tiny_dir)[name]) for name, t in tensors.items())
    assert torch.equal(hf_logits(sharded), hf_logits(tiny_dir))


def test_existing_directory_needs_overwrite(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    make_model("tiny", target)  # an empty directory is fine
    with pytest.raises(FileExistsError, match="overwrite"):
        make_model("tiny", target)
    make_model("tiny", target, overwrite=True, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old dirs left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dsray.make_model.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        make_model("tiny", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_ensure_default_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DSRAY_HOME", str(tmp_path))
    (tmp_path / "models" / ".tiny.tmp-killed").mkdir(parents=True)  # as a killed maker leaves it
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_default_model())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "models" / "tiny"] * 3
    config_mtime = (results[0] / "config.json").stat().st_mtime_ns
    assert ensure_default_model("tiny") == results[0]
    assert (results[0] / "config.json").stat().st_mtime_ns == config_mtime
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".tiny.lock", "tiny"]


def test_small_preset_shapes_without_building():
    config = preset_config("small")
    specs = checkpoint_specs(config)
    num_params = sum(torch.Size(spec.shape).numel() for spec in specs)
    assert 660e6 < num_params < 680e6
    assert len(plan_shards(specs, DTYPES["bfloat16"], DEFAULT_MAX_SHARD_BYTES)) >= 2
    assert sum(".mlp.experts." in spec.name for spec in specs) == 11 * 64 * 3
