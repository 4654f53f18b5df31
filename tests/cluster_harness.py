"""Several `python -m jaxinfer.run|serve` processes forming one multi-host mesh on loopback (CPU, gloo),
each one's log collected line by line."""

import re
import socket
import subprocess
import sys
import threading
import time


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the coordinator and the control channel)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


class ProcessGroup:
    """`n` processes of `module` with `flags` plus --coordinator/--num-processes/--process-id;
    `per_process(i)` adds flags for process i."""

    def __init__(self, module: str, flags: list[str], n: int = 2, per_process=lambda i: []):
        self.port = free_port_pair()
        self.procs, self.logs = [], []
        for i in range(n):
            cmd = [sys.executable, "-m", module, *flags, *per_process(i)]
            cmd += ["--coordinator", f"127.0.0.1:{self.port}", "--num-processes", str(n), "--process-id", str(i)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines: list[str] = []
            threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout), daemon=True).start()
            self.procs.append(proc)
            self.logs.append(lines)

    def log(self, i: int) -> str:
        return "".join(line for line in self.logs[i] if not line.startswith("[Gloo]"))

    def wait_for(self, i: int, pattern: str, timeout: float = 300) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.logs[i]):
                if m := re.search(pattern, line):
                    return m
            assert self.procs[i].poll() is None, f"process {i} exited:\n{self.log(i)}"
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not logged by process {i}:\n{self.log(i)}")

    def wait(self, timeout: float) -> list[int]:
        """Every process's exit status; fails if any is still running after `timeout` seconds."""
        end = time.monotonic() + timeout
        codes = []
        for i, proc in enumerate(self.procs):
            try:
                codes.append(proc.wait(timeout=max(0.1, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"process {i} still running after {timeout}s:\n{self.log(i)}") from None
        time.sleep(0.1)  # the log readers catch up
        return codes

    def finish(self, timeout: float) -> list[int]:
        """`wait`, killing whatever is left if it fails."""
        try:
            return self.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
