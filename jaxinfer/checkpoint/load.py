"""Loading a model onto a mesh from any supported source, and converting sources to the native format.

`--model` accepts: a preset name (random weights: benchmarks, AOT), a native (Orbax) checkpoint
directory, a Hugging Face directory, a GGUF file, or a llama2.c `.bin`; nothing means the embedded
default model (SmolLM2-135M-Instruct), converted once into a cache directory on first use.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxinfer.checkpoint import calibrate, orbax_store
from jaxinfer.checkpoint.default_model import DEFAULT_MODEL, smollm2_gguf_path
from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.hf_layout import layer_from_hf, logical_leaf_from_hf
from jaxinfer.checkpoint.open_source import open_source
from jaxinfer.checkpoint.stored_quant import stored_leaf, stored_spec
from jaxinfer.config import PRESETS, get_preset
from jaxinfer.model import params as P
from jaxinfer.model.forward import ShardedModel
from jaxinfer.model.layout import plan_layout
from jaxinfer.paths import default_cache_dir
from jaxinfer.platform import layer_loop_for, mesh_platform
from jaxinfer.quant.spec import NONE, QuantSpec, check_fits

log = logging.getLogger(__name__)

Tokenize = Callable[[str, str], list[int]]  # (tokenizer path, text) -> token ids


def parse_dtype(name) -> jnp.dtype:
    aliases = {"bf16": "bfloat16", "f32": "float32", "fp32": "float32"}
    name = aliases.get(str(name), str(name))
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype {name!r}: must be bfloat16 or float32")
    return jnp.dtype(name)


def resolve_source(spec: str | None) -> str:
    """`spec` with the default model resolved to its converted checkpoint (converting it on first use)."""
    return str(ensure_default_model()) if spec in (None, "", DEFAULT_MODEL) else spec


def load_model(
    spec: str | None,
    mesh,
    dtype="float32",
    seed: int = 0,
    layer_loop: str = "auto",
    quant: QuantSpec = NONE,
    tokenize: Tokenize | None = None,
) -> ShardedModel:
    """Loads `spec` (see module docstring) onto `mesh` as sharded `dtype` parameters, in the layer loop
    `layer_loop` (auto: the platform's, see `jaxinfer.platform`), with the weights `quant` names quantized
    (`jaxinfer.quant`; a quantized native checkpoint must be loaded with the spec it was written with).
    A calibrated `quant` (`--quantize-calibration`) needs `tokenize(tokenizer_path, text) -> ids` for
    its calibration text (the tokenizer lives a layer beside this one)."""
    platform = mesh_platform(mesh)
    kind = layer_loop_for(platform, layer_loop)
    quant = quant.for_platform(platform)
    if quant.calibration != "none" and not _stored_quantized(spec):
        return _calibrated(spec, mesh, parse_dtype(dtype), seed, quant, tokenize).with_layer_loop(kind)
    return _load(spec, mesh, parse_dtype(dtype), seed, quant).with_layer_loop(kind)


def _stored_quantized(spec: str | None) -> bool:
    """Whether `spec` is a native checkpoint that stores quantized weights (restored as they are)."""
    path = pathlib.Path(resolve_source(spec))
    if not orbax_store.is_native_checkpoint(path):
        return False
    return orbax_store.manifest_quant(orbax_store.read_manifest(path)).enabled


def _calibrated(spec, mesh, dtype, seed: int, quant: QuantSpec, tokenize: Tokenize | None) -> ShardedModel:
    """The float model, then its weights quantized with calibration (`jaxinfer.checkpoint.calibrate`)."""
    model = _load(spec, mesh, dtype, seed, NONE)
    check_fits(quant, model.config, model.layout.mlp, mesh.shape["tensor"])
    if tokenize is None or not model.tokenizer_path:
        raise CheckpointError(
            f"--quantize-calibration {quant.calibration}: needs the model's tokenizer for its calibration text"
            + ("" if model.tokenizer_path else f" (none found inside or beside {model.source})")
        )
    text = calibrate.TEXT.read_text(encoding="utf-8")
    rows = calibrate.token_rows(tokenize(model.tokenizer_path, text))
    return calibrate.quantize_calibrated(model, quant, rows)


def _load(spec: str | None, mesh, dtype, seed: int, quant: QuantSpec) -> ShardedModel:
    if quant.label == "gguf" and spec in (None, "", DEFAULT_MODEL):
        spec = str(smollm2_gguf_path())  # its blocks as stored, not the float conversion in the cache
    spec = resolve_source(spec)
    if spec in PRESETS:
        config = get_preset(spec)
        layout = plan_layout(config, mesh.shape["tensor"])
        check_fits(quant, config, layout.mlp, mesh.shape["tensor"])
        log.warning("model %s: preset architecture with RANDOM weights (seed %d)", spec, seed)
        params = P.init_params(config, layout, mesh, dtype, seed, quant)
        return ShardedModel(config, layout, mesh, params, dtype, source=f"preset:{spec}", quant=quant)
    path = pathlib.Path(spec)
    if not path.exists():
        raise CheckpointError(
            f"{spec}: no such file or directory, and not a preset (presets: {', '.join(sorted(PRESETS))})"
        )
    if orbax_store.is_native_checkpoint(path):
        if quant.label == "gguf":
            raise CheckpointError(f"--quantize gguf: {path} is a native checkpoint; it runs a .gguf file's blocks")
        config, layout, params = orbax_store.restore(path, mesh, dtype, quant)
        manifest = orbax_store.read_manifest(path)
        tokenizer = _resolve_tokenizer(path, manifest)
        return ShardedModel(config, layout, mesh, params, dtype, str(path), tokenizer, quant=quant)
    with open_source(path) as source:
        config = source.config
        layout = plan_layout(config, mesh.shape["tensor"])
        if quant.label == "gguf":
            quant = stored_spec(source).for_platform(mesh_platform(mesh))
            log.info("--quantize gguf: %s", quant.describe())
        check_fits(quant, config, layout.mlp, mesh.shape["tensor"])
        whole, layer = _leaf_readers(source, quant)
        params = P.build_params(config, layout, mesh, dtype, whole, layer, quant)
    return ShardedModel(config, layout, mesh, params, dtype, str(path), find_tokenizer(path), quant=quant)


def _leaf_readers(source, quant: QuantSpec):
    """(whole(path), layer(path, i)): a parameter's unpadded float array from the source, or, for weights
    run as stored (`--quantize gguf`), its (codes, scale, offset)."""
    stored = quant.label == "gguf"

    def whole(path):
        if stored and quant.get(path[-1]):
            return stored_leaf(source, path[-1], None, quant.get(path[-1]))
        return logical_leaf_from_hf(source, path)

    def layer(path, i):
        if stored and quant.get(path[-1]):
            return stored_leaf(source, path[-1], i, quant.get(path[-1]))
        return layer_from_hf(source, path, i)

    return whole, layer


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype="float32",
    quant: QuantSpec = NONE,
    tokenize: Tokenize | None = None,
) -> pathlib.Path:
    """Converts a HF directory / GGUF / llama2.c file into a native checkpoint at `dst`, its weights
    quantized by `quant` (`gguf`: a GGUF's blocks as stored; calibrated: see `load_model`'s `tokenize`)
    and stored with the spec in the manifest."""
    from jaxinfer.sharding import make_mesh

    dtype = parse_dtype(dtype)
    if quant.calibration != "none":
        tree = _calibrated(str(src), make_mesh("1x1"), dtype, 0, quant, tokenize).params
    else:
        tree = _build(src, dtype, quant)
    _save(src, dst, dtype, quant, tree)
    return pathlib.Path(dst)


def _build(src, dtype, quant: QuantSpec):
    """A source's params on one device, unpadded, quantized by `quant` as read."""
    from jaxinfer.sharding import make_mesh

    with open_source(src) as source:
        config = source.config
        logical = plan_layout(config, 1, quiet=True)
        if quant.label == "gguf":
            quant = stored_spec(source)
        whole, layer = _leaf_readers(source, quant)
        return P.build_params(config, logical, make_mesh("1x1"), dtype, whole, layer, quant)


def _save(src, dst, dtype, quant: QuantSpec, tree) -> None:
    import jax

    with open_source(src) as source:
        config = source.config
        if quant.label == "gguf":
            quant = stored_spec(source)
    narrow = {jnp.dtype(jnp.int4): np.int8, jnp.dtype(jnp.uint4): np.uint8}  # 4-bit codes: one per byte on disk
    tree = jax.tree.map(lambda a: np.asarray(a).astype(narrow.get(a.dtype, a.dtype)), tree)
    tokenizer = find_tokenizer(src)
    orbax_store.save(
        dst,
        config,
        tree,
        dtype,
        extra={
            "source": str(pathlib.Path(src).absolute()),
            "tokenizer": str(pathlib.Path(tokenizer).absolute()) if tokenizer else None,
        },
        quant=quant,
    )


def find_tokenizer(path: str | os.PathLike) -> str | None:
    """The tokenizer that belongs to a checkpoint: inside a HF dir, inside a GGUF, or beside a .bin."""
    path = pathlib.Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).exists():
                return str(path)
        return None
    if path.suffix == ".gguf":
        return str(path)
    candidates = sorted(path.parent.glob("tok*.bin")) + sorted(path.parent.glob("tokenizer.model"))
    return str(candidates[0]) if candidates else None


def _resolve_tokenizer(ckpt: pathlib.Path, manifest: dict) -> str | None:
    tok = manifest.get("tokenizer")
    if tok and os.path.exists(tok):
        return tok
    return find_tokenizer(ckpt)


def ensure_default_model(dtype="float32") -> pathlib.Path:
    """Converts the embedded SmolLM2-135M-Instruct GGUF into the cache once; returns the native dir."""
    dst = default_cache_dir() / f"{DEFAULT_MODEL}-{parse_dtype(dtype).name}"
    if orbax_store.is_native_checkpoint(dst):
        return dst
    gguf = smollm2_gguf_path()
    log.info("first use: converting %s into %s", gguf, dst)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    convert(gguf, tmp, dtype)
    try:
        os.rename(tmp, dst)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
