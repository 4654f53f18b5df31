"""Orchestrator logic against a mock engine whose output can be checked by hand (no model, no gRPC server).

The real server is tested end to end in test_server*.py; these pin down the timing-sensitive parts
exactly: FCFS slot admission, queue bound, slow-reader cut-off, cancellation before the next step,
deadlines, per-request internal errors, drain and shutdown.
"""

import collections
import threading
import time
import types

import grpc
import pytest

from jaxinfer.engine.executables import StartupReport
from jaxinfer.engine.requests import Event, Request, Result, SamplingParams
from jaxinfer.engine.status import EngineStatus
from jaxinfer.server.metrics import Metrics
from jaxinfer.server.orchestrator import Orchestrator, RequestFailed


class MockEngine:
    """Prompt [p] generates p+1, p+2, ... one token per step per slot, text "<t>"; FCFS into `max_slots` slots.

    A prompt starting with -1 makes `submit` raise; `fail_next_step` makes the next step raise.
    """

    def __init__(self, max_slots=2, step_seconds=0.002):
        self.config = types.SimpleNamespace(max_slots=max_slots)
        self.startup = StartupReport(load_s=0.5, compiled=3)
        self.unproven_buckets = ()
        self.compiling = None  # no buckets loading or compiling in the background
        self.step_seconds = step_seconds
        self.running_steps = threading.Event()  # cleared: step() waits (the engine thread is busy)
        self.running_steps.set()
        self.waiting = collections.deque()
        self.running: dict[str, tuple[Request, list[int]]] = {}
        self.stats = collections.Counter()
        self.pages_total = 4 * max_slots
        self.fail_next_step = False
        self.cancelled_at: dict[str, int] = {}  # request id -> steps dispatched when engine.cancel ran
        self.admitted: list[str] = []

    def status(self):
        return EngineStatus(
            active_slots=len(self.running),
            waiting=len(self.waiting),
            prefilling=0,
            pages_used=4 * len(self.running),
            pages_total=self.pages_total,
            steps=self.stats["steps"],
            preemptions=0,
            compilations_after_warmup=0,
            steps_by_bucket={},
            finished={},
            pages_cached=0,
            prefix_lookup_tokens=0,
            prefix_hit_tokens=0,
            prompt_tokens_computed=0,
            prefix_evictions=0,
            buckets_ready=(1, 2, 4),
        )

    def submit(self, req):
        if req.prompt_ids[0] == -1:
            raise RuntimeError("corrupt request state")
        self.waiting.append(req)

    def has_work(self):
        return bool(self.waiting or self.running)

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("device fell over")
        self.running_steps.wait()
        time.sleep(self.step_seconds)
        while self.waiting and len(self.running) < self.config.max_slots:
            req = self.waiting.popleft()
            self.running[req.id] = (req, [])
            self.admitted.append(req.id)
        self.stats["steps"] += 1
        events = []
        for rid, (req, tokens) in list(self.running.items()):
            tokens.append(req.prompt_ids[-1] + len(tokens) + 1)
            event = Event(rid, [tokens[-1]], f"<{tokens[-1]}>", None)
            if len(tokens) == req.params.max_tokens:
                event.result = self._result(req, tokens, "length")
                del self.running[rid]
            events.append(event)
        return events

    def cancel(self, rid):
        self.cancelled_at[rid] = self.stats["steps"]
        for req in list(self.waiting):
            if req.id == rid:
                self.waiting.remove(req)
                return self._result(req, [], "cancelled")
        if rid in self.running:
            req, tokens = self.running.pop(rid)
            return self._result(req, tokens, "cancelled")
        return None

    @staticmethod
    def _result(req, tokens, reason):
        return Result(
            req.id, list(tokens), "".join(f"<{t}>" for t in tokens), reason, len(req.prompt_ids), None, 0.001, 0.01
        )


def make(max_slots=2, max_queue=4, stream_buffer=64, request_timeout=None, step_seconds=0.002):
    engine = MockEngine(max_slots, step_seconds)
    orch = Orchestrator(
        engine, Metrics(), max_queue=max_queue, stream_buffer=stream_buffer, request_timeout=request_timeout
    )
    orch.start()
    return engine, orch


def request(rid, start=0, max_tokens=3):
    return Request(rid, [start], SamplingParams(max_tokens=max_tokens))


def collect(ticket):
    return [(e.token_ids[0], e.text) for e in ticket]


def wait_until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.001)


def test_streams_tokens_in_order_and_admits_first_come_first_served():
    engine, orch = make(max_slots=2)
    tickets = [orch.submit(request(f"r{i}", start=10 * i, max_tokens=3)) for i in range(5)]
    outputs = [collect(t) for t in tickets]
    assert outputs[3] == [(31, "<31>"), (32, "<32>"), (33, "<33>")]
    assert all([tok for tok, _ in out] == [10 * i + 1, 10 * i + 2, 10 * i + 3] for i, out in enumerate(outputs))
    assert engine.admitted == ["r0", "r1", "r2", "r3", "r4"]
    wait_until(lambda: orch.status["active_slots"] == 0)
    assert orch.status["peak_active_slots"] == 2
    assert orch.metrics.finished.labels("length")._value.get() == 5
    orch.close()


