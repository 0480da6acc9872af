"""Each example runs standalone: it starts, answers through the proxy, and stops cleanly.

The examples run as real processes (`python examples/X.py --port N`), as a newcomer runs them.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
START_DEADLINE = 20.0  # seconds for the interpreter, the imports and both servers
EXIT_DEADLINE = 5.0


def check_quickstart(client: httpx2.Client) -> None:
    r = client.get("/api/users?id=10")
    assert r.status_code == 200
    assert r.json()["upstream_saw"] == "/users?id=10"
    assert r.json()["headers"]["x-forwarded-prefix"] == "/api"


def check_starlette_mount(client: httpx2.Client) -> None:
    assert client.get("/").text.startswith("Served by the app itself")
    assert client.get("/api/users?id=10").json() == {"upstream_saw": "/users?id=10"}
    assert client.get("/legacy/report").json() == {"upstream_saw": "/legacy/report"}


def check_fastapi_gateway(client: httpx2.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/users/42", headers={"X-Request-ID": "abc123"})
    assert r.json() == {"id": "42", "path": "/v1/users/42", "request_id": "abc123"}
    generated = client.get("/users/7").json()["request_id"]
    assert isinstance(generated, str) and len(generated) == 32


def check_pool_status(c: httpx2.Client) -> None:
    assert {c.get("/hello").json()["server"] for _ in range(4)} == {"a", "b"}
    assert [s["state"] for s in c.get("/_pool").json()] == ["up", "up"]


CHECKS: dict[str, Callable[[httpx2.Client], None]] = {
    "quickstart.py": check_quickstart,
    "starlette_mount.py": check_starlette_mount,
    "fastapi_gateway.py": check_fastapi_gateway,
    "pool_status.py": check_pool_status,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running(example: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """Start the example and wait until its port accepts connections."""
    with subprocess.Popen(
        [sys.executable, str(EXAMPLES / example), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            deadline = time.monotonic() + START_DEADLINE
            while True:
                if process.poll() is not None:
                    output, _ = process.communicate()
                    pytest.fail(f"{example} exited with {process.returncode}:\n{output}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"{example} did not listen on port {port} in time")
                    time.sleep(0.05)
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("example", list(CHECKS))
def test_example(example: str, stop_signal: signal.Signals) -> None:
    port = free_port()
    with running(example, port) as process:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as c:
            CHECKS[example](c)
        process.send_signal(stop_signal)
        try:
            output, _ = process.communicate(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{example} did not stop within {EXIT_DEADLINE} s of {stop_signal.name}")
        assert process.returncode == 0, output
