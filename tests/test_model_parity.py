"""jaxinfer logits vs Hugging Face transformers' LlamaForCausalLM on the same random weights.

The weights go through the real import path: `save_pretrained` safetensors -> jaxinfer reader ->
sharded params on a mesh. Each architecture variant below exercises a different code path
(MHA, GQA, MQA, tied embeddings, explicit head_dim, Llama-3.1 rope scaling).
"""

import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.sharding import make_mesh
from tests.hf_reference import hf_logits, relative_error, save_random_hf_llama

BASE = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    head_dim=16,
    max_position_embeddings=256,
    rope_theta=10000.0,
)

VARIANTS = {
    "mha": ModelConfig(name="mha", num_heads=4, num_kv_heads=4, **BASE),
    "gqa": ModelConfig(name="gqa", num_heads=8, num_kv_heads=2, **BASE),
    "mqa": ModelConfig(name="mqa", num_heads=8, num_kv_heads=1, **BASE),
    "tied": ModelConfig(name="tied", num_heads=4, num_kv_heads=2, tie_embeddings=True, **BASE),
    "head_dim": ModelConfig(
        name="head_dim", num_heads=4, num_kv_heads=2, **{**BASE, "head_dim": 32}
    ),  # 4 * 32 != hidden 64
    "llama31_rope": ModelConfig(
        name="llama31_rope",
        num_heads=4,
        num_kv_heads=2,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=32),
        **{**BASE, "rope_theta": 500000.0},
    ),
    # odd head counts force zero-padding of heads, MLP units and vocabulary on tensor=4 / 8
    "odd_heads": ModelConfig(
        name="odd_heads",
        num_heads=6,
        num_kv_heads=3,
        **{**BASE, "hidden_size": 96, "intermediate_size": 90, "vocab_size": 390},
    ),
}

MESHES = ["1x1", "1x8", "2x4"]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for name, cfg in VARIANTS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, save_random_hf_llama(cfg, path, seed=len(name)))
    return out


def _tokens(vocab: int, batch: int = 2, length: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length))


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(hf_models, variant, mesh_name):
    cfg = VARIANTS[variant]
    path, reference = hf_models[variant]
    mesh = make_mesh(mesh_name)
    model = load_model(str(path), mesh, "float32", layer_loop="scan")
    tokens = _tokens(cfg.vocab_size)
    ours = model.logits(tokens)
    theirs = hf_logits(reference, tokens)
    assert ours.shape == theirs.shape == (2, 40, cfg.vocab_size)
    err = relative_error(ours, theirs)
    assert err < 1e-4, f"{variant} on {mesh_name}: relative error {err:.2e}"


def test_long_positions_rope_scaling(hf_models):
    """Positions past original_max_position exercise every branch of the llama3 frequency scaling."""
    path, reference = hf_models["llama31_rope"]
    model = load_model(str(path), make_mesh("1x1"), "float32", layer_loop="scan")
    tokens = _tokens(VARIANTS["llama31_rope"].vocab_size, batch=1, length=200, seed=3)
    err = relative_error(model.logits(tokens), hf_logits(reference, tokens))
    assert err < 1e-4


@pytest.mark.parametrize("variant", ["gqa", "odd_heads"])
def test_meshes_agree(hf_models, variant):
    """Same weights on 1x1, 2x4 and 1x2x4 (sequence-sharded activations) give the same logits."""
    path, _ = hf_models[variant]
    tokens = _tokens(VARIANTS[variant].vocab_size, batch=2, length=32, seed=1)
    base = load_model(str(path), make_mesh("1x1"), "float32", layer_loop="scan").logits(tokens)
    for mesh_name in ("2x4", "1x2x4"):
        other = load_model(str(path), make_mesh(mesh_name), "float32", layer_loop="scan").logits(tokens)
        err = relative_error(other, base)
        assert err < 1e-5, f"{variant}: {mesh_name} vs 1x1 relative error {err:.2e}"


def test_padding_rows_do_not_change_real_rows(hf_models):
    """Right-padded rows (position -1) leave the real tokens' logits unchanged."""
    path, reference = hf_models["gqa"]
    model = load_model(str(path), make_mesh("2x4"), "float32", layer_loop="scan")
    tokens = _tokens(VARIANTS["gqa"].vocab_size, batch=2, length=24, seed=2)
    positions = np.tile(np.arange(24), (2, 1))
    positions[1, 10:] = -1
    ours = model.logits(tokens, positions)
    short = hf_logits(reference, tokens[1:, :10])
    assert relative_error(ours[1, :10], short[0]) < 1e-4


@pytest.mark.parametrize("variant,mesh_name", [("gqa", "1x1"), ("odd_heads", "2x4")])
def test_unrolled_layout_matches_transformers(hf_models, variant, mesh_name):
    """The CPU layout (per-layer, output-major weights) against transformers, on both of its paths:
    short rows run feature-major, long rows token-major (see `cpu_layout.FEATURE_MAJOR_TOKENS`)."""
    from jaxinfer.model.cpu_layout import FEATURE_MAJOR_TOKENS

    cfg = VARIANTS[variant]
    path, reference = hf_models[variant]
    model = load_model(str(path), make_mesh(mesh_name), "float32", layer_loop="unrolled")
    for length in (12, FEATURE_MAJOR_TOKENS + 36):
        tokens = _tokens(cfg.vocab_size, batch=2, length=length, seed=length)
        err = relative_error(model.logits(tokens), hf_logits(reference, tokens))
        assert err < 1e-4, f"{variant} unrolled on {mesh_name}, {length} tokens: relative error {err:.2e}"


def test_unrolled_layers_are_traced_and_lowered_once(hf_models):
    """The unrolled loop calls one nested jit for every layer (`llama.apply_layer`): a step traces one
    layer's jaxpr, shared by all its calls, and lowers it to one function, instead of tracing and
    lowering `num_layers` copies. Its logits are checked against transformers above."""
    import dataclasses

    from jaxinfer.model.forward import _dense_forward

    cfg = VARIANTS["gqa"].replace(num_layers=4)
    path, _ = hf_models["gqa"]
    model = load_model(str(path), make_mesh("1x1"), "float32", layer_loop="unrolled")
    # four layers (the saved model's two, twice), so that layers repeat beyond a pair
    params = {**model.params, **{f"layers_{i}": model.params[f"layers_{i - 2}"] for i in (2, 3)}}
    model = dataclasses.replace(model, config=cfg, params=params)
    tokens = np.asarray(_tokens(cfg.vocab_size), np.int32)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)

    forward = _dense_forward(model.module, model.mesh, False, False)  # what `ShardedModel.logits` runs
    traced = forward.trace(model.params, tokens, positions)
    layers = [e for e in traced.jaxpr.eqns if e.primitive.name in ("pjit", "jit") and e.params["name"] == "apply_layer"]
    assert len(layers) == 4 and len({id(e.params["jaxpr"]) for e in layers}) == 1
    text = traced.lower().as_text()
    assert text.count("func.func private @apply_layer") == 1 and text.count("call @apply_layer") == 4
