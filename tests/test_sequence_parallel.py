"""Sequence parallelism (#21): a data shard's KV pages dealt round-robin over the mesh's `sequence` shards,
the step's tokens split over them, attention merged exactly across them.

Outside references: JAX's `ref_ragged_paged_attention` on the unsplit cache for the XLA path and the native
kernel, transformers' greedy `generate` on the same random weights for the engine; and every sequence
mesh against its mesh without a sequence axis, token for token.
"""

import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.pages import OutOfPages, PagePool
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sharding import make_mesh
from tests.hf_reference import hf_greedy, save_random_hf_llama

# A tiny random GQA Llama with an 8k context: long prompts are cheap, and transformers runs the same weights.
CONFIG = ModelConfig(
    name="gqa-8k",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    head_dim=16,
    max_position_embeddings=8192,
)


# ------------------------------------------------------------------------------------ host: pages
def test_pages_are_dealt_round_robin_over_stripes():
    pool = PagePool(12, stripes=3)  # stripe s: pages 4s .. 4s+3
    first = pool.allocate(5)
    assert [pool.stripe_of(p) for p in first] == [0, 1, 2, 0, 1]
    more = pool.allocate(4, first=5)  # pages 5..8 of the same sequence continue the rotation
    assert [pool.stripe_of(p) for p in more] == [2, 0, 1, 2]
    assert pool.free == 3  # one left on each stripe
    with pytest.raises(OutOfPages, match="stripe 0"):  # pages 0 and 3 both need stripe 0, which has one left
        pool.allocate(4)
    assert pool.free == 3  # a refused allocation takes nothing
    pool.release(first)
    assert pool.free == 8


def test_cached_pages_are_evicted_from_the_stripe_that_needs_one():
    pool = PagePool(4, stripes=2)
    a = pool.allocate(2)
    for i, p in enumerate(a):
        pool.register(p, bytes([i]))
    pool.release(a)  # both cached now: one on each stripe
    b = pool.allocate(2, first=1)  # page 1 (stripe 1, free), page 2 (stripe 0, free)
    assert pool.evictions == 0 and [pool.stripe_of(p) for p in b] == [1, 0]
    c = pool.allocate(1, first=2)  # stripe 0 has no free page left: its cached page goes
    assert pool.evictions == 1 and pool.stripe_of(c[0]) == 0 and pool.lookup([bytes([0])]) == []
    assert pool.lookup([bytes([1])]) == [a[1]]  # stripe 1's cached page was not evicted


# ------------------------------------------------------------------------------------ XLA path, native kernel
@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("shards", [2, 4])
def test_xla_path_and_native_kernel_shards_merge_to_jax_reference(shards, kv_dtype):
    """Pages dealt over S poisoned shard caches; each shard's partial result and log-sum-exp from the XLA
    path (and the native kernel where it builds), merged, equal JAX's reference on the unsplit cache."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    from jaxinfer import native
    from jaxinfer.engine import xla_attention
    from pallas_kernels.ragged_paged_attention.merge import merge_partials
    from pallas_kernels.ragged_paged_attention.quantized import dequantize_pages, write_tokens
    from tests.sequence_split import split_over_sequence_shards
    from tests.test_ragged_paged_attention import make_case

    args, n = make_case(0, [1, 40, 3, 1], [70, 40, 9, 130], Hq=8, Hk=2, D=32, page_size=8)
    if kv_dtype == "int8":  # the same K/V written into an int8 cache (values and scale rows), poison kept out
        pages = np.nan_to_num(np.asarray(args[1]), nan=0.0)
        rows = 8 + 1  # 4 * page / D = 1 scale row
        cache = jnp.zeros((pages.shape[0], rows) + pages.shape[2:], jnp.int8)
        ids, offsets = np.divmod(np.arange(pages.shape[0] * 8), 8)
        cache = write_tokens(cache, jnp.asarray(ids), jnp.asarray(offsets), jnp.asarray(pages.reshape(-1, 4, 32)))
        args = (args[0], cache, *args[2:])
        want = ref_ragged_paged_attention(args[0], dequantize_pages(cache), *args[2:], sm_scale=0.2)
    else:
        want = ref_ragged_paged_attention(*args, sm_scale=0.2)
    want = np.asarray(want)[:n]
    for use_native in (False, True) if native.available() else (False,):
        parts = []
        for s, shard_args in enumerate(split_over_sequence_shards(args, shards)):
            index = jnp.array([s], jnp.int32)
            fn = jax.jit(
                lambda *a, index=index, use_native=use_native: xla_attention.xla_ragged_paged_attention(
                    *a, sm_scale=0.2, native=use_native, sequence_shards=shards, sequence_index=index, return_lse=True
                )
            )
            parts.append(fn(*shard_args))
        merged = np.asarray(merge_partials(jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts])))
        assert np.isfinite(merged).all()
        np.testing.assert_allclose(merged[:n], want, atol=2e-5, err_msg=f"native={use_native}")
        assert (merged[n:] == 0).all()


# ------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, transformers model) of the random 8k-context GQA model."""
    path = tmp_path_factory.mktemp("gqa8k")
    return path, save_random_hf_llama(CONFIG, path, seed=5, head_scale=40.0)


