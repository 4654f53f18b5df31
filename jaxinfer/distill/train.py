"""Training a draft on its target's sequences with optax, and measuring it on held-out ones.

Loss, at every answer position: cross entropy of the draft's reduced-head softmax against the token
the target wrote (hard), mixed with weight `kd` with the cross entropy against the target's own top-k
distribution there (soft; renormalised over those top-k ids the head covers). Positions whose next
token lies outside the head train nothing (the draft cannot propose it). AdamW with linear warm-up
and cosine decay, gradient clipping at global norm 1. Every sequence is one row of a [rows, T] array
(positions -1 pad it); each step's batch holds sequences of similar length (sorted within groups of
GROUP batches) cut to at most four widths, so the step compiles at most four times.

Held-out metric (the greedy acceptance proxy): the fraction of answer positions of the target's
greedy held-out sequences where the draft's argmax equals the target's next token, with the draft
reading the target's tokens (teacher forcing), as it would under speculative decoding after each
accepted prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinfer.config import ModelConfig
from jaxinfer.distill.data import Sequences
from jaxinfer.model.attention import DenseCausal
from jaxinfer.model.layout import plan_layout
from jaxinfer.model.llama import Llama

log = logging.getLogger(__name__)

GROUP = 16  # batches drawn at once and sorted by length (similar lengths, little padding per batch)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    lr: float
    kd: float  # weight of the soft (target top-k) loss; 1 - kd on the hard label
    train_embed: bool
    seed: int
    max_seconds: float | None = None  # wall-clock cap (the result then depends on the machine's speed)


@dataclasses.dataclass
class Rows:
    """Sequences as fixed-length rows: tokens/positions [N, T]; labels [N, T]: the head column of the next
    token where it is trained (answer positions inside the head), else -1; soft_ids/soft_p [N, T, K]: the
    target's top-k at the next token as head columns (-1: outside the head) and their renormalised
    probabilities."""

    tokens: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    soft_ids: np.ndarray
    soft_p: np.ndarray
    answer: np.ndarray  # bool [N, T]: the position predicts an answer token (in the head or not)


def to_rows(seqs: Sequences, column: np.ndarray, length: int) -> Rows:
    """`column` i32 [vocab]: the head column of each token id (-1 outside the head)."""
    n, k = len(seqs), seqs.top_ids.shape[1]
    tokens = np.zeros((n, length), np.int32)
    positions = np.full((n, length), -1, np.int32)
    labels = np.full((n, length), -1, np.int32)
    soft_ids = np.full((n, length, k), -1, np.int32)
    soft_p = np.zeros((n, length, k), np.float32)
    answer = np.zeros((n, length), bool)
    for i in range(n):
        a, b = seqs.starts[i], min(seqs.starts[i + 1], seqs.starts[i] + length)
        m, p = b - a, seqs.prompt_lens[i]
        tokens[i, :m] = seqs.tokens[a:b]
        positions[i, :m] = np.arange(m)
        nxt = column[seqs.tokens[a + 1 : b]]  # the head column of the token after each position
        labels[i, max(p - 1, 0) : m - 1] = nxt[max(p - 1, 0) :]
        answer[i, max(p - 1, 0) : m - 1] = True
        ids = seqs.top_ids[a + 1 : b]
        cols = np.where(np.arange(m - 1)[:, None] >= p - 1, column[ids], -1)
        probs = np.where(cols >= 0, np.exp(seqs.top_logprobs[a + 1 : b]), 0.0)
        total = probs.sum(-1, keepdims=True)
        soft_ids[i, : m - 1] = cols
        soft_p[i, : m - 1] = np.where(total > 0, probs / np.maximum(total, 1e-30), 0.0)
    return Rows(tokens, positions, labels, soft_ids, soft_p, answer)


def head_columns(head_ids: np.ndarray | None, vocab: int) -> np.ndarray:
    """i32 [vocab]: each id's column in the head (-1 where it has none); the identity for a full head."""
    if head_ids is None:
        return np.arange(vocab, dtype=np.int32)
    column = np.full(vocab, -1, np.int32)
    column[head_ids] = np.arange(len(head_ids), dtype=np.int32)
    return column


