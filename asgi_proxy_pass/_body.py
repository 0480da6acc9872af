"""The request side of an HTTP exchange: the client's body as a stream, and its framing.

`body_framing()` checks the request head before anything is sent upstream (the second line of
defence against smuggling, after the ASGI server's parser); `RequestBody` pulls the body from
`receive()` as the upstream connection takes it, keeping enough of it to replay to the next
server of a pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx2

from ._errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    HeadersTooLarge,
    UnsupportedTransferCoding,
)
from ._types import Receive

__all__ = ["BodyChunks", "RequestBody", "body_framing"]

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
        self.finished = False
        #: Called once the whole body has been received (not when the client went away).
        self.on_finished: Callable[[], None] | None = None
        self.received = 0
        self.kept: list[bytes] | None = []
        self.iterated = False

    @property
    def replayable(self) -> bool:
        """Whether every byte received so far can be sent again."""
        return self.kept is not None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return BodyChunks(self)


class BodyChunks:
    """One pass over a `RequestBody`: what it kept first (a replay), then `receive()`.

    A class rather than an async generator: the event loop registers every async generator in
    a weak set on its first iteration, a cost on each request.
    """

    __slots__ = ("body", "done", "replay", "started")

    def __init__(self, body: RequestBody) -> None:
        self.body = body
        self.started = False
        self.done = False
        self.replay: list[bytes] = []

    def __aiter__(self) -> BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        body = self.body
        if not self.started:
            self.started = True
            if body.iterated:
                if body.kept is None:
                    self.done = True
                    raise RuntimeError("the request body was partly sent and cannot be replayed")
                self.replay = body.kept[::-1]
            body.iterated = True
        if self.replay:
            return self.replay.pop()
        while not self.done and not body.finished:
            message = await body.receive()
            if message["type"] == "http.disconnect":
                body.finished = self.done = True
                raise ClientDisconnected("the client closed the connection while sending its body")
            data: bytes = message.get("body", b"")
            if not message.get("more_body", False):
                body.finished = True
                finished, body.on_finished = body.on_finished, None
                if finished is not None:
                    finished()
            if data:
                body.received += len(data)
                if body.max_size is not None and body.received > body.max_size:
                    self.done = True
                    raise BodyTooLarge(f"the request body is larger than {body.max_size} bytes")
                if body.kept is not None:
                    if body.received <= body.replay_limit:
                        body.kept.append(data)
                    else:
                        body.kept = None
                return data
        self.done = True
        raise StopAsyncIteration


def body_framing(
    scope: Mapping[str, Any], max_header_size: int, max_headers: int
) -> tuple[int | None, bool]:
    """Check the request head; return its `Content-Length`, or whether the body is chunked.

    Raises:
        BadRequest: an invalid or conflicting `Content-Length`, several `Host` headers (the
            ASGI server normally refuses some of these first; this is the second line of
            defence against smuggling and cache poisoning).
        HeadersTooLarge: more than `max_headers` headers or `max_header_size` bytes of them.
        UnsupportedTransferCoding: a transfer coding other than `chunked` alone.
    """
    length: int | None = None
    chunked = hosts = 0
    size = 0
    headers = scope.get("headers") or ()
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise BadRequest("invalid Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            # The server decoded `chunked`; any other coding would reach the upstream undeclared.
            if chunked or value.strip().lower() != b"chunked":
                raise UnsupportedTransferCoding(f"transfer coding {value!r} is not supported")
            chunked = 1
        elif name == b"host":
            hosts += 1
    if size > max_header_size or len(headers) > max_headers:
        raise HeadersTooLarge(f"{len(headers)} request headers, {size} bytes")
    if hosts > 1:
        raise BadRequest("several Host headers")
    if chunked and length is not None:
        raise BadRequest("both Content-Length and Transfer-Encoding")
    if length is None and not chunked and not scope.get("http_version", "1.1").startswith("1"):
        # HTTP/2 and HTTP/3 frame bodies themselves: a body may come without Content-Length.
        return None, scope["method"] not in BODYLESS_METHODS
    return length, bool(chunked)
