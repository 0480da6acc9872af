"""HTTP engines behind httpx2's transport seam, and the built-in one's keep-alive pool.

Two engines forward HTTP requests (`engine=` on `Upstream` and `ProxyPass`):

    engine        transport            parser                     CPU per small GET, alone
    "httptools"   `H1Transport` here   httptools (llhttp, in C)   about 20 us
    "httpx"       httpx2's own         h11 (pure Python)          400-600 us

Both are `httpx2.AsyncBaseTransport`s, so health checks, mocks and custom transports meet one
interface. `H1Transport.send()` is the same exchange without building `httpx2.Request` and
`httpx2.Response` objects; `ProxyPass` calls it directly (docs/performance.md).

The pool keeps `httpx2.Limits`: at most `max_connections` open (connecting, busy or idle), at
most `max_keepalive_connections` idle, each idle for at most `keepalive_expiry` seconds. Idle
connections are reused newest first, so that the oldest expire. A request that finds the pool
full closes an idle connection to another origin if there is one, or waits up to the `pool`
timeout for a free place (`PoolTimeout`). A connection goes back to the idle list only when its
response was read to the end and both sides keep it alive; a response closed early (the client
went away) closes its connection at once.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence

import httpx2

from ._errors import ConfigError
from ._h1 import Connection, request_head

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "H1Transport",
    "ResponseStream",
    "UpstreamResponse",
    "check_engine",
    "make_transport",
]

#: The engines `engine=` accepts.
ENGINES = ("httptools", "httpx")
#: The engine of an `Upstream` or `ProxyPass` created without `engine=`.
DEFAULT_ENGINE = "httptools"

#: scheme, host, port: what the pool keys its connections by.
Origin = tuple[str, str, int]
Timeouts = Mapping[str, float | None]

DEFAULT_PORTS = {"http": 80, "https": 443}


def check_engine(engine: str | None) -> str:
    """The engine name to use; None means `DEFAULT_ENGINE`."""
    if engine is None:
        return DEFAULT_ENGINE
    if engine not in ENGINES:
        expected = " or ".join(map(repr, ENGINES))
        raise ConfigError(f"engine: expected {expected}, got {engine!r}")
    return engine


def make_transport(
    engine: str, *, ssl_context: ssl.SSLContext | None, limits: httpx2.Limits, uds: str | None
) -> httpx2.AsyncBaseTransport:
    """A pooled transport of the given engine (no environment proxies, no cookies)."""
    if engine == "httpx":
        return httpx2.AsyncHTTPTransport(
            verify=ssl_context or True, trust_env=False, limits=limits, uds=uds
        )
    return H1Transport(ssl_context=ssl_context, limits=limits, uds=uds)


class UpstreamResponse:
    """A response head and its body stream, as `H1Transport.send()` returns them."""

    __slots__ = ("headers", "reason", "status_code", "stream")

    def __init__(
        self,
        status_code: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        stream: httpx2.AsyncByteStream | httpx2.SyncByteStream,
    ) -> None:
        self.status_code = status_code
        self.reason = reason
        self.headers = headers  # raw pairs
        self.stream = stream

    @classmethod
    def of(cls, response: httpx2.Response) -> UpstreamResponse:
        """The same, from any transport's `httpx2.Response`."""
        reason = response.extensions.get("reason_phrase", b"")
        return cls(response.status_code, reason, response.headers.raw, response.stream)

    def close_nowait(self) -> bool:
        """Close at once if that takes no I/O (the built-in engine's streams); whether it did.

        Then no cancel scope is needed to shield the closing from a cancellation.
        """
        if isinstance(self.stream, ResponseStream):
            self.stream.release()
            return True
        return False

    async def aclose(self) -> None:
        if isinstance(self.stream, httpx2.AsyncByteStream):
            await self.stream.aclose()
        else:
            self.stream.close()


