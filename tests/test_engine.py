"""The built-in "httptools" engine against raw asyncio servers: the bytes on the wire, framing,
keep-alive, pool limits and the failures, under asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from servers import front
from servers import serve as uvicorn_serve

from asgi_proxy_pass import ProxyPass, Upstream
from asgi_proxy_pass._engine import H1Transport, UpstreamResponse, check_engine
from asgi_proxy_pass._h1 import READ_HIGH_WATER, request_head

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TIMEOUTS = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return "asyncio", {"use_uvloop": request.param == "uvloop"}


class Server:
    """A raw server on 127.0.0.1 (or a unix socket): what it received, connection by connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = asyncio.Event()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()
            self.closed.set()


@asynccontextmanager
async def serve(handler: Handler, uds: str | None = None) -> AsyncIterator[Server]:
    server = Server(handler)
    if uds is None:
        listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = listening.sockets[0].getsockname()[1]
    else:
        listening = await asyncio.start_unix_server(server.handle, uds)
    async with listening:
        yield server


def answer(*responses: bytes, keep: bool = True) -> Handler:
    """Reads a request head (and a body if announced) per response; answers each in turn."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            writer.write(response)
            await writer.drain()
        if keep:
            await reader.read()  # until the client closes

    return handle


async def nobody() -> AsyncIterator[bytes]:
    return
    yield


async def body_of(response: UpstreamResponse) -> bytes:
    stream = response.stream
    assert isinstance(stream, httpx2.AsyncByteStream)
    return b"".join([chunk async for chunk in stream])


async def get(
    transport: H1Transport,
    port: int,
    target: bytes = b"/",
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: AsyncIterator[bytes] | None = None,
) -> UpstreamResponse:
    return await transport.send(
        ("http", "127.0.0.1", port),
        method,
        target,
        headers if headers is not None else [(b"host", b"b")],
        body if body is not None else nobody(),
        TIMEOUTS,
    )


def test_request_head_is_exact() -> None:
    head, length, chunked = request_head(
        b"POST", b"/a/../b%2F?x", [(b"host", b"b:1"), (b"X-Dup", b"1"), (b"x-dup", b"2")]
    )
    assert head == b"POST /a/../b%2F?x HTTP/1.1\r\nhost: b:1\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n"
    assert (length, chunked) == (None, False)
    assert request_head(b"PUT", b"/", [(b"Content-Length", b"5")])[1:] == (5, False)
    assert request_head(b"PUT", b"/", [(b"transfer-encoding", b"chunked")])[1:] == (None, True)


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/a b", []),
        (b"/\r\nX: 1", []),
        (b"/", [(b"x", b"a\r\nInjected: 1")]),
        (b"/", [(b"x", b"a\nb")]),
        (b"/", [(b"x", b"a\0b")]),
        (b"/", [(b"content-length", b"1"), (b"transfer-encoding", b"chunked")]),
        (b"/", [(b"content-length", b"-1")]),
    ],
)
def test_request_head_refuses_what_would_split_it(
    target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(httpx2.LocalProtocolError):
        request_head(b"GET", target, headers)


def test_engine_names() -> None:
    assert check_engine(None) in ("httptools", "httpx")
    with pytest.raises(ValueError, match="^engine: expected 'httptools' or 'httpx', got 'h2'"):
        check_engine("h2")
    with pytest.raises(ValueError, match="^engine: with an Upstream pool"):
        ProxyPass(Upstream(["http://a:1"]), engine="httpx")


async def test_wire_bytes_and_framing() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readuntil(b"0\r\n\r\n") if b"chunked" in head else b""
            if b"content-length: 3" in head:
                body = await reader.readexactly(3)
            seen.append(head + body)
            writer.write(OK)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"de"

    async def three() -> AsyncIterator[bytes]:
        yield b"abc"

    transport = H1Transport()
    async with serve(handle) as server:
        chunked = [(b"host", b"b"), (b"transfer-encoding", b"chunked")]
        r1 = await get(transport, server.port, b"/%7e/./a?q", b"POST", chunked, chunks())
        assert await body_of(r1) == b"ok"
        fixed = [(b"host", b"b"), (b"content-length", b"3")]
        r2 = await get(transport, server.port, b"/", b"PUT", fixed, three())
        assert await body_of(r2) == b"ok"
    await transport.aclose()
    assert seen == [
        b"POST /%7e/./a?q HTTP/1.1\r\nhost: b\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"PUT / HTTP/1.1\r\nhost: b\r\ncontent-length: 3\r\n\r\nabc",
    ]
    assert server.connections == 1  # kept alive


async def test_interim_head_and_bodyless_responses_keep_the_connection() -> None:
    responses = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nETag: x\r\n\r\n",  # to HEAD
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 11\r\n\r\n",
        OK,
    )
    transport = H1Transport()
    async with serve(answer(*responses)) as server:
        first = await get(transport, server.port)
        assert (first.status_code, first.headers) == (200, [(b"content-length", b"2")])
        assert await body_of(first) == b"ok"
        head = await get(transport, server.port, method=b"HEAD")
        assert head.headers == [(b"content-length", b"11"), (b"etag", b"x")]
        assert await body_of(head) == b""
        for status in (204, 304, 200):
            response = await get(transport, server.port)
            assert response.status_code == status
            await body_of(response)
    await transport.aclose()
    assert server.connections == 1


async def test_body_until_close_and_connection_close() -> None:
    transport = H1Transport()
    until_close = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    async with serve(answer(until_close, keep=False)) as server:
        assert await body_of(await get(transport, server.port)) == b"all of it"
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with serve(answer(closing, closing)) as server:
        for _ in range(2):
            assert await body_of(await get(transport, server.port)) == b"ok"
    await transport.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"HTTP/1.1 OK\r\n\r\n", "invalid response"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "invalid response"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "both Content-Length and Transfer-Encoding",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", "unsupported transfer coding"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "101|Upgrade"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "invalid"),
        (b"", "Server disconnected without sending a response"),
    ],
)
async def test_invalid_responses(response: bytes, message: str) -> None:
    transport = H1Transport()
    async with serve(answer(response, keep=False)) as server:
        with pytest.raises(httpx2.RemoteProtocolError, match=message):
            await get(transport, server.port)
    await transport.aclose()
    assert not transport.connections


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    ],
)
async def test_truncated_bodies_raise(response: bytes) -> None:
    transport = H1Transport()
    async with serve(answer(response, keep=False)) as server:
        head = await get(transport, server.port)
        with pytest.raises(httpx2.RemoteProtocolError):
            await body_of(head)
        await head.aclose()
    await transport.aclose()


async def test_early_close_closes_the_connection_and_extra_bytes_are_not_reused() -> None:
    transport = H1Transport()
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
    async with serve(answer(big)) as server:
        response = await get(transport, server.port)
        await response.aclose()  # the client went away mid-body
        await asyncio.wait_for(server.closed.wait(), 5)
    surplus = OK + b"HTTP/1.1 200 OK\r\n"
    async with serve(answer(surplus, OK)) as server:
        assert await body_of(await get(transport, server.port)) == b"ok"
        assert await body_of(await get(transport, server.port)) == b"ok"
    await transport.aclose()
    assert server.connections == 2


async def test_idle_connections_expire_and_upstream_hangups_are_noticed() -> None:
    transport = H1Transport(limits=httpx2.Limits(keepalive_expiry=0.05))
    async with serve(answer(OK, OK)) as server:
        await body_of(await get(transport, server.port))
        await asyncio.wait_for(server.closed.wait(), 5)  # the sweeper closed it
        assert not transport.connections and transport.idle_count == 0
        server.closed.clear()
        await body_of(await get(transport, server.port))
    assert server.connections == 2
    transport = H1Transport()
    async with serve(answer(OK, keep=False)) as server:
        await body_of(await get(transport, server.port))
        await asyncio.wait_for(server.closed.wait(), 5)
        for _ in range(100):
            if not transport.connections:
                break
            await asyncio.sleep(0.01)
        assert transport.idle_count == 0  # forgotten, not handed to the next request
    await transport.aclose()


async def test_pool_limit_waits_then_times_out() -> None:
    transport = H1Transport(limits=httpx2.Limits(max_connections=1))
    async with serve(answer(OK, OK, OK)) as server:
        first = await get(transport, server.port)
        waiting = asyncio.ensure_future(get(transport, server.port))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert await body_of(first) == b"ok"  # released: the waiting request goes on
        assert await body_of(await waiting) == b"ok"
        held = await get(transport, server.port)
        with pytest.raises(httpx2.PoolTimeout):
            await transport.send(
                ("http", "127.0.0.1", server.port), b"GET", b"/", [], nobody(), {"pool": 0.05}
            )
        await held.aclose()
    await transport.aclose()


async def test_read_timeout_between_reads() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await asyncio.sleep(5)

    transport = H1Transport()
    async with serve(slow) as server:
        response = await transport.send(
            ("http", "127.0.0.1", server.port), b"GET", b"/", [], nobody(), {"read": 0.1}
        )
        with pytest.raises(httpx2.ReadTimeout):
            await body_of(response)
        await response.aclose()
    await transport.aclose()


async def test_connect_errors() -> None:
    transport = H1Transport()
    async with serve(answer()) as server:
        port = server.port
    with pytest.raises(httpx2.ConnectError):
        await get(transport, port)
    assert transport.opening == 0 and not transport.connections


async def test_response_backpressure_bounds_the_buffer() -> None:
    sent = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        size = 64 * 1024 * 1024
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 1024 * 1024
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        sent.set()

    transport = H1Transport()
    async with serve(flood) as server:
        response = await get(transport, server.port)
        await asyncio.sleep(0.3)  # the consumer reads nothing meanwhile
        [connection] = transport.connections
        assert connection.reading_paused
        assert connection.buffered < READ_HIGH_WATER + 4 * 1024 * 1024
        assert not sent.is_set()
        assert len(await body_of(response)) == 64 * 1024 * 1024
    await transport.aclose()


async def test_unix_socket_and_the_httpx2_seam(tmp_path: Path) -> None:
    path = str(tmp_path / "up.sock")
    transport = H1Transport(uds=path)
    async with serve(answer(OK), uds=path):
        request = httpx2.Request(
            "GET", "http://localhost/ignored", headers={"Host": "h"}, extensions={"target": b"/t"}
        )
        response = await transport.handle_async_request(request)
        assert response.status_code == 200
        assert response.extensions["reason_phrase"] == b"OK"
        assert await response.aread() == b"ok"
    await transport.aclose()
    with pytest.raises(httpx2.UnsupportedProtocol):
        await transport.handle_async_request(httpx2.Request("GET", "ftp://b/"))


@pytest.mark.parametrize("name", ["httptools", "httpx"])
async def test_disconnect_before_the_response_head_cancels_the_upstream_request(
    name: str,
) -> None:
    reached = asyncio.Event()
    upstream_saw_disconnect = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        reached.set()
        while (await receive())["type"] != "http.disconnect":
            pass
        upstream_saw_disconnect.set()

    async with uvicorn_serve(slow) as up, front(ProxyPass(up.url, engine=name)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /api/slow HTTP/1.1\r\nHost: f\r\n\r\n")
        await asyncio.wait_for(reached.wait(), 5)
        writer.close()
        await asyncio.wait_for(upstream_saw_disconnect.wait(), 5)
