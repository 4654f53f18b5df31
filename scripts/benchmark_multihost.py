"""The cost of spreading one mesh over processes: the batch job on one process against the same job on
N processes (`--coordinator` on loopback), alternating, with a warm `--compile-cache` per mode.

    python scripts/benchmark_multihost.py --repeats 3 --requests 32 --max-tokens 64 [-- --model ... --mesh 2x4]

On one CPU machine every process shares the same cores and the collectives cross processes (gloo), so
this measures overhead (control channel, step inputs sent to every process, cross-process
collectives), not a speedup. Prints output tokens/s per run, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = re.compile(r"output tokens/s ([\d.]+)  steps (\d+)")
DEFAULT = ["--model", "tests/data/stories260K/stories260K.bin", "--mesh", "2x4", "--max-slots", "32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, flags: list[str], cache: str) -> tuple[float, int]:
    """Output tokens/s and steps of one batch job over `processes` processes."""
    port = free_port()
    procs = []
    for i in reversed(range(processes)):
        cluster = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
        cmd = [sys.executable, "-m", "jaxinfer.run", *flags, "--compile-cache", f"{cache}-{i}", *cluster]
        cmd += ["--process-id", str(i)] if processes > 1 else []
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    logs = [p.communicate(timeout=1800)[1] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a run failed:\n{logs[-1][-3000:]}")
    m = RATE.search(logs[-1])  # process 0 started last
    return float(m.group(1)), int(m.group(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"] or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.jsonl")
        with open(src, "w") as f:
            for i in range(args.requests):
                prompt = f"Once upon a time, there was a little {['girl', 'dog', 'bird', 'boy'][i % 4]}"
                f.write(json.dumps({"prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True}) + "\n")
        flags = [*extra, "--input", src, "--output", os.path.join(tmp, "out.jsonl")]
        modes = {"1 process": 1, f"{args.processes} processes": args.processes}
        for n in modes.values():  # fill each mode's compile cache (not timed)
            run(n, flags, os.path.join(tmp, f"cache{n}"))
        rates: dict[str, list[float]] = {name: [] for name in modes}
        for r in range(args.repeats):
            for name, n in modes.items():
                rate, steps = run(n, flags, os.path.join(tmp, f"cache{n}"))
                rates[name].append(rate)
                print(f"repeat {r + 1}: {name}: {rate:.1f} output tokens/s ({steps} steps)", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    for name, value in medians.items():
        print(f"median {name}: {value:.1f} output tokens/s")
    one, many = medians.values()
    print(f"ratio {args.processes} processes / 1 process: {many / one:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rates": rates, "medians": medians}, f, indent=2)


if __name__ == "__main__":
    main()
