"""Start-up, the one way: flags -> mesh -> platform -> model -> tokenizer -> Engine.

The batch job, the server and the AOT tool declare the shared flags with `add_model_args`; the batch
job and the server start their engine with `build_engine`, the AOT tool builds the same
`EngineConfig` with `engine_config`. Each front end checks the paths it was given (`cli_common.check_paths`)
before anything is loaded, and a mesh the engine cannot serve is refused before the model is read.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time

from jaxinfer.config import ConfigError
from jaxinfer.quant.flags import add_quant_args, spec_from_args

log = logging.getLogger("jaxinfer")

DEFAULT_MAX_CONTEXT = 1024


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by the batch job, the server and the AOT tool."""
    p.add_argument(
        "--mesh",
        default=None,
        help="2x4 (data x tensor), data=2,tensor=4 or a preset (default: 2x4 on CPU, all devices on tensor otherwise)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="preset, native checkpoint dir, HF dir, .gguf or llama2.c .bin (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer path when it is not inside or beside the model")
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template file that replaces the tokenizer's (e.g. for a model that has none)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_quant_args(p)
    e = p.add_argument_group("engine")
    e.add_argument("--max-slots", type=int, default=8)
    e.add_argument(
        "--max-context",
        type=int,
        default=None,
        help=f"prompt + output tokens per request (default: {DEFAULT_MAX_CONTEXT}, or the model's limit when smaller)",
    )
    e.add_argument("--prefill-chunk", type=int, default=256, help="most prompt tokens of one request per step")
    e.add_argument(
        "--max-step-tokens",
        type=int,
        default=None,
        help="tokens per data shard per step (default: max(--prefill-chunk, slots per shard))",
    )
    e.add_argument(
        "--min-bucket",
        type=int,
        default=None,
        help="the smallest step shape, in tokens per data shard (default: the platform's, 1 on CPU, 8 on TPU "
        "and GPU); a larger one compiles fewer shapes at start-up and pads small steps up to it",
    )
    e.add_argument("--page-size", type=int, default=16)
    e.add_argument("--kv-pages", type=int, default=None, help="KV pages per (data, sequence) shard, i.e. per device")
    e.add_argument("--kv-memory-fraction", type=float, default=None)
    e.add_argument(
        "--kv-dtype",
        default="auto",
        help="KV cache storage: auto (the model's --dtype), float32, bfloat16, int8 (a float32 scale per token "
        "and KV head) or fp8_e4m3",
    )
    e.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "pallas", "xla", "native"],
        help="auto: the Pallas kernel on TPU, the native C++ kernel on CPU, XLA elsewhere",
    )
    e.add_argument(
        "--layer-loop",
        default="auto",
        choices=["auto", "scan", "unrolled"],
        help="auto: unrolled on CPU (faster there), scan elsewhere (compile time independent of depth)",
    )
    e.add_argument("--strict-no-recompile", action="store_true")
    e.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV pages of prompt prefixes computed before (default: on)",
    )
    e.add_argument(
        "--speculative",
        default="none",
        choices=["none", "ngram", "draft"],
        help="speculative decoding: ngram (prompt lookup) or draft (--draft-model) proposals, verified exactly",
    )
    e.add_argument("--num-speculative-tokens", type=int, default=4, help="proposals per verify window (K)")
    e.add_argument("--draft-model", default=None, help="the draft model of --speculative draft (same tokenizer)")
    e.add_argument(
        "--speculative-adaptive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="speculate per slot only while the measured acceptance makes it pay at the batch size (default: on)",
    )
    e.add_argument(
        "--compile-cache",
        default=None,
        help="directory for the compiled steps (a restart loads them untraced) and JAX's persistent compilation cache",
    )
    p.add_argument("--verbose", action="store_true")
    from jaxinfer.multihost.flags import add_args

    add_args(p)


# flags that may differ between the processes of one mesh (the checkpoint is compared by content)
PER_PROCESS_FLAGS = frozenset(
    {"model", "tokenizer", "chat_template", "compile_cache", "verbose", "process_id", "control_port"}
    | {"heartbeat_timeout", "startup_timeout", "coordinator"}
)


def engine_flags(args) -> dict:
    """The values of the shared flags (`add_model_args`) that every process of one mesh must agree on."""
    p = argparse.ArgumentParser(add_help=False)
    add_model_args(p)
    return {a.dest: getattr(args, a.dest) for a in p._actions if a.dest not in PER_PROCESS_FLAGS}


