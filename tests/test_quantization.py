"""Weight-only quantization (issue #16): the quantizers against float64 oracles, quantized models against
their float originals and against a GGUF's own dequantized weights, quantized checkpoints on other
meshes, and the refusals."""

import functools
import pathlib

import jax
import numpy as np
import pytest

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.load import convert, load_model
from jaxinfer.config import ConfigError
from jaxinfer.quant import awq
from jaxinfer.quant.arrays import QWeight
from jaxinfer.quant.gptq import gptq, group_starts
from jaxinfer.quant.quantize import quantize
from jaxinfer.quant.spec import QuantSpec, WeightQuant, quant_spec
from jaxinfer.sharding import make_mesh
from tests.cli_inprocess import run_front_end

STORIES = "tests/data/stories260K/stories260K.bin"
TOKENIZER = pathlib.Path("tests/data/stories260K/tok512.bin")
TEXT = pathlib.Path("tests/data/perplexity_text.txt")
TOKENS = np.random.default_rng(0).integers(1, 500, (2, 24))


def _oracle_dequant(codes, scale, offset, group, axis):
    """float64 dequantization, element by element through each element's group index."""
    codes = np.moveaxis(codes.astype(np.float64), axis, -1)
    scale = np.moveaxis(scale.astype(np.float64), axis, -1)
    index = np.arange(codes.shape[-1]) // group
    out = codes * scale[..., index]
    if offset is not None:
        out += np.moveaxis(offset.astype(np.float64), axis, -1)[..., index]
    return np.moveaxis(out, -1, axis)


def test_int8_per_channel_scale_search_beats_absmax_and_rounds_to_nearest():
    w = np.random.default_rng(1).standard_normal((6, 37, 5)).astype(np.float32)
    codes, scale, offset = quantize(w, WeightQuant("int8", 1 << 30), axis=1)
    assert offset is None and codes.dtype == np.int8 and scale.shape == (6, 1, 5)
    absmax = np.abs(w.astype(np.float64)).max(axis=1, keepdims=True)
    assert (scale <= absmax / 127 * (1 + 1e-6)).all() and (scale >= absmax / 254 * (1 - 1e-6)).all()
    ours = _oracle_dequant(codes, scale, None, 37, 1)
    inside = np.abs(w) <= 127 * scale  # unclipped weights: round to nearest, at most half a step off
    assert (np.abs(ours - w)[inside] <= np.broadcast_to(scale / 2, w.shape)[inside] * (1 + 1e-5)).all()
    # plain absmax / 127 in float64, channel by channel: the search is never worse
    step = absmax / 127
    plain = np.clip(np.rint(w / step), -127, 127) * step
    assert (((ours - w) ** 2).sum(1) <= ((plain - w) ** 2).sum(1) * (1 + 1e-4)).all()  # float32 scales


def test_gptq_matches_a_float64_oracle_and_beats_round_to_nearest_on_w_x():
    rng = np.random.default_rng(3)
    n, m = 96, 24
    x = rng.standard_normal((300, n)) @ (np.eye(n) + 0.3 * rng.standard_normal((n, n)))
    x[:, 7] *= 20  # an outlier input feature, as LLM activations have
    w = rng.standard_normal((n, m)).astype(np.float32)
    wq = WeightQuant("uint4", 32, offset=True)
    codes, scale, offset, deq = gptq(w, x.T @ x, wq, group_starts((n,), 32), damp=0.01)
    assert codes.dtype == np.uint8 and codes.max() <= 15 and scale.shape == offset.shape == (3, m)
    np.testing.assert_allclose(deq, _oracle_dequant(codes, scale, offset, 32, 0), atol=1e-5)
    oracle = _gptq_oracle(w.astype(np.float64), x.T @ x, 32)
    assert (codes == oracle).mean() > 0.98  # float32 vs float64 rounding may flip a few ties
    rtn = _oracle_dequant(*quantize(w, wq, 0), 32, 0)
    assert np.linalg.norm(x @ (w - deq)) < 0.8 * np.linalg.norm(x @ (w - rtn))


