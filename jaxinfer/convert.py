"""`python -m jaxinfer.convert SRC DST`: convert a HF directory, GGUF or llama2.c file to a native checkpoint."""

from __future__ import annotations

import argparse
import pathlib

from jaxinfer.cli_common import setup_logging, tokenize, user_errors
from jaxinfer.quant.flags import add_quant_args, spec_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxinfer.convert", description=__doc__)
    parser.add_argument("src", help="HF directory (config.json + *.safetensors), .gguf file or llama2.c .bin")
    parser.add_argument("dst", help="output directory for the Orbax checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_quant_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    with user_errors("jaxinfer.convert"):
        from jaxinfer.config import ConfigError
        from jaxinfer.sharding import ensure_host_devices

        if pathlib.Path(args.dst).exists() and not pathlib.Path(args.dst).is_dir():
            raise ConfigError(f"{args.dst}: exists and is not a directory (DST is the checkpoint's directory)")

        ensure_host_devices(1)
        from jaxinfer.checkpoint.load import convert

        out = convert(args.src, args.dst, args.dtype, spec_from_args(args), tokenize)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
