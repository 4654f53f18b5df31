"""Every process makes the same device calls in the same order: the leader's engine tells the others
(`Replicas`, its `engine.replicas`) before each call, and their follower loop (`follow`) repeats it.

The calls that reach the device after start-up are three: a step of bucket b on host inputs, an idle
first run of a freshly compiled bucket, and writing one slot's penalty rows. Start-up itself (the
model's shards, the cache, the compiled steps) is the same program on every process, so it needs no
messages. Workers never read results back: the step's outputs are replicated, and the leader reads
them from its own devices.
"""

from __future__ import annotations

import contextlib
import logging

from jaxinfer.sampling import PenaltyRows

log = logging.getLogger("jaxinfer.multihost")


class Replicas:
    """Leader side (`engine.replicas`): each device call is sent to every worker, then made here."""

    def __init__(self, cluster):
        self.cluster = cluster

    @contextlib.contextmanager
    def call(self, kind: str, meta: dict, arrays: dict | None):
        """A device call: sent to every worker, then made here."""
        self.cluster.broadcast(kind, meta, arrays)
        with self.failures(f"the {kind} call the others were making"):
            yield

    @contextlib.contextmanager
    def failures(self, what: str):
        """Around work of process 0 the others depend on (a call they got, or reading a step's results
        back, where an asynchronous step's failure surfaces): a failure ends the cluster, naming the
        lost process when one was the cause (`cluster.failed_call`)."""
        try:
            yield
        except Exception as e:
            self.cluster.failed_call(f"process 0 failed {what}: {type(e).__name__}: {e}")
            raise


def follow(engine, cluster) -> None:
    """Worker: repeats the leader's device calls until it says stop (a lost process ends the process
    from the channel's threads, `cluster`)."""
    steps = 0
    while True:
        kind, meta, arrays = cluster.commands.get()
        if kind == "step":
            engine.replay_step(meta["bucket"], arrays)
            steps += 1
        elif kind == "idle":
            engine.run_idle([meta["bucket"]])
        elif kind == "rows":
            engine.replay_rows(meta["shard"], meta["slot"], PenaltyRows(**arrays))
        elif kind == "stop":
            engine.block_until_ready()
            log.info("%s: stop after %d steps", cluster.name(), steps)
            cluster.acknowledge_stop()
            return
        else:
            raise RuntimeError(f"control channel: unknown command {kind!r} from process 0")
