"""Writes a random-weight DeepSeek-V3 checkpoint for a preset (``dsray make-model PRESET DIR``), offline.

The directory holds what a real DeepSeek-V3 HF checkpoint holds (config.json,
generation_config.json, tokenizer files, safetensors with the same tensor names and shapes), so
every loader can be tested on it. Weights come from one seeded generator in a fixed tensor order,
so the bytes depend only on (preset, dtype, seed) and not on how the files are sharded.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dsray.envs import dsray_home
from dsray.presets import preset_config, preset_names
from dsray.tokenizer_builder import write_tokenizer

logger = logging.getLogger(__name__)

# 512 MiB keeps peak memory low and splits `small` (~1.3 GB in bf16) into three shards.
DEFAULT_MAX_SHARD_BYTES = 512 * 2**20
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INIT_STD = 0.02  # HF's initializer_range
BIAS_STD = 0.01  # large enough that e_score_correction_bias changes some top-k choices


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its name, shape, how it is initialised, and whether it stays fp32."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (std 0.02), "ones" (norm weights) or "bias" (std 0.01)
    fp32: bool = False

    def num_bytes(self, dtype: torch.dtype) -> int:
        itemsize = 4 if self.fp32 else dtype.itemsize
        return itemsize * torch.Size(self.shape).numel()


def checkpoint_specs(config: dict) -> list[TensorSpec]:
    """Every tensor of a DeepSeek-V3 checkpoint for ``config``, in generation order ([out, in] linears)."""
    D, H = config["hidden_size"], config["num_attention_heads"]
    C, R = config["kv_lora_rank"], config["qk_rope_head_dim"]
    nope, v_dim, q_rank = config["qk_nope_head_dim"], config["v_head_dim"], config["q_lora_rank"]
    E, I = config["n_routed_experts"], config["moe_intermediate_size"]

    def linear(name: str, out_features: int, in_features: int) -> TensorSpec:
        return TensorSpec(name, (out_features, in_features), "normal")

    def norm(name: str, size: int) -> TensorSpec:
        return TensorSpec(name, (size,), "ones")

    def mlp(prefix: str, intermediate: int) -> list[TensorSpec]:
        return [
            linear(f"{prefix}.gate_proj.weight", intermediate, D),
            linear(f"{prefix}.up_proj.weight", intermediate, D),
            linear(f"{prefix}.down_proj.weight", D, intermediate),
        ]

    specs = [linear("model.embed_tokens.weight", config["vocab_size"], D)]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        if q_rank is None:
            specs.append(linear(f"{p}.self_attn.q_proj.weight", H * (nope + R), D))
        else:
            specs.append(linear(f"{p}.self_attn.q_a_proj.weight", q_rank, D))
            specs.append(norm(f"{p}.self_attn.q_a_layernorm.weight", q_rank))
            specs.append(linear(f"{p}.self_attn.q_b_proj.weight", H * (nope + R), q_rank))
        specs += [
            linear(f"{p}.self_attn.kv_a_proj_with_mqa.weight", C + R, D),
            norm(f"{p}.self_attn.kv_a_layernorm.weight", C),
            linear(f"{p}.self_attn.kv_b_proj.weight", H * (nope + v_dim), C),
            linear(f"{p}.self_attn.o_proj.weight", D, H * v_dim),
            norm(f"{p}.input_layernorm.weight", D),
            norm(f"{p}.post_attention_layernorm.weight", D),
        ]
        if layer < config["first_k_dense_replace"]:
            specs += mlp(f"{p}.mlp", config["intermediate_size"])
            continue
        # The router stays fp32 in the file: transformers keeps it fp32 and routing is precision-sensitive.
        specs.append(TensorSpec(f"{p}.mlp.gate.weight", (E, D), "normal", fp32=True))
        specs.append(TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", (E,), "bias", fp32=True))
        for expert in range(E):
            specs += mlp(f"{p}.mlp.experts.{expert}", I)
        specs += mlp(f"{p}.mlp.shared_experts", I * config["n_shared_experts"])
    specs.append(norm("model.norm.weight", D))
    specs.append(linear("lm_head.weight", config["vocab_size"], D))
    return specs


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    shard_bytes = 0
    for spec in specs:
        size = spec.num_bytes(dtype)
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += size
    return shards


def make_tensor(spec: TensorSpec, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Draw one tensor in fp32 from ``generator`` and cast it, so values do not depend on ``dtype``."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    std = BIAS_STD if spec.init == "bias" else INIT_STD
    values = torch.randn(spec.shape, generator=generator, dtype=torch.float32) * std
    return values if spec.fp32 else values.to(dtype)


def write_weights(out_dir: Path, config: dict, dtype: torch.dtype, seed: int, max_shard_bytes: int) -> int:
    """Write the safetensors file(s) (+ index when sharded) one shard at a time; returns total bytes."""
    specs = checkpoint_specs(config)
    shards = plan_shards(specs, dtype, max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    num_shards = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    bar = tqdm(shards, desc="dsray: writing", unit="file", disable=num_shards == 1, file=sys.stderr)
    for index, shard in enumerate(bar, start=1):
        start = time.perf_counter()
        if num_shards == 1:
            file_name = "model.safetensors"
        else:
            file_name = f"model-{index:05d}-of-{num_shards:05d}.safetensors"
        tensors = {spec.name: make_tensor(spec, generator, dtype) for spec in shard}
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        shard_size = sum(spec.num_bytes(dtype) for spec in shard)
        total_size += shard_size
        weight_map.update({spec.name: file_name for spec in shard})
        del tensors
        logger.info(
            "wrote %s: %d tensors, %.1f MiB in %.1fs",
            file_name,
            len(shard),
            shard_size / 2**20,
            time.perf_counter() - start,
        )
    if num_shards > 1:
        index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out_dir / "model.safetensors.index.json", index_json)
    return total_size


def make_model(
    preset: str,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight checkpoint of ``preset`` to ``out_dir`` and return its path.

    Everything is written into a temporary sibling directory that is renamed into place at the
    end, so ``out_dir`` is either absent, as it was, or complete. An existing non-empty
    ``out_dir`` is an error unless ``overwrite``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    config = preset_config(preset, dtype)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it 0700; a model directory should be readable by all
        _write_json(tmp_dir / "config.json", config)
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        _write_json(tmp_dir / "generation_config.json", {**generation, "do_sample": False})
        num_tokens = write_tokenizer(tmp_dir, config["vocab_size"], config["max_position_embeddings"])
        total = write_weights(tmp_dir, config, DTYPES[dtype], seed, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        for path in tmp_dir.iterdir():
            path.chmod(0o644)  # safetensors creates its files 0600
        _publish(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info(
        "made %s (%s, seed %d): %.1f MiB of weights, %d tokenizer ids, in %.1fs -> %s",
        preset,
        dtype,
        seed,
        total / 2**20,
        num_tokens,
        time.perf_counter() - start,
        out_dir,
    )
    return out_dir


def default_model_dir(preset: str = "tiny") -> Path:
    """Where ``ensure_default_model`` keeps ``preset``: ``$DSRAY_HOME/models/<preset>``."""
    preset_config(preset)  # unknown names fail here, before a path is made for them
    return dsray_home() / "models" / preset


def ensure_default_model(preset: str = "tiny") -> Path:
    """Make the default ``preset`` model once (seed 0, bf16) and return its directory.

    A lock file serialises concurrent callers so only one of them builds; the others wait and
    then find the finished directory (which only ever appears complete, by rename).
    """
    out_dir = default_model_dir(preset)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{preset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out_dir / "config.json").is_file():
            # Holding the lock, any temp dir of this preset is left over from a killed maker.
            for stale in out_dir.parent.glob(f".{preset}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            make_model(preset, out_dir)
    return out_dir


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")


def _publish(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp_dir`` to ``out_dir``; an old ``out_dir`` is moved aside first."""
    _check_target(out_dir, overwrite)  # again: another maker may have finished meanwhile
    old_dir = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old_dir)  # replaces the empty placeholder made by mkdtemp
    os.replace(tmp_dir, out_dir)  # an empty out_dir is replaced too
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m dsray.make_model PRESET DIR``: the body of ``dsray make-model``."""
    parser = argparse.ArgumentParser(prog="dsray make-model", description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=preset_names(), help="model preset")
    parser.add_argument("out_dir", type=Path, help="directory to create")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="weight dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight generator")
    parser.add_argument("--max-shard-bytes", type=int, default=None, help="largest safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_model(
        args.preset,
        args.out_dir,
        dtype=args.dtype,
        seed=args.seed,
        max_shard_bytes=args.max_shard_bytes,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
