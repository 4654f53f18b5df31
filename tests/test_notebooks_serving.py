"""Notebooks 02 (serving), 03 (TPU deployment) and 05 (prefix caching) executed end to end, in a file of
their own so pytest-xdist (`--dist loadfile`) runs them beside 01 and 04 (`tests/test_notebooks.py`).
Each notebook asserts its own results; these tests check what it printed on top of the harness's checks
(time, this checkout's jaxinfer, charts drawn, TPU cells saying they took the CPU path)."""

import pytest

from tests.notebook_harness import run_and_check, text_of


def printed(nb) -> str:
    return "".join(text_of(c) for c in nb.cells)


@pytest.mark.slow
def test_02_serving_runs():
    out = printed(run_and_check("02_serving"))
    assert "health SERVING" in out
    assert "completion:" in out and "chat:" in out  # the openai client, both endpoints
    assert out.count("12/12 ok") == 4  # benchmark_serving: every request of every rate
    assert "exit status 0" in out  # SIGTERM: drained and exited cleanly (the notebook asserts it too)


@pytest.mark.slow
def test_03_tpu_deployment_runs():
    out = printed(run_and_check("03_tpu_deployment"))
    assert "llama3-8b on v5e:2x4" in out and "llama3-70b on v6e:2x4" in out
    assert "DOES NOT FIT" in out and "try --topology" in out  # 70B on v5e:2x4, with a suggestion
    assert "| 8 |" in out and "FITS:" in out  # bucket 8 compiled for v5e:2x4, memory analysis shown
    assert "nothing traced, nothing compiled" in out


@pytest.mark.slow
def test_05_prefix_caching_runs():
    out = printed(run_and_check("05_prefix_caching"))
    assert "TTFT p50" in out and "hit rate" in out