def run_engine(path, mesh, prompts, new_tokens, **config):
    model = load_model(str(path), make_mesh(mesh), "float32")
    engine = Engine(model, None, EngineConfig(**config))
    engine.warmup()
    requests = [
        Request(f"r{i}", p, SamplingParams(max_tokens=n, ignore_eos=True))
        for i, (p, n) in enumerate(zip(prompts, new_tokens))
    ]
    results = engine.generate(requests)
    assert engine.compilations_after_warmup == 0
    return [r.token_ids for r in results], engine


LENGTHS = [6000, 4000, 1, 7, 33, 150, 700]
NEW = [6, 6, 12, 9, 16, 8, 10, 7]
LONG = 1  # the 4,000-token prompt of the capacity test
KV_PAGES = {"1x1x4": 400, "1x2x4": 200, "2x2x2": 192}  # --kv-pages: per (data, sequence) shard


@pytest.fixture(scope="module")
def outputs(tiny):
    """{mesh: (greedy outputs of PROMPTS, engine)}: the same requests, one bucket of 256 tokens (one compile
    per mesh), 400 pages per data shard (384 on 2x2x2): the two longest prompts need 627 together, so
    requests are preempted and recomputed."""
    path, _ = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in LENGTHS]
    prompts.append(prompts[0][:2000] + prompts[-1][:40])  # shares 125 pages with the first: prefix-cache hits
    runs = {}
    for mesh, kv_pages in KV_PAGES.items():
        runs[mesh] = run_engine(
            path,
            mesh,
            prompts,
            NEW,
            max_slots=4,
            max_context=6144,
            prefill_chunk=256,
            min_bucket=256,
            kv_pages=kv_pages,
        )
    return prompts, runs


@pytest.mark.parametrize("mesh", ["1x2x4", "2x2x2"])
def test_sequence_meshes_generate_what_meshes_without_sequence_do(tiny, outputs, mesh):
    """Greedy outputs of 1x2x4 and 2x2x2 equal 1x1x4's token for token (prompts of 1 to 6,000 tokens,
    chunked prefill included; 1x2x4 and 1x1x4 preempt), and 1x1x4's equal transformers' generate.
    (2x2x2 against 1x1x4 rather than 2x1x4: outputs do not depend on the data axis, which test_engine
    checks, so one mesh without a sequence axis is the baseline of both.)"""
    _, hf = tiny
    prompts, runs = outputs
    (base, base_engine), (split, engine) = runs["1x1x4"], runs[mesh]
    for i, prompt in enumerate(prompts):
        assert split[i] == base[i], f"prompt of {len(prompt)} tokens"
    assert engine.scheduler.prefix.stats.hit_tokens >= 1000  # the last prompt's shared pages were adopted
    if mesh == "1x2x4":  # (2x2x2 routes the two longest prompts to different data shards: no preemption)
        assert base_engine.scheduler.preemptions > 0 and engine.scheduler.preemptions > 0
        for i in (0, 2, 5):
            assert base[i] == hf_greedy(hf, prompts[i], NEW[i]), f"prompt of {len(prompts[i])} tokens"
    # each device holds its own shard's pages: on 1x2x4 the same 400 pages per data shard as 1x1x4, half per device
    pages = lambda e: (e.cache[0].shape[0], e.cache[0].sharding.shard_shape(e.cache[0].shape)[0])  # noqa: E731
    assert pages(base_engine) == (400, 400)
    assert pages(engine) == ((400, 200) if mesh == "1x2x4" else (768, 192))


def test_capacity_grows_with_sequence_shards(tiny, outputs):
    """--max-context 4096 --kv-pages 160 (2,560 tokens per shard): 1x1x4 refuses with the capacity error,
    1x2x4 serves a 4,000-token request, its pages dealt over both sequence shards, with the tokens 1x1x4
    gives when it has pages enough."""
    path, _ = tiny
    prompts, runs = outputs
    config = EngineConfig(max_slots=1, max_context=4096, kv_pages=160, prefill_chunk=256, min_bucket=256)
    model = load_model(str(path), make_mesh("1x1x4"), "float32")
    with pytest.raises(ConfigError, match="--kv-pages 160 is below the 256 pages per shard"):
        Engine(model, None, config)
    engine = Engine(load_model(str(path), make_mesh("1x2x4"), "float32"), None, config)
    engine.warmup()
    engine.submit(Request("long", prompts[LONG], SamplingParams(max_tokens=NEW[LONG], ignore_eos=True)))
    pool, stripes, result = engine.scheduler.pools[0], [], None
    while engine.has_work():
        for event in engine.step():
            result = event.result or result
        for seq in engine.scheduler.running():
            stripes = [pool.stripe_of(p) for p in seq.pages]
    assert len(stripes) == 251 and stripes == [j % 2 for j in range(251)]  # ceil(4005 / 16) pages, alternating
    assert result.token_ids == runs["1x1x4"][0][LONG]
    assert engine.compilations_after_warmup == 0
