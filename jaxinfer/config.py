"""Model configuration: one frozen, hashable `ModelConfig` and the preset registry.

A `ModelConfig` describes the *logical* model (the numbers a checkpoint was trained
with). Head padding for meshes whose tensor axis does not divide the head counts is
a load-time concern handled in `jaxinfer.model.heads`, never by editing presets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, value and limit."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-class decoder. Frozen and hashable so it can be a static jit argument."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    # > 0: a reduced output vocabulary (a speculative-decoding draft, `jaxinfer.distill`): an untied head
    # [hidden, head_vocab] plus the target token id of each column (`head_ids`); the model still returns
    # logits over all `vocab_size` ids, masked outside those columns. 0: the usual full head.
    head_vocab: int = 0
    # A speculative-decoding head on the target's hidden states (`jaxinfer.model.feature_head`), not a
    # language model: `num_layers` MLP blocks of width `intermediate_size` and its reduced head of
    # `head_vocab` columns; it reads the target's embedding table and has no attention of its own.
    feature_head: bool = False

    def __post_init__(self):
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config {self.name!r}: {field}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config {self.name!r}: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model config {self.name!r}: head_dim={self.head_dim} must be even for RoPE")
        if not isinstance(self.head_vocab, int) or not 0 <= self.head_vocab <= self.vocab_size:
            raise ConfigError(
                f"model config {self.name!r}: head_vocab={self.head_vocab!r} must be an integer in "
                f"[0, vocab_size={self.vocab_size}]"
            )
        if self.head_vocab and self.tie_embeddings:
            raise ConfigError(
                f"model config {self.name!r}: head_vocab={self.head_vocab} needs an untied head "
                "(tie_embeddings=False): the reduced head is its own [hidden, head_vocab] matrix"
            )
        if self.feature_head and not self.head_vocab:
            raise ConfigError(f"model config {self.name!r}: a feature head needs head_vocab > 0 (its reduced head)")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        """Exact number of parameters, computed from the shapes (matches `jax.eval_shape` of init); a reduced
        head counts its `head_vocab` int32 token ids too (a parameter leaf, though not a trained one)."""
        e, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        if self.feature_head:  # fc [2E, E], per block a norm and three [E, F] matrices, the reduced head
            return 2 * e * e + self.num_layers * (e + 3 * e * f) + e * self.head_vocab + self.head_vocab
        attn = e * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * e * f + 2 * e
        if self.head_vocab:
            head = e * self.head_vocab + self.head_vocab
        else:
            head = 0 if self.tie_embeddings else e * v
        return v * e + self.num_layers * per_layer + e + head

    # ---- Hugging Face config.json ---------------------------------------------------
    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | Mapping[str, Any], name: str | None = None) -> ModelConfig:
        """Builds a config from a HF `config.json` path, a directory holding one, or its parsed dict."""
        if isinstance(source, Mapping):
            cfg, origin = dict(source), "config dict"
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise ConfigError(f"{path}: no config.json found")
            try:
                with open(path) as f:
                    cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            origin = path
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        if model_type not in ("llama", "mistral") and not any(a in SUPPORTED_HF_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{origin}: unsupported architecture {archs or model_type!r}; "
                f"supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)}"
            )
        if cfg.get("sliding_window") not in (None, 0) and model_type == "mistral":
            raise ConfigError(f"{origin}: sliding_window={cfg['sliding_window']} is not supported")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in cfg:
                raise ConfigError(f"{origin}: missing required field {key!r}")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        scaling = None
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")  # transformers >= 5 writes the latter
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "llama3":
                scaling = RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
                )
            elif kind not in (None, "default"):
                raise ConfigError(f"{origin}: rope_scaling type {kind!r} is not supported (supported: llama3)")
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            name=name or cfg.get("_name_or_path") or "hf-model",
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            head_vocab=int(cfg.get("head_vocab") or 0),
            feature_head=bool(cfg.get("feature_head", False)),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The equivalent HF `LlamaConfig` dict (used to build reference models in tests)."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.head_vocab:  # jaxinfer's own key: a reduced-head draft (absent for every ordinary model)
            d["head_vocab"] = self.head_vocab
        if self.feature_head:  # jaxinfer's own key too (`jaxinfer.model.feature_head`)
            d["feature_head"] = True
        if self.rope_scaling:
            r = self.rope_scaling
            d["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": r.factor,
                "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position,
            }
        return d


SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

_LLAMA3_VOCAB = 128256
_LLAMA3_EOS = (128001, 128008, 128009)

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(
            name="tiny",
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=512,
        ),
        ModelConfig(
            name="stories260k",
            vocab_size=512,
            hidden_size=64,
            intermediate_size=172,
            num_layers=5,
            num_heads=8,
            num_kv_heads=4,
            head_dim=8,
            tie_embeddings=True,
            max_position_embeddings=512,
        ),
        ModelConfig(
            name="smollm2-135m",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            rope_theta=100000.0,
            tie_embeddings=True,
            max_position_embeddings=8192,
            bos_token_id=1,
            eos_token_ids=(2,),
        ),
        ModelConfig(
            name="llama2-7b",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            head_dim=128,
            max_position_embeddings=4096,
        ),
        ModelConfig(
            name="llama3-8b",
            vocab_size=_LLAMA3_VOCAB,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            max_position_embeddings=8192,
            bos_token_id=128000,
            eos_token_ids=_LLAMA3_EOS,
        ),
        ModelConfig(
            name="llama3.1-8b",
            vocab_size=_LLAMA3_VOCAB,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
            max_position_embeddings=131072,
            bos_token_id=128000,
            eos_token_ids=_LLAMA3_EOS,
        ),
        ModelConfig(
            name="llama3-70b",
            vocab_size=_LLAMA3_VOCAB,
            hidden_size=8192,
            intermediate_size=28672,
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            max_position_embeddings=8192,
            bos_token_id=128000,
            eos_token_ids=_LLAMA3_EOS,
        ),
        ModelConfig(
            name="llama3.2-1b",
            vocab_size=_LLAMA3_VOCAB,
            hidden_size=2048,
            intermediate_size=8192,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
            tie_embeddings=True,
            max_position_embeddings=131072,
            bos_token_id=128000,
            eos_token_ids=_LLAMA3_EOS,
        ),
    ]
}
# a feature head for `tiny` (`--speculative draft --draft-model tiny-head`; random weights): tiny's width,
# one MLP block, a 64-id head
PRESETS["tiny-head"] = PRESETS["tiny"].replace(name="tiny-head", num_layers=1, head_vocab=64, feature_head=True)


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"model preset {name!r} is unknown; known presets: {', '.join(sorted(PRESETS))}") from None