def join_cluster(args):
    """With --coordinator: joins the multi-host cluster (`jaxinfer.multihost`) before JAX picks its
    devices, refusing processes whose flags, versions, checkpoint or device counts differ; else None."""
    from jaxinfer.multihost.flags import multihost_spec

    spec = multihost_spec(args)
    if spec is None:
        return None
    from jaxinfer.multihost.fingerprint import flag_facts, model_fact
    from jaxinfer.multihost.join import join
    from jaxinfer.sharding import accelerator_present, parse_mesh

    cpu_devices = None
    if not accelerator_present():
        if spec.coordinator is None:
            raise ConfigError(
                "--coordinator auto: JAX detects TPU slices, not CPU processes; on CPU give "
                "--coordinator HOST:PORT --num-processes N --process-id I"
            )
        mesh = mesh_spec(args.mesh)
        n = spec.num_processes or 1
        if mesh.size % n:
            raise ConfigError(f"--mesh {mesh}: its {mesh.size} devices do not split evenly over --num-processes {n}")
        cpu_devices = mesh.size // n
    cluster = join(spec, {**flag_facts(engine_flags(args)), **model_fact(args.model)}, cpu_devices)
    import jax

    size = parse_mesh(args.mesh).size if args.mesh else jax.device_count()
    if size != jax.device_count():
        raise ConfigError(
            f"--mesh {args.mesh}: {size} devices, but the {cluster.num_processes} processes have "
            f"{jax.device_count()}; a multi-host mesh must use every device of every process"
        )
    return cluster


