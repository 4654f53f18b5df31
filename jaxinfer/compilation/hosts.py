"""Per-host view of a memory plan: the devices one process drives (one TPU VM host) and what it needs.

A multi-host slice runs one jaxinfer process per host (v5e:4x4 is 4 hosts of 4 chips); each process
places the weight shards of its own devices. Which chip belongs to which process is
`device.process_index`, from libtpu's topology description for a named topology. A host's HBM figures
are its devices' per-device figures added up. Loading also takes host RAM: a process reads its devices'
distinct shards (a replica on two of its chips once), and the loader (`model.params.build_params`)
holds one source tensor (one layer of a stacked weight kind, or the embedding) in host memory while it
places that tensor's slices. Their sum bounds a process's peak.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from jaxinfer.compilation.plan import MemoryPlan, format_bytes
from jaxinfer.model.params import flatten


@dataclasses.dataclass(frozen=True)
class HostPlan:
    hosts: int
    devices_per_host: int  # of the fullest host (the slices jaxinfer targets have equal hosts)
    per_device: MemoryPlan
    host_weights: int  # distinct weight bytes of one host's devices: what its process reads
    largest_tensor: int  # bytes of the largest source tensor, held whole on the host while its slices are placed
    largest_tensor_name: str

    @property
    def load_ram(self) -> int:
        """Host RAM a process needs to load its shards (an upper bound: see the module docstring)."""
        return self.host_weights + self.largest_tensor

    def rows(self) -> list[tuple[str, int]]:
        """The per-device rows times the devices of one host."""
        names = {"device memory": "HBM of its devices"}
        return [(names.get(name, name), value * self.devices_per_host) for name, value in self.per_device.rows()]

    def record(self) -> dict:
        """The manifest's per-host figures."""
        return {
            "hosts": self.hosts,
            "devices_per_host": self.devices_per_host,
            "weights": self.per_device.weights * self.devices_per_host,
            "kv": self.per_device.kv * self.devices_per_host,
            "total": self.per_device.total * self.devices_per_host,
            "memory": self.per_device.memory * self.devices_per_host,
            "host_weights": self.host_weights,
            "largest_tensor": self.largest_tensor,
            "largest_tensor_name": self.largest_tensor_name,
            "load_ram": self.load_ram,
        }


def devices_by_host(devices) -> dict[int, list]:
    """process index -> its devices, in mesh order."""
    hosts = collections.defaultdict(list)
    for device in devices:
        hosts[device.process_index].append(device)
    return dict(sorted(hosts.items()))


def host_shape(devices) -> tuple[int, int]:
    """(hosts, devices of the fullest host)."""
    hosts = devices_by_host(devices)
    return len(hosts), max(len(d) for d in hosts.values())


def build(per_device: MemoryPlan, devices, params) -> HostPlan:
    """`params`: the loader's abstract sharded parameter tree (`abstract_params` on the target's mesh)."""
    hosts = devices_by_host(devices)
    leaves = flatten(params)
    name, largest = max(((n, b) for path, leaf in leaves for n, b in [_source_tensor(path, leaf)]), key=lambda x: x[1])
    return HostPlan(
        *host_shape(devices),
        per_device=per_device,
        host_weights=max(_distinct_shard_bytes([leaf for _, leaf in leaves], set(d)) for d in hosts.values()),
        largest_tensor=largest,
        largest_tensor_name=name,
    )


def _source_tensor(path: tuple[str, ...], leaf) -> tuple[str, int]:
    """(name, bytes) of the largest array the loader holds whole for `leaf`: one layer of a stacked leaf."""
    if path[0] == "layers":
        return "/".join(path) + " (one layer)", _nbytes(leaf.shape[1:], leaf.dtype)
    return "/".join(path), _nbytes(leaf.shape, leaf.dtype)


def _distinct_shard_bytes(leaves, host_devices: set) -> int:
    """Bytes of the distinct slices `host_devices` hold (replicas on two of its devices count once)."""
    total = 0
    for leaf in leaves:
        indices = leaf.sharding.devices_indices_map(leaf.shape)
        slices = {_index_key(indices[d]) for d in host_devices}
        total += sum(_nbytes(_slice_shape(s, leaf.shape), leaf.dtype) for s in slices)
    return total


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop) for s in index)


def _slice_shape(key: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple((stop if stop is not None else n) - (start or 0) for (start, stop), n in zip(key, shape))


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def load_line(plan: HostPlan) -> str:
    return (
        f"host RAM to load one host's shards: up to {format_bytes(plan.load_ram)} = "
        f"{format_bytes(plan.host_weights)} of its devices' weights + {format_bytes(plan.largest_tensor)} "
        f"for the largest tensor ({plan.largest_tensor_name}, held whole while its slices are placed)"
    )
