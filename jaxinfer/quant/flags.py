"""The weight-quantization flags every front end shares (`jaxinfer.run`, `.serve`, `.aot`, `.convert`)."""

from __future__ import annotations

import argparse

from jaxinfer.config import ConfigError
from jaxinfer.quant.spec import MODES, QuantSpec, quant_spec

CHOICES = MODES + ("gguf",)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weight quantization")
    g.add_argument(
        "--quantize",
        default="none",
        choices=CHOICES,
        help="weight-only quantization: int8 (per output channel, each scale searched for the least squared "
        "error), int4 (groups, with offsets), or gguf "
        "(a .gguf model's own quantized blocks, as stored; default: none)",
    )
    g.add_argument(
        "--quantize-group",
        type=int,
        default=None,
        help="weights per scale along each weight's input axis: int4 (default 128), int8 (default: one scale "
        "per output channel)",
    )
    g.add_argument(
        "--quantize-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also quantize the embedding table and lm_head, to int8 per channel (default: on; +0.2%% perplexity "
        "on SmolLM2, see the README)",
    )
    g.add_argument(
        "--quantize-calibration",
        default="none",
        help="how int8/int4 projection codes are chosen: none (round to nearest, default), gptq (GPTQ on a "
        "built-in public-domain calibration text, at load or convert time: minutes on CPU) or awq-gptq (AWQ-style "
        "input scales folded into the norms and up, then GPTQ: the best int4 quality)",
    )


def spec_from_args(args) -> QuantSpec:
    """The `QuantSpec` the flags ask for; `gguf` is resolved from the file when it loads."""
    mode = getattr(args, "quantize", "none")
    calibration = getattr(args, "quantize_calibration", "none")
    if mode == "gguf":
        if calibration != "none":
            raise ConfigError(f"--quantize-calibration {calibration}: a GGUF's blocks run as stored (--quantize gguf)")
        return QuantSpec("gguf")
    return quant_spec(mode, args.quantize_group, args.quantize_embeddings, calibration)
