"""WebSocket upstreams for the end-to-end tests: `websockets` servers on 127.0.0.1 or a socket.

`Upstream` wraps a handler and records, for each connection, the handshake request it received
and how the connection closed as this side saw it, so a test can wait for the close with an
event instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from websockets.asyncio.server import ServerConnection, serve, unix_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

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
