"""GGUF quantized tensors read as codes + scales (`GGUFSource.get_quantized`), checked against gguf's own
`gguf.quants.dequantize` on files we write with `gguf.GGUFWriter`, and against the float `get` on the
bundled SmolLM2 Q4_1/Q8_0 file.

Q8_0/Q4_0/Q4_1 blocks come both from `gguf.quants.quantize` and from random bytes (which reach every
code, e.g. Q8_0's -128 that quantize never writes); gguf cannot quantize Q4_K/Q6_K in Python, so those
are random bytes only. The fp16 fields of random blocks are set to finite values so the reference has no
NaN; everything else (codes, 6-bit scales and mins, int8 sub-scales) is random.
"""

import numpy as np
import pytest

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.open_source import open_source
from jaxinfer.checkpoint.quantized_blocks import QuantizedBlocks, dequantize

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

E, F, V, HEADS, KV, D = 256, 512, 96, 4, 2, 64  # K-quant rows need a multiple of 256 elements
# (GGUF name, HF name, HF shape [out, in], heads whose rows llama.cpp permutes or None)
MATRICES = [
    ("token_embd.weight", "model.embed_tokens.weight", (V, E), None),
    ("output.weight", "lm_head.weight", (V, E), None),
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", (HEADS * D, E), HEADS),
    ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", (KV * D, E), KV),
    ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", (KV * D, E), None),
    ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", (E, HEADS * D), None),
    ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", (F, E), None),
    ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", (F, E), None),
    ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", (E, F), None),
]
# ggml-common.h: byte ranges of each block's fp16 fields (d, and m / dmin where the type has one)
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2], T.Q6_K: [208], T.Q5_K: [0, 2], T.Q2_K: [80, 82]}
# The representation each type maps to (issue #16): kind, group, has offset, code range
EXPECTED = {
    T.Q8_0: ("int8", 32, False, (-128, 127)),
    T.Q4_0: ("int4", 32, False, (-8, 7)),
    T.Q4_1: ("uint4", 32, True, (0, 15)),
    T.Q4_K: ("uint4", 32, True, (0, 15)),
    T.Q6_K: ("int8", 16, False, (-32, 31)),
}


def _llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_blocks(rng, qtype, shape):
    """Random block bytes for an HF `[out, in]` tensor, with finite fp16 scale fields."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        halves = rng.uniform(-0.05, 0.05, raw.shape[:2]).astype(np.float16)
        raw[..., at : at + 2] = halves[..., None].view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(shape[0], -1)


def _write(path, qtype, source="random", seed=0):
    """A one-layer llama GGUF with every matrix in `qtype` and F32 norms; returns {GGUF name: raw bytes}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(V)])
    raw = {}
    for gname, _, shape, _ in MATRICES:
        if source == "quantize":
            raw[gname] = gguf.quants.quantize(rng.standard_normal(shape, np.float32), qtype)
        else:
            raw[gname] = _random_blocks(rng, qtype, shape)
        w.add_tensor(gname, raw[gname], raw_dtype=qtype)
    for gname in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(gname, rng.uniform(0.5, 1.5, E).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


CASES = [(t, "quantize") for t in (T.Q8_0, T.Q4_0, T.Q4_1)] + [(t, "random") for t in EXPECTED]


@pytest.mark.parametrize("qtype,source", CASES, ids=[f"{t.name}-{s}" for t, s in CASES])
def test_blocks_equal_gguf_dequantize(tmp_path, qtype, source):
    raw = _write(tmp_path / "m.gguf", qtype, source)
    kind, group, has_offset, (lo, hi) = EXPECTED[qtype]
    with open_source(tmp_path / "m.gguf") as src:
        assert src.get_quantized("model.norm.weight") is None  # F32 in the file: read it with `get`
        for gname, hname, shape, heads in MATRICES:
            q = src.get_quantized(hname)
            assert isinstance(q, QuantizedBlocks), hname
            assert (q.kind, q.group, q.offset is not None) == (kind, group, has_offset), hname
            assert q.values.shape == shape and q.scale.shape == (shape[0], shape[1] // group), hname
            assert q.values.dtype == (np.uint8 if kind == "uint4" else np.int8)
            assert lo <= q.values.min() and q.values.max() <= hi, hname
            got = dequantize(q)
            assert got.dtype == np.float32
            # gguf's dequantize of the raw file bytes, rows in the file's (llama.cpp-permuted) order
            want = gguf.quants.dequantize(raw[gname], qtype).reshape(shape)
            assert np.array_equal(got if heads is None else _llama_cpp_permute(got, heads), want), hname
            assert np.array_equal(got, src.get(hname)), hname
        if source == "random":  # random codes reach both ends of the range, so the mapping is pinned
            values = src.get_quantized("model.layers.0.mlp.gate_proj.weight").values
            assert (values.min(), values.max()) == (lo, hi)


def test_smollm2_blocks_equal_the_float_reader():
    """Every quantized tensor of the bundled SmolLM2 (Q4_1 layers, Q8_0 embedding) equals `get`."""
    from jaxinfer.checkpoint.default_model import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    kinds = {}
    with open_source(path) as src:
        for name in sorted(src.names()):
            q = src.get_quantized(name)
            if q is None:
                assert "norm" in name, name  # only the norms are float (F32) in this file
                continue
            kinds[name] = (q.kind, q.group)
            assert np.array_equal(dequantize(q), src.get(name)), name
    assert kinds.pop("model.embed_tokens.weight") == ("int8", 32)  # Q8_0
    assert len(kinds) == 30 * 7 and set(kinds.values()) == {("uint4", 32)}  # Q4_1


@pytest.mark.parametrize("qtype", [T.Q5_K, T.Q2_K])
def test_unsupported_quantized_type_is_named(tmp_path, qtype):
    _write(tmp_path / "m.gguf", qtype)
    with open_source(tmp_path / "m.gguf") as src:
        assert src.get_quantized("model.norm.weight") is None
        with pytest.raises(
            CheckpointError,
            match=rf"m\.gguf: tensor 'blk\.0\.ffn_up\.weight' \(model\.layers\.0\.mlp\.up_proj\.weight\) "
            rf"has quantized type {qtype.name}, which cannot be read as quantized blocks; "
            r"supported: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K",
        ):
            src.get_quantized("model.layers.0.mlp.up_proj.weight")


def test_dequantize_with_a_short_last_group():
    """in=10 with group 4: groups of 4, 4, 2 per row; checked element by element in float64."""
    rng = np.random.default_rng(1)
    values = rng.integers(0, 16, (3, 10)).astype(np.uint8)
    scale, offset = rng.standard_normal((2, 3, 3)).astype(np.float32)
    got = dequantize(QuantizedBlocks(values, scale, offset, 4, "uint4"))
    want = [[values[r, c] * float(scale[r, c // 4]) + float(offset[r, c // 4]) for c in range(10)] for r in range(3)]
    np.testing.assert_allclose(got, np.array(want), rtol=1e-6)
    sym = dequantize(QuantizedBlocks(values.view(np.int8), scale, None, 4, "int8"))
    np.testing.assert_allclose(sym, values * np.repeat(scale.astype(np.float64), 4, axis=1)[:, :10], rtol=1e-6)
