"""A scriptable raw-socket upstream that misbehaves on cue.

Each connection runs a script: a list of steps, each a coroutine function of
`(reader, writer)`. Steps read the request head, write raw bytes, wait for an event, close,
reset, and so on, so a test can produce what no well-behaved server would send.

    async with faulty(read_head(), send(b"HTTP/1.1 200 OK\\r\\nContent-Length: 9\\r\\n\\r\\nabc"),
                      close()) as upstream:
        ...  # upstream.url, upstream.heads (request heads received)
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

Step = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Faulty"], Awaitable[None]]


@dataclass
class Faulty:
    url: str = ""
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def read_head() -> Step:
    """Read the request line and headers."""

    async def step(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: Faulty) -> None:
        f.heads.append(await reader.readuntil(b"\r\n\r\n"))

    return step


def read_body(size: int) -> Step:
    """Read exactly `size` bytes of body."""

    async def step(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: Faulty) -> None:
        f.bodies.append(await reader.readexactly(size))

    return step


def send(data: bytes) -> Step:
    async def step(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: Faulty) -> None:
        writer.write(data)
        await writer.drain()

    return step


def drip(data: bytes, delay: float) -> Step:
    """Send `data` one byte at a time, `delay` seconds apart."""

    async def step(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: Faulty) -> None:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(delay)

    return step


def hang() -> Step:
    """Wait until the test releases the upstream (or the peer goes away)."""

    async def step(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: Faulty) -> None:
        waiter = asyncio.ensure_future(f.release.wait())
        eof = asyncio.ensure_future(reader.read())
        await asyncio.wait({waiter, eof}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        eof.cancel()

    return step


def close() -> Step:
    async def step(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: Faulty) -> None:
        writer.close()

    return step


def reset() -> Step:
    """Close with a TCP RST instead of a FIN."""

    async def step(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: Faulty) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    return step


@asynccontextmanager
async def faulty(*script: Step) -> AsyncIterator[Faulty]:
    """Serve `script` on every connection, on 127.0.0.1."""
    state = Faulty()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            for step in script:
                await step(reader, writer, state)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()
            state.closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with server:
            yield state
    finally:
        state.release.set()
