"""WebSocket upstreams for the end-to-end tests: `websockets` servers on 127.0.0.1 or a socket.

`Upstream` wraps a handler and records, for each connection, the handshake request it received
and how the connection closed as this side saw it, so a test can wait for the close with an
event instead of sleeping. `Scripted` writes raw frames, cut where a test wants them cut.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from websockets.asyncio.server import ServerConnection, serve, unix_serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

Handler = Callable[[ServerConnection], Awaitable[None]]


async def echo(ws: ServerConnection) -> None:
    """Send every message back, text as text and binary as binary."""
    async for message in ws:
        await ws.send(message)


async def describe(ws: ServerConnection) -> None:
    """Send the handshake request as JSON (target, raw headers, subprotocol), then echo."""
    assert ws.request is not None
    await ws.send(
        json.dumps(
            {
                "target": ws.request.path,
                "headers": [[k.lower(), v] for k, v in ws.request.headers.raw_items()],
                "subprotocol": ws.subprotocol,
            }
        )
    )
    await echo(ws)


def header_values(description: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in description["headers"] if n == name]


class Upstream:
    """A handler that records each connection's request and close code/reason."""

    def __init__(self, handler: Handler = echo) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.closes: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        self.url = ""

    async def __call__(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.requests.append(ws.request)
        try:
            await self.handler(ws)
        except ConnectionClosed:
            pass
        finally:
            if ws.close_code is not None:
                self.closes.put_nowait((ws.close_code, ws.close_reason))

    async def next_close(self, seconds: float = 5.0) -> tuple[int | None, str | None]:
        """The next connection close this upstream observed, within `seconds`."""
        return await asyncio.wait_for(self.closes.get(), seconds)


@asynccontextmanager
async def ws_upstream(
    handler: Handler = echo, *, uds: str | None = None, **options: Any
) -> AsyncIterator[Upstream]:
    """Run a websockets server with `handler`; `.url` is its http:// (or unix:) address."""
    upstream = Upstream(handler)
    if uds is not None:
        async with unix_serve(upstream, uds, **options):
            upstream.url = f"http://unix:{uds}"
            yield upstream
        return
    scheme = "https" if options.get("ssl") is not None else "http"
    async with serve(upstream, "127.0.0.1", 0, backlog=1024, **options) as server:
        port = server.sockets[0].getsockname()[1]
        upstream.url = f"{scheme}://127.0.0.1:{port}"
        yield upstream


class Silent:
    """A TCP server that accepts and never answers: a handshake that times out."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = asyncio.Event()
        self.closed = asyncio.Event()  # a peer closed its connection
        self.writers: list[asyncio.StreamWriter] = []

    async def hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.accepted.set()
        await reader.read()
        self.closed.set()


@asynccontextmanager
async def silent_server() -> AsyncIterator[Silent]:
    silent = Silent()
    server = await asyncio.start_server(silent.hold, "127.0.0.1", 0)
    silent.port = server.sockets[0].getsockname()[1]
    try:
        yield silent
    finally:
        for writer in silent.writers:
            writer.close()
        server.close()
        await server.wait_closed()


class Scripted:
    """A raw-frame upstream: it answers the handshake with 101 and `first` in one write, then
    writes `rest` `piece` bytes at a time, a loop iteration apart, so that the proxy reads frames
    cut anywhere. It records the frames it receives until a Close frame, then closes."""

    def __init__(self, first: bytes, rest: bytes, piece: int) -> None:
        self.first, self.rest, self.piece = first, rest, piece
        self.frames: list[Frame] = []
        self.url = ""

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = ServerProtocol()
        events: list[Any] = []
        while not events:
            protocol.receive_data(await reader.read(65536))
            events = protocol.events_received()
        protocol.send_response(protocol.accept(events[0]))
        writer.write(b"".join(protocol.data_to_send()) + self.first)
        for start in range(0, len(self.rest), self.piece):
            writer.write(self.rest[start : start + self.piece])
            await writer.drain()
            await asyncio.sleep(0)
        while data := await reader.read(65536):
            protocol.receive_data(data)
            self.frames.extend(protocol.events_received())
            if any(frame.opcode is Opcode.CLOSE for frame in self.frames):
                break
        writer.close()

    def close_code(self) -> int | None:
        """The code of the Close frame received, if any."""
        for frame in self.frames:
            if frame.opcode is Opcode.CLOSE:
                return Close.parse(frame.data).code
        return None


def raw_frame(opcode: Opcode, data: bytes, *, fin: bool = True) -> bytes:
    """A server's frame, as bytes (unmasked, as RFC 6455 section 5.1 wants)."""
    return Frame(opcode, data, fin).serialize(mask=False)


@asynccontextmanager
async def scripted_upstream(
    first: bytes, rest: bytes = b"", piece: int = 1
) -> AsyncIterator[Scripted]:
    scripted = Scripted(first, rest, piece)
    server = await asyncio.start_server(scripted, "127.0.0.1", 0)
    scripted.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield scripted
    finally:
        server.close()
        await server.wait_closed()
