"""Forming the cluster (JAX's distributed runtime plus our control channel), the start-up handshake,
heartbeats, and what happens when a process is lost.

    leader (process 0)                          worker (process i > 0)
    jax.distributed.initialize                  jax.distributed.initialize
    listen on the control port      <--------   connect, send ("hello", fingerprint)
    compare every fingerprint       -------->   ("welcome") or ("refuse", the difference)
    commands: step, idle, rows, stop -------->  a queue the follower loop reads (`replica.follow`)
    ("drain") on a worker's SIGTERM <--------
    heartbeats both ways, every second; EOF or --heartbeat-timeout of silence = lost

A lost process is fatal for all: each survivor logs one line naming it, runs its loss handlers (the
server fails requests in flight with UNAVAILABLE and goes NOT_SERVING), tells the other workers, and
exits with status 1 within seconds, without waiting on collectives that can no longer complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import sys
import threading
import time

from jaxinfer.config import ConfigError
from jaxinfer.multihost.fingerprint import differences
from jaxinfer.multihost.flags import MultihostSpec
from jaxinfer.multihost.wire import ChannelClosed, Connection

log = logging.getLogger("jaxinfer.multihost")

EXIT_LOST = 1
LOSS_GRACE_S = 2.0  # after a loss: time for the loss handlers' replies (failed RPCs) to reach clients
STOP_WAIT_S = 30.0  # a clean stop: how long the leader waits for every worker to acknowledge


class Cluster:
    """This process's place in the cluster and its control-channel connections."""

    def __init__(self, spec: MultihostSpec, process_id: int, num_processes: int):
        self.spec, self.process_id, self.num_processes = spec, process_id, num_processes
        self.peers: dict[int, Connection] = {}
        self.commands: queue.SimpleQueue = queue.SimpleQueue()  # worker: what the leader sent, in order
        self._last_seen: dict[int, float] = {}
        self._lost_handlers: list = []
        self._drain_handlers: list = []
        self._lock = threading.Lock()
        self._lost = False
        self._lost_handled = threading.Event()  # set once the loss handlers have run
        self._closing = False
        self._gone: set[int] = set()  # peers whose connection closed after a clean stop
        self._all_gone = threading.Event()
        self.stopped = False  # worker: the leader's stop was received and acknowledged

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    def name(self, pid: int | None = None) -> str:
        return f"process {self.process_id if pid is None else pid} of {self.num_processes}"

    # ---- hooks -------------------------------------------------------------------------------
    def on_lost(self, handler) -> None:
        """`handler(message)` runs (on a channel thread, must not block long) when a process is lost."""
        self._lost_handlers.append(handler)

    def on_drain(self, handler) -> None:
        """Leader: `handler()` runs when a worker received SIGTERM/SIGINT (the cluster drains as one)."""
        self._drain_handlers.append(handler)

    # ---- leader ------------------------------------------------------------------------------
    def broadcast(self, kind: str, meta: dict | None = None, arrays: dict | None = None) -> None:
        for pid, conn in list(self.peers.items()):
            try:
                conn.send(kind, meta, arrays)
            except OSError as e:
                self._lose(pid, f"sending to it failed ({e})")

    def stop(self) -> None:
        """Leader, at a clean end: every worker finishes the commands it has, acknowledges and exits 0."""
        with self._lock:
            self._closing = True
        self.broadcast("stop")
        if not self._all_gone.wait(STOP_WAIT_S):
            missing = sorted(set(self.peers) - self._gone)
            log.warning("workers %s did not acknowledge the stop within %gs", missing, STOP_WAIT_S)

    def abort(self, message: str) -> None:
        """Tells every other process to exit now with `message` (this process is failing)."""
        with self._lock:
            self._closing = True
        for conn in list(self.peers.values()):
            with contextlib.suppress(OSError):
                conn.send("abort", {"message": message})

    # ---- worker ------------------------------------------------------------------------------
    def request_drain(self) -> None:
        """Worker: asks the leader to drain the cluster (this worker got SIGTERM/SIGINT)."""
        with contextlib.suppress(OSError):
            self.peers[0].send("drain", {"process_id": self.process_id})

    def acknowledge_stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.peers[0].send("bye")

    def finish(self) -> None:
        """A clean end of this process's work: the leader stops the workers; a worker that has not been
        stopped yet (its work was its own, as the AOT tool's is) waits for the leader's stop."""
        if self.is_leader:
            self.stop()
            return
        while not self.stopped:
            kind, _, _ = self.commands.get()
            if kind == "stop":
                self.acknowledge_stop()

    # ---- threads -----------------------------------------------------------------------------
    def start_threads(self) -> None:
        now = time.monotonic()
        for pid, conn in self.peers.items():
            self._last_seen[pid] = now
            threading.Thread(target=self._read, args=(pid, conn), name=f"control-{pid}", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

    def _read(self, pid: int, conn: Connection) -> None:
        while True:
            try:
                kind, meta, arrays = conn.receive()
            except (ChannelClosed, ConnectionResetError):
                if self._closing:
                    self._left(pid)
                    return
                self._lose(pid, "its connection closed (it exited, was killed, or its host went down)")
                return
            except (OSError, ValueError) as e:
                self._lose(pid, f"its control channel failed ({e})")
                return
            self._last_seen[pid] = time.monotonic()
            if kind == "hb":
                continue
            if kind == "abort":
                self._lose(pid, meta.get("message", "it aborted"), relay=False)
                return
            if self.is_leader:
                if kind == "bye":
                    self._left(pid)
                    return
                if kind == "drain":
                    log.info("%s received a signal: draining the cluster", self.name(pid))
                    for handler in self._drain_handlers:
                        handler()
                continue
            if kind == "stop":
                with self._lock:
                    self._closing = True
            self.commands.put((kind, meta, arrays))

    def _left(self, pid: int) -> None:
        """`pid` acknowledged a clean stop (or closed its connection after one)."""
        self._gone.add(pid)
        self._last_seen.pop(pid, None)
        if self._gone >= set(self.peers):
            self._all_gone.set()

    def _heartbeat(self) -> None:
        interval = min(1.0, self.spec.heartbeat_timeout / 4)
        while not self._lost:
            for pid, conn in list(self.peers.items()):
                if pid in self._gone:
                    continue
                try:
                    conn.send("hb")
                except OSError:
                    if not self._closing:
                        self._lose(pid, "its connection broke")
            now = time.monotonic()
            for pid, seen in list(self._last_seen.items()):
                if not self._closing and now - seen > self.spec.heartbeat_timeout:
                    self._lose(
                        pid, f"no heartbeat for {now - seen:.0f}s (--heartbeat-timeout {self.spec.heartbeat_timeout:g})"
                    )
            time.sleep(interval)

    def fatal(self, message: str) -> None:
        """This process can no longer keep the others in step: the same ending as a loss, naming the cause."""
        self._lose(self.process_id, message, relay=False, tell_all=True)

    def failed_call(self, message: str, wait_s: float = 2.0) -> None:
        """A device call failed here after the others got it. A collective fails when a peer died, often
        a moment before the channel sees its connection close: give the channel `wait_s` to name the
        lost process (its loss handlers run first); only then is this process's failure the cause."""
        if not self._lost_handled.wait(wait_s):
            self.fatal(message)
        self._lost_handled.wait(wait_s)

    def _lose(self, pid: int, reason: str, relay: bool = True, tell_all: bool = False) -> None:
        """Fatal: names the lost process, runs the loss handlers, tells the others, exits EXIT_LOST."""
        with self._lock:
            if self._lost:
                return
            self._lost = True
        message = f"{self.name(pid)} lost: {reason}" if relay else reason
        log.error("%s; %s exits", message, self.name())
        if (relay and self.is_leader) or tell_all:
            for other, conn in list(self.peers.items()):
                if other != pid:
                    with contextlib.suppress(OSError):
                        conn.send("abort", {"message": message})
        for handler in self._lost_handlers:
            try:
                handler(message)
            except Exception:
                log.exception("a loss handler failed")
        self._lost_handled.set()
        if self._lost_handlers:
            time.sleep(LOSS_GRACE_S)
        hard_exit(EXIT_LOST)  # before JAX's runtime notices too (when process 0 is lost, it aborts the process)


def hard_exit(code: int) -> None:
    """Exits now: no atexit handlers (JAX's distributed shutdown would wait on the lost process)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def listen(spec: MultihostSpec, host: str, port: int, fingerprint: dict, num_processes: int) -> dict[int, Connection]:
    """Leader: accepts every worker's hello and answers all of them at once (welcome, or the difference)."""
    server = socket.create_server(("" if host not in ("127.0.0.1", "localhost") else host, port), reuse_port=False)
    server.settimeout(spec.startup_timeout)
    hellos: dict[int, tuple[Connection, dict]] = {}
    deadline = time.monotonic() + spec.startup_timeout
    try:
        while len(hellos) < num_processes - 1:
            server.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock, _ = server.accept()
            except TimeoutError:
                missing = sorted(set(range(1, num_processes)) - set(hellos))
                raise ConfigError(
                    f"processes {missing} did not join within --startup-timeout {spec.startup_timeout:g}s"
                ) from None
            sock.settimeout(spec.startup_timeout)
            conn = Connection(sock)
            kind, meta, _ = conn.receive()
            pid = meta.get("process_id")
            if kind != "hello" or not isinstance(pid, int) or not 0 < pid < num_processes or pid in hellos:
                conn.close()  # not one of ours, or a duplicate: ignore it
                continue
            sock.settimeout(None)
            hellos[pid] = (conn, meta["fingerprint"])
    finally:
        server.close()
    problems = [d for pid in sorted(hellos) for d in differences(fingerprint, hellos[pid][1], pid)]
    for conn, _ in hellos.values():
        conn.send("refuse" if problems else "welcome", {"message": "; ".join(problems)})
    if problems:
        raise ConfigError("processes differ: " + "; ".join(problems))
    return {pid: conn for pid, (conn, _) in hellos.items()}


def connect(spec: MultihostSpec, host: str, port: int, fingerprint: dict, process_id: int) -> Connection:
    """Worker: connects to the leader (retrying while it starts), says hello, and waits for its answer."""
    deadline = time.monotonic() + spec.startup_timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"--coordinator: cannot reach process 0's control port {host}:{port} within "
                    f"--startup-timeout {spec.startup_timeout:g}s ({e})"
                ) from None
            time.sleep(0.2)
    sock.settimeout(spec.startup_timeout)
    conn = Connection(sock)
    conn.send("hello", {"process_id": process_id, "fingerprint": fingerprint})
    try:
        kind, meta, _ = conn.receive()
    except (ChannelClosed, TimeoutError):
        raise ConfigError(f"process 0 at {host}:{port} closed the control channel during the handshake") from None
    if kind == "refuse":
        raise ConfigError("processes differ: " + meta["message"])
    sock.settimeout(None)
    return conn
