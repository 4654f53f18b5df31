"""GGUF reader (llama architecture): metadata -> ModelConfig, tensors -> HF names, layout and float32,
or (`get_quantized`) the quantized tensors as their codes and scales (`gguf_blocks`), never expanded to float.

GGUF lists dims fastest-first (`ne`), so a torch `[out, in]` weight is stored as `[in, out]`;
`GGUFReader` already exposes row-major data, and the HF shape is the reversed GGUF shape.
llama.cpp's converter permutes Q/K rows into interleaved-pair RoPE order; we undo that per
head (Q with num_heads, K with num_kv_heads). A llama3-style `rope_freqs.weight` tensor is
mapped back to `RopeScaling` only when the standard parameters reproduce it exactly.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.gguf_blocks import DECODERS, FLOAT_TYPES, decode_blocks
from jaxinfer.checkpoint.quantized_blocks import QuantizedBlocks
from jaxinfer.checkpoint.source import SourceBase, interleaved_to_half_split
from jaxinfer.config import ConfigError, ModelConfig, RopeScaling

SUPPORTED_TYPES = (*FLOAT_TYPES, *DECODERS)  # what `get` dequantizes (with gguf's own dequantize)
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name, or None if it is not part of a Llama model."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


class _Reader(GGUFReader):
    """GGUFReader on a plain ndarray view of its memmap: the same bytes, ~2x faster metadata parsing
    (slicing an np.memmap runs `__array_finalize__` per slice; a 49k-entry token list makes ~500k)."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)


def _nice(x: float) -> float:
    """float32 metadata as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


class GGUFSource(SourceBase):
    """A `.gguf` file; tensors are dequantized on `get`, one at a time."""

    format = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        try:
            self._reader = _Reader(self.path, "r")
        except Exception as e:  # gguf raises ValueError/IndexError/etc. on short or garbled files
            raise CheckpointError(
                f"{self.path}: truncated or corrupt GGUF file ({size} bytes): {type(e).__name__}: {e}"
            ) from None
        end = max((t.data_offset + t.n_bytes for t in self._reader.tensors), default=0)
        if end > size:
            raise CheckpointError(f"{self.path}: truncated: header says {end} bytes, file has {size}")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._by_hf = {h: g for g in self._tensors if (h := hf_name(g)) is not None}
        self.config = self._build_config()

    def _field(self, key: str, default=None):
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def _int(self, key: str, default=None) -> int:
        v = self._field(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            what = "missing" if v is None else f"not a single integer ({v!r})"
            raise CheckpointError(f"{self.path}: metadata {key!r} is {what}")
        return v

    def _build_config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.path}: unsupported GGUF architecture {arch!r}; supported: llama")
        e = self._int("llama.embedding_length")
        heads = self._int("llama.attention.head_count")
        head_dim = self._int("llama.attention.key_length", e // heads)
        rot = self._field("llama.rope.dimension_count")
        if rot is not None and rot != head_dim:
            raise CheckpointError(
                f"{self.path}: partial rotary (rope.dimension_count={rot}, head_dim={head_dim}) is not supported"
            )
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else self._field("llama.vocab_size")
        if vocab is None and "token_embd.weight" in self._tensors:
            vocab = int(self._tensors["token_embd.weight"].shape[-1])
        eos = self._field("tokenizer.ggml.eos_token_id")
        theta = _nice(self._field("llama.rope.freq_base", 10000.0))
        try:
            return ModelConfig(
                name=self._field("general.name") or os.path.splitext(os.path.basename(self.path))[0],
                vocab_size=vocab,
                hidden_size=e,
                intermediate_size=self._int("llama.feed_forward_length"),
                num_layers=self._int("llama.block_count"),
                num_heads=heads,
                num_kv_heads=self._int("llama.attention.head_count_kv", heads),
                head_dim=head_dim,
                rope_theta=theta,
                rope_scaling=self._rope_scaling(theta, head_dim),
                rms_norm_eps=_nice(self._field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                tie_embeddings="output.weight" not in self._tensors,
                max_position_embeddings=self._int("llama.context_length", 2048),
                bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
                eos_token_ids=() if eos is None else (eos,),
            )
        except ConfigError as err:
            raise CheckpointError(f"{self.path}: {err}") from None

    def _rope_scaling(self, theta: float, head_dim: int) -> RopeScaling | None:
        kind = self._field("llama.rope.scaling.type")
        if kind not in (None, "none") and not (kind == "linear" and self._field("llama.rope.scaling.factor") == 1.0):
            raise CheckpointError(f"{self.path}: rope scaling type {kind!r} is not supported")
        t = self._tensors.get("rope_freqs.weight")
        if t is None:
            return None
        factors = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(-1)
        cand = RopeScaling(
            factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192
        )
        if factors.shape != (head_dim // 2,) or not np.allclose(
            factors, llama3_rope_factors(cand, theta, head_dim), rtol=1e-4
        ):
            raise CheckpointError(
                f"{self.path}: tensor 'rope_freqs.weight' does not match llama3 rope scaling "
                f"(factor={cand.factor}, low=1, high=4, original=8192); not supported"
            )
        return cand

    def names(self) -> set[str]:
        return set(self._by_hf)

    def _tensor(self, name: str):
        g = self._by_hf.get(name)
        if g is None:
            raise self._missing(name)
        return g, self._tensors[g]

    def _rope_heads(self, name: str) -> int | None:
        """Heads whose rows llama.cpp permuted into interleaved RoPE pairs (Q and K), or None."""
        if name.endswith("q_proj.weight"):
            return self.config.num_heads
        if name.endswith("k_proj.weight"):
            return self.config.num_kv_heads
        return None

    def get(self, name: str) -> np.ndarray:
        g, t = self._tensor(name)
        if t.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {g!r} ({name}) has unsupported type {t.tensor_type.name}; "
                f"supported: {', '.join(x.name for x in SUPPORTED_TYPES)}"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {g!r} ({type(e).__name__}: {e})") from None
        if heads := self._rope_heads(name):
            arr = interleaved_to_half_split(arr, heads)
        return self._checked(name, arr)

    def get_quantized(self, name: str) -> QuantizedBlocks | None:
        """The tensor's codes and per-group scales in HF layout (Q/K rows un-permuted as in `get`), decoded
        from its blocks without going through float; None when the file stores it as float (use `get`)."""
        g, t = self._tensor(name)
        if t.tensor_type in FLOAT_TYPES:
            return None
        if t.tensor_type not in DECODERS:
            raise CheckpointError(
                f"{self.path}: tensor {g!r} ({name}) has quantized type {t.tensor_type.name}, which cannot be "
                f"read as quantized blocks; supported: {', '.join(x.name for x in DECODERS)}"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if len(shape) != 2:
            raise CheckpointError(f"{self.path}: tensor {g!r} ({name}) is quantized but has shape {shape}, not 2-D")
        self._check_shape(name, shape)
        q = decode_blocks(t.data, t.tensor_type, shape[1])
        if heads := self._rope_heads(name):
            q = q.map_rows(lambda rows: interleaved_to_half_split(rows, heads))
        return q

    def close(self) -> None:
        self._tensors, self._by_hf, self._reader = {}, {}, None


def llama3_rope_factors(s: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as `rope_freqs.weight` for llama3 scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_max_position / s.high_freq_factor:
            out.append(1.0)
        elif wavelen > s.original_max_position / s.low_freq_factor:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out)
