"""The draft's training data: token sequences the TARGET wrote, generated through the real `Engine`.

Each sequence is a prompt (chat-templated when the tokenizer has a template) and the target's answer;
the draft learns the answer part. Beside each answer token the target's TOP_K most likely tokens and
their log-probabilities are kept (the engine reports them for ~3% of a step's time), for distilling
on the target's distribution rather than only on its samples.

Generating is the slow part (SmolLM2 on 2 CPU cores: ~200 answer tokens/s at 32 slots), so the
sequences are cached as one `.npz` under `default_cache_dir()/distill-data/` (or --data-cache), keyed by
everything they depend on; a second run with the same target and data flags trains at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time

import numpy as np

from jaxinfer.distill.prompts import Prompt, heldout_prompts, training_prompts
from jaxinfer.paths import content_key, default_cache_dir

log = logging.getLogger(__name__)

TOP_K = 20  # the target's alternatives kept per answer token (the engine's TOP_LOGPROBS)
DATA_VERSION = 1  # bump when what is generated changes
QUESTION_TOKENS = 48  # longest question the target writes for the `question` kind


@dataclasses.dataclass
class Sequences:
    """Sequences flat: sequence i is tokens[starts[i]:starts[i+1]], its first prompt_lens[i] tokens the prompt.

    top_ids/top_logprobs [total, TOP_K]: at answer token j (flat index), the target's most likely tokens
    at that position and their log-probabilities (zeros at prompt tokens).
    """

    tokens: np.ndarray  # i32 [total]
    starts: np.ndarray  # i64 [n + 1]
    prompt_lens: np.ndarray  # i32 [n]
    greedy: np.ndarray  # bool [n]
    top_ids: np.ndarray  # i32 [total, TOP_K]
    top_logprobs: np.ndarray  # f32 [total, TOP_K]

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    @property
    def answer_tokens(self) -> int:
        return int(self.lengths.sum() - self.prompt_lens.sum())

    def answer_mask(self) -> np.ndarray:
        """bool [total]: the token is part of an answer (a training target)."""
        index = np.arange(len(self.tokens)) - np.repeat(self.starts[:-1], self.lengths)
        return index >= np.repeat(self.prompt_lens, self.lengths)

    @classmethod
    def from_results(cls, prompts_ids: list[list[int]], results, greedy: list[bool]) -> Sequences:
        tokens, starts, tops, logps = [], [0], [], []
        for ids, r in zip(prompts_ids, results):
            seq = list(ids) + list(r.token_ids)
            tokens.extend(seq)
            starts.append(starts[-1] + len(seq))
            top = np.zeros((len(seq), TOP_K), np.int32)
            lp = np.zeros((len(seq), TOP_K), np.float32)
            for j, alternatives in enumerate(r.top_logprobs or []):
                for k, (tid, value) in enumerate(alternatives[:TOP_K]):
                    top[len(ids) + j, k], lp[len(ids) + j, k] = tid, value
            tops.append(top)
            logps.append(lp)
        return cls(
            tokens=np.asarray(tokens, np.int32),
            starts=np.asarray(starts, np.int64),
            prompt_lens=np.asarray([len(i) for i in prompts_ids], np.int32),
            greedy=np.asarray(greedy, bool),
            top_ids=np.concatenate(tops) if tops else np.zeros((0, TOP_K), np.int32),
            top_logprobs=np.concatenate(logps) if logps else np.zeros((0, TOP_K), np.float32),
        )

    @classmethod
    def concat(cls, parts: list[Sequences]) -> Sequences:
        offsets = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
        return cls(
            tokens=np.concatenate([p.tokens for p in parts]),
            starts=np.concatenate([[0]] + [p.starts[1:] + o for p, o in zip(parts, offsets)]).astype(np.int64),
            prompt_lens=np.concatenate([p.prompt_lens for p in parts]),
            greedy=np.concatenate([p.greedy for p in parts]),
            top_ids=np.concatenate([p.top_ids for p in parts]),
            top_logprobs=np.concatenate([p.top_logprobs for p in parts]),
        )

    def arrays(self, prefix: str) -> dict:
        return {f"{prefix}_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def load(cls, arrays, prefix: str) -> Sequences:
        return cls(**{f.name: np.asarray(arrays[f"{prefix}_{f.name}"]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the generated data depends on (its cache key, with the target's identity)."""

    prompts: int
    heldout: int
    new_tokens: int
    seed: int
    slots: int


def default_data_cache() -> pathlib.Path:
    return default_cache_dir() / "distill-data"


