"""Parameters exactly as the engine runs them (heads padded for the mesh, the platform's layer loop),
kept under `--compile-cache DIR/jaxinfer-params/<key>/` so a restart skips the checkpoint's conversion.

One `.npy` file per parameter plus `meta.json` (the identity, the config, each parameter's partition
spec). A restart memory-maps each file and places it straight onto the mesh with its sharding: the
read is bounded by disk (or page-cache) bandwidth, with no Orbax restore, head padding or layout
conversion. The key covers the source's files (path, size, modification time), the mesh, the devices,
the dtype, the layer loop and jaxinfer's own source, so any of them changing means a miss and a
rebuild. It costs one more copy of the weights on disk per mesh layout, only for those who pass
`--compile-cache`, and only in the CPU (unrolled) layout: see `identity`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np

from jaxinfer.config import PRESETS, ModelConfig
from jaxinfer.model import params as P
from jaxinfer.model.forward import ShardedModel
from jaxinfer.model.layout import plan_layout
from jaxinfer.paths import content_key, source_hash
from jaxinfer.quant.spec import NONE, QuantSpec
from jaxinfer.sharding import device_names

log = logging.getLogger(__name__)

SUBDIR = "jaxinfer-params"


NARROW = {"int4": np.int8, "uint4": np.uint8}  # dtypes .npy cannot hold, and how they are stored


def identity(source: str, mesh, dtype, layer_loop: str, quant: QuantSpec = NONE) -> dict | None:
    """What the loaded parameters depend on; None when they are not cached: random presets, and the
    scan layout (TPU/GPU), where the Orbax restore already places the shards on the devices with only
    head padding after it, and where a second copy of a 70B model, gathered on one host to be
    written, would be neither affordable nor possible across hosts. The CPU layout's conversion is
    what costs seconds, and CPU-served models are small."""
    if source in PRESETS or layer_loop != "unrolled" or quant.label == "gguf":
        return None  # gguf: the spec comes from the file at load time (the load reads no float anyway)
    path = pathlib.Path(source).absolute()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "source": str(path),
        "files": [[str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "mesh": dict(mesh.shape),
        "devices": device_names(mesh),
        "dtype": np.dtype(dtype).name,
        "layer_loop": layer_loop,
        "quant": quant.to_json(),
        "jaxinfer_source": source_hash(),
    }


def _folder(root, ident: dict) -> pathlib.Path:
    return pathlib.Path(root) / SUBDIR / content_key(ident)


def load(root, ident: dict, mesh) -> ShardedModel | None:
    """The stored parameters for `ident` placed on `mesh`, or None (a miss, or refused in one line)."""
    folder = _folder(root, ident)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        log.warning("params cache %s refused: unreadable meta.json (%s); rebuilding", folder, e)
        return None
    if meta.get("identity") != ident:
        log.warning("params cache %s refused: built for another source, mesh or version; rebuilding", folder)
        return None
    config = ModelConfig.from_hf_config(meta["config"], name=meta["name"])
    params: dict = {}
    try:
        for leaf in meta["leaves"]:
            spec = jax.sharding.PartitionSpec(*[tuple(a) if isinstance(a, list) else a for a in leaf["spec"]])
            array = np.load(folder / leaf["file"], mmap_mode="r")
            if leaf.get("dtype") in NARROW:  # 4-bit codes, stored one per byte
                array = np.asarray(array).astype(jax.numpy.dtype(leaf["dtype"]))
            P.set_path(params, tuple(leaf["path"]), jax.device_put(array, jax.sharding.NamedSharding(mesh, spec)))
    except (OSError, ValueError) as e:
        log.warning("params cache %s refused: %s; rebuilding", folder, str(e).splitlines()[0][:200])
        return None
    return ShardedModel(
        config,
        plan_layout(config, mesh.shape["tensor"], quiet=True),
        mesh,
        params,
        np.dtype(meta["identity"]["dtype"]),
        source=meta["source"],
        tokenizer_path=meta["tokenizer_path"],
        layer_loop=meta["identity"]["layer_loop"],
        quant=QuantSpec.from_json(meta["identity"]["quant"]),
    )


def save(root, ident: dict, model: ShardedModel) -> None:
    """Writes `model`'s parameters for `ident`; the folder appears whole (renamed into place) or not at all."""
    folder = _folder(root, ident)
    try:
        if json.loads((folder / "meta.json").read_text()).get("identity") == ident:
            return  # another process wrote it meanwhile
    except (OSError, json.JSONDecodeError):
        pass
    shutil.rmtree(folder, ignore_errors=True)  # refused at load: replaced whole
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    leaves = []
    try:
        for i, (path, array) in enumerate(P.flatten(model.params)):
            name = f"{i}.npy"
            host = np.asarray(jax.device_get(array))
            np.save(tmp / name, host.astype(NARROW[str(array.dtype)]) if str(array.dtype) in NARROW else host)
            spec = [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec]
            leaves.append({"path": list(path), "file": name, "spec": spec, "dtype": str(array.dtype)})
        meta = {
            "identity": ident,
            "name": model.config.name,
            "config": model.config.to_hf_config(),
            "source": model.source,
            "tokenizer_path": model.tokenizer_path,
            "leaves": leaves,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, folder)
    except OSError as e:  # a full disk costs the next start the conversion, nothing else
        log.warning("params cache: not saved (%s)", e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
