"""Device meshes and THE logical-axis -> mesh-axis table.

Every mesh has the three named axes `data`, `sequence`, `tensor`:
  - `data` splits independent work: batch rows, and in the engine whole KV-cache shards
    (each data shard owns its pages and its slots);
  - `sequence` splits the token axis of activations (long prefill);
  - `tensor` splits heads, the MLP hidden dimension and the vocabulary (Megatron style).

Parameters and cache leaves declare *logical* axes once (`vocab`, `embed`, `q_heads`, ...);
`LOGICAL_RULES` below is the only place that maps them to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Sequence

MESH_AXES = ("data", "sequence", "tensor")

# logical axis -> mesh axis (None = replicated). The single source of sharding truth: parameter
# shardings, the cache, step inputs and every `shard_map` spec derive from it.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "draft_vocab": None,
    "draft_in": None,  # a feature head's (`jaxinfer.model.feature_head`) weights: small, replicated
    "draft_mlp": None,
    # quantized weights' scale/offset group axes (`jaxinfer.quant.spec`): split like the axis they group
    "embed_groups": None,
    "head_dim_groups": None,
    "mlp_groups": "tensor",  # a reduced-vocabulary draft's head columns: small, replicated (`Llama._reduced_head`)
    # activations and step inputs: rows (dense batch rows, or the engine's data shards) and tokens
    "batch": "data",
    "length": "sequence",
    "act_heads": "tensor",
    # paged KV cache: each (data, sequence) shard owns a block of pages; KV heads split like the weights
    "cache_layers": None,
    "cache_pages": ("data", "sequence"),
    "cache_page_tokens": None,
    "cache_kv_heads": "tensor",
    "cache_head_dim": None,
}

MESH_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "mesh_configs"


class MeshError(ValueError):
    """A mesh request that cannot be satisfied; the message names the value and the limit."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the three mesh axes (plus optional chip facts from a preset)."""

    data: int = 1
    sequence: int = 1
    tensor: int = 1
    name: str = ""
    hbm_bytes_per_device: int | None = None
    hbm_bandwidth_bytes_per_s: float | None = None
    topology: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.sequence, self.tensor)

    @property
    def size(self) -> int:
        return self.data * self.sequence * self.tensor

    def __str__(self) -> str:
        return f"data={self.data},sequence={self.sequence},tensor={self.tensor}"


def parse_mesh(text: str) -> MeshSpec:
    """Parses `2x4` (data x tensor), `1x2x4` (data x sequence x tensor), `data=2,tensor=4`, or a preset name."""
    text = text.strip()
    if re.fullmatch(r"\d+(x\d+){0,2}", text):
        sizes = [int(s) for s in text.split("x")]
        if len(sizes) == 1:
            sizes = [1, 1, sizes[0]]
        elif len(sizes) == 2:
            sizes = [sizes[0], 1, sizes[1]]
        spec = MeshSpec(*sizes, name=text)
    elif "=" in text:
        sizes = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in MESH_AXES:
                raise MeshError(f"--mesh {text!r}: unknown axis {key!r}; axes are {', '.join(MESH_AXES)}")
            if not value.strip().isdigit():
                raise MeshError(f"--mesh {text!r}: axis {key} size {value!r} is not a positive integer")
            sizes[key] = int(value)
        spec = MeshSpec(**sizes, name=text)
    elif (MESH_CONFIG_DIR / f"{text}.yaml").exists():
        spec = load_mesh_preset(text)
    else:
        presets = ", ".join(sorted(p.stem for p in MESH_CONFIG_DIR.glob("*.yaml")))
        raise MeshError(
            f"--mesh {text!r}: expected DATAxTENSOR, DATAxSEQUENCExTENSOR, "
            f"data=N,sequence=N,tensor=N or a preset ({presets})"
        )
    for axis, size in zip(MESH_AXES, spec.shape):
        if size < 1:
            raise MeshError(f"--mesh {text!r}: axis {axis} size {size} must be >= 1")
    return spec


def load_mesh_preset(name: str) -> MeshSpec:
    import yaml

    path = MESH_CONFIG_DIR / f"{name}.yaml"
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    mesh = raw.get("mesh", {})
    return MeshSpec(
        data=int(mesh.get("data", 1)),
        sequence=int(mesh.get("sequence", 1)),
        tensor=int(mesh.get("tensor", 1)),
        name=name,
        topology=raw.get("topology"),
        hbm_bytes_per_device=int(raw["hbm_gib_per_device"] * 2**30) if raw.get("hbm_gib_per_device") else None,
        hbm_bandwidth_bytes_per_s=float(raw["hbm_gbps_per_device"]) * 1e9 if raw.get("hbm_gbps_per_device") else None,
    )


