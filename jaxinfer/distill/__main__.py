"""`python -m jaxinfer.distill`: train a small speculative-decoding draft for a target on the target's outputs.

    python -m jaxinfer.distill                      # a feature head (1 block, 8192-token head) for SmolLM2
    python -m jaxinfer.distill --kind layers        # a 2-layer draft model instead
    python -m jaxinfer.distill --model tests/data/stories260K/stories260K.bin --layers 1 --head-vocab 128

The target answers chat requests and continues free text through the engine (greedy and seeded
sampling). `--kind head` (the default) trains a feature head on the target's hidden states over those
sequences (`jaxinfer.model.feature_head`: `--layers` MLP blocks); `--kind layers` a small model (same
tokenizer, `--layers` decoder layers). Either has a head over the `--head-vocab` tokens the target
writes most, and is trained with optax. The result is a native checkpoint that `--draft-model PATH`
loads; the report gives the held-out greedy acceptance proxy.
"""

from __future__ import annotations

import argparse
import sys

from jaxinfer.cli_common import setup_logging, user_errors
from jaxinfer.config import ConfigError
from jaxinfer.distill.draft import INIT_LAYERS

# each kind's defaults of the flags left unset: a feature head trains on many cheap positions per step
KIND_DEFAULTS = {
    "head": {"layers": 1, "train_steps": 3000, "batch": 256, "lr": 1e-3},
    "layers": {"layers": 2, "train_steps": 200, "batch": 16, "lr": 2e-3},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxinfer.distill",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="the target (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--out", default=None, help="checkpoint folder (default: <cache>/<target>-draft-L<layers>-H<head-vocab>)"
    )
    d = p.add_argument_group("draft")
    d.add_argument("--kind", default="head", help="head (a feature head, the default) | layers (a draft model)")
    d.add_argument("--layers", type=int, default=None, help="head: MLP blocks (default 1); layers: decoder layers (2)")
    d.add_argument("--head-vocab", type=int, default=8192, help="head tokens; 0: the target's full head (default 8192)")
    d.add_argument(
        "--init-layers",
        default=INIT_LAYERS[0],
        help=f"{' | '.join(INIT_LAYERS)}: which target layers the draft's start from (default {INIT_LAYERS[0]})",
    )
    d.add_argument(
        "--train-embed",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train the embedding table too (default: kept as the target's)",
    )
    g = p.add_argument_group("data (the target's outputs, cached per target and these flags)")
    g.add_argument("--prompts", type=int, default=320, help="training requests (default 320)")
    g.add_argument("--heldout", type=int, default=32, help="held-out greedy requests, on unseen topics (default 32)")
    g.add_argument("--new-tokens", type=int, default=128, help="answer tokens per request at most (default 128)")
    g.add_argument(
        "--data-cache", default=None, help="folder of the cached target outputs (default: <cache>/distill-data)"
    )
    g.add_argument("--gen-slots", type=int, default=32, help="requests the target runs at once (default 32)")
    t = p.add_argument_group("training")
    t.add_argument(
        "--train-steps", type=int, default=None, help="optimizer steps (head 3000, layers 200; 0: untrained)"
    )
    t.add_argument("--minutes", type=float, default=None, help="stop training after this wall time (not reproducible)")
    t.add_argument("--batch", type=int, default=None, help="per step: head positions (256), layers sequences (16)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (head 1e-3, layers 2e-3)")
    t.add_argument(
        "--kd", type=float, default=0.5, help="weight of the target's top-20 distribution in the loss (default 0.5)"
    )
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and batch order (default 0)")
    p.add_argument("--verbose", action="store_true")
    return p


def settings(args):
    """The flags as `Settings`, each value checked against its limit (one ConfigError line naming it)."""
    from jaxinfer.distill.pipeline import Settings

    def require(ok: bool, flag: str, value, limit: str) -> None:
        if not ok:
            raise ConfigError(f"{flag} {value}: {limit}")

    require(args.kind in KIND_DEFAULTS, "--kind", args.kind, f"must be one of {tuple(KIND_DEFAULTS)}")
    for flag, value in KIND_DEFAULTS[args.kind].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    require(1 <= args.layers <= 256, "--layers", args.layers, "must be in [1, 256]")
    require(args.head_vocab >= 0, "--head-vocab", args.head_vocab, "must be >= 0 (0: the full head)")
    require(args.kind != "head" or args.head_vocab > 0, "--head-vocab", args.head_vocab, "must be > 0 for --kind head")
    require(args.init_layers in INIT_LAYERS, "--init-layers", args.init_layers, f"must be one of {INIT_LAYERS}")
    require(0.0 <= args.kd <= 1.0, "--kd", args.kd, "must be in [0, 1]")
    require(0 <= args.seed < 2**31, "--seed", args.seed, "must be in [0, 2**31)")
    require(1 <= args.prompts <= 1_000_000, "--prompts", args.prompts, "must be in [1, 1000000]")
    require(1 <= args.heldout <= 100_000, "--heldout", args.heldout, "must be in [1, 100000]")
    require(1 <= args.new_tokens <= 8192, "--new-tokens", args.new_tokens, "must be in [1, 8192]")
    require(1 <= args.gen_slots <= 512, "--gen-slots", args.gen_slots, "must be in [1, 512]")
    require(args.train_steps >= 0, "--train-steps", args.train_steps, "must be >= 0")
    require(args.minutes is None or args.minutes > 0, "--minutes", args.minutes, "must be > 0")
    require(1 <= args.batch <= 4096, "--batch", args.batch, "must be in [1, 4096]")
    require(0 < args.lr <= 1, "--lr", args.lr, "must be in (0, 1]")
    return Settings(
        kind=args.kind,
        model=args.model,
        out=args.out,
        data_cache=args.data_cache,
        layers=args.layers,
        head_vocab=args.head_vocab,
        init_layers=args.init_layers,
        train_embed=args.train_embed,
        kd=args.kd,
        seed=args.seed,
        prompts=args.prompts,
        heldout=args.heldout,
        new_tokens=args.new_tokens,
        gen_slots=args.gen_slots,
        train_steps=args.train_steps,
        minutes=args.minutes,
        batch=args.batch,
        lr=args.lr,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with user_errors("jaxinfer.distill", (OSError,)):
        s = settings(args)
        from jaxinfer.cli_common import check_paths
        from jaxinfer.sharding import ensure_host_devices

        check_paths(args)  # a --model path that does not exist, before anything loads
        ensure_host_devices(1)
        from jaxinfer.distill.pipeline import run

        report = run(s)
        print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
