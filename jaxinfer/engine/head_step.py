"""The feature head's part of a step (`--speculative draft` with a feature-head draft,
`jaxinfer.model.feature_head`): K greedy proposals per flagged slot, from the target's own hidden state.

After sampling, each slot's newest accepted token is `last` (its sample at the window offset it
accepted), and the target's final-normed hidden state at that offset is in this step's logit rows.
From them the head proposes K tokens one after another, each from its own predicted hidden state and
the token it proposed before. The proposals go back to the host with the samples and come back as
the slot's next verify window; the head keeps no state between steps (no cache to follow, roll back
or keep in step with the scheduler), so nothing changes for preemption, prefix-cache hits or slots
that stopped speculating. Greedy proposals keep verification exact for sampled requests too
(`jaxinfer.engine.verify`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.engine.draft_step import Draft


@dataclasses.dataclass(frozen=True)
class HeadDraft:
    """What a step needs of a feature head (static)."""

    module: object  # jaxinfer.model.feature_head.FeatureHead
    tokens: int  # K
    table: object  # jaxinfer.model.llama.TokenTable: the target's embedding lookup


def step_draft(model, draft, draft_shape, tokens: int, page_size: int, pages_per_shard: int):
    """The `build_step_fn` draft triple (draft, its cache shape or None, its step spec) of ShardedModel
    `draft` proposing `tokens` for target `model`: a feature head's `HeadDraft` (no cache), or a draft
    model's `draft_step.Draft` over its cache of shape `draft_shape`."""
    if not draft.config.feature_head:
        return draft, draft_shape, Draft(draft.module, tokens, page_size, pages_per_shard)
    from jaxinfer.model.llama import TokenTable

    table = TokenTable(model.config, model.layout, model.dtype, model.quant)
    return draft, None, HeadDraft(draft.module, tokens, table)


def row_features(hidden, rows):
    """hidden [D, T, E] (every token of the step), rows i32 [D, R] -> [D, R, E]: the logit rows' states."""
    return jnp.take_along_axis(hidden, rows[..., None], axis=1)


def accepted_features(features, window_rows, accepted):
    """features [D, S + E, E] of the sample rows; window_rows i32 [D, S, K + 1]; accepted i32 [D, S] ->
    [D, S, E]: each slot's hidden state at the window offset it accepted (its newest sampled position)."""
    row = jnp.take_along_axis(window_rows, accepted[..., None], axis=-1)
    return jnp.take_along_axis(features, jnp.maximum(row, 0), axis=1)


def propose(head: HeadDraft, params, target_params, features, last, flagged):
    """features [D, S, E]; last i32 [D, S]; flagged bool [D, S] -> proposals i32 [D, S, K] (rows of
    unflagged slots are meaningless). Skipped when no slot is flagged."""
    d, s = last.shape
    table = {"params": {k: v for k, v in target_params.items() if k.startswith("embed")}}

    def run():
        state, token, out = features, last, []
        for _ in range(head.tokens):
            rows = head.table.apply(table, token)
            state, logits, ids = head.module.apply({"params": params}, state, rows)
            token = jnp.take(ids, jnp.argmax(logits, axis=-1))
            out.append(token)
        return jnp.stack(out, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.any(flagged), run, lambda: jnp.zeros((d, s, head.tokens), jnp.int32))
