"""examples/chat.py runs as a user runs it, and a message round-trips through the proxy."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx2
from websockets.sync.client import ClientConnection, connect

CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat.py"
START_DEADLINE = 20.0  # seconds for the interpreter, the imports and both servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running(port: int) -> Iterator[subprocess.Popen[str]]:
    """Start the example and wait until its port accepts connections."""
    with subprocess.Popen(
        [sys.executable, str(CHAT), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            deadline = time.monotonic() + START_DEADLINE
            while True:
                assert process.poll() is None, process.communicate()[0]
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"nothing listens on {port}"
                    time.sleep(0.05)
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def join(url: str, name: str, stack: ExitStack) -> ClientConnection:
    """Connect and wait for our own hello to come back: then we are in the room."""
    ws = stack.enter_context(connect(url, proxy=None, open_timeout=10))
    ws.send(f"{name} joined")
    while ws.recv(timeout=10) != f"{name} joined":
        pass
    return ws


def test_chat_message_round_trips_through_the_proxy() -> None:
    port = free_port()
    with running(port) as process:
        page = httpx2.get(f"http://127.0.0.1:{port}/", trust_env=False, timeout=10)
        assert page.status_code == 200
        assert 'new WebSocket(location.origin.replace(/^http/, "ws") + "/chat/")' in page.text

        with ExitStack() as stack:
            alice = join(f"ws://127.0.0.1:{port}/chat/", "alice", stack)
            bob = join(f"ws://127.0.0.1:{port}/chat/", "bob", stack)
            alice.send("hello, bob")
            for ws in (alice, bob):
                while (message := ws.recv(timeout=10)) != "hello, bob":
                    assert message.endswith("joined")

        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=10)
        assert process.returncode == 0, output
        assert f"Chat on http://127.0.0.1:{port}/" in output
