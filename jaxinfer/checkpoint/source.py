"""The `TensorSource` protocol: one canonical stream of float32 tensors from any checkpoint format.

Every reader presents tensors under Hugging Face `LlamaForCausalLM` names and layouts
(torch Linear weights are `[out, in]`; Q/K rows use HF's rotate-half RoPE layout), as float32
numpy, one tensor at a time; a reader of a format with quantized tensors (GGUF) also hands those over
undecoded as `QuantizedBlocks` through `get_quantized`. The readers build on `SourceBase` here; `open_source(path)` in
`jaxinfer.checkpoint.open_source` picks the reader from what the path is.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import numpy as np

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.quantized_blocks import QuantizedBlocks
from jaxinfer.config import ModelConfig


@runtime_checkable
class TensorSource(Protocol):
    """A checkpoint opened for reading; `get` returns float32 numpy in HF layout, `get_quantized` the codes
    and scales of a tensor the file stores quantized (None for float tensors)."""

    config: ModelConfig
    path: str
    format: str

    def names(self) -> set[str]: ...

    def get(self, name: str) -> np.ndarray: ...

    def get_quantized(self, name: str) -> QuantizedBlocks | None: ...

    def close(self) -> None: ...

    def __enter__(self) -> TensorSource: ...

    def __exit__(self, *exc) -> None: ...


class SourceBase:
    """Shared plumbing for readers: context manager and shape validation against the config."""

    config: ModelConfig
    path: str
    format: str = "?"

    def close(self) -> None:  # readers holding resources override
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, format={self.format!r})"

    def get_quantized(self, name: str) -> QuantizedBlocks | None:
        """The tensor as stored quantized (codes + scales, HF layout), or None where it is float in the file.

        Readers of formats without quantized tensors keep this default; `get` always works.
        """
        return None

    def _check_shape(self, name: str, shape: tuple[int, ...], where: str | None = None) -> None:
        want = expected_shape(self.config, name)
        if want is not None and tuple(shape) != want:
            raise CheckpointError(
                f"{where or self.path}: tensor {name!r} has shape {tuple(shape)}, config expects {want}"
            )

    def _checked(self, name: str, arr: np.ndarray, where: str | None = None) -> np.ndarray:
        self._check_shape(name, arr.shape, where)
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _missing(self, name: str, where: str | None = None) -> CheckpointError:
        return CheckpointError(f"{where or self.path}: tensor {name!r} not found in this {self.format} checkpoint")


def canonical_names(config: ModelConfig) -> list[str]:
    """Every tensor name the model needs, in HF naming (no `lm_head.weight` when embeddings are tied)."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{t}_proj.weight" for t in "qkvo"]
        names += [p + f"mlp.{t}_proj.weight" for t in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    return names


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...] | None:
    """HF shape of a canonical tensor, or None for names that are not canonical."""
    e, f, v, d = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (v, e)
    if name == "model.norm.weight":
        return (e,)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if not m or int(m.group(1)) >= config.num_layers:
        return None
    return {
        "self_attn.q_proj": (q, e),
        "self_attn.k_proj": (kv, e),
        "self_attn.v_proj": (kv, e),
        "self_attn.o_proj": (e, q),
        "mlp.gate_proj": (f, e),
        "mlp.up_proj": (f, e),
        "mlp.down_proj": (e, f),
        "input_layernorm": (e,),
        "post_attention_layernorm": (e,),
    }.get(m.group(2))


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorders Q/K projection rows from interleaved-pair RoPE to HF's rotate-half layout.

    Within each head, interleaved layout stores rotation pairs as rows (2j, 2j+1); HF stores
    pair j as rows (j, j + head_dim/2). Row `h*D + c*D/2 + j` of the result is row
    `h*D + 2j + c` of the input (the permutation of HF's convert_llama_weights_to_hf).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