def _gptq_oracle(w, h, group):
    """GPTQ unblocked, in float64, with the inverse Hessian downdated explicitly after each input (the
    OBQ form, no Cholesky), inputs in decreasing diag H (act order); each group's uint4 range chosen
    up front from the float weights by the same 5-candidate search as the quantizer."""
    n = w.shape[0]
    h = h + 0.01 * np.mean(np.diag(h)) * np.eye(n)
    params = []
    for g0 in range(0, n, group):
        block = w[g0 : g0 + group]
        lo0, hi0 = block.min(0), block.max(0)
        mid, best = (lo0 + hi0) / 2, None
        for keep in (1.0, 0.95, 0.9, 0.85, 0.8):
            lo, hi = mid - (mid - lo0) * keep, mid + (hi0 - mid) * keep
            step = (hi - lo) / 15
            err = ((np.clip(np.rint((block - lo) / step), 0, 15) * step + lo - block) ** 2).sum(0)
            cand = (lo, step, err)
            best = cand if best is None else tuple(np.where(err < best[2], a, b) for a, b in zip(cand, best))
        params.append(tuple(a.astype(np.float32).astype(np.float64) for a in best[:2]))
    hinv = np.linalg.inv(h)
    codes = np.zeros(w.shape, np.int64)
    left = list(np.argsort(-np.diag(h), kind="stable"))
    while left:
        i = left.pop(0)
        lo, step = params[i // group]
        codes[i] = np.clip(np.rint((w[i] - lo) / step), 0, 15)
        err = (w[i] - (codes[i] * step + lo)) / hinv[i, i]
        w[left] -= np.outer(hinv[left, i], err)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes


def test_uint4_groups_with_a_short_last_group_beat_plain_min_max():
    w = np.random.default_rng(2).standard_normal((10, 576)).astype(np.float32)
    w[0, 5] = 9.0  # one outlier: clipping it must win over a coarse step for its group
    wq = WeightQuant("uint4", 128, offset=True)
    codes, scale, offset = quantize(w, wq, axis=1)
    assert codes.dtype == np.uint8 and codes.max() <= 15 and scale.shape == (10, 5)  # 4 x 128 + 64
    ours = _oracle_dequant(codes, scale, offset, 128, 1)
    # plain min-max uint4 per group, in float64: the range search must never be worse, group by group
    bounds = [(s, min(s + 128, 576)) for s in range(0, 576, 128)]
    for lo_i, hi_i in bounds:
        block = w[:, lo_i:hi_i].astype(np.float64)
        lo, hi = block.min(1, keepdims=True), block.max(1, keepdims=True)
        step = (hi - lo) / 15
        plain = np.clip(np.rint((block - lo) / step), 0, 15) * step + lo
        ours_err = ((ours[:, lo_i:hi_i] - block) ** 2).sum(1)
        assert (ours_err <= ((plain - block) ** 2).sum(1) * (1 + 1e-5)).all()
    assert offset[0, 0] + 15 * scale[0, 0] < 9.0  # the search shrank the outlier's group range: it is clipped


def test_device_quantizer_and_dequantization_equal_the_host_ones():
    w = np.random.default_rng(3).standard_normal((64, 3, 40)).astype(np.float32)
    # every format, symmetric int4 (one scale candidate, no search) too
    for wq in (WeightQuant("int8", 1 << 30), WeightQuant("uint4", 16, offset=True), WeightQuant("int4", 16)):
        host = quantize(w, wq, axis=2)
        device = quantize(jax.numpy.asarray(w), wq, axis=2)
        assert (host[2] is None) == (device[2] is None)
        codes = np.asarray(device[0]).astype(np.int32) - host[0]
        assert np.abs(codes).max() <= 1 and (codes != 0).mean() < 1e-3  # XLA's division: a rare tie rounds apart
        for h, d in zip(host[1:], device[1:]):
            if h is not None:
                np.testing.assert_allclose(np.asarray(d), h, rtol=1e-6)
        qw = QWeight(*(None if a is None else jax.numpy.asarray(a) for a in device), quant=wq, axis=2)
        np.testing.assert_allclose(
            np.asarray(qw.dequantize()), _oracle_dequant(*host, min(wq.group, 40), 2), rtol=1e-6, atol=1e-6
        )


@pytest.fixture(scope="module")
def floats():
    return {m: load_model(STORIES, make_mesh(m)).logits(TOKENS) for m in ("1x1", "2x4")}


@pytest.mark.parametrize("mesh", ["1x1", "2x4"])
@pytest.mark.parametrize("loop", ["unrolled", "scan"])
def test_int8_model_stays_close_to_float(floats, mesh, loop):
    """Quantized weights on both layer loops (the CPU layout's output-major codes and scales, the
    checkpoint layout) and on a tensor-parallel mesh, against the float model."""
    model = load_model(STORIES, make_mesh(mesh), layer_loop=loop, quant=quant_spec("int8"))
    assert model.params["embed"].dtype == np.int8
    out, ref = model.logits(TOKENS), floats[mesh]
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_int8_and_int4_on_one_device_equal_tensor_parallel(floats):
    int8 = [load_model(STORIES, make_mesh(m), quant=quant_spec("int8")).logits(TOKENS) for m in ("1x1", "2x4")]
    np.testing.assert_allclose(int8[0], int8[1], rtol=1e-4, atol=1e-4)
    int4 = load_model(STORIES, make_mesh("1x1"), quant=quant_spec("int4", group=4)).logits(TOKENS)
    assert np.abs(int4 - floats["1x1"]).max() < 0.25 * np.abs(floats["1x1"]).max()


@pytest.fixture(scope="module")
def smollm2_gguf():
    from jaxinfer.checkpoint.default_model import smollm2_gguf_path

    return str(smollm2_gguf_path())


@pytest.mark.parametrize("mesh,loop", [("1x1", "scan"), ("2x4", "scan")])
def test_gguf_q4_1_runs_as_stored_and_equals_its_dequantized_floats(smollm2_gguf, mesh, loop):
    """SmolLM2's Q4_1 layer blocks (uint4 codes, group 32, offsets) and Q8_0 embedding, run without
    expansion, give the logits of the float model the GGUF reader dequantizes with gguf's own code; on
    2x4 the 9 query / 3 KV heads are padded, codes, scales and offsets alike."""
    tokens = np.random.default_rng(4).integers(1, 49152, (1, 16))
    stored = load_model(smollm2_gguf, make_mesh(mesh), layer_loop=loop, quant=QuantSpec("gguf"))
    assert stored.quant.label == "gguf" and stored.quant.get("gate").kind == "uint4"
    assert stored.quant.get("embed") == WeightQuant("int8", 32, narrow=False)
    floats = load_model(smollm2_gguf, make_mesh(mesh), layer_loop=loop)
    out, ref = stored.logits(tokens), floats.logits(tokens)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    if mesh == "1x1":
        assert _answer(stored).startswith("The capital of France is Paris."), _answer(stored)


def test_smollm2_int8_still_answers_paris():
    model = load_model(None, make_mesh("1x1"), layer_loop="scan", quant=quant_spec("int8"))
    assert _answer(model).startswith("The capital of France is Paris."), _answer(model)


def _answer(model) -> str:
    from jaxinfer.tokenizer import load_tokenizer
    from tests.dense_greedy import greedy_dense

    tok = load_tokenizer(model.tokenizer_path)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    return tok.decode(greedy_dense(model, prompt, max_new_tokens=10, eos_ids=tok.eos_ids, window=64)).strip()


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory):
    return convert(STORIES, tmp_path_factory.mktemp("ckpt") / "int8", quant=quant_spec("int8"))


