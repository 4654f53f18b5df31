"""The draft model's part of a step (`--speculative draft`): it keeps its own paged cache in step with
the target's, and proposes the next K tokens of the slots that will speculate in the next step.

The draft has its own KV cache with the target's page tables (the same page ids, its own arrays), so
a page the target holds for a sequence holds the draft's K/V of the same tokens; prefix-cache
adoption, preemption and rollback need nothing of their own. Each step:
  1. the draft runs over exactly the step's tokens (prompt chunks and verify windows), writing its
     K/V at their positions; of a verify window, the offsets past the accepted ones are garbage that
     a later step overwrites, as in the target's cache. While the policy has speculation off for every
     slot the step does not follow (it costs nothing then); a sequence whose draft cache fell behind
     that way does not speculate again (`Sequence.draft_valid`);
  2. for slots flagged `propose` (they sampled in this step and speculate in the next), K greedy
     draft steps on device, one token per slot each: from the slot's last token (its sample at the
     accepted offset) at its position, writing the draft's K/V there. The host allocated pages for
     those K positions. The proposals go back to the host with the samples and come back as the
     next step's window, so nothing of the draft's state lives outside its cache.
Greedy proposals keep verification exact for sampled requests too (`jaxinfer.engine.verify`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.engine.paged_attention import PagedAttention
from jaxinfer.engine.step_inputs import StepInputs
from jaxinfer.sampling import greedy_tokens


@dataclasses.dataclass(frozen=True)
class Draft:
    """What a step needs of the draft model (static): its module and how many tokens it proposes."""

    module: object  # jaxinfer.model.llama.Llama
    tokens: int  # K
    page_size: int
    pages_per_shard: int  # a write to this page is dropped


def follow(draft: Draft, params, cache, tokens, inputs: StepInputs, ctx: PagedAttention):
    """Step 1: the draft's K/V of this step's tokens [D, T] (its logits are not needed); skipped when the
    step does not follow (`inputs.follow`: the policy has speculation off)."""
    d = tokens.shape[0]

    def run(cache):
        logit_rows = jnp.zeros((d, 1), jnp.int32)
        return draft.module.apply({"params": params}, tokens, inputs.positions, ctx, cache, logit_indices=logit_rows)[1]

    return jax.lax.cond(jnp.any(inputs.follow), run, lambda c: c, cache)


def propose(draft: Draft, params, cache, inputs: StepInputs, ctx: PagedAttention, last, position, flagged):
    """Step 2. last i32 [D, S]: each slot's newest token; position i32 [D, S]: its position; flagged bool
    [D, S]. -> (cache, proposals i32 [D, S, K]; rows of unflagged slots are meaningless)."""
    d, s = last.shape
    k = draft.tokens
    pages_per_shard, page_size = draft.pages_per_shard, draft.page_size
    width = inputs.page_indices.shape[2]
    one_each = jnp.broadcast_to(jnp.arange(s + 1, dtype=jnp.int32), (d, s + 1))
    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (d, s))

    def advance(i, carry):
        cache, token, out = carry
        pos = position + i
        slot_page = pos // page_size
        live = flagged & (slot_page < width)
        page = jnp.take_along_axis(inputs.page_indices, jnp.minimum(slot_page, width - 1)[..., None], axis=2)[..., 0]
        step = dataclasses.replace(
            inputs,
            write_page=jnp.where(live, page, pages_per_shard),
            write_offset=pos % page_size,
            kv_lens=jnp.where(live, pos + 1, 1),
            cu_q_lens=one_each,
            num_seqs=jnp.full((d, 1), s, jnp.int32),
        )
        logits, cache = draft.module.apply(
            {"params": params},
            token,
            jnp.where(live, pos, 0),
            dataclasses.replace(ctx, inputs=step),
            cache,
            logit_indices=rows,
        )
        nxt = greedy_tokens(logits.reshape(d * s, -1)).reshape(d, s)
        return cache, nxt, out.at[:, :, i].set(nxt)

    def run(cache):
        cache, _, out = jax.lax.fori_loop(0, k, advance, (cache, last, jnp.zeros((d, s, k), jnp.int32)))
        return cache, out

    return jax.lax.cond(jnp.any(flagged), run, lambda c: (c, jnp.zeros((d, s, k), jnp.int32)), cache)
