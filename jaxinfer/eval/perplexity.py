"""Perplexity of a model on a text, scored through the serving engine's paged KV cache.

    python -m jaxinfer.eval.perplexity [--model M] [--dtype float32] [--mesh 1x1] [--text FILE]
                                       [--window 1024] [--stride 512] [--quantize int8|int4|gguf] [--kv-dtype int8]

The text's tokens are cut into windows of at most `window` tokens, each starting `stride` tokens after
the one before (the sliding-window recipe of Hugging Face's perplexity guide): every token is scored
once, in the first window that reaches it, given that window's tokens before it; a window's first token
is context only. Each window is one engine request asking for prompt logprobs, prefilled in chunks of
`prefill_chunk` tokens, so later chunks attend to K/V read back from the paged cache: the engine's KV
dtype and the model's weight format are both in the number. perplexity = exp(mean negative log-likelihood).

Loader and engine options pass through unchanged: `evaluate(..., engine_overrides={...}, **load_kwargs)`
(e.g. `quant=quant_spec("int8")` for `load_model`, `kv_dtype="int8"` for `EngineConfig`);
`supports_load_option` / `supports_engine_option` say whether this build has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import pathlib
import time

import numpy as np

from jaxinfer.config import ConfigError
from jaxinfer.quant.flags import add_quant_args, spec_from_args

# the fixed public-domain English text of the quality tests (its README says what it is), in a checkout
DEFAULT_TEXT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "perplexity_text.txt"
DEFAULT_WINDOW = 1024


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go into one request; [first_scored, end) are scored there."""

    begin: int
    end: int
    first_scored: int


@dataclasses.dataclass(frozen=True)
class Perplexity:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    windows: int
    window: int
    stride: int
    token_logprobs: np.ndarray  # f64 [tokens]: log p(token | the window's tokens before it), in text order
    compile_s: float  # the engine's warm-up
    score_s: float  # the scoring requests, after warm-up

    def summary(self) -> dict:
        """The JSON-able fields (no per-token array)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "token_logprobs"}


def windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows that score tokens 1..n_tokens-1 of a text once each (token 0 has no context)."""
    check_options(window, stride)
    if n_tokens < 2:
        raise ConfigError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    out, scored_to, begin = [], 1, 0
    while begin + 1 < n_tokens and scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        first = max(scored_to, begin + 1)  # with stride == window, each window's first token is context only
        if first < end:
            out.append(Window(begin, end, first))
            scored_to = end
        begin += stride
    return out


def check_options(window: int | None, stride: int | None, prefill_chunk: int = 1, max_slots: int = 1) -> None:
    """Refuses scoring options that cannot work (None: the default, decided with the model)."""
    if window is not None and window < 2:
        raise ConfigError(f"--window {window} must be >= 2 (a window scores the tokens after its first)")
    if stride is not None and not 1 <= stride <= (window or stride):
        limit = f"in [1, --window {window}]" if window is not None else ">= 1"
        raise ConfigError(f"--stride {stride} must be {limit}")
    if prefill_chunk < 1:
        raise ConfigError(f"--prefill-chunk {prefill_chunk} must be >= 1")
    if max_slots < 1:
        raise ConfigError(f"--max-slots {max_slots} must be >= 1")


def supports_load_option(name: str) -> bool:
    """Whether `jaxinfer.checkpoint.load.load_model` takes keyword `name` (e.g. "quant")."""
    from jaxinfer.checkpoint.load import load_model

    return name in inspect.signature(load_model).parameters


def supports_engine_option(name: str) -> bool:
    """Whether `EngineConfig` has field `name` (e.g. "kv_dtype")."""
    from jaxinfer.engine.config import EngineConfig

    return name in {f.name for f in dataclasses.fields(EngineConfig)}


def _require(kind: str, names, supported) -> None:
    for name in names:
        if not supported(name):
            raise ConfigError(f"--{name.replace('_', '-')}: this jaxinfer's {kind} has no {name!r} option")


