"""The platform policy: every platform-dependent choice, resolved once from the mesh.

Nothing else in the library looks at `jax.devices()` to decide anything; it asks the `Platform`
that the bootstrap (or the engine, for a bare `Engine(model, ...)`) resolved from the mesh:
  - `attention`: `pallas` (the Pallas ragged kernel) on TPU, `native` (the C++ FFI kernel) on CPU,
    `xla` elsewhere or when the native kernel cannot be built here (one log line says why);
  - `layer_loop`: `unrolled` on CPU (one array per layer, output-major weights; XLA:CPU copies
    scanned weights out of the stack before every matmul), `scan` on TPU and GPU (compile time
    independent of depth); the params take this layout through `jaxinfer.model.cpu_layout`;
  - `min_bucket`: the smallest token bucket, 1 on CPU (matmuls cost per token), 8 on TPU and GPU
    (a sublane tile; a short step is bound by reading the weights, so padding is free there);
  - `interpret`: Pallas kernels run in TPU interpret mode anywhere but on a TPU.
"""

from __future__ import annotations

import dataclasses
import logging

from jaxinfer.config import ConfigError

log = logging.getLogger(__name__)

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str  # cpu | gpu | tpu
    attention: str  # pallas | xla | native
    layer_loop: str  # scan | unrolled
    min_bucket: int
    interpret: bool  # Pallas kernels in TPU interpret mode


def mesh_platform(mesh) -> str:
    """The platform of a mesh's devices (a compile-only TPU topology description says tpu)."""
    return mesh.devices.flat[0].platform


def pallas_interpret(mesh) -> bool:
    """Pallas kernels run in TPU interpret mode on this mesh (it is not on TPUs)."""
    return mesh_platform(mesh) != "tpu"


def resolve(
    platform: str, attention: str = "auto", layer_loop: str = "auto", min_bucket: int | None = None, quiet: bool = False
) -> Platform:
    """The policy for `platform` with the user's choices applied; an impossible choice is a ConfigError."""
    if platform not in PLATFORMS:
        raise ConfigError(f"platform {platform!r}: must be one of {', '.join(PLATFORMS)}")
    return Platform(
        name=platform,
        attention=_attention(attention, platform, quiet),
        layer_loop=layer_loop_for(platform, layer_loop),
        min_bucket=min_bucket if min_bucket is not None else (1 if platform == "cpu" else 8),
        interpret=platform != "tpu",
    )


def for_mesh(mesh, attention: str = "auto", layer_loop: str = "auto", min_bucket: int | None = None) -> Platform:
    return resolve(mesh_platform(mesh), attention, layer_loop, min_bucket)


def _attention(kind: str, platform: str, quiet: bool) -> str:
    from jaxinfer import native

    if kind == "auto":
        if platform == "tpu":
            return "pallas"
        if platform == "cpu":
            if native.available():
                return "native"
            if not quiet:
                log.warning(
                    "--attention auto: using the XLA path; the native CPU kernel is unavailable: %s",
                    native.unavailable_reason(),
                )
        return "xla"
    if kind == "native":
        if platform != "cpu":
            raise ConfigError(f"--attention native: runs only on CPU; this mesh is on {platform}")
        if not native.available():
            raise ConfigError(f"--attention native: unavailable on this host: {native.unavailable_reason()}")
    if kind not in ("pallas", "xla", "native"):
        raise ConfigError(f"--attention {kind!r}: must be auto, pallas, xla or native")
    return kind


def layer_loop_for(platform: str, kind: str = "auto") -> str:
    """`auto` -> unrolled on CPU, scan elsewhere; an explicit kind as given."""
    if kind == "auto":
        return "unrolled" if platform == "cpu" else "scan"
    if kind not in ("scan", "unrolled"):
        raise ConfigError(f"--layer-loop {kind!r}: must be auto, scan or unrolled")
    return kind
