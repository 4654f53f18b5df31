"""Ahead-of-time compilation and memory planning for a deployment, from abstract shapes only.

`target` resolves what to compile for (a TPU topology compiled from any host, or this machine's
cpu/gpu/tpu devices) and its memory per device; `steps` lowers the engine's step for every token
bucket; `plan` turns the compiled memory figures into a per-device fit report; `manifest` writes and
checks the artifacts (serialized executables + manifest + persistent compile cache entries).
`python -m jaxinfer.aot` is the CLI; the engine's `--compile-cache` start-up uses `cache`.
"""