def score(
    model,
    token_ids: list[int],
    window: int | None = None,
    stride: int | None = None,
    prefill_chunk: int = 256,
    max_slots: int = 4,
    engine_overrides: dict | None = None,
) -> Perplexity:
    """Perplexity of `token_ids` under `model` (a loaded `ShardedModel`), scored by an engine of its own.

    window: tokens per request (default: 1024, or the model's limit less one); stride: default window/2;
    max_slots: windows scored together (rounded up to the mesh's data axis); engine_overrides: more
    `EngineConfig` fields (attention, layer_loop, kv_dtype, ...). The engine compiles one step shape."""
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.requests import Request, SamplingParams

    limit = model.config.max_position_embeddings
    window = window if window is not None else min(DEFAULT_WINDOW, limit - 1)
    stride = stride if stride is not None else max(1, window // 2)
    if window + 1 > limit:
        raise ConfigError(f"--window {window} must be below the model's limit of {limit} positions")
    check_options(window, stride, prefill_chunk, max_slots)
    plan = windows(len(token_ids), window, stride)
    overrides = dict(engine_overrides or {})
    _require("EngineConfig", overrides, supports_engine_option)
    data = model.mesh.shape["data"]
    slots = -(-min(max_slots, len(plan)) // data) * data
    chunk = min(prefill_chunk, window)
    budget = chunk * (slots // data)  # every slot of a data shard prefills a whole chunk in each step
    config = EngineConfig(
        max_slots=slots,
        max_context=window + 1,  # the window and the one token each request must sample
        prefill_chunk=chunk,
        max_step_tokens=budget,
        min_bucket=budget,  # one step shape, one compile
        prefix_cache=False,  # windows overlap; every token must be computed (prompt logprobs need it anyway)
    )
    config = dataclasses.replace(config, **overrides)
    engine = Engine(model, None, config)
    compile_s = engine.warmup()
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, ignore_eos=True)
    requests = [Request(f"w{i}", list(token_ids[w.begin : w.end]), params) for i, w in enumerate(plan)]
    start = time.perf_counter()
    results = engine.generate(requests)
    score_s = time.perf_counter() - start
    picked = [np.asarray(r.prompt_logprobs[w.first_scored - w.begin :], np.float64) for w, r in zip(plan, results)]
    logprobs = np.concatenate(picked)
    nll = float(-logprobs.mean())
    return Perplexity(math.exp(nll), nll, len(logprobs), len(plan), window, stride, logprobs, compile_s, score_s)


def evaluate(
    spec: str | None,
    mesh,
    text: str,
    dtype: str = "float32",
    tokenizer: str | None = None,
    window: int | None = None,
    stride: int | None = None,
    prefill_chunk: int = 256,
    max_slots: int = 4,
    engine_overrides: dict | None = None,
    **load_kwargs,
) -> Perplexity:
    """Loads `spec` (any `--model`; None: the embedded SmolLM2) onto `mesh` with `load_kwargs` passed to
    `load_model` (layer_loop, quant, ...), tokenizes `text` as the model's tokenizer does by default
    (BOS where the model uses one) and scores it (`score`)."""
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.tokenizer import TokenizerError, load_tokenizer

    _require("load_model", load_kwargs, supports_load_option)
    model = load_model(spec, mesh, dtype, **load_kwargs)
    path = tokenizer or model.tokenizer_path
    if not path:
        raise TokenizerError(f"--tokenizer is required: no tokenizer found inside or beside {model.source}")
    ids = load_tokenizer(path).encode(text)
    overrides = dict(engine_overrides or {})
    if "layer_loop" in load_kwargs:
        overrides.setdefault("layer_loop", load_kwargs["layer_loop"])
    return score(model, ids, window, stride, prefill_chunk, max_slots, overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxinfer.eval.perplexity", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="any --model of jaxinfer.run (default: the embedded SmolLM2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path when it is not inside or beside the model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default="1x1", help="DATAxTENSOR, e.g. 1x1 or 2x4")
    p.add_argument("--text", default=None, help=f"a UTF-8 text file (default: {DEFAULT_TEXT.name} of the tests)")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: 1024 or the model's limit)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window/2)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens of one window per step")
    p.add_argument("--max-slots", type=int, default=4, help="windows scored together")
    p.add_argument("--attention", default="auto", choices=["auto", "pallas", "xla", "native"])
    p.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "unrolled"])
    add_quant_args(p)
    p.add_argument(
        "--kv-dtype", default="auto", help="KV cache dtype: auto (the model dtype), float32, bfloat16, int8 or fp8_e4m3"
    )
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from jaxinfer.cli_common import setup_logging, tokenize, user_errors

    setup_logging()
    with user_errors("jaxinfer.eval.perplexity"):
        text_path = pathlib.Path(args.text) if args.text else DEFAULT_TEXT
        if not text_path.is_file():
            raise ConfigError(f"--text {text_path}: no such file" + ("" if args.text else " (give --text FILE)"))
        text = text_path.read_text(encoding="utf-8")
        check_options(args.window, args.stride, args.prefill_chunk, args.max_slots)
        quant = spec_from_args(args)
        engine = {"attention": args.attention} | ({"kv_dtype": args.kv_dtype} if args.kv_dtype else {})
        _require("EngineConfig", engine, supports_engine_option)
        from jaxinfer.bootstrap import resolve_mesh
        from jaxinfer.cli_common import check_paths
        from jaxinfer.sharding import make_mesh

        check_paths(args)
        mesh = make_mesh(resolve_mesh(args.mesh))
        result = evaluate(
            args.model,
            mesh,
            text,
            args.dtype,
            args.tokenizer,
            args.window,
            args.stride,
            args.prefill_chunk,
            args.max_slots,
            engine,
            layer_loop=args.layer_loop,
            quant=quant,
            **({"tokenize": tokenize} if quant.calibration != "none" else {}),
        )
    report = dict(text=str(text_path), model=args.model, dtype=args.dtype, mesh=args.mesh, quantize=args.quantize)
    report |= {"quantize_group": args.quantize_group} if args.quantize_group else {}
    report |= {"quantize_calibration": quant.calibration} if quant.calibration != "none" else {}
    report |= ({"kv_dtype": args.kv_dtype} if args.kv_dtype else {}) | result.summary()
    print(
        f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of up to "
        f"{result.window} tokens, stride {result.stride}; compile {result.compile_s:.1f}s, score "
        f"{result.score_s:.1f}s)",
        flush=True,
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