class ResponseStream(httpx2.AsyncByteStream):
    """A response body read from a pooled connection; the end or `aclose()` releases it."""

    __slots__ = ("connection", "pool", "timeout")

    def __init__(self, pool: H1Transport, connection: Connection, timeout: float | None) -> None:
        self.pool = pool
        self.connection: Connection | None = connection
        self.timeout = timeout

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    @property
    def at_end(self) -> bool:
        """Whether the body was read to its end: the next step ends the iteration."""
        connection = self.connection
        return connection is None or (connection.complete and not connection.chunks)

    async def __anext__(self) -> bytes:
        connection = self.connection
        if connection is None:
            raise StopAsyncIteration
        if connection.chunks:
            return connection.take()  # no coroutine to make for bytes already here
        data = await connection.receive_body(self.timeout)
        if data:
            return data
        self.connection = None
        self.pool.release(connection)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.release()

    def release(self) -> None:
        """Give the connection back: to the idle list if the body was read to its end."""
        connection, self.connection = self.connection, None
        if connection is not None:
            self.pool.release(connection)


class H1Transport(httpx2.AsyncBaseTransport):
    """The "httptools" engine: HTTP/1.1 over pooled asyncio connections.

    Args:
        ssl_context: For https origins, with SNI set to the host (none for an IP literal, as
            the `ssl` module decides). Default: a verifying `ssl.create_default_context()`.
        limits: The pool's `httpx2.Limits`.
        uds: Connect every origin through this unix socket instead of TCP.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: httpx2.Limits = httpx2.Limits(),  # noqa: B008 (immutable)
        uds: str | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.uds = uds
        self.max_connections = limits.max_connections
        self.max_keepalive = limits.max_keepalive_connections
        self.expiry = limits.keepalive_expiry
        self.connections: set[Connection] = set()
        self.opening = 0
        self.idle: dict[Origin, list[Connection]] = {}
        self.idle_count = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.sweeper: asyncio.TimerHandle | None = None

    async def send(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived.

        `target` is sent byte for byte, `headers` exactly as given and in order; the body is
        framed as the headers say (`Content-Length`, chunked, or none: then `body` may be None).
        """
        head, length, chunked = request_head(method, target, headers)
        connection = self.take_idle(origin) or await self.acquire(origin, timeouts)
        read = timeouts.get("read")
        try:
            await connection.exchange(
                head,
                body,
                length,
                chunked,
                head_only=method == b"HEAD",
                write_timeout=timeouts.get("write"),
                read_timeout=read,
            )
        except BaseException:
            connection.close()
            self.release(connection)
            raise
        return UpstreamResponse(
            connection.status,
            connection.reason,
            connection.headers,
            ResponseStream(self, connection, read),
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in DEFAULT_PORTS:
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        target = request.extensions.get("target") or url.raw_path
        stream = request.stream
        if not isinstance(stream, httpx2.AsyncByteStream):
            raise TypeError("H1Transport needs an async request stream")
        response = await self.send(
            (scheme, url.host, url.port or DEFAULT_PORTS[scheme]),
            request.method.encode("ascii"),
            target,
            request.headers.raw,
            stream,
            request.extensions.get("timeout") or {},
        )
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=response.stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason},
        )

    async def aclose(self) -> None:
        """Close every connection, idle or busy, and fail the requests waiting for one."""
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        self.idle.clear()
        self.idle_count = 0
        for connection in list(self.connections):
            connection.idle = False
            connection.close()
        self.connections.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(httpx2.PoolTimeout("the connection pool was closed"))

    # The pool

    def take_idle(self, origin: Origin) -> Connection | None:
        """The most recently used idle connection to `origin` still open and fresh, if any."""
        idle = self.idle.get(origin)
        if idle:
            now = idle[-1].loop.time()  # not get_running_loop(): it makes a syscall
            while idle:
                connection = idle.pop()
                self.idle_count -= 1
                connection.idle = False
                if connection.closed or (
                    self.expiry is not None and now - connection.idle_since > self.expiry
                ):
                    self.discard(connection)
                    continue
                return connection
        return None

    async def acquire(self, origin: Origin, timeouts: Timeouts) -> Connection:
        """An idle connection to `origin`, or a new one once the limits allow it."""
        while True:
            connection = self.take_idle(origin)
            if connection is not None:
                return connection
            limit = self.max_connections
            if limit is None or len(self.connections) + self.opening < limit:
                break
            if self.idle_count:
                self.evict()
                continue
            await self.wait_for_room(timeouts.get("pool"))
        self.opening += 1
        try:
            connection = await self.connect(origin, timeouts.get("connect"))
        finally:
            self.opening -= 1
        self.connections.add(connection)
        return connection

    async def connect(self, origin: Origin, seconds: float | None) -> Connection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            context = self.ssl_context or _default_context()
        loop = asyncio.get_running_loop()
        hostname = host if context is not None else None

        def factory() -> Connection:
            return Connection(self.lost)

        try:
            async with asyncio.timeout(seconds):
                if self.uds is not None:
                    _, connection = await loop.create_unix_connection(
                        factory, self.uds, ssl=context, server_hostname=hostname
                    )
                else:
                    _, connection = await loop.create_connection(
                        factory, host, port, ssl=context, server_hostname=hostname
                    )
        except TimeoutError as exc:
            self.wake()
            raise httpx2.ConnectTimeout(f"no connection within {seconds:g}s") from exc
        except OSError as exc:
            self.wake()
            raise httpx2.ConnectError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            self.wake()
            raise
        connection.key = origin
        return connection

    def release(self, connection: Connection) -> None:
        """Take a connection back after its exchange: idle if reusable, else closed."""
        if (
            connection.reusable
            and connection in self.connections
            and (self.max_keepalive is None or self.idle_count < self.max_keepalive)
        ):
            connection.reset()
            connection.idle = True
            loop = connection.loop
            connection.idle_since = loop.time()
            self.idle.setdefault(connection.key, []).append(connection)
            self.idle_count += 1
            if self.sweeper is None and self.expiry is not None:
                self.sweeper = loop.call_later(self.expiry, self.sweep)
        else:
            connection.close()
            self.connections.discard(connection)
        self.wake()

    def discard(self, connection: Connection) -> None:
        connection.close()
        self.connections.discard(connection)

    def lost(self, connection: Connection) -> None:
        """An idle connection closed by the upstream (or unexpected bytes): forget it."""
        idle = self.idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            self.idle_count -= 1
        self.connections.discard(connection)
        self.wake()

    def evict(self) -> None:
        """Close the oldest idle connection of some origin, to make room for another."""
        for idle in self.idle.values():
            if idle:
                connection = idle.pop(0)
                self.idle_count -= 1
                connection.idle = False
                self.discard(connection)
                return

    def sweep(self) -> None:
        """Close idle connections past `keepalive_expiry`; run again while any are left."""
        self.sweeper = None
        assert self.expiry is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        oldest = now
        for idle in self.idle.values():
            while idle and now - idle[0].idle_since >= self.expiry:
                connection = idle.pop(0)
                self.idle_count -= 1
                connection.idle = False
                self.discard(connection)
            if idle:
                oldest = min(oldest, idle[0].idle_since)
        if self.idle_count:
            self.sweeper = loop.call_later(oldest + self.expiry - now, self.sweep)

    async def wait_for_room(self, seconds: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        timer = None if seconds is None else loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.wake()  # pass the place on
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not waiter.done() or waiter in self.waiters:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass

    def wake(self) -> None:
        """Let the first request waiting for room try again."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx2.PoolTimeout("no connection became free in time"))


_context: ssl.SSLContext | None = None


def _default_context() -> ssl.SSLContext:
    global _context
    if _context is None:
        _context = ssl.create_default_context()
    return _context