def test_quantized_checkpoint_restores_onto_any_mesh(int8_checkpoint):
    direct = load_model(STORIES, make_mesh("1x1"), quant=quant_spec("int8")).logits(TOKENS)
    for mesh in ("1x1", "2x4"):
        restored = load_model(str(int8_checkpoint), make_mesh(mesh), quant=quant_spec("int8"))
        assert restored.params["embed"].dtype == np.int8
        np.testing.assert_allclose(restored.logits(TOKENS), direct, rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="written with --quantize int8 .*loaded with --quantize int4"):
        load_model(str(int8_checkpoint), make_mesh("1x1"), quant=quant_spec("int4", group=4))


def test_float_checkpoint_quantized_on_device_equals_the_host_quantizer(tmp_path):
    ckpt = convert(STORIES, tmp_path / "f32")
    spec = quant_spec("int4", group=4)
    on_device = load_model(str(ckpt), make_mesh("1x1"), quant=spec).logits(TOKENS)
    on_host = load_model(STORIES, make_mesh("1x1"), quant=spec).logits(TOKENS)
    np.testing.assert_allclose(on_device, on_host, rtol=1e-5, atol=1e-5)


def test_awq_scales_cut_the_output_error_of_inputs_with_large_activations():
    """Inputs whose activations are 30x the others': scaling their weight rows up before int4 rounding (and
    down after) lowers tr(E^T H E), and the search finds a non-trivial s; all-equal activations keep s = 1."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 48))
    x = rng.standard_normal((512, 256))
    x[:, rng.choice(256, 8, replace=False)] *= 30
    h, wq, starts = x.T @ x, WeightQuant("uint4", 64, offset=True), group_starts((256,), 64)
    s = awq.search([w], h, wq, starts)
    assert s.std() > 0.1
    assert awq.output_error(w, s, h, wq, starts) < 0.8 * awq.output_error(w, np.ones(256), h, wq, starts)
    np.testing.assert_allclose(awq.input_scales(np.full(256, 4.0), 0.6), 1.0)
    assert (awq.input_scales(np.where(np.arange(256) < 200, 4.0, 0.0), 0.6)[200:] == 1).all()  # dead inputs


def test_importance_weighted_ranges_fit_the_important_inputs():
    """uint4 groups whose first inputs carry 100x the importance (llama.cpp's importance matrix, diag X^T X):
    the weighted range search never does worse on the weighted error than the plain one, and does better
    overall; without importance it is the plain search."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((300, 128)).astype(np.float32)
    importance = np.where(np.arange(128) < 16, 100.0, 1.0)
    wq = WeightQuant("uint4", 128, offset=True)

    def weighted_error(codes, scale, offset):
        return (((codes * scale + offset - w) ** 2) * importance).sum(axis=1)

    plain, weighted = weighted_error(*quantize(w, wq, axis=1)), weighted_error(*quantize(w, wq, 1, importance))
    assert (weighted <= plain * (1 + 1e-6)).all() and weighted.sum() < 0.99 * plain.sum()
    for a, b in zip(quantize(w, wq, 1, np.ones(128)), quantize(w, wq, 1)):
        np.testing.assert_array_equal(a, b)


def test_awq_fold_keeps_the_float_layer_and_gives_gptq_the_scaled_inputs_hessians():
    """A stories260K layer folded (norm scales and up's columns take 1/s, q/k/v, gate/up and down's rows s)
    computes what it did, its norm scales moved, and run again it records exactly the Hessians the fold
    hands GPTQ: X^T X / (s s^T) of the scaled inputs."""
    import jax.numpy as jnp

    from jaxinfer.checkpoint import calibrate
    from jaxinfer.cli_common import tokenize

    model = load_model(STORIES, make_mesh("1x1"), layer_loop="scan")
    tokens = np.asarray(tokenize(str(TOKENIZER), calibrate.TEXT.read_text())[:256], np.int32).reshape(2, 128)
    positions = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), tokens.shape)
    run = calibrate._layer_runner(model.config, model.layout, model.dtype)
    x = jnp.take(model.params["embed"], jnp.asarray(tokens), axis=0)
    layer = jax.tree.map(lambda a: np.asarray(a[1]), model.params["layers"])
    before, calib = run(layer, x, positions)
    hessians = calibrate.layer_hessians(calib)
    folded = jax.tree.map(np.copy, layer)
    awq.fold_layer(folded, hessians, quant_spec("int4", group=4, calibration="awq-gptq"))
    after, calib = run(folded, x, positions)
    np.testing.assert_allclose(after, before, atol=2e-5 * float(jnp.abs(before).max()))
    for norm in ("attn_norm", "mlp_norm"):
        assert np.abs(folded[norm]["scale"] / layer[norm]["scale"] - 1).max() > 0.05, norm
    recorded = calibrate.layer_hessians(calib)
    assert set(recorded) == set(hessians) == {"q", "o", "gate", "down"}
    for n, h in hessians.items():
        np.testing.assert_allclose(recorded[n], h, atol=1e-5 * np.abs(h).max())


