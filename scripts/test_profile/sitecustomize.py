"""Where `make test`'s time goes: JAX's compile phases per test, in every process the suite starts.

    rm -rf /tmp/jaxinfer-test-profile                # records of an earlier run would mix in
    PYTHONPATH=scripts/test_profile PYTEST_ADDOPTS="-p test_profile_plugin" make test
    python scripts/test_profile/report.py            # per module, then the costliest tests

Python imports this file at start-up in each process that has this folder on PYTHONPATH: pytest's
workers and the batch jobs, servers, clusters and notebook kernels the tests start. It adds up JAX's
own duration events (tracing, lowering to MLIR, the backend compile, persistent-cache reads) without
importing JAX itself, and writes them, with the process's parent and lifetime, to
$JAXINFER_TEST_PROFILE (default /tmp/jaxinfer-test-profile)/<pid>.json at exit. The pytest plugin
(`test_profile_plugin.py`) adds each test's window and its share of the worker's own totals; the
report gives a process's totals to the test that was running in the worker it descends from when it started.
"""

import atexit
import collections
import importlib.abc
import json
import os
import sys
import time

OUT = os.environ.get("JAXINFER_TEST_PROFILE", "/tmp/jaxinfer-test-profile")
START = time.time()
TOTALS: dict[str, float] = collections.defaultdict(float)  # seconds per JAX duration event
COUNTS: dict[str, int] = collections.defaultdict(int)  # occurrences per event (durations and plain)
CACHE_HITS = "/jax/compilation_cache/cache_hits"
TESTS: dict[str, dict] = {}  # filled by the pytest plugin in pytest's workers


def _duration(event: str, seconds: float, **_) -> None:
    TOTALS[event] += seconds
    COUNTS[event] += 1


def _event(event: str, **_) -> None:
    COUNTS[event] += 1


class _ListenWhenJaxLoads(importlib.abc.MetaPathFinder):
    """Registers the listeners right after `jax.monitoring` is imported (by whoever imports JAX)."""

    def find_spec(self, name, path, target=None):
        if name != "jax.monitoring":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.register_event_duration_secs_listener(_duration)
            module.register_event_listener(_event)

        spec.loader.exec_module = exec_module
        return spec


def dump() -> None:
    if not COUNTS and not TESTS:
        return
    os.makedirs(OUT, exist_ok=True)
    record = {"pid": os.getpid(), "parent": os.getppid(), "argv": sys.argv, "start": START, "end": time.time()}
    with open(os.path.join(OUT, f"{os.getpid()}.json"), "w") as f:
        json.dump({**record, "totals": TOTALS, "counts": COUNTS, "tests": TESTS}, f)


sys.meta_path.insert(0, _ListenWhenJaxLoads())
atexit.register(dump)
