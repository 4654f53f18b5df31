"""Server limits and lifecycle, on a real server of its own (small queue, short --request-timeout):
start-up logs and health NOT_SERVING -> SERVING, the server-side request timeout, queue overflow, and
SIGTERM (NOT_SERVING, UNAVAILABLE for new requests, in-flight requests finish, exit 0). Tests run in
file order; the SIGTERM test ends the module's server; the request-timeout test and the last one start and stop
servers of their own.
"""

import concurrent.futures
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server import SP, ServerProcess, wait_until

from jaxinfer.proto import jaxinfer_pb2 as pb
from jaxinfer.proto import jaxinfer_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
LONG = pb.GenerateRequest(text="Hi", params=SP(max_tokens=500, ignore_eos=True))  # 500 engine steps


def health_status(health) -> int:
    return health.Check(health_pb2.HealthCheckRequest(service="jaxinfer.v1.Generation"), timeout=5).status


@pytest.fixture(scope="module")
def server():
    """Starts the server and records what a client sees while it warms up, until it is SERVING."""
    # the CPU's own buckets from 1 (test_server's flags start at 8): serving early is about the small ones
    srv = ServerProcess("--max-queue", "2", "--request-timeout", "4", "--drain-seconds", "20", "--min-bucket", "1")
    srv.channel = grpc.insecure_channel(srv.target)
    srv.health = health_pb2_grpc.HealthStub(srv.channel)
    srv.stub = jaxinfer_pb2_grpc.GenerationStub(srv.channel)
    srv.statuses, srv.early_errors = [], []
    try:
        while not srv.statuses or srv.statuses[-1] != SERVING:
            srv.statuses.append(health_status(srv.health))
            if srv.statuses[-1] == NOT_SERVING and not srv.early_errors:
                with pytest.raises(grpc.RpcError) as e:
                    srv.stub.GenerateUnary(pb.GenerateRequest(text="Hi"), timeout=5)
                srv.early_errors.append((e.value.code(), e.value.details()))
            assert srv.proc.poll() is None, srv.log()
            time.sleep(0.1)
        yield srv
    finally:
        srv.channel.close()
        srv.stop()


def info(srv):
    return srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)


def test_health_turns_serving_after_warm_up_and_start_up_is_logged(server):
    assert server.statuses[0] == NOT_SERVING and server.statuses[-1] == SERVING
    assert set(server.statuses) == {NOT_SERVING, SERVING}
    assert server.early_errors[0][0] == grpc.StatusCode.UNAVAILABLE and "warming up" in server.early_errors[0][1]
    log = server.log()
    for pattern in (
        "mesh {'data': 1, 'sequence': 1, 'tensor': 1}",
        "model stories260K",
        "KV cache: 128 pages/shard",
        "buckets (1, 2, 4, 8, 16, 32)",
        "start-up ",
        "serving with buckets (1, 2, 4) while [8, 16, 32] load or compile in the background",  # 4 slots
    ):
        assert pattern in log
    assert log.index("start-up ") < log.index("SERVING stories260K: 4 slots, queue 2, buckets (1, 2, 4) ready")
    server.wait_for(r"all buckets ready \(1, 2, 4, 8, 16, 32\)")


def test_request_timeout_gives_deadline_exceeded_and_frees_the_slots():
    """A server of its own with --request-timeout 0.5 (the module's server keeps 4 s, so requests it
    holds in other tests do not expire under them)."""
    srv = ServerProcess("--request-timeout", "0.5")
    try:
        srv.wait_for(r"SERVING stories260K")
        with grpc.insecure_channel(srv.target) as channel:
            srv.stub = jaxinfer_pb2_grpc.GenerationStub(channel)

            def outcome(call):
                try:
                    return len(list(call))
                except grpc.RpcError as e:
                    return e

            start = time.monotonic()
            # No client deadline, so --request-timeout applies. Five requests of 500 tokens on 4 slots: the last
            # one needs 1,000 engine steps, far more than 0.5 s on any CPU (a step costs the host ~1 ms).
            calls = [srv.stub.Generate(LONG) for _ in range(5)]
            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                outcomes = list(pool.map(outcome, calls))
            timed_out = [o for o in outcomes if isinstance(o, grpc.RpcError)]
            assert timed_out and all(o == 500 for o in outcomes if not isinstance(o, grpc.RpcError))
            for e in timed_out:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline of 0.5s" in e.details()
            assert 0.45 < time.monotonic() - start < 10
            wait_until(
                lambda: (i := info(srv)).active_slots == 0 and i.queue_depth == 0 and i.kv_pages_used == 0, timeout=2
            )
    finally:
        srv.stop()


def test_queue_overflow_is_refused_immediately(server):
    held = [server.stub.Generate(LONG) for _ in range(6)]  # 4 slots + --max-queue 2
    try:
        wait_until(lambda: (i := info(server)).active_slots == 4 and i.queue_depth == 2, timeout=3)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            server.stub.GenerateUnary(pb.GenerateRequest(text="Hi", params=SP(max_tokens=4)), timeout=5)
        assert time.monotonic() - start < 0.5
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue" in e.value.details()
    finally:
        for call in held:
            call.cancel()
    wait_until(lambda: info(server).active_slots == 0, timeout=3)
    assert len(server.stub.GenerateUnary(pb.GenerateRequest(text="Hi", params=SP(max_tokens=4))).token_ids) == 4


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    call = server.stub.Generate(pb.GenerateRequest(text="Hi", params=SP(max_tokens=100, ignore_eos=True)))
    tokens = len(next(call).token_ids)
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: health_status(server.health) == NOT_SERVING, timeout=2)
    with pytest.raises(grpc.RpcError) as e:
        server.stub.GenerateUnary(pb.GenerateRequest(text="Hi", params=SP(max_tokens=4)), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    responses = list(call)
    assert tokens + sum(len(r.token_ids) for r in responses) == 100
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert server.proc.wait(timeout=30) == 0
    assert "SIGTERM: draining" in server.log() and "stopped" in server.log()


def test_sigterm_during_warm_up_exits_0_at_once():
    srv = ServerProcess()
    try:
        with grpc.insecure_channel(srv.target) as channel:
            assert health_status(health_pb2_grpc.HealthStub(channel)) == NOT_SERVING
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=10) == 0
        assert "SIGTERM during start-up: exiting" in srv.log() and "start-up " not in srv.log()
    finally:
        srv.stop()