def test_gptq_calibrated_int4_checkpoint_beats_rounding_and_int8_is_mesh_independent(tmp_path, monkeypatch):
    from jaxinfer.checkpoint import calibrate
    from jaxinfer.cli_common import tokenize

    text = np.asarray([tokenize(str(TOKENIZER), TEXT.read_text(encoding="utf-8"))[:96]])  # not the calibration text
    floats = load_model(STORIES, make_mesh("1x1")).logits(text)
    spec = quant_spec("int4", group=4, calibration="gptq")
    ckpt = convert(STORIES, tmp_path / "gptq", quant=spec, tokenize=tokenize)  # calibrated at conversion
    calibrated = load_model(str(ckpt), make_mesh("1x1"), quant=spec).logits(text)
    # a float native checkpoint (as the embedded SmolLM2's cache) is calibrated too, not rounded on device
    float_ckpt = convert(STORIES, tmp_path / "f32")
    from_float = load_model(str(float_ckpt), make_mesh("1x1"), quant=spec, tokenize=tokenize).logits(text)
    np.testing.assert_allclose(from_float, calibrated, rtol=1e-5, atol=1e-5)
    rounded = load_model(STORIES, make_mesh("1x1"), quant=quant_spec("int4", group=4)).logits(text)
    assert np.linalg.norm(calibrated - floats) < 0.9 * np.linalg.norm(rounded - floats)
    awq_spec = quant_spec("int4", group=4, calibration="awq-gptq")
    with_awq = load_model(STORIES, make_mesh("1x1"), quant=awq_spec, tokenize=tokenize).logits(text)
    assert np.linalg.norm(with_awq - floats) < 0.9 * np.linalg.norm(rounded - floats)
    # tensor-parallel head and MLP padding (8 heads and 172 MLP over 3 shards) is dead input: the same codes
    # (mesh independence needs no more than two rows of calibration text: a fraction of the time of all 13)
    monkeypatch.setattr(calibrate, "token_rows", functools.partial(calibrate.token_rows, rows=2))
    spec8 = quant_spec("int8", calibration="awq-gptq")  # GPTQ after the AWQ fold, which keeps padding at s = 1
    one, three = (
        load_model(STORIES, make_mesh(m), quant=spec8, tokenize=tokenize).logits(text) for m in ("1x1", "1x3")
    )
    np.testing.assert_allclose(three, one, atol=2e-4)
    assert np.abs(one - floats).max() > 50 * 2e-4  # the quantization itself is far larger than the tolerance
    with pytest.raises(CheckpointError, match="needs the model's tokenizer"):
        load_model(STORIES, make_mesh("1x1"), quant=spec)
    for mode, message in (("none", "needs --quantize int8 or int4"), ("int4", None)):
        if message:
            with pytest.raises(ConfigError, match=message):
                quant_spec(mode, calibration="gptq")
    assert QuantSpec.from_json(spec.to_json()) == spec and "calibration" not in quant_spec("int4").to_json()