def head_logits(module: Llama, params, tokens, positions):
    """The draft's logits over its head's columns [B, T, H] (all ids for a full head), through the model's
    own forward: `on_hidden` hands back the final-normed hidden states and the head ([E, H] for a
    reduced head), and `logit_indices` keeps the full-vocabulary logits the module returns to one
    position."""
    picks = jnp.zeros((tokens.shape[0], 1), jnp.int32)
    _, _, (hidden, head) = module.apply(
        {"params": params},
        tokens,
        positions,
        DenseCausal(positions),
        logit_indices=picks,
        on_hidden=lambda h, head: (h, head),
    )
    logits = jnp.einsum("bte,ev->btv", hidden, head, preferred_element_type=jnp.float32)
    return logits[..., : module.config.vocab_size]


def loss_fn(module, kd: float, params, tokens, positions, labels, soft_ids, soft_p):
    logp = jax.nn.log_softmax(head_logits(module, params, tokens, positions), axis=-1)  # [B, T, H]
    trained = labels >= 0
    hard = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    picked = jnp.take_along_axis(logp, jnp.maximum(soft_ids, 0), axis=-1)  # [B, T, K]
    soft = -jnp.sum(jnp.where(soft_ids >= 0, soft_p * picked, 0.0), axis=-1)
    per_position = (1.0 - kd) * hard + kd * soft
    count = jnp.maximum(jnp.sum(trained), 1)
    return jnp.sum(jnp.where(trained, per_position, 0.0)) / count


def split_trainable(params: dict, train_embed: bool) -> tuple[dict, dict]:
    """(trained leaves, fixed leaves): `head_ids` (int) is never trained, the embedding only if asked."""
    fixed_keys = {"head_ids"} | (set() if train_embed else {"embed"})
    return (
        {k: v for k, v in params.items() if k not in fixed_keys},
        {k: v for k, v in params.items() if k in fixed_keys},
    )


def optimizer():
    """AdamW without its learning rate: the step scales the updates by `learning_rate(...)`, computed on
    the host, so a --minutes cap can shorten the schedule while it runs."""
    decay = lambda tree: jax.tree.map(lambda a: a.ndim >= 2, tree)  # no weight decay on norms
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.98),
        optax.add_decayed_weights(0.01, mask=decay),
    )


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of `total` steps, then cosine decay to 5% of `peak` at `total`."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * progress)))


@dataclasses.dataclass
class TrainResult:
    params: dict  # numpy, the logical tree
    steps: int
    seconds: float
    tokens_per_s: float  # answer positions trained per second
    losses: list[float]
    curve: list[tuple[int, float]]  # (step, held-out acceptance proxy)


