"""`python -m jaxinfer.serve`: the gRPC generation server (service `jaxinfer.v1.Generation`).

    python -m jaxinfer.serve --mesh 2x4 --port 50051 --metrics-port 9090
    python -m jaxinfer.serve --model tests/data/stories260K/stories260K.bin --mesh 1x1 --port 50051

The port opens before the model loads, with health NOT_SERVING; it turns SERVING once warm-up has
compiled every bucket. SIGTERM or SIGINT: health NOT_SERVING, new requests get UNAVAILABLE,
in-flight requests get --drain-seconds to finish, then the process exits 0 (at once, during start-up).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from jaxinfer.bootstrap import add_model_args, build_engine, check_paths
from jaxinfer.cli_common import setup_logging, user_errors

log = logging.getLogger("jaxinfer.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxinfer.serve", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (gRPC and metrics)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port, logged)")
    s.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: any free port)")
    s.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for a slot; beyond it requests get RESOURCE_EXHAUSTED",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take; the client's deadline applies when shorter",
    )
    s.add_argument(
        "--drain-seconds", type=float, default=30.0, help="on SIGTERM/SIGINT, how long in-flight requests get to finish"
    )
    s.add_argument(
        "--stream-buffer",
        type=int,
        default=64,
        help="responses buffered per streaming request; a client that lets it fill is cut off",
    )
    return p


def check_server_args(args) -> None:
    for flag, minimum in (("port", 0), ("max_queue", 0), ("stream_buffer", 1)):
        if getattr(args, flag) < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= {minimum}")
    if args.metrics_port is not None and args.metrics_port < 0:
        raise ValueError(f"--metrics-port {args.metrics_port} must be >= 0")
    for flag in ("request_timeout", "drain_seconds"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be > 0")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with user_errors("jaxinfer.serve", (OSError,)):
        check_server_args(args)
        check_paths(args)
        from grpc_health.v1 import health_pb2
        from prometheus_client import start_http_server

        from jaxinfer.server.metrics import Metrics
        from jaxinfer.server.orchestrator import Orchestrator
        from jaxinfer.server.service import SERVICE, GenerationService, build_server

        metrics = Metrics()
        if args.metrics_port is not None:
            http, _ = start_http_server(args.metrics_port, addr=args.host, registry=metrics.registry)
            log.info("metrics on http://%s:%d/metrics", args.host, http.server_port)
        service = GenerationService(metrics)
        server, port, health = build_server(service, args.max_slots + args.max_queue + 16, f"{args.host}:{args.port}")
        stopping, warming = threading.Event(), threading.Event()
        warming.set()

        def on_signal(signum, frame):
            health.enter_graceful_shutdown()
            stopping.set()
            if warming.is_set():  # nothing is in flight yet; unwinding out of XLA compilation is not safe
                log.info("%s during start-up: exiting", signal.Signals(signum).name)
                logging.shutdown()
                os._exit(0)
            log.info("%s: draining (new requests get UNAVAILABLE)", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.start()
        log.info("gRPC listening on %s:%d (health NOT_SERVING until warm-up is done)", args.host, port)

        engine = build_engine(args, serve_early=True)  # larger buckets may still compile in the background
        orchestrator = Orchestrator(
            engine,
            metrics,
            max_queue=args.max_queue,
            stream_buffer=args.stream_buffer,
            request_timeout=args.request_timeout,
        )
        orchestrator.start()
        warming.clear()
        service.ready(engine, orchestrator)
        if not stopping.is_set():
            for name in ("", SERVICE):
                health.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info(
                "SERVING %s: %d slots, queue %d, buckets %s ready of %s",
                engine.model.config.name,
                engine.config.max_slots,
                args.max_queue,
                engine.ready_buckets,
                engine.buckets,
            )
        while not stopping.wait(1.0):
            pass
        orchestrator.stop_accepting()
        left = orchestrator.drain(args.drain_seconds)
        if left:
            log.warning("%d request(s) still running after --drain-seconds %g; ending them", left, args.drain_seconds)
        orchestrator.close()
        server.stop(grace=5).wait()
        log.info("stopped")
        if engine.compiling is not None and engine.compiling.is_alive():
            logging.shutdown()  # a thread inside XLA compilation cannot be unwound: leave without waiting
            os._exit(0)
        return 0


if __name__ == "__main__":
    sys.exit(main())
