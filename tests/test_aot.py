"""AOT compile and memory planner (CPU host with the tpu extra): TPU executables, fit reports, manifest checks,
and the planner's KV page count against a real engine."""

import itertools
import json
import re
import subprocess
import sys

import pytest

from jaxinfer.compilation import manifest as aot_manifest
from jaxinfer.config import get_preset
from jaxinfer.engine.config import EngineConfig, token_buckets
from tests.cli_inprocess import run_front_end

STORIES = "tests/data/stories260K/stories260K.bin"


def aot(args, timeout=300, capfd=None):
    """(exit status, stdout, stderr) of scripts/aot_compile.py; with `capfd`, of its `main` in this process
    (tests/cli_inprocess.py), for runs that write nothing (a plan, a refusal): a process start with libtpu
    costs 5-7 s."""
    if capfd is not None:
        return run_front_end("jaxinfer.aot.__main__", args, capfd, in_process=True)
    proc = subprocess.run(
        [sys.executable, "scripts/aot_compile.py", *args], capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def tpu_available():
    from jax.experimental import topologies

    try:
        topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    except Exception as e:  # libtpu missing
        pytest.skip(f"no TPU topology support: {e}")


def test_tiny_compiles_for_v5e_2x4_and_manifest_records_it(tmp_path, tpu_available):
    code, out, err = aot(
        [
            "--model",
            "tiny",
            "--topology",
            "v5e:2x4",
            "--mesh",
            "2x4",
            "--max-slots",
            "8",
            "--max-context",
            "128",
            "--prefill-chunk",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0, err[-3000:]
    m = json.loads((tmp_path / "manifest.json").read_text())
    buckets = token_buckets(EngineConfig(max_slots=8, max_context=128, prefill_chunk=16).step_budget(2), smallest=8)
    assert m["buckets"] == list(buckets) == [8, 16]
    assert m["engine"]["prefix_cache"] is True  # on by default: the same step and buckets (host-side only)
    assert m["target"] == {
        "name": "v5e:2x4",
        "platform": "tpu",
        "device_kind": "TPU v5 lite",
        "num_devices": 8,
        "device_ids": list(range(8)),
        "memory_bytes": 16 * 2**30,
        "hosts": 2,  # libtpu describes v5e:2x4 as 2 processes of 4 chips (a v5litepod-8 VM has all 8)
        "devices_per_host": 4,
    }
    assert m["mesh"] == {"data": 2, "sequence": 1, "tensor": 4}
    assert m["model"]["name"] == "tiny" and m["engine"]["attention"] == "pallas"
    assert m["versions"] == aot_manifest.versions() and m["versions"]["libtpu"]
    for b in buckets:
        assert (tmp_path / m["executables"][str(b)]).stat().st_size > 100_000  # a real TPU binary
        step = next(s for s in m["steps"] if s["bucket"] == b)
        assert step["memory"]["argument"] > 0 and step["estimated_seconds"] > 0
        assert re.search(rf"^\| {b} \| [\d.]+ \|", out, re.M), out  # one table row per executable
    assert m["plan"]["fits"] and "FITS" in out
    per_host = m["plan"]["per_host"]
    assert per_host["hosts"] == 2 and per_host["total"] == 4 * m["plan"]["total"]
    assert per_host["load_ram"] == per_host["host_weights"] + per_host["largest_tensor"] > 0
    # the executables are in StepStore form, where `--compile-cache DIR` on a v5e-8 loads them untraced
    (signature,) = tmp_path.glob("jaxinfer-steps/*/signature.json")
    sig = json.loads(signature.read_text())
    assert len(sig["devices"]) == 8 and all(d.startswith("tpu:TPU v5 lite:") for d in sig["devices"])
    assert sig["platform"]["attention"] == "pallas" and sig["inputs"]["slots_per_shard"] == 4
    assert sorted(f.name for f in signature.parent.glob("bucket_*.xla")) == ["bucket_16.xla", "bucket_8.xla"]
    # the same v5e chips but only four of them (v5e:2x2): refused, naming the device count
    v5e_2x2 = {"platform": "tpu", "device_kind": "TPU v5 lite", "num_devices": 4}
    with pytest.raises(aot_manifest.ManifestMismatch, match=r"8 devices \(this system has 4\)"):
        aot_manifest.check_manifest(m, v5e_2x2)

    # this CPU machine is not a v5e-8: the artifacts are refused, by the aot CLI and by run --compile-cache
    for cmd in (
        [sys.executable, "-m", "jaxinfer.aot", "--check", str(tmp_path)],
        [
            sys.executable,
            "-m",
            "jaxinfer.run",
            "--model",
            STORIES,
            "--mesh",
            "1x1",
            "--compile-cache",
            str(tmp_path),
            "--prompt",
            "Hi",
            "--no-chat",
        ],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "built for topology v5e:2x4" in proc.stderr and "TPU v5 lite (tpu) devices" in proc.stderr
        assert "refusing to load them" in proc.stderr


def test_llama3_8b_on_v5e_2x4_fits_with_weights_split_over_tensor(tmp_path, tpu_available):
    # 64 slots at 2k context; one bucket, the smallest (the CLI default is all): the figures checked here do not
    # depend on which, and the run with the 8-token step took 28 s of CPU here against 42 s with the 32-token one
    code, out, err = aot(
        [
            "--model",
            "llama3-8b",
            "--topology",
            "v5e:2x4",
            "--mesh",
            "2x4",
            "--max-slots",
            "64",
            "--max-context",
            "2048",
            "--prefill-chunk",
            "32",
            "--buckets",
            "8",
            "--dtype",
            "bf16",
            "--out",
            str(tmp_path),
        ],
        timeout=600,
    )
    assert code == 0, err[-3000:]
    plan = json.loads((tmp_path / "manifest.json").read_text())["plan"]
    expected = get_preset("llama3-8b").param_count() * 2 / 4  # bf16, tensor=4, replicated over data
    assert plan["weights"] == pytest.approx(expected, rel=0.01)
    # 32 slots per data shard x 2048 tokens x 32 layers x (K, V) x 8/4 KV heads x 128 x 2 bytes
    assert plan["kv"] == 32 * 2048 * 32 * 2 * (8 // 4) * 128 * 2
    assert plan["fits"] and plan["largest_temp"] > 0 and plan["max_slots"] >= 64
    assert "FITS" in out and "| weights | 4015529984 |" in out


def test_llama3_70b_on_v5e_2x2_does_not_fit(tpu_available, capfd):
    code, out, err = aot(
        [
            "--model",
            "llama3-70b",
            "--topology",
            "v5e:2x2",
            "--max-slots",
            "8",
            "--max-context",
            "2048",
            "--dtype",
            "bfloat16",
        ],
        capfd=capfd,
    )
    assert code == 1 and "Traceback" not in err
    msg = next(line for line in err.splitlines() if "DOES NOT FIT" in line)
    over = float(re.search(r"over by ([\d.]+) GiB", msg).group(1))
    assert 16 < over < 20  # 70.6B x 2 B / 4 = 32.9 GiB of weights on 16 GiB chips
    assert "--topology v5e:4x4 --mesh 1x16" in msg and "v5p:2x2x1" in msg


def test_llama3_70b_on_v5e_4x4_fits_on_four_hosts_with_per_host_figures(tpu_available):
    # 1 x 16 (all tensor): 8.4 GiB of weights per chip. One bucket, one 80-layer (scanned) compile: ~30 s;
    # without --out, which would add another compile and the serialization (~20 s)
    code, out, err = aot(
        [
            "--model",
            "llama3-70b",
            "--topology",
            "v5e:4x4",
            "--mesh",
            "1x16",
            "--max-slots",
            "32",
            "--max-context",
            "4096",
            "--buckets",
            "8",
            "--dtype",
            "bf16",
        ],
        timeout=600,
    )
    assert code == 0, err[-3000:]
    assert "FITS" in out and "4 hosts x 4 devices" in out
    device, host = printed_table(out, "per device"), printed_table(out, "per host (4 devices)")
    # 32 slots x 4096 tokens x 80 layers x (K, V) x 1 KV head per chip (8 padded to 16) x 128 x 2 bytes
    assert device["weights"] == 8989458432 and device["KV cache"] == 32 * 4096 * 80 * 2 * 1 * 128 * 2
    assert device["largest temp"] > 0 and device["total"] <= device["device memory"] == 16 * 2**30
    assert host == {
        **{name: 4 * value for name, value in device.items() if name != "device memory"},
        "HBM of its devices": 64 * 2**30,
    }
    load = re.search(r"host RAM to load one host's shards: up to ([\d.]+) GiB = ([\d.]+) GiB .* \+ ([\d.]+) GiB", out)
    ram, shards, largest = (float(g) for g in load.groups())
    # the loader holds one source tensor at a time: the embedding (or lm_head), 128256 x 8192 x 2 B
    assert 33.4 < shards <= host["weights"] / 2**30 and largest == 1.96
    assert ram == pytest.approx(shards + largest, abs=0.01)


def printed_table(out: str, heading: str) -> dict[str, int]:
    """{row: bytes} of the plan table under `| heading | bytes | |`."""
    lines = out[out.index(f"| {heading} | bytes | |") :].splitlines()[2:]
    rows = (re.fullmatch(r"\| (.+?) \| (\d+) \| .* \|", line) for line in lines)
    return {m.group(1): int(m.group(2)) for m in itertools.takewhile(bool, rows)}


def test_planner_kv_pages_equal_the_engines_on_cpu(capsys):
    """--kv-memory-fraction: the planner (topology cpu) and a real engine give the same page count."""
    import jax

    from jaxinfer.aot.__main__ import main
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.engine.engine import Engine
    from jaxinfer.kv_cache import device_memory
    from jaxinfer.sharding import make_mesh, per_device_bytes

    model = load_model(STORIES, make_mesh("1x1", jax.devices()[:1]))
    memory = device_memory(jax.devices()[0])[0]
    fraction = (per_device_bytes(model.params) + 3 * 2**20) / memory  # ~150 pages of 20 KiB
    engine = Engine(model, None, EngineConfig(max_context=128, prefill_chunk=8, kv_memory_fraction=fraction))
    allocated = sum(a.nbytes for a in jax.tree.leaves(engine.cache)) // engine.cache_shape.bytes_per_page
    assert (
        main(
            [
                "--model",
                STORIES,
                "--topology",
                "cpu",
                "--mesh",
                "1x1",
                "--max-context",
                "128",
                "--prefill-chunk",
                "8",
                "--kv-memory-fraction",
                repr(fraction),
            ]
        )
        == 0
    )
    planned = int(re.search(r"(\d+) KV pages per device", capsys.readouterr().out).group(1))
    assert allocated > 100 and planned == pytest.approx(allocated, rel=0.01)


def test_check_manifest_names_every_mismatch():
    import jax

    dev = jax.devices()[0]
    good = {
        "versions": aot_manifest.versions(),
        "target": {"name": "cpu", "platform": "cpu", "device_kind": dev.device_kind, "num_devices": 1},
    }
    aot_manifest.check_manifest(good)
    bad = {"versions": {**good["versions"], "jaxlib": "0.4.1"}, "target": {**good["target"], "num_devices": 4096}}
    with pytest.raises(aot_manifest.ManifestMismatch) as e:
        aot_manifest.check_manifest(bad)
    assert "jaxlib 0.4.1" in str(e.value) and "4096 devices" in str(e.value)


def test_bad_mesh_for_topology_is_a_one_line_error(tpu_available, capfd):
    code, _, err = aot(["--model", "tiny", "--topology", "v5e:2x4", "--mesh", "2x2"], capfd=capfd)
    assert code == 2 and "Traceback" not in err
    assert "has 4 devices but topology v5e:2x4 has 8 chips" in err


BAD_AOT_FLAGS = [
    (["--device-memory-gib", "-1", "--plan-only"], "--device-memory-gib -1: must be > 0"),
    (["--device-memory-gib", "0", "--plan-only"], "--device-memory-gib 0: must be > 0"),  # not "the default"
    (["--out", "README.md"], "--out README.md: exists and is not a directory"),  # refused before compiling
]


@pytest.mark.parametrize("flags,message", BAD_AOT_FLAGS)
def test_bad_aot_flags_are_one_line_and_exit_2(flags, message, capfd):
    # the first case as a process (the script), the others through `main()` in this one, as test_run_cli's table
    argv = ["--model", "tiny", "--topology", "v5e:2x4", "--mesh", "2x4", *flags]
    code, _, err = aot(argv, capfd=None if flags == BAD_AOT_FLAGS[0][0] else capfd)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and message in lines[0], err[-2000:]


def test_host_plan_counts_replicas_once_in_host_ram_but_per_chip_in_hbm(tpu_available):
    """data=16: every chip holds the whole (tiny) model; a host's 4 chips hold 4 copies in HBM, and its
    process reads one copy."""
    import jax
    import numpy as np

    from jaxinfer.compilation import hosts, plan, target
    from jaxinfer.model.layout import plan_layout
    from jaxinfer.model.params import abstract_params
    from jaxinfer.sharding import MESH_AXES, per_device_bytes

    tgt, spec = target.resolve("v5e:4x4", "16x1", None)
    mesh = jax.sharding.Mesh(np.asarray(tgt.devices, dtype=object).reshape(spec.shape), MESH_AXES)
    config = get_preset("tiny")
    params = abstract_params(config, plan_layout(config, 1), "bfloat16", mesh)
    model = per_device_bytes(params)
    per_device = plan.MemoryPlan(tgt.memory_bytes, model, 1000, None, None, 1, None, None)
    host = hosts.build(per_device, tgt.devices, params)
    assert (host.hosts, host.devices_per_host) == (4, 4) == hosts.host_shape(tgt.devices)
    assert host.host_weights == model == config.param_count() * 2
    assert dict(host.rows())["weights"] == 4 * model and dict(host.rows())["KV cache"] == 4000
    assert host.load_ram == model + host.largest_tensor and host.largest_tensor_name == "embed"


@pytest.mark.parametrize("draft", ["tiny", "tiny-head"])
def test_speculative_verify_and_draft_steps_compile_for_v5e(tmp_path, tpu_available, draft):
    """--speculative draft, with a draft model or a feature head: each bucket's plain step (the draft follows
    and proposes in it; the head proposes from the target's states) and its verify step compile for
    v5e:2x4 with the Pallas kernel, and the manifest lists both."""
    code, out, err = aot(
        ["--model", "tiny", "--topology", "v5e:2x4", "--mesh", "2x4", "--max-slots", "8", "--max-context", "128"]
        + ["--max-step-tokens", "8", "--speculative", "draft", "--draft-model", draft, "--out", str(tmp_path)]
    )
    assert code == 0, err[-3000:]
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["engine"]["attention"] == "pallas" and m["engine"]["speculative"] == "draft"
    assert [s["bucket"] for s in m["steps"]] == [8, "verify_8"]
    for key in ("8", "verify_8"):
        assert (tmp_path / m["executables"][key]).stat().st_size > 100_000  # a real TPU binary


def test_llama3_70b_int8_plans_onto_v5e_2x4_with_one_byte_per_weight(tpu_available, capfd):
    """Int8 weights put Llama-3-70B on one v5e:2x4 (8 x 16 GiB) at 2k context with room for more than 8
    requests; each chip holds about params x 1 byte / 8 (plus the per-channel scales)."""
    code, out, err = aot(
        ["--model", "llama3-70b", "--topology", "v5e:2x4", "--mesh", "1x8", "--max-slots", "8"]
        + ["--max-context", "2048", "--dtype", "bf16", "--quantize", "int8", "--plan-only"],
        capfd=capfd,
    )
    assert code == 0, err[-3000:]
    assert "FITS" in out and "weights quantized: int8: int8 per channel" in out
    device = printed_table(out, "per device")
    assert device["weights"] == pytest.approx(get_preset("llama3-70b").param_count() / 8, rel=0.01)
    slots = int(re.search(r"= (\d+) concurrent requests of 2048 tokens", out).group(1))
    assert slots >= 8


@pytest.mark.parametrize("topology,model", [("v5e:2x4", "llama3.2-1b"), ("v6e:2x4", "tiny")])
def test_int8_weight_decode_step_compiles_for_tpu(tpu_available, topology, model, tmp_path):
    """The decode step with int8 weights (codes and scales sharded like the weights) compiles for v5e and
    v6e with the Pallas kernel, and XLA's memory analysis of its arguments shows one byte per weight
    (Llama-3.2-1B on v5e; a tiny model on v6e keeps the second compile short)."""
    code, out, err = aot(
        ["--model", model, "--topology", topology, "--mesh", "1x8", "--max-slots", "8"]
        + ["--max-context", "512", "--dtype", "bf16", "--quantize", "int8", "--buckets", "8"]
        + ["--out", str(tmp_path)]
    )
    assert code == 0, err[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    plan, step = manifest["plan"], manifest["steps"][0]
    assert manifest["model"]["quant"]["label"] == "int8"
    if model != "tiny":
        assert plan["weights"] == pytest.approx(get_preset(model).param_count() / 8, rel=0.02)
    assert step["memory"]["argument"] < plan["weights"] + plan["kv"] + 64 * 2**20


def longest_context(out: str) -> int:
    return int(re.search(r"longest context one request can hold: ([\d,]+) tokens", out).group(1).replace(",", ""))


def test_sequence_axis_doubles_the_longest_context_of_llama31_8b_on_v5e(tpu_available, capfd):
    """The planner's longest context one request can hold: Llama-3.1-8B in bf16 on v5e:2x4, 1x2x4 deals a
    request's pages over two sequence shards, so it holds twice what 2x1x4 does at the same memory."""
    longest = {}
    for mesh in ("2x1x4", "1x2x4"):
        code, out, err = aot(
            ["--model", "llama3.1-8b", "--topology", "v5e:2x4", "--mesh", mesh, "--dtype", "bf16", "--plan-only"],
            capfd=capfd,
        )
        assert code == 0, err[-3000:]
        longest[mesh] = longest_context(out)
    assert longest["1x2x4"] == 2 * longest["2x1x4"] > 131072


def test_sequence_parallel_prefill_and_decode_steps_compile_for_v5e(tpu_available, tmp_path):
    """A decode bucket and a prefill bucket on mesh 1x2x4 (pages and tokens split over sequence, the Pallas
    kernel's partial results merged across it) compile for v5e:2x4."""
    code, out, err = aot(
        ["--model", "tiny", "--topology", "v5e:2x4", "--mesh", "1x2x4", "--max-slots", "8", "--max-context", "512"]
        + ["--prefill-chunk", "128", "--buckets", "8", "128", "--out", str(tmp_path)]
    )
    assert code == 0, err[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["mesh"] == {"data": 1, "sequence": 2, "tensor": 4}
    assert manifest["engine"]["attention"] == "pallas"
    assert [s["bucket"] for s in manifest["steps"]] == [8, 128]
