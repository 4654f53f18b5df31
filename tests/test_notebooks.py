"""The notebooks in `notebooks/`: stored stripped, public APIs only, a Colab badge each, linked from the
README, and 01 (quickstart) and 04 (kernels) executed end to end. 02, 03 and 05 run in
`tests/test_notebooks_serving.py`, so pytest-xdist (`--dist loadfile`) gives each worker a share.
"""

import nbformat
import pytest

from tests.notebook_harness import (
    COLAB,
    GITHUB_REPO,
    NOTEBOOKS,
    ROOT,
    notebook_paths,
    output_problems,
    private_names,
    read,
    run_and_check,
    strip,
    text_of,
)

EXPECTED = ["01_quickstart", "02_serving", "03_tpu_deployment", "04_kernels", "05_prefix_caching"]


def test_the_notebooks_are_there():
    assert [p.stem for p in notebook_paths()] == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_stored_stripped(name):
    nb = read(NOTEBOOKS / f"{name}.ipynb")
    nbformat.validate(nb)
    problems = output_problems(nb)
    assert not problems, f"{name}.ipynb carries run results ({'; '.join(problems)}); strip it with " + (
        "`python tests/notebook_harness.py --strip`"
    )


def test_the_stripped_check_fails_on_a_notebook_with_outputs():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# title"),
        nbformat.v4.new_code_cell("print(1)"),
        nbformat.v4.new_code_cell("1 + 1"),
    ]
    assert output_problems(nb) == []
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[2].execution_count = 3
    nb.cells[2].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    assert output_problems(nb) == ["cell 1: 1 output(s)", "cell 2: execution_count 3", "cell 2: run metadata execution"]
    assert output_problems(strip(nb)) == []


def test_the_private_name_check_catches_private_access():
    def found(code):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(code)]
        return private_names(nb)

    assert found("engine._step_fn(x)") == ["cell 0: ._step_fn"]
    assert found("from jaxinfer.engine.engine import _helper") == ["cell 0: import of _helper"]
    assert found("from jaxinfer.engine import (step,\n  _traces)") == ["cell 0: import of _traces"]
    assert "cell 0: import of _src" in found("from jax._src import xla_bridge")
    assert "cell 0: import of _src" in found("import jax._src.config as c")
    assert found("obj.__private") == ["cell 0: .__private"]
    assert found("print(jax.__version__, engine.step(), x.y_z, self_x, a._1)") == ["cell 0: ._1"]
    assert found("from jaxinfer.engine.engine import Engine\nimport numpy as np") == []


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_uses_no_private_names(name):
    assert private_names(read(NOTEBOOKS / f"{name}.ipynb")) == []


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_starts_with_a_colab_badge_and_says_what_it_shows(name):
    first = read(NOTEBOOKS / f"{name}.ipynb").cells[0]
    assert first.cell_type == "markdown"
    assert COLAB.format(repo=GITHUB_REPO, name=f"{name}.ipynb") in first.source
    assert "colab-badge.svg" in first.source
    prose = [line for line in first.source.splitlines() if line and not line.startswith(("[", "#"))]
    assert len(" ".join(prose)) > 200, "a short paragraph on what the notebook shows"


def test_the_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Notebooks\n", 1)[1].split("\n## ", 1)[0]
    for name in EXPECTED:
        assert f"(notebooks/{name}.ipynb)" in section
        assert COLAB.format(repo=GITHUB_REPO, name=f"{name}.ipynb") in section


@pytest.mark.slow
def test_01_quickstart_runs():
    nb = run_and_check("01_quickstart")
    out = "".join(text_of(c) for c in nb.cells)
    assert "picked: " in out and "refused: " in out  # the mesh picked, and one another mesh cannot have
    assert "steps produced text" in out  # streamed step by step (the notebook asserts more than one step)
    assert "reproduces its text" in out  # seeds: the notebook asserted same seed -> same text, other seed -> other
    assert "Paris" in out  # SmolLM2's answer to the capital of France
    assert "same text as on 1x1" in out


@pytest.mark.slow
def test_04_kernels_runs():
    nb = run_and_check("04_kernels")
    out = "".join(text_of(c) for c in nb.cells)
    assert "kernel matches the reference" in out
    assert "compiled for TPU" in out
