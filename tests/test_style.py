"""House rules that a machine checks: lint, formatting, the layers contract, and small files."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
MAX_LINES = 400


def run(*argv):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint():
    proc = run(sys.executable, "-m", "ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_format():
    proc = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_layers_contract():
    """The architecture of the README, as `[tool.importlinter]` in pyproject.toml writes it down."""
    proc = run(str(BIN / "lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_long_files():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "jaxinfer").rglob("*.py")
        if "proto" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"
