"""Config presets, mesh parsing, the sharding table and the errors users see for bad meshes."""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxinfer.config import PRESETS, ConfigError, ModelConfig, get_preset
from jaxinfer.model.layout import plan_layout
from jaxinfer.model.params import abstract_params, count_params
from jaxinfer.sharding import LOGICAL_RULES, MeshError, logical_to_mesh_axes, make_mesh, parse_mesh


@pytest.mark.parametrize(
    "name,published", [("llama3-8b", 8.03e9), ("llama3-70b", 70.55e9), ("llama3.2-1b", 1.24e9), ("llama2-7b", 6.74e9)]
)
def test_preset_param_counts_match_published(name, published):
    counted = count_params(get_preset(name))  # jax.eval_shape over the real module: no memory
    assert abs(counted - published) / published < 0.005, counted
    assert counted == get_preset(name).param_count()


def test_required_presets_exist():
    for name in (
        "tiny",
        "stories260k",
        "smollm2-135m",
        "llama2-7b",
        "llama3-8b",
        "llama3.1-8b",
        "llama3-70b",
        "llama3.2-1b",
    ):
        assert name in PRESETS
    with pytest.raises(ConfigError, match="model preset 'llama9' is unknown"):
        get_preset("llama9")


def test_config_is_hashable_and_validated():
    cfg = get_preset("tiny")
    assert hash(cfg) == hash(cfg.replace())
    with pytest.raises(ConfigError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        cfg.replace(num_heads=6, num_kv_heads=4)


def test_from_hf_config_reads_llama31(tmp_path):
    cfg = get_preset("llama3.1-8b")
    assert ModelConfig.from_hf_config({**cfg.to_hf_config(), "_name_or_path": cfg.name}) == cfg


@pytest.mark.parametrize(
    "text,shape",
    [
        ("2x4", (2, 1, 4)),
        ("1x2x4", (1, 2, 4)),
        ("8", (1, 1, 8)),
        ("data=2,tensor=4", (2, 1, 4)),
        ("sequence=2", (1, 2, 1)),
        ("v5e-8", (2, 1, 4)),
        ("cpu-8", (2, 1, 4)),
    ],
)
def test_parse_mesh(text, shape):
    assert parse_mesh(text).shape == shape


@pytest.mark.parametrize(
    "text,message",
    [
        ("2x", "expected DATAxTENSOR"),
        ("data=2,model=4", "unknown axis 'model'"),
        ("data=two", "axis data size 'two' is not a positive integer"),
        ("0x4", "axis data size 0 must be >= 1"),
    ],
)
def test_bad_mesh_strings(text, message):
    with pytest.raises(MeshError, match=message):
        parse_mesh(text)


def test_mesh_needing_more_devices_than_exist_is_one_clear_line():
    with pytest.raises(MeshError) as e:
        make_mesh("4x4")
    assert str(e.value) == "mesh data=4,sequence=1,tensor=4 needs 16 devices but only 8 CPU device(s) are available"


def test_cpu_mesh_larger_than_device_count_sets_up_host_devices():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    code = (
        "from jaxinfer.sharding import make_mesh; m = make_mesh('1x2x4'); "
        "import jax; print(len(jax.devices()), dict(m.shape))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "8 {'data': 1, 'sequence': 2, 'tensor': 4}"


def test_logical_axis_collisions_are_refused():
    assert logical_to_mesh_axes(("layers", "embed", "q_heads", "head_dim")) == (None, None, "tensor", None)
    with pytest.raises(MeshError, match="'q_heads' and 'mlp' both map to mesh axis 'tensor'"):
        logical_to_mesh_axes(("q_heads", "mlp"))


def test_every_parameter_sharding_comes_from_the_table():
    cfg = get_preset("llama3-8b")
    mesh = make_mesh("2x4")
    tree = abstract_params(cfg, plan_layout(cfg, 4), jnp.bfloat16, mesh)
    q = tree["layers"]["attn"]["q"]
    assert q.shape == (32, 4096, 32, 128) and tuple(q.sharding.spec) == (None, None, "tensor", None)
    assert tuple(tree["layers"]["mlp"]["down"].sharding.spec) == (None, "tensor", None)
    assert tuple(tree["embed"].sharding.spec) == ("tensor", None)
    targets = [axis for v in LOGICAL_RULES.values() for axis in (v if isinstance(v, tuple) else (v,))]
    assert set(targets) <= {None, "data", "sequence", "tensor"}
    assert LOGICAL_RULES["cache_pages"] == ("data", "sequence")  # each (data, sequence) shard its own pages


@pytest.mark.parametrize(
    "heads,kv,tensor,expect_q,expect_kv",
    [
        (9, 3, 4, 12, 4),  # SmolLM2 on tensor=4: one dummy KV group
        (8, 4, 8, 8, 8),  # KV heads replicated twice, one query head per replica
        (64, 8, 16, 64, 16),  # Llama-3-70B on tensor=16: KV replicated, 4 query heads each
        (32, 8, 4, 32, 8),  # divisible: unchanged
    ],
)
def test_head_padding_plan(heads, kv, tensor, expect_q, expect_kv):
    cfg = get_preset("tiny").replace(num_heads=heads, num_kv_heads=kv)
    lay = plan_layout(cfg, tensor, quiet=True)
    assert (lay.q_heads, lay.kv_heads) == (expect_q, expect_kv)
    assert lay.q_heads % tensor == 0 and lay.kv_heads % tensor == 0
    group = lay.q_per_kv
    # every real query head appears exactly once, under a KV head that is its own original KV head
    real = [(i, s) for i, s in enumerate(lay.q_source) if s is not None]
    assert sorted(s for _, s in real) == list(range(heads))
    for phys, logical in real:
        assert lay.kv_source[phys // group] == logical // (heads // kv)


def test_padding_is_logged_once(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        plan_layout(get_preset("smollm2-135m"), 4)
    lines = [r.message for r in caplog.records if "zero-padding" in r.message]
    assert len(lines) == 1 and "heads q 9->12, kv 3->4" in lines[0]
