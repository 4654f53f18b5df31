"""A step's inputs packed into one int32 array (`jaxinfer.engine.packed_inputs`): every field comes back
bit for bit, on host and inside jit, and the engine lowers its steps for exactly one packed array."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxinfer.engine.packed_inputs import PackedInputs, abstract_inputs
from jaxinfer.engine.step_inputs import HostBatchBuilder
from jaxinfer.engine.step_registry import verify_key
from jaxinfer.sharding import make_mesh


def _fields(inputs) -> dict:
    flat = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs) if f.name != "sampling"}
    return {**flat, **vars(inputs.sampling)}


def _busy_host(builder: HostBatchBuilder) -> dict:
    """A verify step's arrays with every field holding distinct values, float and uint32 bit patterns
    included (NaN payloads, seeds above 2^31)."""
    host = builder.empty(8, builder.extra_rows(8))
    rng = np.random.default_rng(0)
    for a in host.values():
        if a.dtype == np.bool_:
            a[...] = rng.random(a.shape) < 0.5
        elif a.dtype == np.float32:
            a[...] = rng.normal(size=a.shape).astype(np.float32)
        else:
            a[...] = rng.integers(np.iinfo(a.dtype).min, np.iinfo(a.dtype).max, size=a.shape, dtype=a.dtype)
    host["temperature"].view(np.uint32)[0, 0] = 0x7FC01234  # a NaN with a payload
    host["seed"][0, 1] = 2**32 - 1
    return host


def test_every_field_round_trips_bit_for_bit_on_host_and_in_jit():
    builder = HostBatchBuilder(2, 4, 8, 64, 16, proposals=3)
    host = _busy_host(builder)
    packed = PackedInputs.pack(host)
    assert packed.words.dtype == np.int32 and packed.words.shape[0] == 2
    assert packed.words.shape[1] == sum(a[0].size for a in host.values())
    on_device = jax.jit(lambda p: p.unpack())(jax.device_put(packed))
    for unpacked in (packed.unpack(), on_device):
        got = _fields(unpacked)
        assert set(got) == set(host)
        for name, want in host.items():
            have = np.asarray(got[name])
            assert have.dtype == want.dtype and have.shape == want.shape, name
            assert have.tobytes() == want.tobytes(), name


def test_only_four_byte_types_and_booleans_are_packed():
    with pytest.raises(TypeError, match="float64"):
        PackedInputs.pack({"x": np.zeros((1, 2), np.float64)})


def test_the_engine_lowers_its_steps_for_one_packed_array():
    builder = HostBatchBuilder(2, 4, 8, 64, 16, proposals=3)
    mesh = make_mesh("2x4")
    for key in (8, verify_key(8)):
        abstract = abstract_inputs(builder, mesh, key)
        (leaf,) = jax.tree.leaves(abstract)
        assert leaf.dtype == np.int32 and leaf.shape == PackedInputs.pack(builder.idle(key)).words.shape
        assert leaf.sharding.spec[0] is not None  # split over the data shards


def test_only_the_tokens_that_sample_reach_the_vocabulary_head():
    """A step of T tokens projects at most min(T, S) sample rows (plus a verify step's extra rows) to the
    vocabulary, not one per slot: a one-token step with 4 slots projects one row, and logit_map sends
    every slot's sample row back to its place."""
    builder = HostBatchBuilder(1, 4, 8, 64, 16, proposals=3)
    assert builder.empty(1)["logit_rows"].shape == builder.empty(1)["logit_slot"].shape == (1, 1)
    assert builder.empty(8)["logit_rows"].shape == (1, 4)
    assert builder.empty(8, builder.extra_rows(8))["logit_map"].shape == (1, 4)