@contextlib.contextmanager
def cluster_scope(cluster, prog: str):
    """Around a front end's work in a multi-host process. A clean end stops the workers (a worker waits
    for that stop). A failure tells every other process to exit with this one's error, reports it (one
    line for a user's mistake, as `user_errors` does) and exits at once: JAX's distributed shutdown at
    interpreter exit would wait on processes that are leaving."""
    if cluster is None:
        yield
        return
    from jaxinfer.cli_common import report_user_error, user_error_types
    from jaxinfer.multihost.cluster import hard_exit

    try:
        yield
    except SystemExit as e:
        if e.code in (0, None):
            cluster.finish()
            raise
        cluster.abort(f"{cluster.name()} exited with status {e.code}")
        hard_exit(e.code if isinstance(e.code, int) else 1)
    except user_error_types((OSError,)) as e:
        cluster.abort(f"{cluster.name()} failed: {e}")
        report_user_error(prog, e)
        hard_exit(2)
    except BaseException as e:
        cluster.abort(f"{cluster.name()} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        log.exception("%s failed", cluster.name())
        hard_exit(1)
    else:
        cluster.finish()


def engine_config(args, model_limit: int):
    """The `EngineConfig` of the engine flags `add_model_args` declares; `--max-context` defaults to the
    smaller of `DEFAULT_MAX_CONTEXT` and the model's limit."""
    from jaxinfer.engine.config import EngineConfig

    max_context = args.max_context if args.max_context is not None else min(DEFAULT_MAX_CONTEXT, model_limit)
    return EngineConfig(
        max_slots=args.max_slots,
        page_size=args.page_size,
        max_context=max_context,
        prefill_chunk=args.prefill_chunk,
        max_step_tokens=args.max_step_tokens,
        min_bucket=args.min_bucket,
        kv_pages=args.kv_pages,
        kv_memory_fraction=args.kv_memory_fraction,
        attention=args.attention,
        layer_loop=args.layer_loop,
        strict_no_recompile=args.strict_no_recompile,
        prefix_cache=args.prefix_cache,
        speculative=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens,
        speculative_adaptive=args.speculative_adaptive,
        kv_dtype=args.kv_dtype,
    )


def read_chat_template(path: str) -> str:
    """--chat-template's Jinja source, compiled once here so a broken template stops the start-up."""
    import jinja2

    from jaxinfer.tokenizer.chat import _jinja_environment

    with open(path, encoding="utf-8") as f:
        source = f.read()
    if not source.strip():
        raise ConfigError(f"--chat-template {path}: the file is empty")
    try:
        _jinja_environment().from_string(source)
    except jinja2.TemplateError as e:
        raise ConfigError(f"--chat-template {path}: not a valid Jinja template: {e}") from None
    return source


def mesh_spec(flag: str | None):
    """--mesh as a `MeshSpec`; without it 2x4 host devices on a CPU-only machine, None (every device on
    tensor) where an accelerator is attached."""
    from jaxinfer.sharding import accelerator_present, parse_mesh

    return parse_mesh(flag) if flag else (None if accelerator_present() else parse_mesh("2x4"))


def resolve_mesh(flag: str | None):
    """--mesh -> a `MeshSpec` (host devices set up for it on a CPU-only machine)."""
    from jaxinfer.sharding import ensure_host_devices

    spec = mesh_spec(flag)
    ensure_host_devices(spec.size if spec else 1)
    return spec


def load_draft(args, model, tokenizer, mesh, layer_loop: str):
    """--draft-model on the target's mesh, refused when its vocabulary or tokenizer differs."""
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.tokenizer import load_tokenizer

    draft = load_model(args.draft_model, mesh, args.dtype, layer_loop=layer_loop)
    flag = f"--draft-model {args.draft_model}"
    if draft.config.vocab_size != model.config.vocab_size:
        raise ConfigError(
            f"{flag}: its vocabulary has {draft.config.vocab_size} tokens, the model's {model.config.vocab_size}"
        )
    if draft.tokenizer_path:
        theirs = load_tokenizer(draft.tokenizer_path)
        same_size = theirs.vocab_size == tokenizer.vocab_size
        size = min(theirs.vocab_size, tokenizer.vocab_size)
        differ = next((i for i in range(size) if theirs.token_bytes(i) != tokenizer.token_bytes(i)), None)
        if not same_size or differ is not None:
            where = (
                f"token {differ}"
                if differ is not None
                else f"{theirs.vocab_size} against {tokenizer.vocab_size} tokens"
            )
            raise ConfigError(f"{flag}: its tokenizer differs from the model's ({where}); use the same tokenizer")
    log.info("draft model %s (%s): %d layers", draft.config.name, draft.source, draft.config.num_layers)
    return draft


def build_engine(args, serve_early: bool = False, cluster=None):
    """Mesh, platform, model, tokenizer and an engine with its step executables ready (loaded from
    `--compile-cache` or compiled; with `serve_early`, the larger buckets keep compiling in the
    background, `jaxinfer.compilation.startup`) from parsed flags (paths already checked). In a
    multi-host `cluster`, every process builds the same engine over the global mesh; the leader's tells
    the others each device call it makes."""
    from jaxinfer.engine import compile_counter

    spec = resolve_mesh(args.mesh)
    quant = spec_from_args(args)  # bad quantization flags are refused before any device work
    compile_counter.install()  # from the first compile on, so the summary's total is complete
    if args.compile_cache:
        from jaxinfer.compilation.cache import use_compile_cache

        use_compile_cache(args.compile_cache)
    import jax

    from jaxinfer import platform as platforms
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.engine.engine import Engine
    from jaxinfer.perf import HostMemoryPeak
    from jaxinfer.sharding import describe, make_mesh, parse_mesh
    from jaxinfer.tokenizer import TokenizerError, load_tokenizer

    mesh = make_mesh(spec or parse_mesh(str(len(jax.devices()))))
    log.info("%s", describe(mesh))
    policy = platforms.for_mesh(mesh, args.attention, args.layer_loop, args.min_bucket)
    start = time.perf_counter()
    model = ident = None
    if args.compile_cache:  # the parameters as the engine runs them, from an earlier start
        from jaxinfer.checkpoint import params_cache
        from jaxinfer.checkpoint.load import parse_dtype, resolve_source

        ident = params_cache.identity(
            resolve_source(args.model), mesh, parse_dtype(args.dtype), policy.layer_loop, quant
        )
        model = params_cache.load(args.compile_cache, ident, mesh) if ident else None
    how = "loaded from --compile-cache" if model is not None else "loaded"
    if model is None:
        from jaxinfer.cli_common import tokenize

        with HostMemoryPeak() as peak:
            model = load_model(
                args.model,
                mesh,
                args.dtype,
                layer_loop=policy.layer_loop,
                quant=quant,
                tokenize=tokenize,
            )
        if peak.bytes is not None:
            how += f" (host memory peak +{peak.bytes / 2**20:.0f} MiB)"
        if ident:
            params_cache.save(args.compile_cache, ident, model)
    log.info("model %s (%s) %s in %.1fs", model.config.name, model.source, how, time.perf_counter() - start)
    tok_path = args.tokenizer or model.tokenizer_path
    if not tok_path:
        raise TokenizerError(f"--tokenizer is required: no tokenizer found inside or beside {model.source}")
    tokenizer = load_tokenizer(tok_path)
    if getattr(args, "chat_template", None):
        tokenizer.chat_template = read_chat_template(args.chat_template)
    load_s = time.perf_counter() - start
    draft = load_draft(args, model, tokenizer, mesh, policy.layer_loop) if args.draft_model else None
    engine = Engine(model, tokenizer, engine_config(args, model.config.max_position_embeddings), policy, draft)
    engine.startup.load_s = load_s
    from jaxinfer.compilation.startup import prepare

    engine.compiling = prepare(engine, args.compile_cache, serve_early=serve_early)
    log.info("%s", engine.startup.line())
    if cluster is not None and cluster.is_leader:
        from jaxinfer.multihost.replica import Replicas

        engine.replicas = Replicas(cluster)
    return engine
