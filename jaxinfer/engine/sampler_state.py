"""What sampling carries from one step to the next, on device: each slot's last sampled token (the next
step's input when it decodes) and the penalty rows of its request (`PenaltyRows`: generated-token counts,
prompt tokens, logit bias; each [D, S, vocab]).

The step itself counts each token it samples for a penalized slot. A slot's rows are written whole
(`RowSetter`) when a request with penalties or a bias is admitted to it, from what the host knows:
its prompt and the tokens it generated before a preemption (admission waits until none is in flight).
Rows of slots whose request has no penalties are never read, so they need no reset.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.engine.requests import SamplingParams
from jaxinfer.sampling import PenaltyRows
from jaxinfer.sharding import logical_sharding

ROW_AXES = ("batch", None)  # [D, S]
VOCAB_ROW_AXES = ("batch", None, None)  # [D, S, vocab]: the whole vocabulary on every tensor shard


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    prev_tokens: jax.Array  # i32 [D, S]
    penalties: PenaltyRows  # each [D, S, vocab]


def _shapes(data: int, slots: int, vocab: int) -> SamplerState:
    row = (data, slots, vocab)
    return SamplerState(
        prev_tokens=jax.ShapeDtypeStruct((data, slots), jnp.int32),
        penalties=PenaltyRows(
            counts=jax.ShapeDtypeStruct(row, jnp.int32),
            seen=jax.ShapeDtypeStruct(row, jnp.bool_),
            bias=jax.ShapeDtypeStruct(row, jnp.float32),
        ),
    )


def state_shardings(mesh) -> SamplerState:
    vocab_rows = logical_sharding(mesh, VOCAB_ROW_AXES)
    return SamplerState(logical_sharding(mesh, ROW_AXES), PenaltyRows(vocab_rows, vocab_rows, vocab_rows))


def abstract_state(mesh, data: int, slots: int, vocab: int) -> SamplerState:
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        _shapes(data, slots, vocab),
        state_shardings(mesh),
    )


def allocate_state(mesh, data: int, slots: int, vocab: int) -> SamplerState:
    return jax.tree.map(
        lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh),
        _shapes(data, slots, vocab),
        state_shardings(mesh),
    )


def penalty_rows(params: SamplingParams, prompt: list[int], generated: list[int], vocab: int) -> PenaltyRows:
    """Numpy rows [vocab] for a request admitted with `generated` tokens already produced."""
    counts = np.bincount(np.asarray(generated, np.int64), minlength=vocab).astype(np.int32)
    seen = np.zeros(vocab, bool)
    seen[np.asarray(prompt, np.int64)] = True
    bias = np.zeros(vocab, np.float32)
    for token, value in params.logit_bias:
        bias[token] = value
    return PenaltyRows(counts, seen, bias)


class RowSetter:
    """Writes one slot's penalty rows into the (donated) state. Its executable is compiled, or loaded from
    the step store, at start-up (`compile`/`install`), so the first penalized request compiles nothing."""

    NAME = "penalty_rows"  # its file in the step store

    def __init__(self, mesh, data: int, slots: int, vocab: int):
        def set_rows(state: SamplerState, shard, slot, rows: PenaltyRows) -> SamplerState:
            put = lambda table, row: jax.lax.dynamic_update_slice(table, row[None, None], (shard, slot, 0))
            return dataclasses.replace(state, penalties=jax.tree.map(put, state.penalties, rows))

        self._fn = jax.jit(set_rows, donate_argnums=(0,), out_shardings=state_shardings(mesh))
        self._abstract = abstract_state(mesh, data, slots, vocab)
        self._vocab = vocab
        self._compiled = None

    @property
    def ready(self) -> bool:
        return self._compiled is not None

    def compile(self):
        row = lambda dtype: jax.ShapeDtypeStruct((self._vocab,), dtype)
        rows = PenaltyRows(row(jnp.int32), row(jnp.bool_), row(jnp.float32))
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        return self._fn.lower(self._abstract, scalar, scalar, rows).compile()

    def install(self, compiled) -> None:
        self._compiled = compiled

    def __call__(self, state: SamplerState, shard: int, slot: int, rows: PenaltyRows) -> SamplerState:
        if self._compiled is None:
            self._compiled = self.compile()
        return self._compiled(state, np.int32(shard), np.int32(slot), rows)