def cache_path(root: pathlib.Path, spec: DataSpec, target_identity: dict) -> pathlib.Path:
    ident = {"version": DATA_VERSION, "target": target_identity, **dataclasses.asdict(spec)}
    return pathlib.Path(root) / f"{content_key(ident)}.npz"


def target_data(model, tokenizer, spec: DataSpec, path: pathlib.Path) -> tuple[Sequences, Sequences]:
    """(training sequences, held-out greedy sequences) of `model`, from the cache file `path` or generated now."""
    if path.is_file():
        with np.load(path) as arrays:
            log.info("target outputs: loaded from %s", path)
            return Sequences.load(arrays, "train"), Sequences.load(arrays, "heldout")
    train, heldout = generate_data(model, tokenizer, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **train.arrays("train"), **heldout.arrays("heldout"))
    tmp.replace(path)
    return train, heldout


def generate_data(model, tokenizer, spec: DataSpec) -> tuple[Sequences, Sequences]:
    """Runs the target through the engine: its own questions first (with a chat template), then every
    training request, then the held-out ones (greedy)."""
    chat = tokenizer.has_chat_template
    final, askers = training_prompts(spec.prompts, chat, spec.seed)
    held = heldout_prompts(spec.heldout, chat, spec.seed)
    engine = target_engine(model, tokenizer, spec.slots, spec.new_tokens)
    start = time.perf_counter()
    parts = []
    if askers:
        asked = _run(engine, askers, QUESTION_TOKENS)
        parts.append(asked)
        final = final + _questions(asked.texts, askers)
    parts.append(_run(engine, final, spec.new_tokens))
    train = Sequences.concat([p.sequences for p in parts])
    heldout = _run(engine, held, spec.new_tokens).sequences
    elapsed = time.perf_counter() - start
    made = train.answer_tokens + heldout.answer_tokens
    log.info(
        "target outputs: %d training sequences (%d answer tokens), %d held-out (%d) in %.0fs (%.0f tokens/s)",
        len(train),
        train.answer_tokens,
        len(heldout),
        heldout.answer_tokens,
        elapsed,
        made / max(elapsed, 1e-9),
    )
    return train, heldout


def target_engine(model, tokenizer, slots: int, new_tokens: int):
    """An engine for data generation: every step padded to at least `slots` tokens (a full decode batch),
    so only 2-4 step sizes compile; prompts up to 256 tokens (longer ones keep their last tokens)."""
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import Engine

    limit = model.config.max_position_embeddings
    max_context = min(limit, 256 + new_tokens)
    config = EngineConfig(
        max_slots=slots,
        max_context=max_context,
        prefill_chunk=max(4 * slots, 64),
        min_bucket=slots,
        page_size=16,
    )
    return Engine(model, tokenizer, config)


@dataclasses.dataclass
class _Run:
    sequences: Sequences
    texts: list[str]


def _run(engine, prompts: list[Prompt], max_tokens: int) -> _Run:
    from jaxinfer.engine.requests import SamplingParams
    from jaxinfer.request_builder import RequestBuilder

    builder = RequestBuilder.for_engine(engine)
    requests = []
    for i, p in enumerate(prompts):
        params = SamplingParams(
            max_tokens=min(max_tokens, engine.config.max_context - 1),
            temperature=p.temperature,
            top_p=0.95 if p.temperature > 0 else 1.0,
            seed=p.seed,
            top_logprobs=TOP_K,
        )
        chat = p.kind != "free"
        requests.append(builder.build(str(i), text=p.text, chat=chat, params=params, truncate=True))
    progress = _Progress(len(requests))
    results = engine.generate(requests, on_event=progress)
    sequences = Sequences.from_results([r.prompt_ids for r in requests], results, [p.temperature == 0 for p in prompts])
    return _Run(sequences, [r.text for r in results])


def _questions(texts: list[str], askers: list[Prompt]) -> list[Prompt]:
    """The questions the target wrote, as chat requests (empty ones are dropped); a third answered greedy."""
    out = []
    for text, p in zip(texts, askers):
        text = text.strip()
        if text:
            temperature = (0.0, 0.7, 1.0)[p.seed % 3]
            out.append(Prompt("question", text, temperature, p.seed + 1))
    return out


class _Progress:
    """Logs how many requests finished (and answer tokens made) at most every 30 seconds."""

    def __init__(self, total: int):
        self.total, self.done, self.tokens = total, 0, 0
        self.start = self.last = time.perf_counter()

    def __call__(self, event) -> None:
        self.tokens += len(event.token_ids)
        self.done += event.result is not None
        now = time.perf_counter()
        if now - self.last > 30:
            self.last = now
            rate = self.tokens / (now - self.start)
            log.info("target outputs: %d of %d requests done, %.0f tokens/s", self.done, self.total, rate)
