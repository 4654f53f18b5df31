"""The notebooks of `notebooks/` as a user runs them, and the checks the tests apply to them.

Notebooks are stored stripped (no outputs, no execution counts) and executed by the tests with
nbclient on the `python3` kernel, in the repository root, with this checkout first on PYTHONPATH (so
`import jaxinfer` there is this checkout's package, and the notebooks' subprocesses find `scripts/`
and `tests/data/`). Cell tags the tests read:
  - `chart`: the cell draws a matplotlib figure; it must have produced an image/png output;
  - `tpu`: the cell needs a TPU for its full path; without one it must print "no TPU attached".

    python tests/notebook_harness.py --strip     # strip every notebook in place (after running them in Jupyter)
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import time

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GITHUB_REPO = "jaxinfer/jaxinfer"  # <org>/<name> of the public repository the Colab badges open
COLAB = "https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}"
NO_TPU = "no TPU attached"
CELL_METADATA_FROM_RUNS = ("execution", "collapsed", "scrolled", "ExecuteTime")

# `x._name` (not `x.__dunder__`), and a private name in an import: `from a._b import c`, `import a._b`,
# `from a import _c` or `from a import (b, _c)`.
PRIVATE_ATTRIBUTE = re.compile(r"\.(_[A-Za-z0-9]\w*|__\w*[A-Za-z0-9])\b")
IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\s+(\([^)]*\)|[^#\n]+)|import\s+([^#\n]+))", re.M)


def notebook_paths() -> list[pathlib.Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def read(path: pathlib.Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def output_problems(nb: nbformat.NotebookNode) -> list[str]:
    """What a stored notebook must not carry: outputs, execution counts, run metadata (one line each)."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i}: {len(cell.outputs)} output(s)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i}: execution_count {cell.execution_count}")
        kept = sorted(k for k in CELL_METADATA_FROM_RUNS if k in cell.get("metadata", {}))
        if kept:
            problems.append(f"cell {i}: run metadata {', '.join(kept)}")
    return problems


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            for key in CELL_METADATA_FROM_RUNS:
                cell.metadata.pop(key, None)
    return nb


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names(nb: nbformat.NotebookNode) -> list[str]:
    """Private names the code cells use: `._x` attribute access and `_x` in imports, with the cell number."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        code = cell.source
        found += [f"cell {i}: .{m.group(1)}" for m in PRIVATE_ATTRIBUTE.finditer(code) if _is_private(m.group(1))]
        for m in IMPORT.finditer(code):
            module, names, plain = m.groups()
            parts = (module or "").split(".")
            for item in re.split(r"[,\s()]+", names or plain or ""):
                parts += item.split(".") if item and item != "as" else []
            found += [f"cell {i}: import of {p}" for p in parts if _is_private(p)]
    return found


def kernel_env() -> dict[str, str]:
    """The test process's environment (8 host CPU devices, the session's compile cache) with this checkout
    first on PYTHONPATH and matplotlib left to the kernel's inline backend."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MPLBACKEND", None)
    return env


def execute(path: pathlib.Path, cell_timeout: int = 170) -> tuple[nbformat.NotebookNode, float]:
    """Runs every cell in order (nbclient; any cell error raises CellExecutionError) -> (executed notebook, seconds)."""
    from nbclient import NotebookClient

    nb = read(path)
    client = NotebookClient(
        nb,
        timeout=cell_timeout,
        startup_timeout=120,  # a kernel starting on a machine busy with the rest of the suite
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    start = time.perf_counter()
    client.execute(env=kernel_env(), cwd=str(ROOT))
    return nb, time.perf_counter() - start


def text_of(cell) -> str:
    """Everything a code cell printed or displayed as text (streams, results, tracebacks)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return "".join(parts)


def tagged(nb: nbformat.NotebookNode, tag: str) -> list[tuple[int, nbformat.NotebookNode]]:
    return [(i, c) for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", [])]


def has_png(cell) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


MAX_SECONDS = 180  # per notebook (issue #22)


def run_and_check(name: str) -> nbformat.NotebookNode:
    """Executes notebooks/NAME.ipynb and checks what every notebook promises: it ran within MAX_SECONDS,
    imported this checkout's jaxinfer, drew every `chart` cell's figure, and said so where a `tpu` cell
    took the CPU path (this machine has no TPU)."""
    nb, seconds = execute(NOTEBOOKS / f"{name}.ipynb")
    print(f"{name}: executed in {seconds:.1f}s")
    assert seconds < MAX_SECONDS, f"{name} took {seconds:.0f}s, over {MAX_SECONDS}s"
    out = "".join(text_of(c) for c in nb.cells)
    assert f"jaxinfer from {ROOT / 'jaxinfer'}," in out, "the notebook must import this checkout's jaxinfer"
    charts = tagged(nb, "chart")
    assert all(has_png(c) for _, c in charts), [i for i, c in charts if not has_png(c)]
    for i, cell in tagged(nb, "tpu"):
        assert NO_TPU in text_of(cell), f"cell {i} needs a TPU and must say it took the CPU path"
    return nb


def main(argv: list[str]) -> int:
    if argv != ["--strip"]:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for path in notebook_paths():
        nb = read(path)
        if output_problems(nb):
            nbformat.write(strip(nb), path)
            print(f"stripped {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
