"""llama2.c legacy (version-0) `.bin` reader.

Layout (run.c `memory_map_weights`): a 7 x int32 header (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len; negative vocab_size means a separate classifier follows),
then float32 arrays token_embedding[V,E], rms_att[L,E], wq[L,E,E], wk[L,KV,E], wv[L,KV,E],
wo[L,E,E], rms_ffn[L,E], w1[L,F,E], w2[L,E,F], w3[L,F,E], rms_final[E], two unused RoPE
tables (seq_len*head_size/2 floats each) and, if not shared, wcls[V,E]. Matrices are already
torch `[out, in]`. llama2.c rotates interleaved pairs, so Q/K rows are permuted to HF's
rotate-half layout exactly as HF's convert_llama_weights_to_hf does.
"""

from __future__ import annotations

import os
import re
import struct

import numpy as np

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.source import SourceBase, canonical_names, interleaved_to_half_split
from jaxinfer.config import ConfigError, ModelConfig

_HEADER = struct.Struct("<7i")
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c export.py version >= 1 (not the legacy layout)


def sniff(head: bytes) -> bool:
    """True if `head` (the file's first bytes) is a plausible llama2.c header."""
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == _V1_MAGIC:
        return True  # recognised; Llama2cSource explains that this version is unsupported
    if len(head) < _HEADER.size:
        return False
    dim, hidden, layers, heads, kv, vocab, seq = _HEADER.unpack(head[: _HEADER.size])
    limit = 1 << 20
    return (
        0 < dim < limit
        and 0 < hidden < limit
        and 0 < layers < 4096
        and 0 < heads <= dim
        and 0 < kv <= heads
        and 0 < abs(vocab) < (1 << 24)
        and 0 < seq < (1 << 24)
        and dim % heads == 0
        and heads % kv == 0
        and (dim // heads) % 2 == 0
    )


class Llama2cSource(SourceBase):
    """A llama2.c `.bin` checkpoint; `get` reads just the requested slice from disk."""

    format = "llama2c"

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(_HEADER.size)
        if len(head) >= 8 and struct.unpack("<I", head[:4])[0] == _V1_MAGIC:
            version = struct.unpack("<i", head[4:8])[0]
            raise CheckpointError(
                f"{self.path}: llama2.c version-{version} export is not supported (only the legacy version-0 layout)"
            )
        if not sniff(head):
            raise CheckpointError(f"{self.path}: not a llama2.c checkpoint (implausible header)")
        dim, hidden, layers, heads, kv_heads, vocab, seq = _HEADER.unpack(head)
        shared, vocab = vocab > 0, abs(vocab)
        hs = dim // heads
        kv = kv_heads * hs
        name = os.path.splitext(os.path.basename(self.path))[0]
        try:
            self.config = ModelConfig(
                name=name,
                vocab_size=vocab,
                hidden_size=dim,
                intermediate_size=hidden,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=hs,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                tie_embeddings=shared,
                max_position_embeddings=seq,
                bos_token_id=1,
                eos_token_ids=(2,),
            )
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        # (key, per-layer shape or None for a single tensor) in file order
        layout = [
            ("embed", (vocab, dim), False),
            ("rms_att", (dim,), True),
            ("wq", (dim, dim), True),
            ("wk", (kv, dim), True),
            ("wv", (kv, dim), True),
            ("wo", (dim, dim), True),
            ("rms_ffn", (dim,), True),
            ("w1", (hidden, dim), True),
            ("w2", (dim, hidden), True),
            ("w3", (hidden, dim), True),
            ("rms_final", (dim,), False),
            ("freq_cis", (seq * hs,), False),
        ]
        if not shared:
            layout.append(("wcls", (vocab, dim), False))
        self._where: dict[str, tuple[int, tuple[int, ...]]] = {}
        offset = _HEADER.size
        for key, shape, per_layer in layout:
            self._where[key] = (offset, shape)
            offset += 4 * int(np.prod(shape)) * (layers if per_layer else 1)
        if size < offset:
            raise CheckpointError(f"{self.path}: truncated: header says {offset} bytes, file has {size}")
        if size > offset:
            raise CheckpointError(
                f"{self.path}: size mismatch: llama2.c header says {offset} bytes, "
                f"file has {size} (not a legacy llama2.c export?)"
            )

    _LAYER = {
        "self_attn.q_proj": "wq",
        "self_attn.k_proj": "wk",
        "self_attn.v_proj": "wv",
        "self_attn.o_proj": "wo",
        "mlp.gate_proj": "w1",
        "mlp.down_proj": "w2",
        "mlp.up_proj": "w3",
        "input_layernorm": "rms_att",
        "post_attention_layernorm": "rms_ffn",
    }
    _TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "rms_final", "lm_head.weight": "wcls"}

    def names(self) -> set[str]:
        return set(canonical_names(self.config))

    def get(self, name: str) -> np.ndarray:
        key, layer = self._TOP.get(name), 0
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        if m and int(m.group(1)) < self.config.num_layers:
            key, layer = self._LAYER.get(m.group(2)), int(m.group(1))
        if key is None or key not in self._where:
            raise self._missing(name)
        offset, shape = self._where[key]
        count = int(np.prod(shape))
        arr = np.fromfile(self.path, dtype="<f4", count=count, offset=offset + 4 * count * layer)
        if arr.size != count:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        arr = arr.reshape(shape)
        if key == "wq":
            arr = interleaved_to_half_split(arr, self.config.num_heads)
        elif key == "wk":
            arr = interleaved_to_half_split(arr, self.config.num_kv_heads)
        return self._checked(name, arr)
