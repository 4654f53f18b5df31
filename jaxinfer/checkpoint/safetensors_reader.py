"""Hugging Face directory reader: config.json + one or more *.safetensors files (sharded via index.json).

Every file's header is parsed and checked against the file size when the source is opened,
so truncation is reported before any weights are read. Tensors are then read one at a time
(peak host memory ~one tensor): through `safetensors.safe_open(framework="numpy")`, except
bf16, which numpy cannot name and which is read straight from the file as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.source import SourceBase
from jaxinfer.config import ConfigError, ModelConfig

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": ml_dtypes.bfloat16}


def is_hf_dir(path: str) -> bool:
    """True for a directory holding config.json and safetensors weights (or a shard index)."""
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, INDEX_NAME)) or bool(glob.glob(os.path.join(path, "*.safetensors")))
    )


def read_header(file: str) -> dict[str, dict]:
    """Parses and validates a safetensors header: {tensor name: {dtype, shape, data_offsets}}."""
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: truncated: header says at least 8 bytes, file has {size}")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{file}: truncated: header says {8 + n}+ bytes, file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64))
            info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {name!r}") from None
        if stop < begin:
            raise CheckpointError(f"{file}: corrupt data offsets {begin}..{stop} for tensor {name!r}")
        itemsize = np.dtype(_DTYPES[info["dtype"]]).itemsize if info["dtype"] in _DTYPES else None
        if itemsize is not None and stop - begin != count * itemsize:
            raise CheckpointError(
                f"{file}: tensor {name!r} spans {stop - begin} bytes, its shape "
                f"{info['shape']} and dtype {info['dtype']} need {count * itemsize}"
            )
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated: header says {8 + n + end} bytes, file has {size}")
    return header


class SafetensorsSource(SourceBase):
    """A HF checkpoint directory; `get` streams one tensor from whichever shard holds it."""

    format = "safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            config = ModelConfig.from_hf_config(self.path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if config.name == "hf-model":
            config = config.replace(name=os.path.basename(os.path.abspath(self.path)))
        self.config = config
        self._where: dict[str, str] = {}  # tensor name -> file
        self._info: dict[str, dict] = {}  # tensor name -> header entry
        self._data_start: dict[str, int] = {}
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt shard index ({type(e).__name__}: {e})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(self.path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        for base in files:
            file = os.path.join(self.path, base)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: shard listed in {INDEX_NAME} does not exist")
            header = read_header(file)
            with open(file, "rb") as fh:
                start = 8 + struct.unpack("<Q", fh.read(8))[0]
            for name, info in header.items():
                if weight_map is not None and weight_map.get(name) != base:
                    continue  # the index is authoritative about where a tensor lives
                if name in self._where:
                    raise CheckpointError(f"{file}: tensor {name!r} also appears in {self._where[name]}")
                self._where[name], self._info[name], self._data_start[file] = file, info, start
        if weight_map is not None:
            for name, base in weight_map.items():
                if name not in self._where:
                    raise CheckpointError(
                        f"{os.path.join(self.path, base)}: tensor {name!r} is listed in "
                        f"{INDEX_NAME} but absent from the file"
                    )

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        file = self._where.get(name)
        if file is None:
            raise self._missing(
                name, f"{self.path} ({', '.join(sorted({os.path.basename(f) for f in self._where.values()}))})"
            )
        info = self._info[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{file}: tensor {name!r} has unsupported dtype {info['dtype']} (supported: {', '.join(_DTYPES)})"
            )
        try:
            if dtype is ml_dtypes.bfloat16:
                begin, _ = info["data_offsets"]
                count = int(np.prod(info["shape"], dtype=np.int64))
                arr = np.fromfile(file, dtype=dtype, count=count, offset=self._data_start[file] + begin)
                arr = arr.reshape(info["shape"]).astype(np.float32)
            else:
                with safe_open(file, framework="numpy") as fh:
                    arr = fh.get_tensor(name)
        except Exception as e:  # the file changed under us or the library rejected it
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None
        return self._checked(name, arr, file)