def train(config: ModelConfig, params: dict, rows: Rows, heldout: Rows, head_ids, settings: TrainSettings):
    """Trains `params` (numpy, logical) for settings.steps steps (or until max_seconds); measures the
    held-out acceptance proxy before, a few times during, and after."""
    module = Llama(config, plan_layout(config, 1, quiet=True), jnp.float32, "scan")
    trainable, fixed = split_trainable(jax.tree.map(jnp.asarray, params), settings.train_embed)
    opt = optimizer()
    state = opt.init(trainable)
    data = {k: jnp.asarray(v) for k, v in dataclasses.asdict(rows).items() if k != "answer"}

    @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnums=(4,))
    def step(trainable, state, index, lr, width: int):
        batch = {k: v[index, :width] for k, v in data.items()}
        grad_fn = jax.value_and_grad(lambda t: loss_fn(module, settings.kd, {**t, **fixed}, **batch))
        loss, grads = grad_fn(trainable)
        updates, state = opt.update(grads, state, trainable)
        return jax.tree.map(lambda p, u: p - lr * u, trainable, updates), state, loss

    evaluate = Evaluator(module, heldout, head_ids, settings.batch)
    curve = [(0, evaluate({**trainable, **fixed}))]
    log.info("step 0: held-out acceptance proxy %.4f", curve[0][1])
    batches = Batches(rows, settings.batch, np.random.default_rng([settings.seed, 3]))
    losses, done, trained_positions = [], 0, 0
    per_row = (rows.labels >= 0).sum(axis=1)
    cap = WallClockCap(settings.steps, settings.max_seconds)
    total = settings.steps
    while done < total:
        index, width = batches.next()
        trained_positions += int(per_row[index].sum())
        lr = np.float32(learning_rate(done, total, settings.lr))
        trainable, state, loss = step(trainable, state, jnp.asarray(index), lr, width)
        losses.append(float(loss))
        done += 1
        total = cap.total(done)
        if done in {max(1, total * i // 4) for i in (1, 2, 3)} and done < total:
            curve.append((done, evaluate({**trainable, **fixed})))
            log.info("step %d: loss %.3f, held-out acceptance proxy %.4f", done, np.mean(losses[-20:]), curve[-1][1])
    seconds = time.perf_counter() - cap.start
    final = {**trainable, **fixed}
    if done:
        curve.append((done, evaluate(final)))
        log.info("step %d: loss %.3f, held-out acceptance proxy %.4f", done, np.mean(losses[-20:]), curve[-1][1])
    return TrainResult(
        params=jax.tree.map(np.asarray, final),
        steps=done,
        seconds=seconds,
        tokens_per_s=trained_positions / max(seconds, 1e-9),
        losses=losses,
        curve=curve,
    )


class WallClockCap:
    """The number of steps a schedule of `steps` runs: all of them, or with `max_seconds`, as many as fit
    the wall-clock cap at the speed measured so far (the learning-rate schedule then ends there too)."""

    def __init__(self, steps: int, max_seconds: float | None):
        self.steps, self.max_seconds, self.start = steps, max_seconds, time.perf_counter()
        self.timed_from = None  # (step, time) after the first step (its compilation is not a step's cost)
        self.current = steps

    def total(self, done: int) -> int:
        """Called after step `done`: the schedule's length now."""
        if self.max_seconds is None:
            return self.steps
        now = time.perf_counter()
        if self.timed_from is None:
            self.timed_from = (done, now)
        elif done - self.timed_from[0] >= 2:
            per_step = (now - self.timed_from[1]) / (done - self.timed_from[0])
            left = self.start + self.max_seconds - now
            self.current = min(self.steps, done + max(0, int(left / per_step)))
        return self.current


class Batches:
    """Row indices of each step, and the width [0, width) of the rows it needs: epochs in a seeded order,
    each GROUP batches of it sorted by length, split, and taken in a seeded order."""

    def __init__(self, rows: Rows, batch: int, rng: np.random.Generator):
        self.lengths = (rows.positions >= 0).sum(axis=1)
        full = rows.tokens.shape[1]
        self.quantum = -(-full // 4 // 16) * 16  # at most four widths, multiples of 16
        self.full, self.batch, self.rng = full, batch, rng
        self.order = np.zeros(0, np.int64)
        self.queue: list[np.ndarray] = []

    def next(self) -> tuple[np.ndarray, int]:
        if not self.queue:
            need = self.batch * GROUP
            while len(self.order) < need:  # a new epoch: each sequence once, in a seeded order
                self.order = np.concatenate([self.order, self.rng.permutation(len(self.lengths))])
            group, self.order = self.order[:need], self.order[need:]
            group = group[np.argsort(self.lengths[group], kind="stable")]
            split = [group[i : i + self.batch] for i in range(0, need, self.batch)]
            self.queue = [split[i] for i in self.rng.permutation(len(split))]
        index = self.queue.pop()
        width = min(self.full, -(-int(self.lengths[index].max()) // self.quantum) * self.quantum)
        return index, width


class Evaluator:
    """The held-out greedy acceptance proxy of a parameter tree (see the module docstring)."""

    def __init__(self, module: Llama, heldout: Rows, head_ids, batch: int):
        self.rows, self.batch = heldout, batch
        ids = jnp.asarray(head_ids if head_ids is not None else np.arange(module.config.vocab_size), jnp.int32)

        @jax.jit
        def argmax_ids(params, tokens, positions):
            return ids[jnp.argmax(head_logits(module, params, tokens, positions), axis=-1)]

        self.argmax_ids = argmax_ids

    def predictions(self, params) -> np.ndarray:
        """The draft's greedy next token at every held-out position, i32 [N, T]."""
        r, b = self.rows, self.batch
        out = []
        for i in range(0, len(r.tokens), b):
            tok, pos = r.tokens[i : i + b], r.positions[i : i + b]
            pad = b - len(tok)  # the last batch padded to the compiled shape
            tok = np.pad(tok, ((0, pad), (0, 0)))
            pos = np.pad(pos, ((0, pad), (0, 0)), constant_values=-1)
            out.append(np.asarray(self.argmax_ids(params, tok, pos))[: b - pad])
        return np.concatenate(out)

    def __call__(self, params) -> float:
        return acceptance(self.predictions(params), self.rows)


def acceptance(predicted: np.ndarray, rows: Rows) -> float:
    """Fraction of answer positions where `predicted` [N, T] equals the target's next token."""
    nxt = np.concatenate([rows.tokens[:, 1:], np.zeros_like(rows.tokens[:, :1])], axis=1)
    return float((predicted[rows.answer] == nxt[rows.answer]).mean()) if rows.answer.any() else 0.0
