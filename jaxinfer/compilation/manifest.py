"""AOT artifacts on disk and the check that they belong to the running system.

`--out DIR` holds:
  manifest.json         model, mesh, engine flags, buckets, memory plan, target topology, versions;
  jaxinfer-steps/<key>/  the compiled steps in `StepStore` form (`jax.experimental.serialize_executable`
                        output, the device binaries), which `--compile-cache DIR` on the target loads
                        without tracing (only with the same jaxinfer, jax/jaxlib/libtpu and devices);
  *-cache               JAX persistent compilation cache entries of the other small programs compiled
                        meanwhile (the steps bypass it: see `compilation.cache.persistent_cache_bypassed`).
Anything that reads DIR first calls `check_manifest`, which refuses (with a message, never a crash)
artifacts built by other versions or for other devices.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import pickle

MANIFEST = "manifest.json"
FORMAT = "jaxinfer-aot/1"


class ManifestMismatch(ValueError):
    """AOT artifacts were built for different software versions or devices than this system."""


def versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("jax", "jaxlib", "libtpu"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def write(out: str, manifest: dict, files: dict[int | str, pathlib.Path]) -> pathlib.Path:
    """Writes `manifest` under `out`, listing the executables in `files` (bucket, or the name of another
    executable, -> path under `out`, written by `StepStore.save`, so `--compile-cache out` on the target
    loads them)."""
    root = pathlib.Path(out)
    root.mkdir(parents=True, exist_ok=True)
    executables = {str(b): str(pathlib.Path(f).relative_to(root)) for b, f in sorted(files.items(), key=_buckets_first)}
    manifest = {"format": FORMAT, **manifest, "versions": versions(), "executables": executables}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return root / MANIFEST


def _buckets_first(item) -> tuple:
    key = item[0]
    return (0, key, "") if isinstance(key, int) else (1, 0, key)


def read(root: str | pathlib.Path) -> dict:
    path = pathlib.Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestMismatch(f"{path}: unreadable AOT manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ManifestMismatch(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def running_system() -> dict:
    import jax

    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "num_devices": len(devices)}


def check_manifest(manifest: dict, system: dict | None = None, where: str = "AOT artifacts") -> None:
    """Raises ManifestMismatch naming every difference between what `manifest` was built for and this system."""
    system = system or running_system()
    target = manifest["target"]
    problems = [
        f"{pkg} {built} (this system has {versions()[pkg]})"
        for pkg, built in manifest["versions"].items()
        if versions().get(pkg) != built and (pkg != "libtpu" or target["platform"] == "tpu")
    ]
    if (target["platform"], target["device_kind"]) != (system["platform"], system["device_kind"]):
        problems.append(
            f"{target['device_kind']} ({target['platform']}) devices "
            f"(this system has {system['device_kind']} ({system['platform']}))"
        )
    if target["num_devices"] > system["num_devices"]:
        problems.append(f"{target['num_devices']} devices (this system has {system['num_devices']})")
    if problems:
        raise ManifestMismatch(
            f"{where} were built for topology {target['name']} with "
            + "; ".join(problems)
            + ": refusing to load them; recompile with python -m jaxinfer.aot on or for "
            "this system"
        )


def load_executables(root: str | pathlib.Path, system: dict | None = None) -> dict[int | str, object]:
    """Checks the manifest, then deserializes every executable: {bucket or name: jax.stages.Compiled}."""
    import jax
    from jax.experimental import serialize_executable

    root = pathlib.Path(root)
    manifest = read(root)
    check_manifest(manifest, system, where=str(root))
    if manifest.get("engine", {}).get("attention") == "native":  # its steps call the native CPU kernel by name
        from jaxinfer import native

        if not native.available():
            raise ManifestMismatch(
                f"{root}: built with --attention native, which is unavailable here: {native.unavailable_reason()}"
            )
    by_id = {d.id: d for d in jax.devices()}
    devices = [by_id[i] for i in manifest["target"]["device_ids"]]  # the mesh's devices, in mesh order
    return {
        (int(b) if b.isdigit() else b): serialize_executable.deserialize_and_load(
            *pickle.loads((root / f).read_bytes()), execution_devices=devices
        )
        for b, f in manifest["executables"].items()
    }


def check_cache_dir(path: str) -> None:
    """For `--compile-cache DIR`: when DIR holds AOT output, refuse it unless it matches this system."""
    if (pathlib.Path(path) / MANIFEST).exists():
        check_manifest(read(path), where=f"--compile-cache {path}")
