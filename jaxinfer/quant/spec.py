"""What is quantized and how: `WeightQuant` per weight kind, `QuantSpec` for a whole model.

Groups run along each weight's LAST contraction (input) axis: `embed` for q/k/v/gate/up and the
lm_head, `head_dim` for o (so a group never straddles two heads, which tensor-parallel head padding
moves apart), `mlp` for down, and `embed` for the embedding table (whose rows are gathered, and which
a tied head contracts over `embed`). A group larger than its axis covers the whole axis; an axis that
is not a multiple of the group ends in one shorter group (SmolLM2's 576 with 128: 4 x 128 + 64). The
one axis that is split over `tensor`, `mlp`, must hold whole groups on every shard, else the spec is
refused.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jaxinfer.config import ConfigError, ModelConfig

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
EMBEDDINGS = ("embed", "lm_head")
MODES = ("none", "int8", "int4")
# how codes are chosen: round to nearest, GPTQ on calibration text, or GPTQ after AWQ-style input scales
CALIBRATIONS = ("none", "gptq", "awq-gptq")
KINDS = {"int8": jnp.int8, "int4": jnp.int4, "uint4": jnp.uint4}
# the logical axis of a scale's group dimension, by the contraction axis it groups
GROUP_AXES = {"embed": "embed_groups", "head_dim": "head_dim_groups", "mlp": "mlp_groups"}
# contraction axes of each weight kind as declared in `jaxinfer.model.llama` ([in..., out...]), and
# the embedding table's (stored [vocab, embed], contracted over embed by a tied head)
INPUT_AXES = {"o": 2, "embed": -1}


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """One weight kind's format: code dtype, group length along its last input axis, and whether it
    carries an offset (asymmetric: codes * scale + offset) or not (codes * scale)."""

    kind: str  # int8 | int4 | uint4
    group: int  # elements per group along the last contraction axis; >= that axis: one group per row
    offset: bool = False
    # 4-bit codes in XLA's 4-bit types (TPU and GPU hold them two per byte), or one per byte as int8
    # (CPU: arrays placed from the host and compiled steps disagree on XLA:CPU's int4 layouts, and the
    # native linear layer reads int8 codes 0..15 with an offset exactly as uint4 ones)
    narrow: bool = True

    @property
    def dtype(self):
        if not self.narrow and self.kind in ("int4", "uint4"):
            return jnp.dtype(jnp.int8)
        return jnp.dtype(KINDS[self.kind])

    def groups(self, length: int) -> int:
        """Groups along a contraction axis of `length` elements (the last may be shorter)."""
        return math.ceil(length / min(self.group, length))


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """The whole model's weight quantization: a label (`int8`, `int4`, `gguf:Q4_1`, ...) and the format of
    every quantized weight kind; kinds not listed stay in the model's float dtype. Frozen and hashable:
    it is part of the Flax module and of every cache key."""

    label: str = "none"
    weights: tuple[tuple[str, WeightQuant], ...] = ()
    calibration: str = "none"  # `CALIBRATIONS`: the same format, other codes (so part of every cache key)

    @property
    def enabled(self) -> bool:
        return bool(self.weights)

    def for_platform(self, platform: str) -> QuantSpec:
        """This spec with 4-bit codes stored one per byte on CPU (see `WeightQuant.narrow`)."""
        narrow = platform != "cpu"
        return dataclasses.replace(
            self, weights=tuple((n, dataclasses.replace(w, narrow=narrow)) for n, w in self.weights)
        )

    def get(self, name: str) -> WeightQuant | None:
        for n, w in self.weights:
            if n == name:
                return w
        return None

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        formats: dict[str, list[str]] = {}
        for name, w in self.weights:
            group = "per channel" if w.group >= 1 << 30 else f"groups of {w.group}"
            formats.setdefault(f"{w.kind} {group}{' with offsets' if w.offset else ''}", []).append(name)
        how = "" if self.calibration == "none" else f", projections calibrated by {self.calibration}"
        return f"{self.label}: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in sorted(formats.items())) + how

    def to_json(self) -> dict:
        weights = {n: {k: v for k, v in dataclasses.asdict(w).items() if k != "narrow"} for n, w in self.weights}
        calibrated = {} if self.calibration == "none" else {"calibration": self.calibration}
        return {"label": self.label, "weights": weights} | calibrated

    @classmethod
    def from_json(cls, raw: dict | None) -> QuantSpec:
        if not raw:
            return NONE
        weights = tuple(sorted((n, WeightQuant(**w)) for n, w in raw["weights"].items()))
        return cls(raw["label"], weights, raw.get("calibration", "none"))


NONE = QuantSpec()


def quant_spec(mode: str, group: int | None = None, embeddings: bool = True, calibration: str = "none") -> QuantSpec:
    """The spec `--quantize MODE [--quantize-group GROUP] [--no-quantize-embeddings]
    [--quantize-calibration gptq]` asks for.

    int8: symmetric, one scale per output channel (one group spanning the whole input), or per group
    of `group` when one is given (as GGUF's Q8_0 with 32). int4: asymmetric 4-bit codes (uint4 with a
    per-group offset, as GGUF's Q4_1 and AWQ store them), groups of `group` (default 128). Embeddings
    (the table and an untied lm_head) are quantized to int8 per channel in both
    modes unless `embeddings` is False: they are read once per token like every other weight, and a
    4-bit vocabulary head costs small models most of their int4 quality loss. `calibration` gptq
    chooses the projections' codes by GPTQ on calibration text (`jaxinfer.checkpoint.calibrate`).
    """
    if mode not in MODES:
        raise ConfigError(f"--quantize {mode!r}: must be one of {', '.join(MODES)}")
    if group is not None and (not isinstance(group, int) or group < 2 or group % 2):
        raise ConfigError(f"--quantize-group {group!r}: must be an even integer >= 2")
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"--quantize-calibration {calibration!r}: must be one of {', '.join(CALIBRATIONS)}")
    if mode == "none":
        if calibration != "none":
            raise ConfigError(f"--quantize-calibration {calibration}: needs --quantize int8 or int4 (got none)")
        return NONE
    per_channel = WeightQuant("int8", 1 << 30)
    if mode == "int8":
        body = per_channel if group is None else WeightQuant("int8", group)
    else:
        body = WeightQuant("uint4", group or 128, offset=True)
    weights = [(n, body) for n in PROJECTIONS]
    if embeddings:
        weights += [(n, per_channel) for n in EMBEDDINGS]
    return QuantSpec(mode, tuple(sorted(weights)), calibration)


def check_fits(spec: QuantSpec, config: ModelConfig, mlp: int, tensor: int) -> None:
    """Refuses a spec whose groups would straddle a tensor shard of the MLP (the one grouped axis that
    is split over `tensor`): `mlp` is the layout's padded MLP size."""
    down = spec.get("down")
    if down is None or down.group >= config.intermediate_size:
        return
    share = mlp // tensor
    if config.intermediate_size % down.group or share % down.group:
        raise ConfigError(
            f"--quantize-group {down.group}: does not divide the MLP dimension of {config.name} "
            f"(intermediate_size {config.intermediate_size}, {share} per tensor shard of {tensor}); "
            f"use a group that divides {math.gcd(config.intermediate_size, share)}"
        )
