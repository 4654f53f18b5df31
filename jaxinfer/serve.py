"""`python -m jaxinfer.serve`: the generation server, gRPC (service `jaxinfer.v1.Generation`) and, with
--http-port, the OpenAI-compatible HTTP API, in one process over one engine.

    python -m jaxinfer.serve --mesh 2x4 --port 50051 --http-port 8000 --metrics-port 9090
    python -m jaxinfer.serve --model tests/data/stories260K/stories260K.bin --mesh 1x1 --port 50051

The ports open before the model loads, with health NOT_SERVING (HTTP /health 503); they turn SERVING
once warm-up has compiled the buckets decoding needs. SIGTERM or SIGINT: NOT_SERVING, new requests get
UNAVAILABLE (HTTP 503), in-flight requests get --drain-seconds to finish, then the process exits 0 (at
once, during start-up). Both listen on loopback unless --host says otherwise; --api-key (or
JAXINFER_API_KEY) and --tls-cert/--tls-key secure both protocols.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from jaxinfer.bootstrap import add_model_args, build_engine, cluster_scope, join_cluster
from jaxinfer.cli_common import check_paths, setup_logging, user_errors

log = logging.getLogger("jaxinfer.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxinfer.serve", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (gRPC, HTTP and metrics); default loopback only, 0.0.0.0 for every interface",
    )
    s.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port, logged)")
    s.add_argument(
        "--http-port", type=int, default=None, help="OpenAI-compatible HTTP API port (0: any free port, logged)"
    )
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest HTTP request body; larger ones get 413")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on HTTP /v1/*, /tokenize, /detokenize and gRPC Generation "
        "calls (default: $JAXINFER_API_KEY; health and metrics stay open)",
    )
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain: TLS for gRPC and HTTP (with --tls-key)")
    s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
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
    for flag, minimum in (("port", 0), ("max_queue", 0), ("stream_buffer", 1), ("max_body_bytes", 1)):
        if getattr(args, flag) < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= {minimum}")
    for flag in ("port", "http_port", "metrics_port"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 65535:
            raise ValueError(f"--{flag.replace('_', '-')} {value} must be in [0, 65535]")
    for flag in ("request_timeout", "drain_seconds"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be > 0")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with user_errors("jaxinfer.serve", (OSError,)):
        check_server_args(args)
        check_paths(args)
        cluster = join_cluster(args)
        if cluster is not None and not cluster.is_leader:
            return follow_leader(args, cluster)
        from grpc_health.v1 import health_pb2
        from prometheus_client import start_http_server

        from jaxinfer.server.auth import ApiKeyInterceptor, api_key, tls_files
        from jaxinfer.server.metrics import Metrics
        from jaxinfer.server.orchestrator import Orchestrator
        from jaxinfer.server.service import SERVICE, GenerationService, build_server

        key, tls = api_key(args.api_key), tls_files(args.tls_cert, args.tls_key)
        metrics = Metrics()
        if args.metrics_port is not None:
            metrics_http, _ = start_http_server(args.metrics_port, addr=args.host, registry=metrics.registry)
            log.info("metrics on http://%s:%d/metrics", args.host, metrics_http.server_port)
        service = GenerationService(metrics)
        refused = lambda method: metrics.rpcs.labels(method, "UNAUTHENTICATED").inc()
        server, port, health = build_server(
            service,
            args.max_slots + args.max_queue + 16,
            f"{args.host}:{args.port}",
            credentials=tls.grpc_credentials() if tls else None,
            interceptors=(ApiKeyInterceptor(key, SERVICE, refused),) if key else (),
        )
        openai = http = None
        if args.http_port is not None:
            from jaxinfer.server.http_app import OpenAIServer
            from jaxinfer.server.http_server import HttpServer

            openai = OpenAIServer(metrics, api_key=key, max_body_bytes=args.max_body_bytes)
            http = HttpServer(openai.app(), args.host, args.http_port, tls)
        stopping, warming = threading.Event(), threading.Event()
        warming.set()

        def on_signal(signum, frame):
            health.enter_graceful_shutdown()
            if openai is not None:
                openai.draining = True
            stopping.set()
            if warming.is_set():  # nothing is in flight yet; unwinding out of XLA compilation is not safe
                log.info("%s during start-up: exiting", signal.Signals(signum).name)
                logging.shutdown()
                os._exit(0)
            log.info("%s: draining (new requests get UNAVAILABLE)", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.start()
        secured = ", ".join(what for what, on in (("TLS", tls), ("API key", key)) if on) or "no TLS, no API key"
        log.info("gRPC listening on %s:%d (%s; health NOT_SERVING until warm-up is done)", args.host, port, secured)
        if http is not None:
            http.start()
            log.info(
                "HTTP listening on %s://%s:%d (/health 503 until warm-up is done)", http.scheme, args.host, http.port
            )

        # larger buckets may still compile in the background
        engine = build_engine(args, serve_early=True, cluster=cluster)
        orchestrator = Orchestrator(
            engine,
            metrics,
            max_queue=args.max_queue,
            stream_buffer=args.stream_buffer,
            request_timeout=args.request_timeout,
        )
        if cluster is not None:

            def on_lost(message):
                health.enter_graceful_shutdown()
                if openai is not None:
                    openai.draining = True
                orchestrator.abort(f"the server lost a process of its mesh: {message}")

            cluster.on_lost(on_lost)
            cluster.on_drain(lambda: on_signal(signal.SIGTERM, None))
        orchestrator.start()
        warming.clear()
        service.ready(engine, orchestrator)
        if openai is not None:
            openai.ready(engine, orchestrator)
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
        if http is not None:
            http.stop()
        server.stop(grace=5).wait()
        if cluster is not None:
            cluster.stop()
        log.info("stopped")
        if engine.compiling is not None and engine.compiling.is_alive():
            logging.shutdown()  # a thread inside XLA compilation cannot be unwound: leave without waiting
            os._exit(0)
        return 0


def follow_leader(args, cluster) -> int:
    """A multi-host worker: the same engine, no ports; it repeats process 0's device calls until process
    0 stops it. SIGTERM/SIGINT here asks process 0 to drain the whole cluster."""
    from jaxinfer.multihost.replica import follow

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: cluster.request_drain())
    with cluster_scope(cluster, "jaxinfer.serve"):
        follow(build_engine(args, serve_early=True, cluster=cluster), cluster)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
