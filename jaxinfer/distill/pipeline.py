"""One distillation, start to end: load the target, have it write the data, build, train, measure and
save the draft, and the report's figures."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import time

import numpy as np

from jaxinfer.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

K = 4  # draft tokens per verify step the report's expectation assumes


@dataclasses.dataclass(frozen=True)
class Settings:
    kind: str  # head (a feature head, `jaxinfer.distill.head`) | layers (a small model, `jaxinfer.distill.train`)
    model: str | None
    out: str | None
    data_cache: str | None
    layers: int
    head_vocab: int
    init_layers: str
    train_embed: bool
    kd: float
    seed: int
    prompts: int
    heldout: int
    new_tokens: int
    gen_slots: int
    train_steps: int
    minutes: float | None
    batch: int
    lr: float


@dataclasses.dataclass
class Report:
    out: pathlib.Path
    config: ModelConfig
    target: ModelConfig
    acceptance: float  # held-out greedy acceptance proxy, trained
    acceptance_step0: float
    coverage: float  # held-out answer tokens the head holds
    heldout_positions: int
    train_answer_tokens: int
    data_seconds: float  # 0 when the target's outputs came from the cache
    train_seconds: float
    steps: int
    tokens_per_s: float
    second: float | None = None  # a feature head: its second proposal's proxy, given the first was right

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.config)

    def lines(self) -> list[str]:
        c, t, a = self.config, self.target, self.acceptance
        head = f"head {c.head_vocab} of {c.vocab_size} ids" if c.head_vocab else f"full head ({c.vocab_size} ids)"
        target_bytes = bytes_per_token(t)
        kind = f"feature head, {c.num_layers} blocks" if c.feature_head else f"draft: {c.num_layers} layers"
        second = [] if self.second is None else [f"second proposal, given the first was right: {self.second:.4f}"]
        return [
            f"{kind}, {head}: {c.param_count():,} params, "
            f"{self.bytes_per_token / 1e6:.1f} MB read per token (float32; the target "
            f"{target_bytes / 1e6:.1f} MB, ratio {self.bytes_per_token / target_bytes:.3f})",
            f"held-out greedy acceptance proxy {a:.4f} (untrained draft {self.acceptance_step0:.4f}, chance "
            f"{1 / c.vocab_size:.1e}; head coverage {self.coverage:.4f}; {self.heldout_positions} positions)",
            f"expected per verify step, K={K}, independent acceptances: {accepted_tokens(a, K):.2f} draft tokens "
            f"accepted, {accepted_tokens(a, K) + 1:.2f} tokens with the target's own",
            f"training: {self.steps} steps in {self.train_seconds:.0f}s ({self.tokens_per_s:.0f} answer positions/s) "
            f"on {self.train_answer_tokens} answer tokens of the target"
            + (f" generated in {self.data_seconds:.0f}s" if self.data_seconds else " (cached)"),
            *second,
            f"saved: {self.out}",
        ]


def accepted_tokens(a: float, k: int) -> float:
    """Expected draft tokens accepted per verify step when each is accepted with probability `a`,
    independently: a + a^2 + ... + a^k."""
    return sum(a**i for i in range(1, k + 1))


def bytes_per_token(config: ModelConfig, itemsize: int = 4) -> int:
    """Parameter bytes one decode token reads: every weight except the embedding table, of which one row
    (a tied head reads the whole table as the head)."""
    v, e = config.vocab_size, config.hidden_size
    if config.feature_head:  # its weights and one row of the target's table per proposal
        return itemsize * (config.param_count() - config.head_vocab + e)
    table = 0 if config.tie_embeddings else v * e - e
    return itemsize * (config.param_count() - table)


def default_out(target_name: str, s: Settings) -> pathlib.Path:
    """`default_cache_dir()/<target>-draft-L<layers>-H<head_vocab>` (a feature head: `-head-B<blocks>-H..`),
    beside the converted default model."""
    from jaxinfer.paths import default_cache_dir

    kind = "head-B" if s.kind == "head" else "draft-L"
    return default_cache_dir() / f"{target_name}-{kind}{s.layers}-H{s.head_vocab}"


def target_name(spec: str | None) -> str:
    from jaxinfer.checkpoint.default_model import DEFAULT_MODEL
    from jaxinfer.config import PRESETS

    if spec in (None, "", DEFAULT_MODEL) or spec in PRESETS:
        return spec or DEFAULT_MODEL
    path = pathlib.Path(spec).absolute()
    return path.stem if path.is_file() else path.name


def check_out(path: pathlib.Path) -> None:
    """Refuses an --out that would overwrite something that is not a jaxinfer checkpoint."""
    from jaxinfer.checkpoint.orbax_store import is_native_checkpoint

    if path.exists() and not (path.is_dir() and (is_native_checkpoint(path) or not any(path.iterdir()))):
        raise ConfigError(f"--out {path}: exists and is not an empty folder or a jaxinfer checkpoint")


def target_identity(source: str) -> dict:
    """What the target's outputs depend on: its files (path, size, modification time), or a preset name."""
    path = pathlib.Path(source).absolute()
    if not path.exists():
        return {"preset": source}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"source": str(path), "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def run(s: Settings) -> Report:
    import jax

    from jaxinfer.checkpoint.load import load_model, resolve_source
    from jaxinfer.distill import draft as D
    from jaxinfer.distill import train as T
    from jaxinfer.distill.data import DataSpec, cache_path, default_data_cache, target_data
    from jaxinfer.platform import for_mesh
    from jaxinfer.sharding import make_mesh
    from jaxinfer.tokenizer import TokenizerError, load_tokenizer

    out = pathlib.Path(s.out) if s.out else default_out(target_name(s.model), s)
    check_out(out)
    mesh = make_mesh("1x1")
    source = resolve_source(s.model)
    target = load_model(source, mesh, "float32", seed=s.seed, layer_loop="scan")
    tc = target.config
    check_against_target(s, tc)
    if not target.tokenizer_path:
        raise TokenizerError(f"--model {source}: no tokenizer found inside or beside it")
    tok_path = str(pathlib.Path(target.tokenizer_path).absolute())
    tokenizer = load_tokenizer(tok_path)
    host = jax.tree.map(np.asarray, target.params)  # the draft starts from these (scan layout, unpadded)
    spec = DataSpec(s.prompts, s.heldout, s.new_tokens, s.seed, s.gen_slots)
    data_file = cache_path(s.data_cache or default_data_cache(), spec, target_identity(source))
    cached = data_file.is_file()
    start = time.perf_counter()
    engine_model = target.with_layer_loop(for_mesh(mesh).layer_loop)
    train_seqs, held_seqs = target_data(engine_model, tokenizer, spec, data_file)
    data_seconds = 0.0 if cached else time.perf_counter() - start
    if s.kind == "head":
        del target
        must = tuple(i for i in tokenizer.eos_ids if 0 <= i < tc.vocab_size)
        return run_head(s, out, engine_model, host, (train_seqs, held_seqs), tok_path, source, data_seconds, must)
    del engine_model, target

    answers = train_seqs.answer_mask()
    head_ids = None
    if s.head_vocab:
        must = tuple(i for i in tokenizer.eos_ids if 0 <= i < tc.vocab_size)
        head_ids = D.choose_head_ids(train_seqs.tokens, answers, tc.vocab_size, s.head_vocab, must)
    name = out.name
    config = D.draft_config(tc, s.layers, s.head_vocab, name)
    params = D.initial_params(host, tc, config, head_ids, s.init_layers, s.seed)
    del host
    length = int(-(-max(train_seqs.lengths.max(), held_seqs.lengths.max()) // 16) * 16)
    column = T.head_columns(head_ids, tc.vocab_size)
    rows, held_rows = T.to_rows(train_seqs, column, length), T.to_rows(held_seqs, column, length)
    settings = T.TrainSettings(
        steps=s.train_steps,
        batch=s.batch,
        lr=s.lr,
        kd=s.kd,
        train_embed=s.train_embed,
        seed=s.seed,
        max_seconds=s.minutes * 60 if s.minutes else None,
    )
    result = T.train(config, params, rows, held_rows, head_ids, settings)
    held_answers = held_seqs.answer_mask()
    coverage = D.head_coverage(held_seqs.tokens, held_answers, head_ids) if head_ids is not None else 1.0
    report = Report(
        out=out,
        config=config,
        target=tc,
        acceptance=result.curve[-1][1],
        acceptance_step0=result.curve[0][1],
        coverage=coverage,
        heldout_positions=int(held_rows.answer.sum()),
        train_answer_tokens=train_seqs.answer_tokens,
        data_seconds=data_seconds,
        train_seconds=result.seconds,
        steps=result.steps,
        tokens_per_s=result.tokens_per_s,
    )
    manifest = draft_manifest(s, source, tok_path, tc, report, result.curve, train_seqs.answer_tokens)
    save_atomically(out, config, result.params, manifest)
    return report


def draft_manifest(s: Settings, source, tok_path: str, tc: ModelConfig, report: Report, curve, answers: int) -> dict:
    """The checkpoint manifest's record of how the draft was made and how it measured."""
    return {
        "source": f"distilled from {source}",
        "tokenizer": tok_path,  # load_model finds the draft's tokenizer here
        "draft": {
            "target": source,
            "target_name": tc.name,
            "seed": s.seed,
            "settings": dataclasses.asdict(s),
            "heldout_acceptance": report.acceptance,
            "heldout_acceptance_step0": report.acceptance_step0,
            "heldout_second_acceptance": report.second,
            "head_coverage": report.coverage,
            "steps": report.steps,
            "curve": curve,
            "train_answer_tokens": answers,
        },
    }


def check_against_target(s: Settings, tc: ModelConfig) -> None:
    """The flags whose limits come from the target, checked once it is loaded (before any work)."""
    if not 1 <= s.layers <= tc.num_layers:
        raise ConfigError(f"--layers {s.layers}: must be in [1, {tc.num_layers}] (the target's layers)")
    if s.head_vocab > tc.vocab_size:
        raise ConfigError(f"--head-vocab {s.head_vocab}: must be 0 (full head) or at most {tc.vocab_size}")
    if s.new_tokens >= tc.max_position_embeddings:
        raise ConfigError(f"--new-tokens {s.new_tokens}: must be below {tc.max_position_embeddings} (the context)")


def save_atomically(out: pathlib.Path, config: ModelConfig, params: dict, manifest: dict) -> None:
    """Writes the checkpoint beside `out`, then replaces `out` with it whole."""
    import jax.numpy as jnp

    from jaxinfer.checkpoint import orbax_store

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    orbax_store.save(tmp, config, params, jnp.float32, extra=manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def run_head(s: Settings, out, target, host, seqs, tok_path: str, source, data_seconds, must) -> Report:
    """`--kind head`: the target's states over its sequences, then a feature head trained on them."""
    from jaxinfer.distill import head as H
    from jaxinfer.distill.draft import choose_head_ids, head_coverage

    tc, (train_seqs, held_seqs) = target.config, seqs
    start = time.perf_counter()
    data = (train_seqs, H.target_features(target, train_seqs))
    heldout = (held_seqs, H.target_features(target, held_seqs))
    log.info(
        "target states of %d tokens in %.0fs",
        len(train_seqs.tokens) + len(held_seqs.tokens),
        time.perf_counter() - start,
    )
    del target
    head_ids = choose_head_ids(train_seqs.tokens, train_seqs.answer_mask(), tc.vocab_size, s.head_vocab, must)
    config = H.head_config(tc, s.layers, s.head_vocab, out.name)
    params = H.initial_params(host, tc, config, head_ids, s.seed)
    max_seconds = s.minutes * 60 if s.minutes else None
    result = H.train(
        config, params, host["embed"], data, heldout, H.HeadSettings(s.train_steps, s.batch, s.lr, s.seed, max_seconds)
    )
    coverage = head_coverage(held_seqs.tokens, held_seqs.answer_mask(), head_ids)
    positions = len(H.example_positions(held_seqs, answers_only=True))
    report = Report(
        out=out,
        config=config,
        target=tc,
        acceptance=result.curve[-1][1],
        acceptance_step0=result.curve[0][1],
        coverage=coverage,
        heldout_positions=positions,
        train_answer_tokens=train_seqs.answer_tokens,
        data_seconds=data_seconds,
        train_seconds=result.seconds,
        steps=result.steps,
        tokens_per_s=result.steps * s.batch / max(result.seconds, 1e-9),
        second=result.curve[-1][2],
    )
    manifest = draft_manifest(s, source, tok_path, tc, report, result.curve, train_seqs.answer_tokens)
    save_atomically(out, config, result.params, manifest)
    return report
