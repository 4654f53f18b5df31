"""A front end's `main(argv)` run inside the test worker, for the refusal cases of a flag table.

A subprocess costs a new interpreter and `import jax` (2-3.5 s alone, 6-16 s beside the other worker's
compiles), which is most of a refused flag's test. Each table keeps one case as a real subprocess, which
checks what only a process shows (its exit status, nothing else on stderr); the other cases call `main`
here, where anything but a one-line refusal (an exception, a step compiled) fails the test as it would
have failed the process.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import subprocess
import sys


def run_front_end(module: str, argv: list[str], capfd, in_process: bool, timeout: float = 300):
    """(exit status, stdout, stderr) of `python -m module argv`: a real process, or with `in_process` its
    `main(argv)` in this one (`run_main`)."""
    if in_process:
        return run_main(importlib.import_module(module).main, argv, capfd)
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def run_main(main, argv: list[str], capfd) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `main(argv)`: its return value, or the status of the SystemExit
    raised by argparse or `cli_common.user_errors`; output read at the file descriptors (capfd), with the
    INFO log lines a process would print there (pytest's own log capture would otherwise take them)."""
    capfd.readouterr()  # what earlier code in the test printed is not this call's
    with _info_logs_to_stderr():
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    out, err = capfd.readouterr()
    return code, out, err


@contextlib.contextmanager
def _info_logs_to_stderr():
    root = logging.getLogger()
    handler, level = logging.StreamHandler(sys.stderr), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
