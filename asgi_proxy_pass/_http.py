"""One HTTP exchange: stream `receive()` upstream, stream the response back, race the disconnect.

The shape is starlette's `StreamingResponse`: the exchange runs beside a listener for
`http.disconnect`, and whichever finishes first ends the other. The listener is a task started
only once the request body has been read and the exchange has run for another `WATCH_AFTER`
seconds or two: a small response is over before then, and costs no task.

As in uvicorn's `RequestResponseCycle`, a failure before the response starts becomes an error
response (400/413/502/503/504); after it, the client connection is aborted by returning without
completing the response, so that a truncated body is never presented as complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import httpx2

from ._accesslog import record_attempt
from ._body import RequestBody, body_framing
from ._engine import H1Transport, ResponseStream, UpstreamResponse
from ._errors import (
    BodyTooLarge,
    ClientDisconnected,
    ClientError,
    UpstreamError,
    map_upstream_errors,
)
from ._failover import Attempt, Budget, classify, counts_as_failure, status_condition
from ._headers import Headers, response_headers
from ._types import Receive, Scope, Send
from ._upstream import NoLiveUpstreams, Server, UpstreamsBusy

if TYPE_CHECKING:
    from ._proxy import ProxyPass

__all__ = ["SlowExchanges", "handle_http", "send_error"]

logger = logging.getLogger("asgi_proxy_pass")

#: An exchange that runs for one to two times this many seconds gets a task listening for the
#: client's disconnect.
WATCH_AFTER = 0.05


def request_url(origin: httpx2.URL, target: bytes) -> httpx2.URL:
    """The full upstream URL, for transports that look at it (a mock, a cache).

    The bytes on the wire are `target` itself, through httpx2's `target` extension: the URL
    class would normalise dot segments and escapes.
    """
    try:
        return origin.copy_with(raw_path=target)
    except (UnicodeDecodeError, httpx2.InvalidURL):
        return origin.copy_with(raw_path=quote(target, safe="/%?=&;:@!$'()*+,~").encode())


async def send_error(send: Send, status: int, reason: str) -> None:
    """A short plain-text error response."""
    body = f"{status} {reason}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def handle_http(proxy: ProxyPass, scope: Scope, receive: Receive, send: Send) -> None:
    """Forward one HTTP request to the upstream and relay the response."""
    try:
        target = proxy.target(scope)
        length, chunked = body_framing(scope, proxy.max_header_size, proxy.max_headers)
        if length is not None and proxy.max_body_size is not None and length > proxy.max_body_size:
            raise BodyTooLarge(f"Content-Length {length} is larger than {proxy.max_body_size}")
    except ClientError as exc:
        logger.info("%s %s: %s (%d)", scope["method"], scope["path"], exc, exc.status_code)
        await send_error(send, exc.status_code, exc.reason)
        return
    if length is not None:
        framing = [(b"content-length", str(length).encode("ascii"))]
    else:
        framing = [(b"transfer-encoding", b"chunked")] if chunked else []
    if not proxy._started:
        await proxy.start()

    body = RequestBody(receive, proxy.max_body_size, proxy.replay_buffer_size)
    exchange = Exchange(proxy, scope, send, target, framing, body)
    if framing:
        # Listen for a disconnect once the body has been read: `receive()` is the body's until
        # then, and a disconnect during the body ends its reading anyway.
        body.on_finished = exchange.watch_soon
    else:
        body.finished = True  # no framing, no body (RFC 9112 section 6.3): nothing to receive
        exchange.watch_soon()
    try:
        await exchange.run()
        if exchange.disconnected:
            await asyncio.sleep(0)  # take delivery of our cancellation here, if still pending
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not exchange.disconnected or task is None or task.uncancel():
            raise  # not ours, or someone else's as well
    finally:
        body.on_finished = None  # no reference cycle left for the garbage collector
        exchange.stop_watching()
    if exchange.disconnected:
        logger.info(
            "%s %s: the client closed the connection before the response was complete (499)",
            scope["method"],
            scope["path"],
        )


class SlowExchanges:
    """One proxy's exchanges that still run a tick or two after they started: those get a
    disconnect listener (`Exchange.watch`). A tick is `WATCH_AFTER` seconds.

    One timer serves them all, and runs only while there are any: a timer (or a listener task)
    per request would cost more than a whole small exchange does.
    """

    __slots__ = ("loop", "old", "timer", "young")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.young: set[Exchange] = set()
        self.old: set[Exchange] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, exchange: Exchange, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self.loop:
            # The first exchange, or another event loop (the last one's timer died with it).
            self.loop, self.young, self.old, self.timer = loop, set(), set(), None
        self.young.add(exchange)
        if self.timer is None:
            self.timer = loop.call_later(WATCH_AFTER, self.tick)

    def discard(self, exchange: Exchange) -> None:
        self.young.discard(exchange)
        self.old.discard(exchange)

    def tick(self) -> None:
        due, self.old, self.young = self.old, self.young, set()
        for exchange in due:
            exchange.watch()
        if self.old and self.loop is not None:
            self.timer = self.loop.call_later(WATCH_AFTER, self.tick)
        else:
            self.timer = None


class Exchange:
    """One forwarded request: `run()` and `watch_disconnect()` run side by side.

    `run()` tries servers of the pool in turn (`connect()`, nginx's `proxy_next_upstream`) until
    one gives a response worth relaying, then relays it (`relay()`).
    """

    def __init__(
        self,
        proxy: ProxyPass,
        scope: Scope,
        send: Send,
        target: bytes,
        framing: Headers,
        body: RequestBody,
    ) -> None:
        self.proxy = proxy
        self.scope = scope
        self.send = send
        self.target = target
        self.framing = framing
        self.body = body
        self.started = False
        self.complete = False
        self.disconnected = False
        self.task: asyncio.Task[Any] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self._client_base: bytes | None = None

    def watch_soon(self) -> None:
        """Listen for the client's disconnect if the exchange is still running a tick or two
        from now (`SlowExchanges`): `receive()` has nothing else to give."""
        self.task = task = asyncio.current_task()
        if task is not None:
            self.proxy._slow_exchanges.add(self, task.get_loop())

    def watch(self) -> None:
        """Start the disconnect listener."""
        if self.task is not None and not self.complete:
            self.watcher = self.task.get_loop().create_task(self.watch_disconnect())

    def stop_watching(self) -> None:
        self.proxy._slow_exchanges.discard(self)
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None

    async def watch_disconnect(self) -> None:
        while True:
            message = await self.body.receive()
            if message["type"] == "http.disconnect":
                break
        # The exchange is suspended at an await here (one thread): the cancellation is delivered
        # inside `run()`, which closes the upstream connection on its way out.
        if not self.complete and self.task is not None:
            self.disconnected = True
            self.task.cancel()

    async def run(self) -> None:
        attempt = await self.connect()
        if attempt is None:
            return
        server, response = attempt
        try:
            await self.relay(response)
        except UpstreamError as exc:
            self.log_failure(exc, server, started=self.started)
            if not self.started:
                await self.answer(exc)
            # Else too late for a status: abort, so the client sees a truncated body as such.
            return
        finally:
            try:
                if not response.close_nowait():
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
            finally:
                # Even if a client disconnect (a plain task cancellation) interrupts the close.
                self.proxy.pool.release(server)
        if not self.complete:
            self.complete = True
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def forward(self, server: Server) -> UpstreamResponse:
        """Send the request to `server`: straight into the built-in engine, or as an
        `httpx2.Request` through the transport seam (the httpx engine, a `transport=`)."""
        proxy = self.proxy
        transport = proxy.transport_for(server)
        if type(transport) is H1Transport:
            url = server.url
            return await transport.send(
                (url.scheme, url.host, url.port),
                self.scope["method"].encode("ascii"),
                self.target,
                proxy.upstream_headers(self.scope, url) + self.framing,
                self.body if self.framing else None,
                proxy._timeout_extension,
            )
        # The pool's own httpx2 transport reads only the `target` extension: no URL to build.
        # Any other (a mock, the cache) may look at `request.url`.
        bare = proxy._transport is None and type(transport) is httpx2.AsyncHTTPTransport
        response = await transport.handle_async_request(self.request_for(server, bare=bare))
        return UpstreamResponse.of(response)

    def request_for(self, server: Server, *, bare: bool = False) -> httpx2.Request:
        proxy = self.proxy
        origin = proxy.origin(server)
        return httpx2.Request(
            self.scope["method"],
            origin if bare else request_url(origin, self.target),
            headers=proxy.upstream_headers(self.scope, server.url) + self.framing,
            stream=self.body,
            extensions={"target": self.target, "timeout": proxy._timeout_extension},
        )

    async def connect(self) -> tuple[Server, UpstreamResponse] | None:
        """Send the request to servers in turn; None once the client has been answered."""
        proxy, pool, scope = self.proxy, self.proxy.pool, self.scope
        method: str = scope["method"]
        tried: list[Server] = []
        budget = proxy.budget()
        failure: UpstreamError | None = None
        while True:
            try:
                server = await pool.choose(scope, tried)
            except UpstreamsBusy as exc:
                logger.error("%s %s: %s; answered 503", method, scope["path"], exc)
                await self.answer(exc)
                return None
            except NoLiveUpstreams as exc:
                if failure is None:
                    logger.error("%s %s: %s; answered 502", method, scope["path"], exc)
                    await self.answer(exc)
                    return None
                break  # every server was tried: the last one's outcome stands
            budget.start()
            tried.append(server)
            pool.acquire(server)
            started = time.monotonic()
            try:
                with map_upstream_errors():
                    response = await self.forward(server)
            except UpstreamError as exc:
                pool.release(server)
                record_attempt(scope, server.url.address, exc.status_code, started)
                attempt = classify(exc)
                if counts_as_failure(attempt.conditions, proxy.next_upstream):
                    pool.record_failure(server, str(exc))
                failure = exc
                if self.may_retry(attempt, tried, budget) and pool.can_select(tried):
                    self.log_retry(server, str(exc))
                    continue
                self.log_failure(exc, server, started=False)
                await self.answer(exc)
                return None
            except ClientDisconnected:
                pool.release(server)
                self.disconnected = True
                return None
            except ClientError as exc:
                pool.release(server)
                logger.info("%s %s: %s (%d)", method, scope["path"], exc, exc.status_code)
                await self.answer(exc)
                return None
            except BaseException:
                pool.release(server)
                raise

            record_attempt(scope, server.url.address, response.status_code, started)
            condition = status_condition(response.status_code)
            if condition in proxy.next_upstream:
                status = Attempt(frozenset({condition}), sent=True)
                if counts_as_failure(status.conditions, proxy.next_upstream):
                    pool.record_failure(server, f"status {response.status_code}")
                if self.may_retry(status, tried, budget) and pool.can_select(tried):
                    try:
                        if not response.close_nowait():
                            with anyio.CancelScope(shield=True):
                                await response.aclose()
                    finally:
                        pool.release(server)
                    failure = UpstreamError(f"status {response.status_code}")
                    self.log_retry(server, str(failure))
                    continue
            else:
                pool.record_success(server)
            return server, response

        # Every server failed; the last failure is the answer (nginx P4, P8).
        self.log_failure(failure, tried[-1], started=False)
        await self.answer(failure)
        return None

    def may_retry(self, attempt: Attempt, tried: list[Server], budget: Budget) -> bool:
        return budget.allows(len(tried)) and attempt.may_retry(
            listed=self.proxy.next_upstream,
            method=self.scope["method"],
            replayable=self.body.replayable,
        )

    async def answer(self, exc: ClientError | UpstreamError) -> None:
        """Answer with the error's status; the request is then complete, not abandoned."""
        self.complete = True
        await send_error(self.send, exc.status_code, exc.reason)

    def log_retry(self, server: Server, reason: str) -> None:
        logger.warning(
            "%s %s: upstream %s failed: %s; trying the next server",
            self.scope["method"],
            self.scope["path"],
            server.url.address,
            reason,
        )

    def client_base(self) -> bytes:
        """The client-facing URL of the upstream path, for redirects (computed once, if asked)."""
        if self._client_base is None:
            self._client_base = self.proxy.client_base(self.scope)
        return self._client_base

    async def relay(self, response: UpstreamResponse) -> None:
        stream = response.stream
        if not isinstance(stream, httpx2.AsyncByteStream):
            raise UpstreamError(f"the transport returned a {type(stream).__name__}, not async")
        headers = response_headers(
            response.headers,
            redirects=self.proxy.redirects,
            client_base=self.client_base,
            extra=self.proxy.response_headers,
            scope=self.scope,
        )
        self.started = True
        await self.send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        # The built-in engine knows when a chunk is the last one: it then ends the response,
        # saving the ASGI server an empty message.
        engine = stream if isinstance(stream, ResponseStream) else None
        with map_upstream_errors():
            async for chunk in stream:
                if chunk:
                    if engine is not None and engine.at_end:
                        self.complete = True
                        await self.send({"type": "http.response.body", "body": chunk})
                        break
                    else:
                        await self.send(
                            {"type": "http.response.body", "body": chunk, "more_body": True}
                        )

    def log_failure(self, exc: UpstreamError, server: Server, *, started: bool) -> None:
        scope = self.scope
        outcome = "aborted the client connection" if started else f"answered {exc.status_code}"
        # Transport errors are explained by their message; anything else is a bug in a custom
        # transport, worth its traceback.
        expected = type(exc) is not UpstreamError or isinstance(exc.__cause__, httpx2.HTTPError)
        logger.error(
            "%s %s: upstream %s failed: %s; %s",
            scope["method"],
            scope["path"],
            server.url.address,
            exc,
            outcome,
            exc_info=None if expected else exc,
        )
