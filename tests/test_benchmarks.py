"""Benchmark scripts run end to end at a tiny size and report every field with sane values."""

import importlib.util
import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_decode_tiny(tmp_path):
    out = tmp_path / "decode.json"
    load_script("benchmark_decode").main(
        ["--model", "tiny", "--layers", "2", "--batch", "1", "4", "--context", "16", "--steps", "4", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["measured_bandwidth"] > 1e8 and result["measured_matmul_flops"] > 1e8
    assert [(r["batch"], r["context"]) for r in result["results"]] == [(1, 16), (4, 16)]
    for r in result["results"]:
        for key in ("step_ms", "tokens_per_s", "weight_bytes", "kv_bytes", "achieved_bytes_per_s", "mbu", "mfu"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["mbu"] < 2 and r["mfu"] < 2  # plausible fractions (CPU timings are noisy)
        assert abs(r["tokens_per_s"] - r["batch"] / (r["step_ms"] / 1e3)) < 1e-6 * r["tokens_per_s"]
        assert r["compilations_after_warmup"] == 0
    assert result["results"][1]["kv_bytes"] > result["results"][0]["kv_bytes"]


def test_compare_hf_tiny(tmp_path):
    """On a random-weight tiny Llama saved by transformers (SmolLM2's own greedy parity with transformers is
    tests/test_reference_models.py's)."""
    import pytest

    pytest.importorskip("transformers")
    from jaxinfer.config import get_preset
    from tests.hf_reference import save_random_hf_llama

    save_random_hf_llama(get_preset("tiny"), tmp_path / "tiny", seed=3)
    out = tmp_path / "compare.json"
    load_script("compare_hf").main(
        ["--model", str(tmp_path / "tiny"), "--batch", "2", "--prompt-tokens", "4", "--new-tokens", "3"]
        + ["--repeats", "1", "--json", str(out)]
    )
    row = json.loads(out.read_text())["results"][0]
    assert row["identical_outputs"] and row["identical_requests"] == 2  # same greedy tokens as transformers
    for key in ("jaxinfer_tokens_per_s", "transformers_tokens_per_s", "ratio", "median_paired_ratio"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert len(row["paired_ratios"]) == 1 and row["paired_ratios"][0] == row["median_paired_ratio"]


def test_benchmark_attention_tiny(tmp_path):
    import pytest

    from jaxinfer import native

    if not native.available():
        pytest.skip(native.unavailable_reason())
    out = tmp_path / "attention.json"
    load_script("benchmark_attention").main(
        ["--batch", "3", "--context", "5", "40", "--q-len", "2", "--layers", "2", "--repeats", "2", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert [(r["batch"], r["context"]) for r in result["results"]] == [(3, 5), (3, 40)]
    for r in result["results"]:
        for key in ("native_ms", "xla_ms", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["max_abs_difference"] < 1e-4  # the two paths compute the same attention
    assert result["results"][1]["kv_bytes_per_layer"] == 8 * result["results"][0]["kv_bytes_per_layer"]


def test_benchmark_matmul_tiny():
    """One layer and a 64-row lm_head, int4 and bf16, at 3 tokens, XLA in its feature-major layout: every
    field, and each native path computing what XLA computes on the same weights."""
    results = load_script("benchmark_matmul").main(
        ["--layers", "1", "--vocab", "64", "--n", "3", "--repeats", "1", "--xla-feature-major"]
        + ["--paths", "xla-int4", "native-int4", "xla-bf16", "native-bf16"]
    )
    assert sorted(results) == [(3, "native-bf16"), (3, "native-int4"), (3, "xla-bf16"), (3, "xla-int4")]
    for (_, path), r in results.items():
        for key in ("ms", "cpu_ms", "gflops", "gbs"):
            assert math.isfinite(r[key]) and r[key] > 0, (path, key)
        if path.startswith("native"):
            assert r["max_rel_diff"] < 1e-2, path  # bf16 outputs round at 2^-9


def test_benchmark_prefix_cache_tiny(tmp_path):
    """Two real batch jobs (stories260K) on one shared prompt: the cached one computes far fewer prompt tokens."""
    data = ROOT / "tests" / "data" / "stories260K"
    example = tmp_path / "shared.jsonl"
    result = load_script("benchmark_prefix_cache").main(
        ["--tokenizer", str(data / "tok512.bin"), "--system-tokens", "96", "--questions", "4", "--max-tokens", "4"]
        + ["--repeats", "1", "--keep-jsonl", str(example), "--json", str(tmp_path / "r.json")]
        + ["--", "--model", str(data / "stories260K.bin"), "--mesh", "1x1", "--max-step-tokens", "32"]
        + ["--min-bucket", "8"]  # three step shapes to compile (8 to 32 tokens), not six
    )
    lines = [json.loads(line) for line in example.read_text().splitlines()]
    system = lines[0]["prompt"].split("\nQuestion")[0]
    assert len(lines) == 4 and len(system) > 100 and all(line["prompt"].startswith(system + "\n") for line in lines)
    on, off = result["median"]["on"], result["median"]["off"]
    assert on["prompt_tokens"] == off["prompt_tokens"] == off["computed_tokens"]
    assert off["hit_rate"] == off["cached_tokens"] == 0
    # three of the four requests adopt the shared system prompt's whole pages
    assert on["cached_tokens"] >= 3 * 80 and on["computed_tokens"] == on["prompt_tokens"] - on["cached_tokens"]
    assert abs(on["hit_rate"] - on["cached_tokens"] / on["prompt_tokens"]) < 1e-3
    saved = json.loads((tmp_path / "r.json").read_text())["computed_reduction"]
    assert saved == result["computed_reduction"] == 1 - on["computed_tokens"] / off["computed_tokens"]


def test_benchmark_startup_tiny(tmp_path):
    """A cold and a warm batch job (stories260K): the warm one loads every step and traces nothing."""
    model = str(ROOT / "tests" / "data" / "stories260K" / "stories260K.bin")
    result = load_script("benchmark_startup").main(
        ["--repeats", "1", "--no-serve", "--json", str(tmp_path / "s.json"), "--"]
        + ["--model", model, "--mesh", "1x1", "--no-chat", "--max-context", "128", "--max-step-tokens", "16"]
        + ["--min-bucket", "8"]  # two step shapes to compile (8 and 16 tokens), not five
    )
    cold, warm = result["median"]["cold"], result["median"]["warm"]
    assert cold["traced"] == cold["compiled"] > 0 and cold["loaded"] == 0
    assert warm["loaded"] == cold["compiled"] and warm["traced"] == warm["compiled"] == 0
    assert warm["ready_s"] < cold["ready_s"] and warm["wall_s"] > warm["ready_s"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["median"] == result["median"]


def test_benchmark_sampling_filters_tiny():
    results = load_script("benchmark_sampling_filters").main(["--rows", "1", "4", "--vocab", "300", "--repeats", "2"])
    assert [r["rows"] for r in results] == [1, 4]
    for r in results:
        assert (
            math.isfinite(r["sort_ms"])
            and r["sort_ms"] > 0
            and math.isfinite(r["bisection_ms"])
            and r["bisection_ms"] > 0
        )
        assert r["differing_rows"] == 0  # no near-tie boundary at this size and seed


def test_compare_peers_tiny(tmp_path):
    """Every system on a random-weight tiny Llama saved by transformers, batch 1: measured (CTranslate2 where it
    is installed), or listed as unavailable with the reason (the GGUF one: the model is no GGUF file)."""
    import importlib.util

    import pytest

    pytest.importorskip("transformers")
    from jaxinfer.config import get_preset
    from tests.hf_reference import save_random_hf_llama

    save_random_hf_llama(get_preset("tiny"), tmp_path / "tiny", seed=3)
    out = tmp_path / "peers.json"
    result = load_script("compare_peers").main(
        ["--model", str(tmp_path / "tiny"), "--batch", "1", "--prompt-tokens", "1", "--new-tokens", "2"]
        + ["--repeats", "1", "--json", str(out)]
    )
    assert json.loads(out.read_text()) == result
    expected = {f"jaxinfer {d}" for d in ("float32", "bfloat16", "int8", "int4")}
    expected |= {"transformers float32", "transformers bfloat16"}
    if importlib.util.find_spec("ctranslate2") is not None:
        expected.add("ctranslate2 int8")
    assert result["unavailable"]["jaxinfer gguf"] == f"--model {tmp_path / 'tiny'} is not a GGUF file"
    (row,) = result["results"]
    assert set(row["systems"]) == expected and row["reference"] == "transformers float32"
    assert set(result["unavailable"]) == set(load_script("compare_peers").SYSTEMS) - expected  # the rest, each
    for name, r in row["systems"].items():
        assert len(r["runs"]) == 1 and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, name
        assert r.get("recompiles_after_warmup", 0) == 0, name
    # float32 on both sides, the same greedy tokens (other dtypes may differ on random weights)
    assert row["systems"]["jaxinfer float32"]["identical_to_reference"] == 1
    assert set(row["best"]) == {n.split()[0] for n in expected}
    for family, best in row["best"].items():
        assert best["tokens_per_s"] == max(r["tokens_per_s"] for n, r in row["systems"].items() if n.startswith(family))
    ratio = row["best"]["jaxinfer"]["tokens_per_s"] / row["best"]["transformers"]["tokens_per_s"]
    assert row["best_ratios"]["jaxinfer/transformers"] == pytest.approx(ratio)
