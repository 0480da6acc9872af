"""One HTTP/1.1 client connection: an asyncio protocol around httptools' C parser (llhttp).

This is the wire half of the built-in engine (`_engine.py` pools these connections). It writes
a request exactly as given (request-target and header pairs byte for byte, nothing added) and
parses the response as it arrives, handing the body over chunk by chunk with backpressure both
ways: reading from the socket pauses while more than `READ_HIGH_WATER` bytes wait for the
consumer, and writing the request body waits while asyncio's write buffer is full.

A connection goes through one exchange at a time:

    state      entered when                          leaves to
    idle       connected, or the last response was   active (the pool hands it out),
               complete and both sides keep alive    closed (upstream hung up, expiry)
    active     a request is being written            complete, closed (any failure)
    complete   the response was read to its end       idle or closed (the pool decides)
    closed     either side closed, or an error       (final)

Failures are httpx2's exceptions, so that `_errors.map_upstream_errors` maps them as it maps
httpx2's own transport: `RemoteProtocolError` for an invalid or truncated response,
`ReadTimeout` / `WriteTimeout` between two operations, `ReadError` / `WriteError` for a broken
socket. Interim 1xx responses are skipped (RFC 9110 section 15.2); a 101 is an error, since the
proxy never asks for an upgrade here (WebSockets go through `_websocket.py`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterable, Callable, Sequence
from typing import Any, cast

import httptools
import httpx2

from ._deadline import Deadline

__all__ = ["READ_HIGH_WATER", "Connection", "request_head"]

#: Response body bytes buffered before reading from the upstream pauses.
READ_HIGH_WATER = 512 * 1024
#: Request body chunks smaller than this are joined with their framing into one write.
SMALL_WRITE = 16 * 1024

Headers = Sequence[tuple[bytes, bytes]]


def request_head(method: bytes, target: bytes, headers: Headers) -> tuple[bytes, int | None, bool]:
    """The request line and header block, and the body framing the headers declare.

    Returns:
        The head bytes, the `Content-Length` (None without one) and whether the body is sent
        chunked. Without either header the request has no body (RFC 9112 section 6.3).

    Raises:
        httpx2.LocalProtocolError: CR, LF or NUL where they would split the head, a malformed
            `Content-Length`, or both framing headers (h11 refuses the same).
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    length: int | None = None
    chunked = False
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
        if len(name) in (14, 17):
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise httpx2.LocalProtocolError(f"invalid Content-Length {value!r}")
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # One line per header plus the request line and the blank one: any other CR or LF, or a NUL,
    # would let a value start a header or a request of its own (RFC 9112 section 2.2).
    lines = len(headers) + 2
    if (
        head.count(b"\n") != lines
        or head.count(b"\r") != lines
        or head.find(b"\0") >= 0  # not `in`: see `_urls.map_target`
        or target.find(b" ") >= 0
    ):
        raise httpx2.LocalProtocolError("a request-target or header contains CR, LF, NUL or space")
    if chunked and length is not None:
        raise httpx2.LocalProtocolError("both Content-Length and Transfer-Encoding")
    return head, length, chunked


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an upstream, owned by the pool of `_engine.py`.

    The pool calls `exchange()` to send a request and wait for the response head, then
    `receive_body()` until it returns b"", then asks `reusable` whether the connection can go
    back to the idle list. `on_lost` is called once if the connection closes while idle.
    """

    def __init__(self, on_lost: Callable[[Connection], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle = False
        self.idle_since = 0.0
        self.key: Any = None
        # The exchange in progress.
        self.parser: httptools.HttpResponseParser | None = None
        self.head_only = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.framing: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.read_deadline = Deadline(self.loop, self.read_timed_out)
        self.reading_paused = False
        self.writing_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small requests go out at once, not after a delayed ACK (Nagle's algorithm).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.keep_alive = False
            self.close()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(httpx2.RemoteProtocolError("unexpected 101 Switching Protocols"))
        except httptools.HttpParserError as exc:
            # Our callbacks' own verdicts come wrapped in HttpParserCallbackError.
            cause = exc.__context__
            if not isinstance(cause, httpx2.RemoteProtocolError):
                message = f"invalid response: {exc}"
                if "can't be present with" in message:
                    # A smuggling vector (RFC 9112 section 6.3), in the words h11 uses.
                    message = "both Content-Length and Transfer-Encoding"
                cause = httpx2.RemoteProtocolError(message)
            self.fail(cause)

    def eof_received(self) -> bool:
        if self.head_done and self.until_close and not self.complete:
            # A body delimited by the end of the connection (RFC 9112 section 6.3, rule 8).
            self.complete = True
            self.keep_alive = False
            self.wake()
        else:
            self.fail(self.closed_early())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.read_deadline.cancel()
        if exc is not None and self.error is None and not self.complete:
            self.error = httpx2.ReadError(str(exc) or type(exc).__name__)
        if not self.complete:
            self.fail(self.closed_early())
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_exception(httpx2.WriteError("the upstream closed the connection"))
        if self.idle:
            self.idle = False
            self.on_lost(self)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()  # as h11 gives them, whichever engine runs
        if name == b"content-length" or name == b"transfer-encoding":
            self.framing.append((name, value))
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status < 200:
            if status != 101:
                self.headers = []  # an interim response: the real one follows
                self.framing = []
            return
        coded = [value for name, value in self.framing if name == b"transfer-encoding"]
        if coded:
            codings = b",".join(coded)
            if codings.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                # The length would be unknowable (RFC 9112 section 6.3); h11 refuses it too.
                raise httpx2.RemoteProtocolError(
                    f"unsupported transfer coding {codings.decode('latin-1')!r}"
                )
        self.status = status
        self.head_done = True
        if self.head_only:
            # A response to HEAD has no body whatever its headers say; llhttp cannot be told.
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
        elif status not in (204, 304):
            self.until_close = not self.framing
        self.wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if not self.head_done or self.complete:
            return  # the end of an interim response, or of a response to HEAD
        assert self.parser is not None
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self.wake()

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response to one request: stop parsing (feed_data raises) and close.
            raise httpx2.RemoteProtocolError("more data after the response")

    # The exchange, driven by the pool

    async def exchange(
        self,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        length: int | None,
        chunked: bool,
        *,
        head_only: bool,
        write_timeout: float | None,
        read_timeout: float | None,
    ) -> None:
        """Send one request and wait until the final response's head has arrived.

        A `body` is always iterated to its end, even when the framing says there is none: the
        caller's stream may need to see the end of its input. None is no body at all.
        """
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.idle = False
        if self.closed:
            raise httpx2.RemoteProtocolError("the upstream closed the connection")
        transport = self.transport
        assert transport is not None
        try:
            if body is None:
                if length or chunked:
                    raise httpx2.LocalProtocolError("framing headers for a request without body")
                transport.write(head)
            else:
                await self.send_body(transport, head, body, length, chunked, write_timeout)
        except httpx2.WriteError:
            # The upstream may have answered early (a 413) and closed: that answer stands.
            if not self.head_done:
                raise
            self.keep_alive = False
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self.wait(read_timeout)

    async def send_body(
        self,
        transport: asyncio.Transport,
        head: bytes,
        body: AsyncIterable[bytes],
        length: int | None,
        chunked: bool,
        write_timeout: float | None,
    ) -> None:
        pending: bytes | None = head
        sent = 0
        async for chunk in body:
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                raise httpx2.LocalProtocolError("more request body than its Content-Length")
            if length is None and not chunked:
                raise httpx2.LocalProtocolError("a request body without framing headers")
            if chunked:
                chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            if self.closed or self.error is not None:
                raise httpx2.WriteError("the upstream closed the connection")
            if pending is not None and len(chunk) < SMALL_WRITE:
                transport.write(pending + chunk)
            else:
                if pending is not None:
                    transport.write(pending)
                transport.write(chunk)
            pending = None
            if self.writing_paused:
                await self.drain(write_timeout)
        if length is not None and sent != length:
            raise httpx2.LocalProtocolError("less request body than its Content-Length")
        end = b"0\r\n\r\n" if chunked else b""
        if self.closed:
            raise httpx2.WriteError("the upstream closed the connection")
        if pending is not None:
            transport.write(pending + end)
        elif end:
            transport.write(end)

    async def receive_body(self, read_timeout: float | None) -> bytes:
        """The next piece of the response body; b"" once it is complete."""
        while True:
            if self.chunks:
                return self.take()
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self.wait(read_timeout)

    def take(self) -> bytes:
        """The body bytes received so far (`chunks` is not empty), at once."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        """Whether the response was read to its end and both sides keep the connection."""
        return self.complete and self.keep_alive and not self.closed and not self.chunks

    def reset(self) -> None:
        """Forget the finished exchange, before the connection goes idle."""
        self.parser = None
        self.status = 0
        self.reason = b""
        self.headers = []
        self.framing = []
        self.head_done = self.complete = self.keep_alive = self.until_close = False
        self.error = None

    def close(self) -> None:
        """Close at once (an abort: nothing more is owed to the upstream)."""
        self.closed = True
        self.read_deadline.cancel()
        if self.transport is not None:
            self.transport.abort()

    # Waiting

    async def wait(self, seconds: float | None) -> None:
        """Until the next parser event, or `ReadTimeout` after `seconds`."""
        waiter = self.waiter = self.loop.create_future()
        if seconds is not None:
            self.read_deadline.set(seconds)
        try:
            await waiter
        finally:
            self.waiter = None
            self.read_deadline.clear()

    def read_timed_out(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(httpx2.ReadTimeout("timed out"))

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.keep_alive = False
        self.wake()
        if not self.closed:
            self.close()

    def closed_early(self) -> httpx2.RemoteProtocolError:
        if self.head_done:
            return httpx2.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        return httpx2.RemoteProtocolError("Server disconnected without sending a response.")

    async def drain(self, seconds: float | None) -> None:
        waiter = self.drain_waiter = self.loop.create_future()
        if self.closed:
            raise httpx2.WriteError("the upstream closed the connection")
        timer = (
            None
            if seconds is None
            else self.loop.call_later(seconds, _expire, waiter, httpx2.WriteTimeout)
        )
        try:
            await waiter
        finally:
            self.drain_waiter = None
            if timer is not None:
                timer.cancel()


def _expire(waiter: asyncio.Future[None], error: type[httpx2.TimeoutException]) -> None:
    if not waiter.done():
        waiter.set_exception(error("timed out"))
