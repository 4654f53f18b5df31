"""The orchestrator: the bridge between gRPC's many handler threads (and the HTTP API's event loop) and
the engine's one thread.

Data flow for one request:

    gRPC handler thread (one per RPC)             engine thread (one; the only user of the Engine)
    ---------------------------------             ------------------------------------------------
    parse, tokenize, validate
    submit(): admission check under a lock  ---commands--->  engine.submit(request)
      (full -> RESOURCE_EXHAUSTED at once)                    engine.step(), continuously: every step
                                                                admits waiting requests into free
                                                                slots (first come, first served) and
                                                                returns the previous step's Events
    iterate the Ticket, build protobufs,    <---Ticket-----  ticket.push(event): never blocks; a full
      send them (may block on the client)                       buffer cuts the request off
    RPC ends early (client cancel, deadline) ---commands--->  engine.cancel(id): slot and pages are free
                                                                before the next step
                                                              deadlines (--request-timeout or the
                                                                client's) are checked after every step

Why threads: the Engine is single-threaded and its `step()` blocks on the device once per step, so it
gets a thread of its own that does nothing but step, hand out events and apply commands. Everything
that can wait on the outside world (reading requests, tokenizing, building and sending protobufs,
a client that reads slowly) happens on the gRPC handler threads. The two sides meet only in the
command queue and the per-request `Ticket` buffers, so a slow or vanished client costs its own
request, never the step rate of the others. Detokenization stays inside the engine (`Event.text`):
it is incremental and cheap next to a step, and stop strings are matched on the text. The HTTP API
(`http_app`) takes the same path from asyncio handlers, which must not block: they read a Ticket with
`poll()` and are woken by its `on_change` callback instead of iterating it.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

import grpc

from jaxinfer.engine.requests import Event, Request, RequestError
from jaxinfer.server.metrics import Metrics

log = logging.getLogger(__name__)


class RequestFailed(Exception):
    """A request ended without a result; `code` is the gRPC status its caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Ticket:
    """One request's events on their way to its caller: a bounded buffer, then the end (result or error)."""

    def __init__(self, request_id: str, capacity: int, deadline: float | None, timeout: float | None, on_cutoff=None):
        self.request_id = request_id
        self.deadline = deadline  # time.monotonic() by which it must finish, or None
        self.timeout = timeout
        self.on_cutoff = on_cutoff  # called (engine thread, must not block) when the reader is cut off
        self._capacity = capacity
        self._events: collections.deque[Event] = collections.deque()
        self._error: RequestFailed | None = None
        self._ended = False
        self._cond = threading.Condition()
        self.on_change = None  # called (engine thread, must not block) after an event is added or the request ends

    def push(self, event: Event) -> bool:
        """Adds an event (engine thread); False, adding nothing, when the buffer is full."""
        with self._cond:
            if len(self._events) >= self._capacity:
                return False
            self._events.append(event)
            self._ended = event.result is not None
            self._cond.notify()
        self._changed()
        return True

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """Ends the request with an error; events not yet taken are dropped."""
        with self._cond:
            if not self._ended:
                self._events.clear()
                self._error = RequestFailed(code, message)
                self._ended = True
                self._cond.notify()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def poll(self) -> Event | None:
        """The next event without waiting (an asyncio caller's `__iter__`): None when there is none yet or
        the request ended with its result taken (`done` tells which); raises RequestFailed if it failed."""
        with self._cond:
            if self._events:
                return self._events.popleft()
            if self._error is not None:
                raise self._error
            return None

    @property
    def done(self) -> bool:
        """The request ended and every event was taken."""
        with self._cond:
            return self._ended and not self._events

    def __iter__(self):
        """Events in order until the one carrying the result; raises RequestFailed if it failed."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._events or self._ended)
                if self._events:
                    event = self._events.popleft()
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield event
            if event.result is not None:
                return


class Orchestrator:
    """Owns the engine thread; `submit` and `cancel` are safe to call from any thread."""

    def __init__(
        self, engine, metrics: Metrics, *, max_queue: int, stream_buffer: int = 64, request_timeout: float | None = None
    ):
        self.engine, self.metrics = engine, metrics
        self.max_queue, self.stream_buffer, self.request_timeout = max_queue, stream_buffer, request_timeout
        self.capacity = engine.config.max_slots + max_queue  # requests in flight: running + waiting
        self._tickets: dict[str, Ticket] = {}
        self._startup_settled = False  # its StartupReport no longer changes: stop republishing it
        self._lock = threading.Condition()  # guards _tickets and _accepting; notified when _tickets empties
        self._accepting = True
        self._aborted: str | None = None  # why `abort` failed everything (steps may fail from then on)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.status = self._status(peak=0)

    # ---- any thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, timeout: float | None = None, on_cutoff=None) -> Ticket:
        """Queues a validated request; raises RequestFailed when it cannot be accepted right now.

        `timeout`: the caller's deadline in seconds (--request-timeout applies when shorter);
        `on_cutoff`: called, without blocking, if the caller stops reading and is cut off.
        """
        limits = [t for t in (timeout, self.request_timeout) if t is not None]
        timeout = min(limits) if limits else None
        deadline = time.monotonic() + timeout if timeout is not None else None
        with self._lock:
            if not self._accepting:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            if request.id in self._tickets:
                raise RequestFailed(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request.id!r} is already in flight")
            if len(self._tickets) >= self.capacity:
                raise RequestFailed(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server at capacity: {self.engine.config.max_slots} slots busy and {self.max_queue} requests "
                    f"waiting (--max-queue); retry later",
                )
            ticket = self._tickets[request.id] = Ticket(request.id, self.stream_buffer, deadline, timeout, on_cutoff)
        self._commands.put(("submit", request, ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Ends a request whose caller went away; its slot is freed before the engine's next step."""
        with self._lock:
            if self._tickets.get(ticket.request_id) is ticket:  # not a later request reusing the id
                self._commands.put(("cancel", ticket, self.status["engine_steps"]))

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def drain(self, timeout: float) -> int:
        """Waits until no request is in flight or `timeout` passes; returns how many are left."""
        with self._lock:
            self._lock.wait_for(lambda: not self._tickets, timeout)
            return len(self._tickets)

    def abort(self, message: str) -> None:
        """Fails every request in flight with UNAVAILABLE at once, from any thread: for when the engine
        thread may be stuck in a step that can no longer finish (a multi-host process was lost)."""
        self._aborted = message
        self.stop_accepting()
        for ticket in self._in_flight():
            ticket.fail(grpc.StatusCode.UNAVAILABLE, message)

    def close(self) -> None:
        """Fails what is still in flight with UNAVAILABLE and stops the engine thread."""
        self.stop_accepting()
        self._commands.put(("stop",))
        self._thread.join()

    # ---- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._apply(self._next_commands()) and self._aborted is None:
            if self.engine.has_work():
                self._step()
            self._expire(time.monotonic())
            self.status = self._status(peak=self.status["peak_active_slots"])

    def _next_commands(self) -> list:
        """Every queued command; waits for the first one only when the engine has nothing to do."""
        commands = []
        while not commands and not self.engine.has_work():
            try:  # idle: first runs of buckets compiled in the background, between polls for commands
                commands.append(self._commands.get(timeout=None if not self.engine.unproven_buckets else 0))
            except queue.Empty:
                self.engine.warm_one()
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands) -> bool:
        for command in commands:
            if command[0] == "submit":
                _, request, ticket = command
                try:
                    self.engine.submit(request)
                except RequestError as e:
                    self._end(ticket, grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except Exception as e:
                    log.exception("engine refused request %s", request.id)
                    self._end(ticket, grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
            elif command[0] == "cancel":
                _, ticket, steps_then = command
                if self._tickets.get(ticket.request_id) is ticket:
                    if self._end(ticket, grpc.StatusCode.CANCELLED, "cancelled by the client"):
                        self.metrics.release_steps.observe(self.engine.status().steps - steps_then)
            else:
                for ticket in self._in_flight():
                    self._end(ticket, grpc.StatusCode.UNAVAILABLE, "the server shut down before the request finished")
                return False
        return True

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:
            if self._aborted is not None:  # expected: a collective with a lost process cannot complete
                log.error("engine step failed after: %s (%s)", self._aborted, type(e).__name__)
                return
            log.exception("engine step failed; failing the requests in flight")
            for ticket in self._in_flight():
                self._end(
                    ticket, grpc.StatusCode.INTERNAL, f"internal error in an engine step: {type(e).__name__}: {e}"
                )
            return
        for event in events:
            ticket = self._tickets.get(event.request_id)
            if ticket is None:
                continue  # ended already (cut off, cancelled or timed out) while its last step ran
            if not ticket.push(event):
                self._end(
                    ticket,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the client did not read its stream: {self.stream_buffer} responses were buffered, so the "
                    f"request was cut off",
                )
                if ticket.on_cutoff is not None:
                    ticket.on_cutoff()
            elif event.result is not None:
                self.metrics.finished_request(event.result)
                self._forget(ticket)

    def _expire(self, now: float) -> None:
        for ticket in self._in_flight():
            if ticket.deadline is not None and ticket.deadline <= now:
                self._end(
                    ticket,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request did not finish within its deadline of {ticket.timeout:g}s",
                )

    def _in_flight(self) -> list[Ticket]:
        with self._lock:
            return list(self._tickets.values())

    def _end(self, ticket: Ticket, code: grpc.StatusCode, message: str) -> bool:
        """Takes the request out of the engine (its slot is free now) and fails its ticket; True if it was there."""
        try:
            result = self.engine.cancel(ticket.request_id)
        except Exception:
            log.exception("engine.cancel(%s) failed", ticket.request_id)
            result = None
        if result is not None:
            self.metrics.finished.labels("error" if code == grpc.StatusCode.INTERNAL else "cancelled").inc()
        ticket.fail(code, message)
        self._forget(ticket)
        return result is not None

    def _forget(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.pop(ticket.request_id, None)
            if not self._tickets:
                self._lock.notify_all()

    def _status(self, peak: int) -> dict:
        """The engine's state as plain numbers, published for other threads (GetModelInfo) and metrics."""
        e = self.engine.status()
        status = dict(
            active_slots=e.active_slots,
            peak_active_slots=max(peak, e.active_slots),
            queue_depth=e.waiting,
            kv_pages_used=e.pages_used,
            kv_pages_total=e.pages_total,
            engine_steps=e.steps,
        )
        self.metrics.engine_state(
            active_slots=e.active_slots,
            max_slots=self.engine.config.max_slots,
            queue_depth=e.waiting,
            pages_used=e.pages_used,
            pages_cached=e.pages_cached,
            pages_total=e.pages_total,
            steps=e.steps,
            preemptions=e.preemptions,
            compilations=e.compilations_after_warmup,
            prefix_hit_tokens=e.prefix_hit_tokens,
            prefix_lookup_tokens=e.prefix_lookup_tokens,
            prefix_evictions=e.prefix_evictions,
            speculative=e.speculative,
            spec_windows=e.spec_windows,
            spec_proposed=e.spec_proposed,
            spec_accepted=e.spec_accepted,
        )
        if not self._startup_settled:  # larger buckets may still arrive and make their first runs
            self.metrics.startup(self.engine.startup)
            compiling = self.engine.compiling
            self._startup_settled = not (compiling and compiling.is_alive()) and not self.engine.unproven_buckets
        return status
