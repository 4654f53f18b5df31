"""Start-up time of the batch job and the server: cold, and again from a warm `--compile-cache`.

    python scripts/benchmark_startup.py --repeats 3 [--baseline-ref REF] [-- --mesh 2x4 ...]

Per repeat, in this order (so slow drift reaches every mode):
  baseline cold  `--baseline-ref` (a git ref, e.g. the commit before concurrent compiles) checked out
                 in a temporary worktree; its batch job with an empty --compile-cache; its warm-up line;
  cold           this tree's batch job with an empty --compile-cache: the start-up line (model load,
                 trace, compile);
  warm           the same command again on that cache, `--max-tokens 1`: the whole command's wall time
                 is an upper bound on process start -> first token;
  serve warm     `python -m jaxinfer.serve` on that cache: process start -> SERVING (health).
Prints each run and the medians; `--json` writes everything. Extra arguments after `--` go to every
command (default model and mesh otherwise).
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = ["--prompt", "What is the capital of France?"]
STARTUP = re.compile(
    r"start-up ([\d.]+)s: model load ([\d.]+)s; (\d+) executables loaded in ([\d.]+)s; (\d+) traced in ([\d.]+)s; "
    r"(\d+) compiled in ([\d.]+)s"
)


def batch_job(cwd: str, cache: str, extra: list[str], max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "jaxinfer.run", *PROMPT, "--max-tokens", str(max_tokens), "--compile-cache", cache]
    start = time.perf_counter()
    proc = subprocess.run(cmd + extra, cwd=cwd, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark_startup: {' '.join(cmd)} failed in {cwd}:\n{proc.stderr[-3000:]}")
    out = {"wall_s": wall}
    if m := STARTUP.search(proc.stderr):
        ready, load, loaded, load_x, traced, trace, compiled, comp = m.groups()
        out.update(
            ready_s=float(ready),
            model_load_s=float(load),
            loaded=int(loaded),
            executables_load_s=float(load_x),
            traced=int(traced),
            trace_s=float(trace),
            compiled=int(compiled),
            compile_s=float(comp),
        )
        out["warmup_s"] = out["ready_s"] - out["model_load_s"]
    elif m := re.search(r"warm-up compiled (\d+) buckets in ([\d.]+)s", proc.stderr):  # the code before #23
        out.update(compiled=int(m.group(1)), warmup_s=float(m.group(2)))
    return out


def serve_until_serving(cache: str, extra: list[str]) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cmd = [sys.executable, "-m", "jaxinfer.serve", "--port", str(port), "--compile-cache", cache, *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - start < 600:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return time.perf_counter() - start
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise SystemExit("benchmark_startup: the server did not report SERVING within 600 s")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-ref", default=None, help="git ref of the code to compare the cold start with")
    p.add_argument("--no-serve", action="store_true", help="skip the server measurement")
    p.add_argument("--json", default=None)
    p.add_argument("job_args", nargs="*", metavar="-- ARG", help="passed to every jaxinfer command it runs (after --)")
    args = p.parse_args(argv)
    extra = list(args.job_args)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats} must be >= 1")
    runs: dict[str, list] = {"baseline_cold": [], "cold": [], "warm": [], "serve_warm_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = None
        if args.baseline_ref:
            baseline = os.path.join(tmp, "baseline")
            subprocess.run(["git", "worktree", "add", "--detach", baseline, args.baseline_ref], cwd=ROOT, check=True)
        try:
            for i in range(args.repeats):
                if baseline:
                    runs["baseline_cold"].append(batch_job(baseline, os.path.join(tmp, f"b{i}"), extra, 4))
                cache = os.path.join(tmp, f"c{i}")
                runs["cold"].append(batch_job(ROOT, cache, extra, 4))
                runs["warm"].append(batch_job(ROOT, cache, extra, 1))
                if not args.no_serve:
                    runs["serve_warm_s"].append(serve_until_serving(cache, extra))
                print(f"repeat {i + 1}: " + json.dumps({k: v[-1] for k, v in runs.items() if v}), flush=True)
        finally:
            if baseline:
                subprocess.run(["git", "worktree", "remove", "--force", baseline], cwd=ROOT, check=False)
    med = {}
    for mode in ("baseline_cold", "cold", "warm"):
        if runs[mode]:
            med[mode] = {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]}
    if runs["serve_warm_s"]:
        med["serve_warm_s"] = statistics.median(runs["serve_warm_s"])
    result = {"median": med, "runs": runs}
    if "baseline_cold" in med:
        result["cold_warmup_speedup"] = med["baseline_cold"]["warmup_s"] / med["cold"]["warmup_s"]
    print("medians:", json.dumps(med, indent=1))
    if "cold_warmup_speedup" in result:
        print(
            f"cold warm-up (everything after model load): {result['cold_warmup_speedup']:.2f}x faster than the baseline"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
