"""The gRPC generation server: `orchestrator` (engine thread, admission, per-request streams),
`service` (the Generation RPCs, health, reflection), `metrics` (Prometheus) and `wire` (request checks
protobuf parsing cannot name)."""
