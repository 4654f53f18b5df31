"""scripts/benchmark_serving.py against a real server at a tiny size: every field present and sane."""

import math

import pytest

from tests.test_benchmarks import load_script
from tests.test_server import ServerProcess


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-queue", "32")
    try:
        srv.wait_for(r"SERVING stories260K")
        yield srv
    finally:
        srv.stop()


def test_benchmark_serving_reports_every_field(server, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "serving.json"
    png = tmp_path / "serving.png"
    result = load_script("benchmark_serving").main(
        [
            "--target",
            server.target,
            "--num-requests",
            "6",
            "--prompt-len",
            "uniform:4:40",
            "--output-len",
            "fixed:8",
            "--rates",
            "20",
            "inf",
            "--slo-ttft-ms",
            "60000",
            "--slo-tpot-ms",
            "60000",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert out.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["rate"] for r in result["results"]] == [20.0, "inf"]
    for r in result["results"]:
        assert r["completed"] == 6 and r["failed"] == 0 and not r["errors"]
        for key in ("request_throughput", "input_tokens_per_s", "output_tokens_per_s", "goodput", "duration_s"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["goodput"] == pytest.approx(r["request_throughput"])  # SLOs generous enough for all
        assert r["output_tokens_per_s"] * r["duration_s"] == pytest.approx(6 * 8)
        for key in ("ttft_ms", "tpot_ms", "itl_ms"):
            q = r[key]
            assert all(math.isfinite(q[k]) and q[k] >= 0 for k in ("p50", "p90", "p99", "mean")), key
            assert q["p50"] <= q["p90"] <= q["p99"], key


def test_benchmark_serving_conversations_report_prefix_cache_hits_per_turn(server):
    result = load_script("benchmark_serving").main(
        [
            "--target",
            server.target,
            "--num-requests",
            "3",
            "--prompt-len",
            "fixed:20",
            "--output-len",
            "fixed:8",
            "--shared-prefix",
            "40",
            "--turns",
            "3",
            "--rates",
            "inf",
        ]
    )
    (r,) = result["results"]
    assert r["requests"] == r["completed"] == 9 and r["failed"] == 0
    # turn k+1 resends turn k's prompt and answer: whole pages of it come from the cache
    by_turn = r["hit_rate_by_turn"]
    assert len(by_turn) == 3 and by_turn[1] > 0.5 and by_turn[2] > 0.5
    assert r["cached_tokens"] > 0 and 0 < r["prefix_hit_rate"] < 1
