"""WebSocket load: N connections, each sends a small message and waits for its echo, repeatedly.

Raw frames on uvloop (the mask is computed once: the message never changes), so that the load
generator costs its core as little as the proxies allow. Prints round trips per second.

    python benchmarks/wsload.py URL CONNECTIONS SECONDS
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
from urllib.parse import urlsplit

import uvloop

MESSAGE = b"x" * 64


def masked_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    length = len(payload)
    repeated = (mask * (length // 4 + 1))[:length]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        length, "little"
    )
    return bytes((0x81, 0x80 | length)) + mask + body


class Client(asyncio.Protocol):
    def __init__(self, host: str, path: str, done: asyncio.Future[None]) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self.frame = masked_frame(MESSAGE)
        self.expected = 2 + len(MESSAGE)
        self.buffer = bytearray()
        self.open = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done = done
        self.count = 0
        self.running = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            head, sep, rest = bytes(self.buffer).partition(b"\r\n\r\n")
            if not sep:
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.opened.set_exception(RuntimeError(head.decode("latin-1")))
                return
            self.open = True
            self.buffer = bytearray(rest)
            self.opened.set_result(None)
        while len(self.buffer) >= self.expected:
            del self.buffer[: self.expected]
            self.count += 1
            if self.running:
                assert self.transport is not None
                self.transport.write(self.frame)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))


async def main(url: str, connections: int, seconds: float) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    clients = []
    for _ in range(connections):
        _, client = await loop.create_connection(
            lambda: Client(f"{host}:{port}", parts.path or "/", done), host, port
        )
        clients.append(client)
    await asyncio.gather(*(c.opened for c in clients))
    await asyncio.sleep(0.2)  # let every connection settle before counting
    for client in clients:
        client.count = 0
        assert client.transport is not None
        client.transport.write(client.frame)
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    total = sum(c.count for c in clients)
    elapsed = time.perf_counter() - start
    for client in clients:
        client.running = False
    print(f"{total / elapsed:.1f}")
    for client in clients:
        assert client.transport is not None
        client.transport.abort()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