def test_group_that_straddles_a_tensor_shard_is_refused():
    with pytest.raises(ConfigError, match=r"--quantize-group 4: does not divide .* 43 per tensor shard of 4"):
        load_model(STORIES, make_mesh("2x4"), quant=quant_spec("int4", group=4))


@pytest.mark.parametrize(
    "extra,message,flags_alone",  # flags_alone: wrong whatever the model, so refused before the mesh is built
    [
        (["--quantize", "int3"], "argument --quantize: invalid choice: 'int3'", True),
        (["--quantize", "int4", "--quantize-group", "100"], "--quantize-group 100: does not divide the MLP", False),
        (["--quantize", "int4", "--quantize-group", "7"], "--quantize-group 7: must be an even integer >= 2", True),
        (
            ["--quantize", "gguf"],
            "stories260K.bin: --quantize gguf: the file stores no supported quantized weight",
            False,
        ),
        (
            ["--quantize", "int4", "--quantize-calibration", "awq"],
            "--quantize-calibration 'awq': must be one of",
            True,
        ),
    ],
)
def test_bad_quantization_flags_get_one_line_and_exit_2(extra, message, flags_alone, capfd):
    argv = ["--model", STORIES, "--mesh", "1x1", "--prompt", "x", *extra]
    # the first case as a real process, the others in this one (tests/cli_inprocess.py)
    code, _, stderr = run_front_end(
        "jaxinfer.run", argv, capfd, in_process=extra != ["--quantize", "int3"], timeout=120
    )
    assert code == 2, stderr
    assert message in stderr and "Traceback" not in stderr
    if flags_alone:
        assert "over 1 CPU device" not in stderr, stderr
