"""One mesh over several processes (multi-host TPU slices; several CPU processes in tests).

Process 0 (the leader) runs the scheduler and the front ends. Every process builds the same engine
(same flags, same global mesh, same compiled steps, each loading only its own shards); the leader
sends each device call's host inputs (steps, idle warm-up runs, penalty rows) to the others over a
TCP control channel (`channel`), and every process dispatches the same SPMD program in the same order
(`replica`). Step outputs are replicated, so the leader reads the sampled tokens back alone.

The control channel also carries the start-up handshake (flags, versions, checkpoint and device
counts must match, `fingerprint`) and heartbeats: a process that dies or stops answering makes every
other one exit non-zero within a bounded time, with one line naming it (`cluster`).
"""
