"""One HTTP exchange: stream `receive()` upstream, stream the response back, race the disconnect.

The shape is starlette's `StreamingResponse`: the exchange runs beside a listener for
`http.disconnect` (started once the request body has been read), and whichever finishes first
ends the other. As in uvicorn's `RequestResponseCycle`, a failure before the response starts
becomes an error response (400/413/502/503/504); after it, the client connection is aborted by
returning without completing the response, so that a truncated body is never presented as
complete.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import httpx2

from ._errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    ClientError,
    UpstreamError,
    map_upstream_errors,
)
from ._failover import Attempt, Budget, classify, counts_as_failure, status_condition
from ._headers import Headers, response_headers
from ._types import Receive, Scope, Send
from ._upstream import NoLiveUpstreams, Server

if TYPE_CHECKING:
    from ._proxy import ProxyPass

__all__ = ["RequestBody", "handle_http", "send_error"]

logger = logging.getLogger("asgi_proxy_pass")

# Methods that carry no body when an HTTP/2 client sends no Content-Length.
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})


class RequestBody(httpx2.AsyncByteStream):
    """The client's request body, pulled from `receive()` as the upstream connection takes it.

    Raises `ClientDisconnected` if the client goes away first (the upstream connection is then
    closed mid-body, so the upstream never sees a shorter body as complete) and `BodyTooLarge`
    past `max_size`. Up to `replay_limit` bytes are kept, so that the next server of a pool can
    be sent the same body; past that the body streams on and can no longer be replayed.
    """

    def __init__(self, receive: Receive, max_size: int | None, replay_limit: int) -> None:
        self.receive = receive
        self.max_size = max_size
        self.replay_limit = replay_limit
        self.finished = anyio.Event()
        self.received = 0
        self.kept: list[bytes] | None = []
        self.iterated = False

    @property
    def replayable(self) -> bool:
        """Whether every byte received so far can be sent again."""
        return self.kept is not None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.iterated:
            if self.kept is None:
                raise RuntimeError("the request body was partly sent and cannot be replayed")
            for chunk in list(self.kept):
                yield chunk
        self.iterated = True
        while not self.finished.is_set():
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.finished.set()
                raise ClientDisconnected("the client closed the connection while sending its body")
            data: bytes = message.get("body", b"")
            if not message.get("more_body", False):
                self.finished.set()
            if data:
                self.received += len(data)
                if self.max_size is not None and self.received > self.max_size:
                    raise BodyTooLarge(f"the request body is larger than {self.max_size} bytes")
                if self.kept is not None:
                    if self.received <= self.replay_limit:
                        self.kept.append(data)
                    else:
                        self.kept = None
                yield data


def body_framing(scope: Mapping[str, Any]) -> tuple[int | None, bool]:
    """The client's body framing: its `Content-Length`, or whether it is sent chunked.

    Raises:
        BadRequest: an invalid or conflicting `Content-Length` (the ASGI server normally
            refuses these first; this is the second line of defence against smuggling).
    """
    length: int | None = None
    chunked = False
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise BadRequest("invalid Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    if chunked and length is not None:
        raise BadRequest("both Content-Length and Transfer-Encoding")
    if length is None and not chunked and not scope.get("http_version", "1.1").startswith("1"):
        # HTTP/2 and HTTP/3 frame bodies themselves: a body may come without Content-Length.
        chunked = scope["method"] not in BODYLESS_METHODS
    return length, chunked


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
        length, chunked = body_framing(scope)
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
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(exchange.watch_disconnect, receive, tasks.cancel_scope)
        await exchange.run()
        tasks.cancel_scope.cancel()
    if exchange.disconnected:
        logger.info(
            "%s %s: the client closed the connection before the response was complete (499)",
            scope["method"],
            scope["path"],
        )


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

    async def watch_disconnect(self, receive: Receive, cancel_scope: anyio.CancelScope) -> None:
        await self.body.finished.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not self.complete:
            self.disconnected = True
            cancel_scope.cancel()

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
            with anyio.CancelScope(shield=True):
                await response.aclose()
            self.proxy.pool.release(server)
        self.complete = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    def request_for(self, server: Server) -> httpx2.Request:
        proxy = self.proxy
        return httpx2.Request(
            self.scope["method"],
            request_url(proxy.origin(server), self.target),
            headers=proxy.upstream_headers(self.scope, server.url) + self.framing,
            stream=self.body,
            extensions={"target": self.target, "timeout": proxy._timeout_extension},
        )

    async def connect(self) -> tuple[Server, httpx2.Response] | None:
        """Send the request to servers in turn; None once the client has been answered."""
        proxy, pool, scope = self.proxy, self.proxy.pool, self.scope
        method: str = scope["method"]
        tried: list[Server] = []
        budget = proxy.budget()
        failure: UpstreamError | None = None
        while True:
            try:
                server = pool.select(scope, tried)
            except NoLiveUpstreams as exc:
                if failure is None:
                    logger.error("%s %s: %s; answered 502", method, scope["path"], exc)
                    await self.answer(exc)
                    return None
                break  # every server was tried: the last one's outcome stands
            budget.start()
            tried.append(server)
            pool.acquire(server)
            try:
                with map_upstream_errors():
                    response = await proxy.transport_for(server).handle_async_request(
                        self.request_for(server)
                    )
            except UpstreamError as exc:
                pool.release(server)
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

            condition = status_condition(response.status_code)
            if condition in proxy.next_upstream:
                status = Attempt(frozenset({condition}), sent=True)
                if counts_as_failure(status.conditions, proxy.next_upstream):
                    pool.record_failure(server, f"status {response.status_code}")
                if self.may_retry(status, tried, budget) and pool.can_select(tried):
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
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

    async def relay(self, response: httpx2.Response) -> None:
        stream = response.stream
        if not isinstance(stream, httpx2.AsyncByteStream):
            raise UpstreamError(f"the transport returned a {type(stream).__name__}, not async")
        base: list[bytes] = []

        def client_base() -> bytes:
            if not base:
                base.append(self.proxy.client_base(self.scope))
            return base[0]

        headers = response_headers(
            response.headers.raw,
            redirects=self.proxy.redirects,
            client_base=client_base,
            extra=self.proxy.response_headers,
            scope=self.scope,
        )
        self.started = True
        await self.send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        with map_upstream_errors():
            async for chunk in stream:
                if chunk:
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
