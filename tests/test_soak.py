"""scripts/soak.py against a real server (stories260K, HTTP and gRPC in one process): 500 requests
mixing both protocols, streaming and unary, with cancellations, deadlines, disconnects and malformed
requests. The script's own checks must all pass (one complete answer per good request, the same text
for the same request, nothing left in a slot or page, no recompiles, resident memory within 10%);
the test also reads its summary to make sure every kind of request was exercised.
"""

import json
import subprocess
import sys

from test_server import ServerProcess

REQUESTS = 500


def test_soak_of_500_mixed_requests(tmp_path):
    srv = ServerProcess(
        "--http-port",
        "0",
        "--chat-template",
        "tests/data/chat_template.jinja",
        "--max-slots",
        "8",
        "--max-queue",
        "256",
    )
    try:
        http_port = int(srv.wait_for(r"HTTP listening on http://127\.0\.0\.1:(\d+)").group(1))
        srv.wait_for(r"all buckets ready")  # larger buckets compile after SERVING: RSS is measured after them
        summary = tmp_path / "soak.json"
        proc = subprocess.run(
            [
                sys.executable,
                "scripts/soak.py",
                "--grpc",
                srv.target,
                "--http",
                f"http://127.0.0.1:{http_port}",
                "--requests",
                str(REQUESTS),
                "--concurrency",
                "24",
                "--max-tokens",
                "12",
                "--server-pid",
                str(srv.proc.pid),
                "--json",
                str(summary),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert all(result["checks"].values()) and len(result["checks"]) == 8  # the RSS check included
    assert sum(result["by_status"].values()) == REQUESTS and result["by_status"]["ok"] > REQUESTS // 2
    assert result["by_status"]["expected_error"] > 50  # cancels, disconnects, malformed and expired deadlines
    assert set(result["by_kind"]) == {
        "grpc_unary",
        "grpc_stream",
        "http_completion",
        "http_completion_stream",
        "http_chat",
        "http_chat_stream",
        "grpc_cancel",
        "http_disconnect",
        "grpc_deadline",
        "http_malformed",
        "grpc_malformed",
    }
