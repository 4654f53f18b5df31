"""The step's head runs only for the rows that sample (`jaxinfer.engine.sample_rows`), and the sampler
maps rows back to slots and counts penalized slots' tokens where they belong."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine.sample_rows import row_tiers, sample_step_rows, step_logits
from jaxinfer.engine.step_inputs import HostBatchBuilder, StepInputs
from jaxinfer.sampling import PenaltyRows

VOCAB, WIDTH = 16, 8


def inputs_with(sampling_slots: list[list[int]], extra_rows: int = 0, **sampling) -> StepInputs:
    """Idle step inputs of len(sampling_slots) data shards x 4 slots, bucket 8 (R = 4), where shard d's
    rows sample the slots sampling_slots[d] in order."""
    host = HostBatchBuilder(len(sampling_slots), 4, 4, 32, 8, proposals=2).empty(8, extra_rows)
    for d, slots in enumerate(sampling_slots):
        host["logit_slot"][d, : len(slots)] = slots
        host["logit_map"][d, slots] = np.arange(len(slots))
    for name, value in sampling.items():
        host[name][:] = value
    return StepInputs.from_flat(host)


def project(rows):
    """A head whose logits name their row: row i of shard d gets 1 + 10 d + i in every column, from x."""
    return jnp.broadcast_to(rows[..., :1], rows.shape[:2] + (VOCAB,))


def rows_x(d: int, r: int, e: int):
    d_ids = np.arange(d)[:, None, None] * 10
    return jnp.asarray(np.broadcast_to(1 + d_ids + np.arange(r + e)[None, :, None], (d, r + e, WIDTH)), jnp.float32)


@pytest.mark.parametrize(
    "sampling_slots, projected",
    [([[2]], 1), ([[]], 0), ([[0, 3, 1]], 4), ([[3, 2, 1, 0]], 4), ([[1], []], 4), ([[], []], 4)],
)
def test_only_the_sampling_rows_reach_the_head(sampling_slots, projected):
    """With one data shard, rows past the tier that holds the sampling rows are never projected (zeros)
    and extra rows always are: a step that samples one slot of four projects one row. With two data
    shards every row is projected (the shards would have to agree on a tier first)."""
    e, d = 2, len(sampling_slots)
    inputs = inputs_with(sampling_slots, extra_rows=e)
    assert row_tiers(4) == (0, 1, 4)
    logits = np.asarray(jax.jit(lambda x: step_logits(x, project, inputs, VOCAB))(rows_x(d, 4, e)))
    expected = np.array(project(rows_x(d, 4, e)))
    expected[:, projected:4] = 0
    np.testing.assert_array_equal(logits, expected)


def test_samples_return_to_their_slots_and_penalties_count_there():
    """Row 0 of shard 0 samples slot 2 (penalized), row 0 of shard 1 samples slot 1 (not): slot 2's
    sample is row 0's greedy token, counted in slot 2's row only; shard 1 counts nothing."""
    inputs = inputs_with([[2], [1]])
    logits = np.full((2, 4, VOCAB), -1.0, np.float32)
    logits[0, 0, 5] = logits[1, 0, 9] = 3.0  # row 0's best tokens
    logits[0, 1:, 7] = logits[1, 1:, 7] = 9.0  # rows past the sampling ones must not matter
    penalized = np.zeros((2, 4), bool)
    penalized[0, 2] = True
    inputs = dataclasses.replace(inputs, sampling=dataclasses.replace(inputs.sampling, penalized=penalized))
    zeros = np.zeros((2, 4, VOCAB))
    penalties = PenaltyRows(zeros.astype(np.int32), zeros.astype(bool), zeros.astype(np.float32))
    samples, after = jax.jit(lambda lg, p: sample_step_rows(lg, inputs, p))(logits, penalties)
    assert int(samples.tokens[0, 2]) == 5 and int(samples.tokens[1, 1]) == 9
    counts = np.asarray(after.counts)
    assert counts[0, 2, 5] == 1 and counts.sum() == 1
