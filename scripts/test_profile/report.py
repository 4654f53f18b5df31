"""Reads what `sitecustomize.py` here recorded over a `make test` and prints where the time went.

Per module and per test: wall time (the test's window, setup to teardown), JAX backend compile
seconds in the worker and in the processes the test started (each compile thread counted: a
pipelined warm-up compiles on a pool), persistent-cache hits, and lowering to MLIR (worker and children)."""

import argparse
import collections
import glob
import json
import os
import pathlib

COMPILE = "/jax/core/compile/backend_compile_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
HITS = "/jax/compilation_cache/cache_hits"


def load(folder: str):
    records = [json.loads(pathlib.Path(p).read_text()) for p in glob.glob(os.path.join(folder, "*.json"))]
    workers = [r for r in records if r["tests"]]
    children = [r for r in records if not r["tests"]]
    tests = {}
    for w in workers:
        for nodeid, t in w["tests"].items():
            tests[nodeid] = {"wall": t["end"] - t["start"], "compile": t.get(COMPILE, 0.0), "lower": t.get(LOWER, 0.0)}
            tests[nodeid].update(
                child_compile=0.0, children=0, hits=t.get("hits", 0), window=(w["pid"], t["start"], t["end"])
            )
    parent = {r["pid"]: r["parent"] for r in records}
    worker_pids = {w["pid"] for w in workers}

    def worker_of(record) -> int | None:
        """The pytest worker a process descends from (a server a notebook kernel started: the kernel's)."""
        pid = record["parent"]
        while pid not in worker_pids and pid in parent:
            pid = parent[pid]
        return pid if pid in worker_pids else None

    for c in children:  # the test of the worker it descends from that was running when it started
        for t in tests.values():
            pid, start, end = t["window"]
            if worker_of(c) == pid and start <= c["start"] <= end:
                t["child_compile"] += c["totals"].get(COMPILE, 0.0)
                t["lower"] += c["totals"].get(LOWER, 0.0)
                t["hits"] += c["counts"].get(HITS, 0)
                t["children"] += 1
                break
    return tests, workers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--folder", default=os.environ.get("JAXINFER_TEST_PROFILE", "/tmp/jaxinfer-test-profile"))
    p.add_argument("--top", type=int, default=40, help="tests listed, costliest first")
    args = p.parse_args()
    tests, workers = load(args.folder)
    if not tests:
        raise SystemExit(f"{args.folder}: no test records (run make test with the plugin, see sitecustomize.py)")
    fields = ("wall", "compile", "child_compile", "lower")
    total = {f: sum(t[f] for t in tests.values()) for f in fields}
    print(f"{len(tests)} tests over {len(workers)} workers: " + ", ".join(f"{f} {v:.0f}s" for f, v in total.items()))
    modules = collections.defaultdict(collections.Counter)
    for nodeid, t in tests.items():
        modules[nodeid.split("::")[0]].update({f: t[f] for f in fields})
    print(f"\n{'module':44s}" + "".join(f"{f:>14s}" for f in fields))
    for name, m in sorted(modules.items(), key=lambda kv: -kv[1]["wall"]):
        print(f"{name:44s}" + "".join(f"{m[f]:14.1f}" for f in fields))
    print(f"\n{'wall':>7s} {'compile':>8s} {'children':>9s} {'hits':>5s}  test")
    for nodeid, t in sorted(tests.items(), key=lambda kv: -kv[1]["wall"])[: args.top]:
        print(f"{t['wall']:7.1f} {t['compile']:8.1f} {t['child_compile']:9.1f} {t['hits']:5d}  {nodeid}")


if __name__ == "__main__":
    main()
