"""Every `python -m jaxinfer.run` line of the README runs as written (exit 0, output produced)."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands(prefix: str) -> list[str]:
    """The README's lines starting with `prefix`, except those reading a shell variable: those need what
    an earlier line built (`$DRAFT`: the distilled feature head, about 20 minutes of data and training)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.startswith(prefix) and "$" not in line]


def test_the_readme_has_run_examples():
    commands = readme_commands("python -m jaxinfer.run")
    assert len(commands) >= 4 and any("--input" in c for c in commands)


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands("python -m jaxinfer.run"))
def test_readme_run_example_runs_as_written(command):
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "jaxinfer.run"]
    proc = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "output tokens/s" in proc.stderr and "compilations after warm-up 0" in proc.stderr
    if "--speculative" in argv:  # the summary reports the proposer's windows and acceptance
        mode = argv[argv.index("--speculative") + 1]
        assert f"speculative decoding ({mode}): " in proc.stderr and "proposals accepted" in proc.stderr
    if "--output" in argv:
        out = pathlib.Path(argv[argv.index("--output") + 1])
        assert out.read_text().count("\n") == (ROOT / argv[argv.index("--input") + 1]).read_text().count("\n")
    else:
        assert proc.stdout.count("--- [") >= 1 and proc.stdout.strip()
