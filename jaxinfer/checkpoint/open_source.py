"""`open_source(path)`: opens any supported checkpoint, picking the reader from what the path is.

Kept apart from `source.py` (the protocol and shared reader base) so the readers, which import
that base, and this dispatcher, which imports the readers (lazily, per format), form no import cycle.
"""

from __future__ import annotations

import os

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.source import TensorSource

SUPPORTED_FORMATS = (
    "Hugging Face directory (config.json + *.safetensors, or model.safetensors.index.json)",
    "GGUF file (.gguf, architecture llama)",
    "llama2.c legacy version-0 .bin export",
)


def open_source(path: str | os.PathLike) -> TensorSource:
    """Opens a checkpoint, dispatching on what `path` is; raises CheckpointError for anything else."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"{p}: no such file or directory")
    if os.path.isfile(p) and os.path.basename(p) in ("config.json", "model.safetensors.index.json"):
        p = os.path.dirname(p) or "."
    if os.path.isdir(p):
        from jaxinfer.checkpoint.safetensors_reader import SafetensorsSource, is_hf_dir

        if is_hf_dir(p):
            return SafetensorsSource(p)
        raise CheckpointError(
            f"{p}: directory has no config.json with *.safetensors weights; "
            f"supported formats: {'; '.join(SUPPORTED_FORMATS)}"
        )
    with open(p, "rb") as fh:
        head = fh.read(32)
    from jaxinfer.checkpoint import gguf_reader, llama2c_reader

    if head[:4] == b"GGUF":
        return gguf_reader.GGUFSource(p)
    if p.lower().endswith(".gguf"):
        raise CheckpointError(f"{p}: not a GGUF file (bad magic {head[:4]!r})")
    if llama2c_reader.sniff(head):
        return llama2c_reader.Llama2cSource(p)
    if p.lower().endswith(".safetensors"):
        raise CheckpointError(f"{p}: a lone .safetensors file; pass the directory holding it and config.json")
    raise CheckpointError(f"{p}: unrecognised checkpoint format; supported formats: {'; '.join(SUPPORTED_FORMATS)}")
