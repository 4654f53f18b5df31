"""jaxinfer's native checkpoint: an Orbax PyTree checkpoint of the *unpadded* parameter tree plus the
model config (HF `config.json` form) and a small `jaxinfer.json` manifest.

Storing the unpadded tree makes one checkpoint restorable onto any mesh: leaves are restored
directly as sharded arrays, and when the target mesh needs padded heads/MLP/vocab
(`jaxinfer.model.layout`) the padding runs on device, leaf by leaf, inside `jit`.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.config import ModelConfig
from jaxinfer.model import params as P
from jaxinfer.model.layout import ModelLayout, plan_layout

MANIFEST = "jaxinfer.json"
FORMAT = "jaxinfer-orbax-v1"


def is_native_checkpoint(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / MANIFEST).is_file()


def save(path: str | os.PathLike, config: ModelConfig, logical_params: P.Params, dtype, extra: dict | None = None):
    """Writes `logical_params` (unpadded tree, host or device arrays) to `path`."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / "params", logical_params, force=True)
    ckpt.wait_until_finished()
    with open(path / "config.json", "w") as f:
        json.dump({**config.to_hf_config(), "_name_or_path": config.name}, f, indent=2)
    manifest = {"format": FORMAT, "dtype": jnp.dtype(dtype).name, **(extra or {})}
    with open(path / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)


def read_manifest(path: str | os.PathLike) -> dict:
    path = pathlib.Path(path)
    try:
        with open(path / MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def restore(path: str | os.PathLike, mesh, dtype=None) -> tuple[ModelConfig, ModelLayout, P.Params]:
    """Restores a native checkpoint onto `mesh` as sharded arrays in `dtype` (default: as saved)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    manifest = read_manifest(path)
    config = ModelConfig.from_hf_config(path / "config.json")
    dtype = jnp.dtype(dtype or manifest["dtype"])
    logical = plan_layout(config, 1, quiet=True)
    layout = plan_layout(config, mesh.shape["tensor"])
    target = P.abstract_params(config, logical, dtype, mesh)
    try:
        restored = ocp.StandardCheckpointer().restore(path / "params", target)
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise CheckpointError(
            f"{path / 'params'}: cannot restore checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if layout == logical:
        return config, layout, restored
    axes = dict(P.flatten(P.logical_axes(config, layout, dtype)))
    shardings = dict(P.flatten(P.param_shardings(mesh, config, layout, dtype)))
    padded = {}
    for leaf_path, array in P.flatten(restored):
        pad = jax.jit(lambda a, ax=axes[leaf_path]: P.pad_to_layout(a, ax, layout), out_shardings=shardings[leaf_path])
        P.set_path(padded, leaf_path, pad(array))
        del array
    return config, layout, padded