def test_full_queue_is_refused_at_once_and_duplicate_ids_too():
    engine, orch = make(max_slots=2, max_queue=1, step_seconds=0.02)
    held = [orch.submit(request(f"r{i}", max_tokens=100)) for i in range(3)]  # 2 slots + 1 waiting
    engine.running_steps.clear()  # the engine thread is stuck in a step: a refusal must not wait for it
    steps = engine.stats["steps"]
    with pytest.raises(RequestFailed) as e:
        orch.submit(request("r3"))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue" in str(e.value)
    assert engine.stats["steps"] == steps
    engine.running_steps.set()
    with pytest.raises(RequestFailed) as e:
        orch.submit(request("r0"))
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    for ticket in held:
        orch.cancel(ticket)
    assert orch.drain(1.0) == 0
    assert collect(orch.submit(request("after", start=5, max_tokens=1))) == [(6, "<6>")]
    orch.close()


def test_reader_that_stops_reading_is_cut_off_without_slowing_the_other():
    engine, orch = make(max_slots=2, stream_buffer=4)
    cut = threading.Event()
    slow = orch.submit(request("slow", max_tokens=50), on_cutoff=cut.set)
    fast = orch.submit(request("fast", start=100, max_tokens=50))
    assert [tok for tok, _ in collect(fast)] == list(range(101, 151))
    assert cut.is_set() and "slow" in engine.cancelled_at
    assert engine.cancelled_at["slow"] == 5  # 4 buffered events, the 5th step's event did not fit
    with pytest.raises(RequestFailed) as e:
        list(slow)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "did not read" in str(e.value)
    orch.close()


def test_cancel_frees_the_slot_before_the_next_step():
    engine, orch = make(max_slots=1, step_seconds=0.01)
    ticket = orch.submit(request("a", max_tokens=1000))
    events = iter(ticket)
    next(events), next(events)
    steps_before = engine.stats["steps"]
    orch.cancel(ticket)
    wait_until(lambda: "a" in engine.cancelled_at)
    assert engine.cancelled_at["a"] - steps_before <= 1
    with pytest.raises(RequestFailed) as e:
        list(events)
    assert e.value.code == grpc.StatusCode.CANCELLED
    wait_until(lambda: orch.status["active_slots"] == 0)
    hist = {
        s.labels.get("le"): s.value
        for s in orch.metrics.release_steps.collect()[0].samples
        if s.name.endswith("_bucket")
    }
    assert hist["1.0"] == hist["+Inf"] == 1
    orch.close()


def test_deadline_ends_the_request_and_frees_its_slot():
    engine, orch = make(max_slots=1, request_timeout=5.0, step_seconds=0.005)
    ticket = orch.submit(request("slowpoke", max_tokens=10_000), timeout=0.1)  # the client's deadline is shorter
    start = time.monotonic()
    with pytest.raises(RequestFailed) as e:
        list(ticket)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "0.1s" in str(e.value)
    assert time.monotonic() - start > 0.09  # no upper bound in seconds: a loaded machine may be slow
    assert engine.cancelled_at["slowpoke"] < 10_000, "ended by its deadline, long before its last token"
    assert collect(orch.submit(request("next", max_tokens=1))) == [(1, "<1>")]
    orch.close()


def test_internal_errors_fail_only_the_requests_concerned():
    engine, orch = make(max_slots=2)
    bad = orch.submit(Request("bad", [-1], SamplingParams(max_tokens=2)))
    good = orch.submit(request("good", start=7, max_tokens=2))
    with pytest.raises(RequestFailed) as e:
        list(bad)
    assert e.value.code == grpc.StatusCode.INTERNAL and "corrupt request state" in str(e.value)
    assert collect(good) == [(8, "<8>"), (9, "<9>")]
    engine.fail_next_step = True
    doomed = orch.submit(request("doomed", max_tokens=2))
    with pytest.raises(RequestFailed) as e:
        list(doomed)
    assert e.value.code == grpc.StatusCode.INTERNAL and "device fell over" in str(e.value)
    assert collect(orch.submit(request("survivor", max_tokens=1))) == [(1, "<1>")]
    orch.close()


def test_drain_lets_in_flight_finish_then_close_ends_the_rest():
    engine, orch = make(max_slots=2, stream_buffer=10_000, step_seconds=0.005)
    finishing = orch.submit(request("finishing", max_tokens=20))
    endless = orch.submit(request("endless", max_tokens=100_000))
    orch.stop_accepting()
    with pytest.raises(RequestFailed) as e:
        orch.submit(request("late"))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert orch.drain(0.5) == 1  # "endless" is still running after the drain time
    assert len(collect(finishing)) == 20
    orch.close()
    with pytest.raises(RequestFailed) as e:
        list(endless)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_polled_tickets_call_on_change_for_each_event_and_the_end():
    """What the HTTP API's asyncio handlers rely on: `poll` never waits, `on_change` fires after each push."""
    engine, orch = make(max_slots=1, step_seconds=0.01)
    blocker = orch.submit(request("busy", start=0, max_tokens=50))
    ticket = orch.submit(request("polled", start=100, max_tokens=3))
    changes = threading.Semaphore(0)
    ticket.on_change = changes.release
    assert ticket.poll() is None and not ticket.done  # queued behind "busy": nothing yet, and poll did not wait
    orch.cancel(blocker)
    polled = []
    while not ticket.done:
        assert changes.acquire(timeout=5)
        while (event := ticket.poll()) is not None:
            polled.append(event.token_ids[0])
    assert polled == [101, 102, 103] and ticket.poll() is None
    failing = orch.submit(request("fails", start=200, max_tokens=50))
    failing.on_change = changes.release
    orch.cancel(failing)
    with pytest.raises(RequestFailed, match="cancelled by the client"):  # on_change fired for the end too
        while changes.acquire(timeout=5):
            while failing.poll() is not None:
                pass
    orch.close()
