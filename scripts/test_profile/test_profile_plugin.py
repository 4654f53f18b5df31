"""pytest plugin for `sitecustomize.py` here: each test's window and its share of the worker's totals."""

import time

import pytest
import sitecustomize as profile


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before, hits, start = dict(profile.TOTALS), profile.COUNTS[profile.CACHE_HITS], time.time()
    yield
    spent = {event: seconds - before.get(event, 0.0) for event, seconds in profile.TOTALS.items()}
    hits = profile.COUNTS[profile.CACHE_HITS] - hits
    profile.TESTS[item.nodeid] = {"start": start, "end": time.time(), "hits": hits, **spent}


def pytest_sessionfinish(session):
    profile.dump()  # xdist may end a worker before its atexit handlers run