def ensure_host_devices(count: int) -> None:
    """Before JAX initialises: on a machine with no TPU or GPU, run on CPU with `count` host devices.

    Lets `--mesh 2x4` work on a laptop or CI box. A no-op once JAX is initialised, or when an
    accelerator is present (a mesh larger than its device count then fails in `make_mesh`).
    """
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if not platforms:
        if accelerator_present():
            return
        os.environ["JAX_PLATFORMS"] = "cpu"  # also keeps an installed libtpu from probing for a TPU
        jax.config.update("jax_platforms", "cpu")
    elif "cpu" not in platforms.split(","):
        return
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    current = max(jax.config.jax_num_cpu_devices, int(flag.group(1)) if flag else 1)
    if current < count:
        jax.config.update("jax_num_cpu_devices", count)


def accelerator_present() -> bool:
    """A TPU or NVIDIA GPU is attached (checked from device files, without initialising JAX)."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.path.exists("/dev/nvidia0"))


def make_mesh(spec: MeshSpec | str, devices: Sequence | None = None):
    """Builds a `jax.sharding.Mesh` with axes (data, sequence, tensor) over `devices` (default: all)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    if isinstance(spec, str):
        spec = parse_mesh(spec)
    if devices is None:
        ensure_host_devices(spec.size)
        devices = jax.devices()
    devices = list(devices)
    if spec.size > len(devices):
        raise MeshError(
            f"mesh {spec} needs {spec.size} devices but only {len(devices)} "
            f"{devices[0].platform.upper()} device(s) are available"
        )
    if spec.size < len(devices):
        devices = devices[: spec.size]
    try:
        grid = jax.experimental.mesh_utils.create_device_mesh(spec.shape, devices=devices)
    except Exception:  # non-physical host device sets: fall back to the given order
        grid = np.asarray(devices, dtype=object).reshape(spec.shape)
    return Mesh(grid, MESH_AXES)


def _axis_names(axis: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A LOGICAL_RULES value as the mesh axes it names: None -> (), "data" -> ("data",), a tuple as is."""
    return (axis,) if isinstance(axis, str) else axis or ()


def logical_to_mesh_axes(logical: Sequence[str | None]) -> tuple[str | None, ...]:
    """Maps logical axis names to mesh axes via `LOGICAL_RULES`, refusing collisions."""
    out, used = [], {}
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no entry in LOGICAL_RULES")
        axis = LOGICAL_RULES[name]
        for a in _axis_names(axis):
            if a in used:
                raise MeshError(f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r}")
            used[a] = name
        out.append(axis)
    return tuple(out)


def logical_spec(logical: Sequence[str | None]):
    """The PartitionSpec of an array with these logical axes (for `shard_map` in/out specs)."""
    from jax.sharding import PartitionSpec

    return PartitionSpec(*logical_to_mesh_axes(logical))


def logical_sharding(mesh, logical: Sequence[str | None], shape: Sequence[int] | None = None):
    """NamedSharding for an array with the given logical axes on `mesh`.

    With `shape`, a dimension that its mesh axis does not divide is replicated instead (callers that
    need exact splits pad first, see `jaxinfer.model.padding`); mesh axes of size 1 are dropped.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    axes = list(logical_to_mesh_axes(logical))
    for i, axis in enumerate(axes):
        if axis is None:
            continue
        kept = tuple(a for a in _axis_names(axis) if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in kept)
        if not kept or (shape is not None and shape[i] % size):
            axes[i] = None
        else:
            axes[i] = kept[0] if len(kept) == 1 else kept
    return NamedSharding(mesh, PartitionSpec(*axes))


def describe(mesh) -> str:
    dev = mesh.devices.flat[0]
    return f"mesh {dict(mesh.shape)} over {mesh.devices.size} {dev.platform.upper()} device(s)"


def device_names(mesh) -> list[str]:
    """'platform:kind:id' of each device of `mesh` in mesh order: what cached artifacts are tied to."""
    return [f"{d.platform}:{d.device_kind}:{d.id}" for d in mesh.devices.flat]


def ceil_to(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or `ShapeDtypeStruct`s (evenly split shards)."""
    import jax
    import numpy as np

    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )
