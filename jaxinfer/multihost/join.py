"""Joining the cluster: JAX's distributed runtime first (so every process sees the global devices),
then the control channel and the handshake (`cluster`)."""

from __future__ import annotations

import logging

from jaxinfer.config import ConfigError
from jaxinfer.multihost import cluster as clusters
from jaxinfer.multihost.fingerprint import runtime_facts
from jaxinfer.multihost.flags import MultihostSpec

log = logging.getLogger("jaxinfer.multihost")


def join(spec: MultihostSpec, identity: dict, cpu_devices: int | None) -> clusters.Cluster:
    """Initialises `jax.distributed` (on CPU with `cpu_devices` host devices per process and gloo
    collectives), then connects the control channel and checks that every process's `identity`
    (flags and checkpoint, `fingerprint`) and runtime facts match process 0's."""
    import jax
    from jax._src import distributed

    if cpu_devices is not None:
        use_host_devices(cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        native_stdout_to_stderr()
    try:
        jax.distributed.initialize(
            spec.coordinator,
            spec.num_processes,
            spec.process_id,
            initialization_timeout=int(spec.startup_timeout),
        )
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--coordinator {spec.coordinator or 'auto'}: joining the cluster failed: {first}") from None
    pid, n = jax.process_index(), jax.process_count()
    host, _, port = distributed.global_state.coordinator_address.rpartition(":")
    control_port = spec.control_port or int(port) + 1
    fingerprint = {**identity, **runtime_facts()}
    cluster = clusters.Cluster(spec, pid, n)
    if cluster.is_leader:
        log.info("%s: waiting for %d worker(s) on control port %d", cluster.name(), n - 1, control_port)
        cluster.peers = clusters.listen(spec, host, control_port, fingerprint, n)
    else:
        cluster.peers = {0: clusters.connect(spec, host, control_port, fingerprint, pid)}
    cluster.start_threads()
    log.info(
        "%s joined: %d devices here, %d in all (%s)",
        cluster.name(),
        jax.local_device_count(),
        jax.device_count(),
        "serving and scheduling" if cluster.is_leader else "following process 0",
    )
    return cluster


def use_host_devices(count: int) -> None:
    """Exactly `count` host devices in this process (before JAX initialises): each process of a CPU
    cluster contributes its share of the mesh, so an inherited larger device count must not apply."""
    import os
    import re

    import jax

    from jaxinfer.sharding import ensure_host_devices

    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    ensure_host_devices(count)
    jax.config.update("jax_num_cpu_devices", count)


def native_stdout_to_stderr() -> None:
    """Gloo prints its connection messages on the process's stdout, where the batch job writes results:
    native code's fd 1 becomes stderr, and Python's `sys.stdout` keeps the original stdout."""
    import io
    import os
    import sys

    sys.stdout.flush()
    original = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(
        os.fdopen(original, "wb", buffering=0), encoding=sys.stdout.encoding, write_through=True
    )
