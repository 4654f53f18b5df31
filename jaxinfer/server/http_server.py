"""uvicorn on a thread of the serving process: the HTTP API shares the process, the orchestrator and the
engine with gRPC. The socket is bound here, on the caller's thread, so a port in use is a one-line
error and port 0 resolves to the port to log before anything is served.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

from jaxinfer.server.auth import TlsFiles

log = logging.getLogger(__name__)


class HttpServer:
    """Serves `app` on host:port (port 0: any free one, see `.port`), over TLS when `tls` is given."""

    def __init__(self, app, host: str, port: int, tls: TlsFiles | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise OSError(f"--http-port {port}: cannot listen on {host}:{port}: {e.strerror}") from None
        self._socket.listen(2048)
        self.port = self._socket.getsockname()[1]
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(
            app,
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=tls.cert_path if tls else None,
            ssl_keyfile=tls.key_path if tls else None,
        )
        config.load()  # here, so an unusable certificate or key is an error at start-up, not in the thread
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs=dict(sockets=[self._socket]), name="http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Closes the listener and open connections (what is in flight gets uvicorn's 5 s grace)."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()
