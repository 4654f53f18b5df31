"""The jitted engine step: one ragged batch of tokens through the model with a paged KV cache
(`paged_attention`), then sampling.

A step samples one row per sampling slot (its last token's logits; only those rows reach the head and
the sampler, `jaxinfer.engine.sample_rows`). With speculation an engine compiles two
variants of each bucket's step: the plain one, and a verify one whose inputs have E > 0 extra sample
rows for the offsets of speculating slots' windows (`jaxinfer.engine.verify`); a step without
proposals runs the plain one and pays nothing for speculation. With a draft model both variants also
run the draft (`jaxinfer.engine.draft_step`), or a feature head on the target's hidden states
(`jaxinfer.engine.head_step`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxinfer.engine import draft_step, head_step
from jaxinfer.engine.packed_inputs import PackedInputs
from jaxinfer.engine.paged_attention import AttentionImpl, PagedAttention
from jaxinfer.engine.sample_rows import sample_step_rows, step_logits
from jaxinfer.engine.sampler_state import ROW_AXES, SamplerState, state_shardings
from jaxinfer.engine.verify import accepted_counts
from jaxinfer.engine.xla_attention import xla_ragged_paged_attention
from jaxinfer.kv_cache import CacheShape, cache_sharding
from jaxinfer.model.forward import ShardedModel
from jaxinfer.platform import Platform
from jaxinfer.sampling import PromptLogprobs, Samples, prompt_logprobs
from jaxinfer.sharding import logical_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """What a step returns besides the cache and sampler state; the host reads back only what it needs."""

    samples: Samples  # each [D, S + E, ...]: rows 0..S-1 one per slot, then the verify windows' extra rows
    prompt: PromptLogprobs  # each [D, T, ...]: per token of the step (zeros unless a request asked)
    accepted: jax.Array  # i32 [D, S]: proposals each slot's window accepted (0 without one)
    proposals: jax.Array  # i32 [D, S, K]: the draft's proposals for flagged slots' next windows (K = 0: none)


_traces = 0  # times a step function was traced in this process


def step_traces() -> int:
    """How often any engine step has been traced (lowered) in this process: zero on a start that loads
    every executable from disk."""
    return _traces


def build_step_fn(
    model: ShardedModel,
    cache_shape: CacheShape,
    platform: Platform,
    draft: tuple[ShardedModel, CacheShape | None, draft_step.Draft | head_step.HeadDraft] | None = None,
):
    """Returns jit(step)(params, cache, inputs, state) -> (StepOutputs, cache, state). With a draft,
    params and cache are pairs (the target's, the draft's; a feature head's cache is None).

    The cache and the sampler state are donated: XLA updates them in place and there is never a second
    copy on device.
    """
    module = model.module
    mesh = model.mesh
    impl = attention_impl(platform.attention, platform.interpret)
    vocab = model.config.vocab_size
    reads_features = draft is not None and isinstance(draft[2], head_step.HeadDraft)  # a feature head

    def step(params, cache, packed: PackedInputs, state: SamplerState):
        global _traces
        _traces += 1  # runs only while tracing
        inputs = packed.unpack()
        if draft is not None:
            (params, draft_params), (cache, draft_cache) = params, cache
        prev = jnp.take_along_axis(state.prev_tokens, inputs.prev_slot, axis=1)
        tokens = jnp.where(inputs.use_prev, prev, inputs.tokens)
        positions = inputs.positions
        if mesh.shape["sequence"] > 1:  # the step's tokens split over the sequence shards (`paged_attention`)
            split = logical_sharding(mesh, ("batch", "length"), tokens.shape)
            tokens, positions = (jax.lax.with_sharding_constraint(a, split) for a in (tokens, positions))
        ctx = PagedAttention(inputs, mesh, impl)
        rows = jnp.concatenate([inputs.sample_index, inputs.extra_index], axis=1)  # [D, S + E]

        def on_hidden(hidden, head):
            prompt = prompt_logprobs(hidden, head, inputs.prompt_targets, vocab)
            return (prompt, head_step.row_features(hidden, rows)) if reads_features else (prompt, None)

        logit_rows = jnp.concatenate([inputs.logit_rows, inputs.extra_index], axis=1)  # [D, R + E]
        logits, cache, (prompt, features) = module.apply(
            {"params": params},
            tokens,
            positions,
            ctx,
            cache,
            logit_indices=logit_rows,
            on_hidden=on_hidden,
            on_logits=lambda x, project: step_logits(x, project, inputs, vocab),
        )  # logits [D, R + E, V]; features [D, S + E, E] for a feature head
        samples, penalties = sample_step_rows(logits, inputs, state.penalties)  # [D, S + E, ...]
        accepted, last = accepted_counts(samples.tokens, inputs.window_rows, inputs.window_proposals)
        proposals = jnp.zeros(inputs.window_proposals.shape, jnp.int32)
        if reads_features:
            at = head_step.accepted_features(features, inputs.window_rows, accepted)
            proposals = head_step.propose(draft[2], draft_params, params, at, last, inputs.propose)
            cache = (cache, draft_cache)
        elif draft is not None:
            draft_model, _, spec = draft
            draft_ctx = PagedAttention(inputs, mesh, impl)
            draft_cache = draft_step.follow(spec, draft_params, draft_cache, tokens, inputs, draft_ctx)
            position = inputs.sampling.position + accepted
            draft_cache, proposals = draft_step.propose(
                spec, draft_params, draft_cache, inputs, draft_ctx, last, position, inputs.propose
            )
            cache = (cache, draft_cache)
        state = SamplerState(last, penalties)
        return StepOutputs(samples, prompt, accepted, proposals), cache, state

    row = output_sharding(mesh)
    outputs = StepOutputs(Samples(row, row, row, row), PromptLogprobs(row, row, row), row, row)
    caches = cache_sharding(mesh, cache_shape, model.layer_loop)
    if draft is not None:  # a feature head has no cache (None)
        caches = (caches, None if reads_features else cache_sharding(mesh, draft[1], draft[0].layer_loop))
    return jax.jit(step, donate_argnums=(1, 3), out_shardings=(outputs, caches, state_shardings(mesh)))


def output_sharding(mesh):
    """The step outputs' sharding: split over data shards in one process; replicated when the mesh spans
    processes, so process 0 reads every shard's samples from its own devices (`jaxinfer.multihost`)."""
    if jax.process_count() > 1:
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return logical_sharding(mesh, ROW_AXES)


@functools.cache
def attention_impl(kind: str, interpret: bool) -> AttentionImpl:
    """'xla' -> the XLA path; 'native' -> one pass of the native CPU kernel (through the XLA path's entry
    point); 'pallas' -> the Pallas ragged paged-attention kernel (in TPU interpret mode when `interpret`)."""
    if kind == "xla":
        return xla_ragged_paged_attention
    if kind == "native":
        return functools.partial(xla_ragged_paged_attention, native=True)
    if kind == "pallas":
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention

        return functools.partial(ragged_paged_attention, interpret=interpret)
    raise ValueError(f"attention {kind!r}: must be pallas, xla or native")
