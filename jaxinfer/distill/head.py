"""Training a feature head (`jaxinfer.model.feature_head`) on its target's hidden states, with optax.

Data: the target's final-normed hidden state h_p at every position of its own sequences (one dense
forward per sequence, teacher forcing; `target_features`), beside the tokens. An example is a position
p with two tokens after it: the head reads (h_p, x_{p+1}) and should predict h_{p+1}, whose head
logits are the target's distribution of x_{p+2}; fed its own prediction and x_{p+2}, it should
predict h_{p+2} (the second proposal of a window, trained on the head's own output as it will run).

Loss, for each of the two predictions: the cross entropy of the head's softmax over its columns
against the target's softmax over the same columns (the target's own head applied to the true
h_{p+1}), plus FEATURE_WEIGHT times the squared error of the predicted state relative to the true
one's mean square. The head's vocabulary matrix is the target's, restricted to `head_ids`, and is
not trained (so the predicted state must live in the target's space). AdamW, linear warm-up, cosine
decay, clipping at global norm 1; each step draws `batch` positions at random (seeded).

Held-out metric (the greedy acceptance proxy, as for a draft model): at the answer positions of the
target's greedy held-out sequences, the fraction where the head's first proposal equals the target's
token, and (`second`) where its second equals the next one given the first was right.
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
from jaxinfer.distill.train import WallClockCap, learning_rate
from jaxinfer.model.feature_head import FeatureHead

log = logging.getLogger(__name__)

FEATURE_WEIGHT = 0.1  # weight of the state regression beside the distribution loss
UNROLL = 2  # predictions per example: the first proposal, then one fed the head's own state
FORWARD_ROWS = 8  # sequences per dense target forward when collecting states


def head_config(target: ModelConfig, blocks: int, head_vocab: int, name: str) -> ModelConfig:
    """A feature head for `target`: `blocks` MLP blocks at the target's MLP width, head of `head_vocab`."""
    return target.replace(name=name, num_layers=blocks, head_vocab=head_vocab, feature_head=True, tie_embeddings=False)


def initial_params(target_params: dict, target: ModelConfig, head: ModelConfig, head_ids, seed: int) -> dict:
    """The head's first parameters (numpy): fc passes h_p through (identity on its first half, small
    noise), the blocks start as identities (zero `down`), the vocabulary matrix is the target's."""
    e, f, b = head.hidden_size, head.intermediate_size, head.num_layers
    rng = np.random.default_rng([seed, 11])
    fc = np.concatenate([np.eye(e), np.zeros((e, e))]).astype(np.float32)
    fc += 0.01 * rng.standard_normal(fc.shape).astype(np.float32)
    target_head = target_params["embed"][: target.vocab_size].T if target.tie_embeddings else target_params["lm_head"]
    return {
        "fc": fc,
        "block_norm": np.ones((b, e), np.float32),
        "block_gate": (0.02 * rng.standard_normal((b, e, f))).astype(np.float32),
        "block_up": (0.02 * rng.standard_normal((b, e, f))).astype(np.float32),
        "block_down": np.zeros((b, f, e), np.float32),
        "lm_head": np.array(np.asarray(target_head)[:, head_ids], np.float32),
        "head_ids": np.asarray(head_ids, np.int32),
    }


