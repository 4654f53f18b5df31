"""Perplexity through the engine (`jaxinfer.eval.perplexity`): its windows, its CLI, and the quality bounds of
issue 16 for quantized weights and KV caches.

The text, tests/data/perplexity_text.txt, is public domain: the Declaration of Independence (1776; the
National Archives transcription's wording and spelling) followed by Abraham Lincoln's Second Inaugural
Address (1865), 2,523 SmolLM2 tokens. SmolLM2's float32 perplexity equals transformers' on the same weights
in tests/test_reference_models.py (it shares that module's transformers model).
"""

import json
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.eval.perplexity import main, supports_engine_option, windows

STORIES = "tests/data/stories260K/stories260K.bin"


def guide_windows(n, window, stride):
    """Hugging Face's perplexity guide, as written there: for each window [begin, end), (begin, the positions
    whose labels are kept: the last end - prev_end, less the window's first as the loss shifts labels)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        labels = np.arange(begin, end)[-(end - prev_end) :]
        out.append((begin, [int(p) for p in labels if p > begin]))
        prev_end = end
        if end == n:
            break
    return out


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 200), st.integers(2, 40), st.data())
def test_windows_follow_the_guide(n, window, data):
    stride = data.draw(st.integers(1, window))
    ours = windows(n, window, stride)
    theirs = [scored for _, scored in guide_windows(n, window, stride) if scored]
    assert [list(range(w.first_scored, w.end)) for w in ours] == theirs
    for w in ours:
        assert 0 <= w.begin < w.first_scored < w.end <= n and w.end - w.begin <= window
    scored = [p for w in ours for p in range(w.first_scored, w.end)]
    assert len(scored) == len(set(scored))
    if stride < window:
        assert scored == list(range(1, n))  # overlapping windows give every token but the first some context


def test_text_is_long_enough(data_dir):
    from jaxinfer.checkpoint.default_model import smollm2_gguf_path
    from jaxinfer.tokenizer import load_tokenizer

    text = (data_dir / "perplexity_text.txt").read_text(encoding="utf-8")
    assert text.startswith("In Congress, July 4, 1776.") and text.rstrip().endswith("with all nations.")
    assert len(load_tokenizer(smollm2_gguf_path()).encode(text)) >= 2000


def test_cli_equals_dense_forward(stories, data_dir, tmp_path, capsys):
    """The CLI on stories260K: two overlapping windows scored through the paged cache (four prefill chunks
    each) give the perplexity of the model's dense forward over the same windows, computed here."""
    models, tok = stories
    text = tmp_path / "text.txt"
    text.write_text((data_dir / "perplexity_text.txt").read_text(encoding="utf-8")[:240])
    ids = tok.encode(text.read_text())
    out = tmp_path / "ppl.json"
    report = main(
        ["--model", STORIES, "--text", str(text), "--window", "64", "--stride", "32", "--prefill-chunk", "16"]
        + ["--json", str(out)]
    )
    assert json.loads(out.read_text()) == report and f"perplexity {report['perplexity']:.4f}" in capsys.readouterr().out
    logprobs = []
    for begin, scored in guide_windows(len(ids), 64, 32):
        logits = np.asarray(models["1x1"].logits(np.asarray([ids[begin : scored[-1] + 1]]))[0], np.float64)
        lsm = logits - logits.max(-1, keepdims=True)
        lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
        logprobs += [lsm[p - 1 - begin, ids[p]] for p in scored]
    assert report["tokens"] == len(logprobs) == len(ids) - 1 and report["windows"] > 2
    assert report["perplexity"] == pytest.approx(math.exp(-np.mean(logprobs)), rel=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--window", "1"], "--window 1 must be >= 2"),
        (["--window", "8", "--stride", "9"], "--stride 9 must be in [1, --window 8]"),
        (["--stride", "0"], "--stride 0 must be >= 1"),  # no --window: its default is the model's to decide
        (["--prefill-chunk", "0"], "--prefill-chunk 0 must be >= 1"),
        (["--text", "/nonexistent.txt"], "--text /nonexistent.txt: no such file"),
        (["--model", "/nonexistent"], "--model /nonexistent: no such file or directory"),
        (["--model", STORIES, "--window", "600"], "--window 600 must be below the model's limit of 512 positions"),
    ]
    + [
        (["--model", STORIES, "--quantize", "int4"], "--quantize-group 128: does not divide the MLP dimension"),
    ]
    + ([] if supports_engine_option("kv_dtype") else [(["--kv-dtype", "int8"], "EngineConfig has no 'kv_dtype'")]),
)
def test_cli_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


# ---- issue 16's quality bounds (the KV ones turn on by themselves once EngineConfig has kv_dtype) ----
# The whole text in non-overlapping 1,024-token windows (2,520 tokens scored), SmolLM2 on 1x1.
WINDOW = dict(window=1024, stride=1024)


@pytest.fixture(scope="module")
def float32_smollm2(data_dir):
    """(SmolLM2 float32 on 1x1, the text, its perplexity)."""
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.eval.perplexity import score
    from jaxinfer.sharding import make_mesh
    from jaxinfer.tokenizer import load_tokenizer

    text = (data_dir / "perplexity_text.txt").read_text(encoding="utf-8")
    model = load_model(None, make_mesh("1x1"), "float32")
    return model, text, score(model, load_tokenizer(model.tokenizer_path).encode(text), **WINDOW)


@pytest.mark.slow
def test_int8_weight_perplexity_within_one_percent(float32_smollm2):
    """`--quantize int8` (per channel, searched scales, embeddings too: the default) through the engine, as
    `jaxinfer.eval.perplexity --quantize int8` scores it: within 1% of float32 (measured +0.54%; plain absmax
    scales gave +1.28%). int4's 5% bound is not met and not tested (docs/PERFORMANCE.md, "Weight
    quantization": its float32 weights are GGUF Q4_1 blocks of 32 expanded, which groups of 128 re-quantize
    coarsely)."""
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.eval.perplexity import score
    from jaxinfer.quant.spec import quant_spec
    from jaxinfer.sharding import make_mesh
    from jaxinfer.tokenizer import load_tokenizer

    model, text, base = float32_smollm2
    int8 = load_model(None, make_mesh("1x1"), "float32", quant=quant_spec("int8"))
    codes = [a for a in jax.tree.leaves(int8.params) if a.dtype == np.int8]
    assert int8.quant.label == "int8" and sum(a.size for a in codes) > 100_000_000  # the weights are int8 codes
    ours = score(int8, load_tokenizer(int8.tokenizer_path).encode(text), **WINDOW)
    assert ours.tokens == base.tokens
    assert ours.perplexity != base.perplexity and abs(ours.perplexity / base.perplexity - 1) <= 0.01, (
        ours.perplexity,
        base.perplexity,
    )


@pytest.mark.slow
@pytest.mark.skipif(not supports_engine_option("kv_dtype"), reason="EngineConfig has no kv_dtype yet (issue 16)")
@pytest.mark.parametrize("kv_dtype,bound", [("int8", 0.01), ("fp8_e4m3", 0.03)])
def test_kv_quantization_perplexity(float32_smollm2, kv_dtype, bound):
    from jaxinfer.eval.perplexity import score
    from jaxinfer.tokenizer import load_tokenizer

    model, text, base = float32_smollm2
    ids = load_tokenizer(model.tokenizer_path).encode(text)
    ours = score(model, ids, engine_overrides={"kv_dtype": kv_dtype}, **WINDOW)
    assert ours.tokens == base.tokens
    assert abs(ours.perplexity / base.perplexity - 1) <= bound, (ours.perplexity, base.perplexity)
