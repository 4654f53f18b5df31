"""Serialized step executables under `--compile-cache DIR`, so a restart loads them instead of tracing.

    DIR/jaxinfer-steps/<key>/signature.json      what the executables were built for
    DIR/jaxinfer-steps/<key>/bucket_<N>.xla      one compiled step per token bucket
    DIR/jaxinfer-steps/<key>/penalty_rows.xla    the sampler state's row writer (`RowSetter`)

The key hashes the signature: jaxinfer's own source, jax/jaxlib/libtpu versions, the devices and the
mesh, XLA_FLAGS, the model's architecture, layout and dtype, the platform policy, the KV cache and
step-input shapes (which is what --max-slots, --max-context, --page-size, --kv-pages and --dtype
change). A bucket's executable depends on nothing else, so a changed bucket set only adds files.
On a miss, one log line names the fields that differ from the closest signature on disk; an
unreadable or mismatched file is refused with one line naming it and rebuilt.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import pickle
import tempfile

import numpy as np

from jaxinfer.compilation.manifest import versions
from jaxinfer.paths import content_key, source_hash
from jaxinfer.sharding import device_names

log = logging.getLogger(__name__)

SUBDIR = "jaxinfer-steps"
_DEVICE_COUNT = "--xla_force_host_platform_device_count"  # already in "devices"; CPU hosts that AOT-compile set it
SIGNATURE = "signature.json"


def signature(engine) -> dict:
    """Everything the engine's step executables depend on, as JSON-able data. `engine` is an `Engine`
    or anything with the same parts (`compilation.steps.StepSpecs` for AOT): model, platform,
    cache_shape, inputs."""
    mesh = engine.model.mesh

    def plain(obj):
        return json.loads(json.dumps(dataclasses.asdict(obj), default=str))

    return {
        "jaxinfer_source": source_hash(),
        "versions": versions(),
        "xla_flags": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)),
        "devices": device_names(mesh),
        "mesh": dict(mesh.shape),
        "model": plain(engine.model.config),
        "layout": plain(engine.model.layout),
        "dtype": str(np.dtype(engine.model.dtype)),
        "layer_loop": engine.model.layer_loop,
        "quant": engine.model.quant.to_json(),
        # the smallest bucket only decides which bucket files exist, not what any of them holds
        "platform": {k: v for k, v in plain(engine.platform).items() if k != "min_bucket"},
        "cache": plain(engine.cache_shape),
        "inputs": plain(engine.inputs),
        "draft": plain(engine.draft.config) if getattr(engine, "draft", None) is not None else None,
    }


# the flag behind a signature field, for the line that says why the stored executables do not fit
FLAGS = {
    "inputs.slots_per_shard": "--max-slots",
    "cache.pages_per_shard": "--kv-pages",
    "inputs.pages_per_shard": "--kv-pages",
    "inputs.pages_per_slot": "--max-context",
    "cache.page_size": "--page-size",
    "inputs.page_size": "--page-size",
    "dtype": "--dtype",
    "cache.dtype": "--kv-dtype",
    "layer_loop": "--layer-loop",
    "quant.label": "--quantize",
    "platform.layer_loop": "--layer-loop",
    "platform.attention": "--attention",
    "mesh.data": "--mesh",
    "mesh.tensor": "--mesh",
    "inputs.data_shards": "--mesh",
    "cache.data_shards": "--mesh",
}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'field: old -> new' for every leaf that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            field = f"{prefix}{k}"
            flag = f"{FLAGS[field]} " if field in FLAGS else ""
            out.append(
                f"{flag}{field}: {a} -> {b}"
                if k != "devices"
                else f"devices: {len(a or [])} stored, e.g. "
                f"{(a or ['none'])[0]}; here {len(b or [])}, e.g. {(b or ['none'])[0]}"
            )
    return out


class StepStore:
    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root) / SUBDIR

    def load(self, engine, buckets, quiet: bool = False) -> dict:
        """{bucket: executable} for those of `buckets` on disk for exactly this engine (a bucket may also
        be the name of another executable, e.g. RowSetter.NAME); logs a miss unless `quiet` (the second
        load of one start-up, whose first already said it)."""
        sig = signature(engine)
        folder = self.root / content_key(sig)
        stored = self._read_signature(folder, quiet)
        if stored is None:
            if not quiet:
                self._log_miss(sig)
            return {}
        if stored != sig:
            if not quiet:
                log.warning("step cache %s refused: %s; rebuilding", folder, "; ".join(differences(stored, sig)))
            return {}
        if engine.platform.attention == "native":
            from jaxinfer import native

            native.load()  # the executables call the native kernel by name: register it first
        from jax.experimental.serialize_executable import deserialize_and_load

        devices = list(engine.model.mesh.devices.flat)  # the mesh's, not every device of the process

        def one(bucket):
            path = folder / _file_name(bucket)
            if not path.exists():
                return None
            try:
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                return deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
            except Exception as e:  # a truncated or foreign file: say so, compile it again
                log.warning("step cache %s refused: %s; rebuilding it", path, str(e).splitlines()[0][:200])
                return None

        # deserializing releases the GIL for most of its time: two at once take about half as long
        with concurrent.futures.ThreadPoolExecutor(min(len(buckets), os.cpu_count() or 1) or 1) as pool:
            loaded = dict(zip(buckets, pool.map(one, buckets)))
        return {b: x for b, x in loaded.items() if x is not None}

    def save(self, engine, executables: dict) -> dict[int, pathlib.Path]:
        """Writes `executables` (bucket -> compiled) for this engine (or AOT's `StepSpecs`); each file
        appears whole or not at all. Returns the files written."""
        from jax.experimental.serialize_executable import serialize

        sig = signature(engine)
        folder = self.root / content_key(sig)
        folder.mkdir(parents=True, exist_ok=True)
        if self._read_signature(folder, quiet=True) != sig:
            _write_atomic(folder / SIGNATURE, (json.dumps(sig, indent=1, sort_keys=True) + "\n").encode())
        files = {}
        for bucket, compiled in executables.items():
            try:
                data = pickle.dumps(serialize(compiled))
            except Exception as e:  # some backends cannot serialize; the next start compiles again
                log.warning("step cache: %s not saved: %s", _file_name(bucket), str(e).splitlines()[0][:200])
                continue
            files[bucket] = folder / _file_name(bucket)
            _write_atomic(files[bucket], data)
        return files

    @staticmethod
    def _read_signature(folder: pathlib.Path, quiet: bool = False) -> dict | None:
        try:
            return json.loads((folder / SIGNATURE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            if not quiet:
                log.warning("step cache %s refused: unreadable signature (%s); rebuilding", folder, e)
            return None

    def _log_miss(self, sig: dict) -> None:
        """One line: nothing stored yet, or which fields differ from the closest stored signature."""
        best = None
        for path in self.root.glob(f"*/{SIGNATURE}"):
            try:
                diff = differences(json.loads(path.read_text()), sig)
            except (OSError, json.JSONDecodeError):
                continue
            if best is None or len(diff) < len(best):
                best = diff
        if best is None:
            log.info("step cache miss: no executables stored in %s yet; compiling", self.root)
        else:
            log.info("step cache miss: stored executables were built for other values (%s); compiling", "; ".join(best))


def _file_name(key: int | str) -> str:
    return f"bucket_{key}.xla" if isinstance(key, int) else f"{key}.xla"


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
