"""ModelArgs: a DeepSeek-V2/V3 checkpoint's config.json, parsed and validated.

Field names are DeepSeek's own, so a checkpoint's ``config.json`` maps 1:1. Values this
implementation does not support are refused with a ``ValueError`` that names the field and
what is supported, instead of producing silently wrong numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling parameters (DeepSeek's ``rope_scaling`` with ``type: yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class Fp8Quantization:
    """Block-quantised float8 weights: ``weight_scale_inv`` holds one scale per block."""

    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelArgs:
    """Model hyper-parameters with DeepSeek's names: a checkpoint's config.json maps onto them 1:1."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = field(default=(1,))
    quantization: Fp8Quantization | None = None

    def __post_init__(self) -> None:
        self._validate()

    # Derived quantities -------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the latent ``c_kv`` and the roped key (C + R)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(d_nope + R)^-0.5, times YaRN's mscale² where ``mscale_all_dim`` is set."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # Construction -------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Parse a Hugging Face ``config.json`` dict of a DeepSeek-V2 or V3 checkpoint."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        is_v3 = model_type == "deepseek_v3"
        hidden_act = cfg.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act {hidden_act!r} is not supported; supported: 'silu'")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if kv_heads != heads:
            raise ValueError(
                f"config.json: num_key_value_heads={kv_heads} differs from num_attention_heads={heads}; "
                "MLA checkpoints have one key/value head per query head"
            )
        eos = cfg.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        theta, rope_scaling = _parse_rope(cfg)
        n_group = cfg.get("n_group") or 1
        topk_group = cfg.get("topk_group") or n_group
        # V2's hub configs name every field; HF's V3 save_pretrained omits scoring_func and topk_method.
        default_scoring, default_topk = ("sigmoid", "noaux_tc") if is_v3 else ("softmax", "greedy")
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
            moe_layer_freq=cfg.get("moe_layer_freq") or 1,
            num_attention_heads=heads,
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            n_routed_experts=cfg["n_routed_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"],
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            n_group=n_group,
            topk_group=topk_group,
            scoring_func=cfg.get("scoring_func") or default_scoring,
            topk_method=cfg.get("topk_method") or default_topk,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", is_v3)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            # HF's DeepSeek-V2 always rotates interleaved pairs; V3 configs say which layout they use.
            rope_interleave=bool(cfg.get("rope_interleave", True)) if is_v3 else True,
            attention_bias=bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=_parse_quantization(cfg.get("quantization_config")),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelArgs:
        """Read ``config.json`` from a checkpoint directory."""
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: is this a Hugging Face checkpoint directory?")
        return cls.from_hf_config(json.loads(config_file.read_text()))

    def replace(self, **changes: Any) -> ModelArgs:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelArgs(**values)

    # Validation ---------------------------------------------------------------------------------

    def _validate(self) -> None:
        def fail(name: str, value: Any, supported: str) -> None:
            raise ValueError(f"config.json: {name}={value!r} is not supported; supported: {supported}")

        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", self.scoring_func, str(SCORING_FUNCS))
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", self.topk_method, str(TOPK_METHODS))
        if self.n_routed_experts % self.n_group:
            fail("n_group", self.n_group, f"a divisor of n_routed_experts={self.n_routed_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            fail("topk_group", self.topk_group, f"1..n_group={self.n_group}")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            fail("num_experts_per_tok", self.num_experts_per_tok, f"1..n_routed_experts={self.n_routed_experts}")
        if self.topk_method != "greedy":
            per_group = self.n_routed_experts // self.n_group
            if self.topk_group * per_group < self.num_experts_per_tok:
                fail(
                    "topk_group",
                    self.topk_group,
                    f"enough groups to hold num_experts_per_tok={self.num_experts_per_tok} experts",
                )
            if self.topk_method == "noaux_tc" and per_group < 2:
                fail("n_group", self.n_group, "groups of at least 2 experts for noaux_tc (top-2 group score)")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, "an even number")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", self.first_k_dense_replace, f"0..{self.num_hidden_layers}")
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", self.moe_layer_freq, "an integer >= 1")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 · mscale · ln(scale) + 1 (1 when not stretched)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    """Accept both spellings: DeepSeek's ``rope_theta`` + ``rope_scaling`` and HF's ``rope_parameters``."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    max_pos = cfg.get("max_position_embeddings", 4096)
    original = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor") or max_pos / original
    return theta, YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 1.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
    )


def _parse_quantization(qcfg: dict[str, Any] | None) -> Fp8Quantization | None:
    if not qcfg:
        return None
    method = qcfg.get("quant_method")
    if method != "fp8":
        raise ValueError(f"config.json: quantization_config.quant_method={method!r} is not supported; supported: 'fp8'")
    fmt = qcfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"config.json: quantization_config.fmt={fmt!r} is not supported; supported: 'e4m3'")
    block = tuple(qcfg.get("weight_block_size") or (128, 128))
    if len(block) != 2:
        raise ValueError(f"config.json: quantization_config.weight_block_size={block!r} must be [rows, cols]")
    return Fp8Quantization(fmt=fmt, weight_block_size=(int(block[0]), int(block[1])))
