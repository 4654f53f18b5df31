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
from jaxinfer.quant.quantize import quantize
from jaxinfer.quant.spec import NONE, QuantSpec, check_fits

MANIFEST = "jaxinfer.json"
FORMAT = "jaxinfer-orbax-v1"
CHUNK_BYTES = 16 << 20  # largest stored chunk of a parameter array


def is_native_checkpoint(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / MANIFEST).is_file()


def save(
    path: str | os.PathLike,
    config: ModelConfig,
    logical_params: P.Params,
    dtype,
    extra: dict | None = None,
    quant: QuantSpec = NONE,
):
    """Writes `logical_params` (unpadded tree, host or device arrays; quantized by `quant`, whose 4-bit
    codes are stored one per byte) to `path`."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    # stored in chunks of at most CHUNK_BYTES: a process restoring only its shards (multi-host, or a
    # tensor-parallel mesh) reads the chunks they overlap, not each whole array
    chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), logical_params)
    # stored as jax arrays, not numpy ones: Orbax restores a numpy-typed entry whole on every process
    cpu = jax.devices("cpu")[0]
    logical_params = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jax.device_put(a, cpu), logical_params)
    ckpt.save(path / "params", logical_params, save_args=chunked, force=True)
    ckpt.wait_until_finished()
    with open(path / "config.json", "w") as f:
        json.dump({**config.to_hf_config(), "_name_or_path": config.name}, f, indent=2)
    manifest = {"format": FORMAT, "dtype": jnp.dtype(dtype).name, "quant": quant.to_json(), **(extra or {})}
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


def manifest_quant(manifest: dict) -> QuantSpec:
    """The weight quantization a native checkpoint's manifest records: disabled for a float checkpoint,
    whose manifest names the label `none`."""
    return QuantSpec.from_json(manifest.get("quant"))


def restore(
    path: str | os.PathLike, mesh, dtype=None, quant: QuantSpec = NONE
) -> tuple[ModelConfig, ModelLayout, P.Params]:
    """Restores a native checkpoint onto `mesh` as sharded arrays in `dtype` (default: as saved), its
    weights quantized by `quant`: a float checkpoint is quantized on device leaf by leaf; a quantized one
    must have been written with the same spec."""

    path = pathlib.Path(path).absolute()
    manifest = read_manifest(path)
    config = ModelConfig.from_hf_config(path / "config.json")
    dtype = jnp.dtype(dtype or manifest["dtype"])
    stored = manifest_quant(manifest)
    if stored.enabled and stored.to_json() != quant.to_json():
        raise CheckpointError(
            f"{path}: written with --quantize {stored.label} ({stored.describe()}); loaded with --quantize "
            f"{quant.label}{_calibration_flag(quant)}: load it with the spec it was written with, or convert the "
            "float source again"
        )
    logical = plan_layout(config, 1, quiet=True)
    layout = plan_layout(config, mesh.shape["tensor"])
    check_fits(quant, config, layout.mlp, mesh.shape["tensor"])
    target = jax.tree.map(_disk_form, P.abstract_params(config, logical, dtype, mesh, stored))
    try:
        restored = _restore_leaf_by_leaf(path / "params", target)
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise CheckpointError(
            f"{path / 'params'}: cannot restore checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if layout == logical and not quant.enabled:
        return config, layout, restored
    axes = dict(P.flatten(P.logical_axes(config, layout, dtype, quant)))
    final = dict(P.flatten(P.abstract_params(config, layout, dtype, mesh, quant)))
    out = {}
    for leaf_path, array in P.flatten(restored):
        wq = None if stored.enabled else quant.get(leaf_path[-1])
        parts = [leaf_path] if wq is None else P.quantized_paths(leaf_path, wq)
        specs = [final[p] for p in parts]
        grouped = P.grouped_axis(axes[parts[-1]]) if wq is not None else None

        def prepare(a, ax=axes[leaf_path], specs=specs, wq=wq, grouped=grouped):
            a = P.pad_to_shape(P.pad_to_layout(a, ax, layout), specs[0].shape)
            if wq is None:
                return [a.astype(specs[0].dtype)]
            return [x for x in quantize(a, wq, grouped) if x is not None]

        placed = jax.jit(prepare, out_shardings=[s.sharding for s in specs])(array)
        del array
        for p, a in zip(parts, placed):
            P.set_path(out, p, a)
    return config, layout, out


def _calibration_flag(quant: QuantSpec) -> str:
    return "" if quant.calibration == "none" else f" --quantize-calibration {quant.calibration}"


def _disk_form(spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """How a leaf is stored: 4-bit codes one per byte (int8 / uint8), everything else as it is."""
    wide = {jnp.dtype(jnp.int4): jnp.int8, jnp.dtype(jnp.uint4): jnp.uint8}.get(jnp.dtype(spec.dtype), spec.dtype)
    return jax.ShapeDtypeStruct(spec.shape, wide, sharding=spec.sharding)


def _restore_leaf_by_leaf(path: pathlib.Path, target: P.Params) -> P.Params:
    """Restores `target`'s leaves (sharded ShapeDtypeStructs) one at a time: each process reads only the
    chunks of its own devices' shards, and its host memory holds at most one leaf's read buffers beside
    what is already placed (restoring the whole tree at once reads every leaf concurrently)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    out: P.Params = {}
    for leaf_path, spec in P.flatten(target):
        one, args = {}, {}
        P.set_path(one, leaf_path, spec)
        P.set_path(
            args, leaf_path, ocp.ArrayRestoreArgs(sharding=spec.sharding, global_shape=spec.shape, dtype=spec.dtype)
        )
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(one, restore_args=args, partial_restore=True))
        for k in leaf_path:
            restored = restored[k]
        P.set_path(out, leaf_path, restored)
    return out
