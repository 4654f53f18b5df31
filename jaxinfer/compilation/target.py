"""What the AOT tool compiles for: a named TPU topology or this machine's devices, and each device's memory.

Named TPU topologies (`v5e:2x4`, `v5p:2x2x1`, ...) come from `jax.experimental.topologies`, which
libtpu provides on any host: XLA compiles for those chips without any being attached. `cpu`, `gpu`
and `tpu` mean the devices of this machine. A chip's HBM comes from the `mesh_configs/` presets
(`hbm_gib_per_device`), the one table of chip facts.
"""

from __future__ import annotations

import dataclasses
import math

from jaxinfer.sharding import MESH_CONFIG_DIR, MeshError, MeshSpec, parse_mesh

LOCAL = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # v5e:2x4, cpu, ...
    platform: str  # tpu | cpu | gpu
    device_kind: str  # e.g. "TPU v5 lite"
    devices: tuple  # the mesh's devices, row-major
    memory_bytes: int  # per device
    compile_only: bool  # devices are a topology description, not attached chips


def generation(topology: str) -> str:
    return topology.split(":")[0].lower()


def presets() -> dict[str, MeshSpec]:
    return {p.stem: parse_mesh(p.stem) for p in sorted(MESH_CONFIG_DIR.glob("*.yaml"))}


def chip_hbm_bytes(topology: str) -> int:
    """HBM of one chip of this topology's generation, from the presets that name that generation."""
    sizes = {
        p.hbm_bytes_per_device
        for p in presets().values()
        if p.topology and generation(p.topology) == generation(topology) and p.hbm_bytes_per_device
    }
    if len(sizes) != 1:
        known = sorted({generation(p.topology) for p in presets().values() if p.topology})
        raise MeshError(
            f"--topology {topology}: no HBM size for chip {generation(topology)!r} in "
            f"{MESH_CONFIG_DIR} (known: {', '.join(known)}); pass --device-memory-gib"
        )
    return sizes.pop()


def topology_chips(topology: str) -> int:
    return math.prod(int(n) for n in topology.split(":")[1].split("x"))


def default_mesh(topology: str) -> MeshSpec:
    """The preset for this topology when there is one, else every chip on `tensor`."""
    for spec in presets().values():
        if spec.topology == topology:
            return spec
    return parse_mesh(f"1x{topology_chips(topology)}")


def resolve(topology: str | None, mesh: str | None, memory_gib: float | None) -> tuple[Target, MeshSpec]:
    """Devices and memory for `--topology`/`--mesh`; a preset mesh with a topology implies the topology."""
    if memory_gib is not None and not memory_gib > 0:
        raise MeshError(f"--device-memory-gib {memory_gib:g}: must be > 0")
    spec = parse_mesh(mesh) if mesh else None
    topology = topology or (spec.topology if spec else None)
    if not topology:
        raise MeshError(
            "--topology is required (e.g. v5e:2x4, v5p:2x2x1, v6e:2x4, cpu) unless --mesh is a TPU preset such as v5e-8"
        )
    if topology in LOCAL:
        return _local(topology, spec or parse_mesh("1x1"), memory_gib)
    spec = spec or default_mesh(topology)
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu missing, or a name it does not know
        raise MeshError(
            f"--topology {topology}: cannot describe it ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); it needs the tpu extra (pip install -e .[tpu]) "
            f"and a name like v5e:2x4, v5p:2x2x1, v6e:2x4"
        ) from None
    if spec.size != len(devices):
        raise MeshError(
            f"--mesh {spec.name or spec} has {spec.size} devices but topology {topology} has "
            f"{len(devices)} chips; use a mesh whose sizes multiply to {len(devices)}"
        )
    memory = int(memory_gib * 2**30) if memory_gib else chip_hbm_bytes(topology)
    return Target(topology, "tpu", devices[0].device_kind, tuple(devices), memory, True), spec


def _local(platform: str, spec: MeshSpec, memory_gib: float | None) -> tuple[Target, MeshSpec]:
    from jaxinfer.kv_cache import device_memory, local_device
    from jaxinfer.sharding import make_mesh

    if platform == "cpu":
        from jaxinfer.sharding import ensure_host_devices

        ensure_host_devices(spec.size)
    import jax

    try:
        available = jax.devices(platform)
    except RuntimeError:
        raise MeshError(f"--topology {platform}: this machine has no {platform.upper()} devices") from None
    devices = tuple(make_mesh(spec, available).devices.flat)
    memory = int(memory_gib * 2**30) if memory_gib else device_memory(local_device(devices))[0]
    return Target(platform, platform, devices[0].device_kind, devices, memory, False), spec