def target_features(model, seqs: Sequences) -> np.ndarray:
    """float32 [total, E]: the target's final-normed hidden state at every token of `seqs` (ShardedModel
    `model` with scan params on one device)."""
    from jaxinfer.model.attention import DenseCausal

    module = model.module

    @jax.jit
    def states(params, tokens, positions):
        picks = jnp.zeros((tokens.shape[0], 1), jnp.int32)
        on_hidden = lambda h, head: h  # noqa: E731
        return module.apply(
            {"params": params}, tokens, positions, DenseCausal(positions), logit_indices=picks, on_hidden=on_hidden
        )[2]

    out = np.zeros((len(seqs.tokens), model.config.hidden_size), np.float32)
    lengths = seqs.lengths
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), FORWARD_ROWS):
        picked = order[i : i + FORWARD_ROWS]
        width = int(-(-lengths[picked].max() // 32) * 32)  # a few widths compile
        tokens = np.zeros((FORWARD_ROWS, width), np.int32)
        positions = np.full((FORWARD_ROWS, width), -1, np.int32)
        for r, j in enumerate(picked):
            seq = seqs.sequence(j)
            tokens[r, : len(seq)], positions[r, : len(seq)] = seq, np.arange(len(seq))
        h = np.asarray(states(model.params, tokens, positions))
        for r, j in enumerate(picked):
            out[seqs.starts[j] : seqs.starts[j + 1]] = h[r, : lengths[j]]
    return out


def example_positions(seqs: Sequences, answers_only: bool) -> np.ndarray:
    """Flat indices p with p + UNROLL + 1 inside p's sequence (x_{p+1} .. x_{p+UNROLL+1} exist); with
    `answers_only`, only those whose first predicted token x_{p+2} is an answer token."""
    parts = [np.arange(a, b - UNROLL - 1) for a, b in zip(seqs.starts[:-1], seqs.starts[1:])]
    p = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return p[seqs.answer_mask()[p + 2]] if answers_only else p


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    steps: int
    batch: int  # positions per step
    lr: float
    seed: int
    max_seconds: float | None = None


@dataclasses.dataclass
class HeadResult:
    params: dict
    steps: int
    seconds: float
    losses: list[float]
    curve: list[tuple[int, float, float]]  # (step, first-proposal proxy, second given first)


def train(config: ModelConfig, params: dict, embed: np.ndarray, data, heldout, settings: HeadSettings) -> HeadResult:
    """data / heldout: (Sequences, their states [total, E]). `embed` [vocab, E]: the target's table."""
    module = FeatureHead(config)
    table = jnp.asarray(embed[: config.vocab_size])
    fixed = {k: jnp.asarray(params[k]) for k in ("lm_head", "head_ids")}
    trainable = {k: jnp.asarray(v) for k, v in params.items() if k not in fixed}
    seqs, states = data
    tokens, states = jnp.asarray(seqs.tokens), jnp.asarray(states)

    def predict(t, h, token):
        return module.apply({"params": {**t, **fixed}}, h, table[token])

    def loss_fn(t, p):
        h, total = states[p], 0.0
        for i in range(1, UNROLL + 1):
            h, logits, _ = predict(t, h, tokens[p + i])
            true = states[p + i]
            teacher = jax.nn.softmax(true @ fixed["lm_head"], axis=-1)
            total += -jnp.mean(jnp.sum(teacher * jax.nn.log_softmax(logits, axis=-1), axis=-1))
            total += FEATURE_WEIGHT * jnp.mean((h - true) ** 2) / jnp.mean(true**2)
        return total

    decay = lambda tree: jax.tree.map(lambda a: a.ndim >= 2, tree)  # noqa: E731 (no decay on norms)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.98), optax.add_decayed_weights(0.01, decay)
    )
    state = opt.init(trainable)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(t, state, p, lr):
        loss, grads = jax.value_and_grad(loss_fn)(t, p)
        updates, state = opt.update(grads, state, t)
        return jax.tree.map(lambda a, u: a - lr * u, t, updates), state, loss

    evaluate = Evaluator(module, table, fixed, heldout)
    curve = [(0, *evaluate(trainable))]
    positions = example_positions(seqs, answers_only=False)
    rng = np.random.default_rng([settings.seed, 5])
    losses, done, total, cap = [], 0, settings.steps, WallClockCap(settings.steps, settings.max_seconds)
    while done < total:
        p = jnp.asarray(rng.choice(positions, settings.batch))
        lr = np.float32(learning_rate(done, total, settings.lr))
        trainable, state, loss = step(trainable, state, p, lr)
        losses.append(float(loss))
        done += 1
        total = cap.total(done)
        if done in {max(1, total * i // 4) for i in (1, 2, 3)} and done < total:
            curve.append((done, *evaluate(trainable)))
            log.info(
                "step %d: loss %.3f, held-out proxy %.4f (second %.4f)", done, np.mean(losses[-50:]), *curve[-1][1:]
            )
    seconds = time.perf_counter() - cap.start
    if done:
        curve.append((done, *evaluate(trainable)))
        log.info("step %d: loss %.3f, held-out proxy %.4f (second %.4f)", done, np.mean(losses[-50:]), *curve[-1][1:])
    final = jax.tree.map(np.asarray, {**trainable, **fixed})
    return HeadResult(final, done, seconds, losses, curve)


class Evaluator:
    """(first-proposal proxy, second-given-first proxy) of trainable params on the held-out sequences."""

    def __init__(self, module, table, fixed, heldout):
        seqs, states = heldout
        p = example_positions(seqs, answers_only=True)
        self.want = seqs.tokens[p + 2], seqs.tokens[p + 3]
        h0, x1, x2 = jnp.asarray(states[p]), jnp.asarray(seqs.tokens[p + 1]), jnp.asarray(seqs.tokens[p + 2])

        @jax.jit
        def proposals(t):
            params = {"params": {**t, **fixed}}
            h1, logits1, ids = module.apply(params, h0, table[x1])
            _, logits2, _ = module.apply(params, h1, table[x2])  # fed the true x_{p+2}: counts only where it was right
            return ids[jnp.argmax(logits1, -1)], ids[jnp.argmax(logits2, -1)]

        self.proposals = proposals

    def __call__(self, trainable) -> tuple[float, float]:
        first, second = (np.asarray(a) for a in self.proposals(trainable))
        if not len(first):
            return 0.0, 0.0
        ok1 = first == self.want[0]
        ok2 = (second == self.want[1])[ok1]
        return float(ok1.mean()), float(ok2.mean()) if ok2.size else 0.0
