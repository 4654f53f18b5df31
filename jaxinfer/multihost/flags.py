"""The multi-host flags shared by `jaxinfer.run`, `jaxinfer.serve` and `jaxinfer.aot`, checked once."""

from __future__ import annotations

import argparse
import dataclasses

from jaxinfer.config import ConfigError

AUTO = "auto"
DEFAULT_TIMEOUTS = {"heartbeat_timeout": 10.0, "startup_timeout": 300.0}  # seconds


@dataclasses.dataclass(frozen=True)
class MultihostSpec:
    coordinator: str | None  # HOST:PORT, or None for JAX's cluster auto-detection (TPU VMs)
    num_processes: int | None  # None: auto-detected
    process_id: int | None  # None: auto-detected
    control_port: int | None  # None: the coordinator's port + 1
    heartbeat_timeout: float
    startup_timeout: float

    @property
    def known_leader(self) -> bool:
        """Whether this process is known to be process 0 before the cluster forms."""
        return self.process_id == 0


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (one mesh over several processes; process 0 serves)")
    g.add_argument(
        "--coordinator",
        default=None,
        help="HOST:PORT of process 0 (JAX's coordinator), or 'auto' on TPU VMs (jax.distributed.initialize() "
        "detects the slice); absent: one process",
    )
    g.add_argument("--num-processes", type=int, default=None, help="processes in the mesh (with --coordinator)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 for the one that serves")
    g.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="process 0's port for step inputs and heartbeats (default: the coordinator's port + 1)",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        help=f"seconds without a heartbeat before a process counts as lost and every process exits "
        f"(default {DEFAULT_TIMEOUTS['heartbeat_timeout']:g})",
    )
    g.add_argument(
        "--startup-timeout",
        type=float,
        default=None,
        help=f"seconds to wait for every process to join at start-up (default {DEFAULT_TIMEOUTS['startup_timeout']:g})",
    )


def multihost_spec(args) -> MultihostSpec | None:
    """The flags as a `MultihostSpec`, or None for a single process; refuses inconsistent combinations."""
    coordinator = getattr(args, "coordinator", None)
    n, pid = getattr(args, "num_processes", None), getattr(args, "process_id", None)
    if coordinator is None:
        given = [("--num-processes", n), ("--process-id", pid), ("--control-port", args.control_port)]
        given += [(f"--{name.replace('_', '-')}", getattr(args, name, None)) for name in DEFAULT_TIMEOUTS]
        for flag, value in given:
            if value is not None:
                raise ConfigError(f"{flag} {value}: needs --coordinator HOST:PORT (or --coordinator auto)")
        return None
    if coordinator != AUTO:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65535:
            raise ConfigError(f"--coordinator {coordinator}: expected HOST:PORT (port 1-65534) or 'auto'")
        if n is None or pid is None:
            raise ConfigError(f"--coordinator {coordinator}: needs --num-processes and --process-id")
    if n is not None and n < 1:
        raise ConfigError(f"--num-processes {n}: must be >= 1")
    if pid is not None and (pid < 0 or (n is not None and pid >= n)):
        raise ConfigError(f"--process-id {pid}: must be in [0, {(n or 1) - 1}] for --num-processes {n}")
    if args.control_port is not None and not 0 < args.control_port <= 65535:
        raise ConfigError(f"--control-port {args.control_port}: must be in [1, 65535]")
    timeouts = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in DEFAULT_TIMEOUTS.items()
    }
    for name, value in timeouts.items():
        if not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} {value:g}: must be > 0")
    return MultihostSpec(
        None if coordinator == AUTO else coordinator,
        n,
        pid,
        args.control_port,
        timeouts["heartbeat_timeout"],
        timeouts["startup_timeout"],
    )
