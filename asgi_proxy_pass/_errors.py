"""Exceptions, and the one table that turns an upstream failure into a status code.

    ProxyPassError
    ├── ConfigError (also ValueError)   bad arguments, raised at construction
    ├── ClientError                     the client's request cannot be forwarded
    │   ├── BadRequest                  400: malformed target, path leaving the mount, framing
    │   ├── NotFound                    404: outside a literal strip_prefix
    │   ├── BodyTooLarge                413: over max_body_size
    │   ├── HeadersTooLarge             431: over max_header_size or max_headers
    │   ├── UnsupportedTransferCoding   501: a transfer coding other than chunked
    │   └── ClientDisconnected          the client went away (logged as nginx's 499)
    └── UpstreamError                   the upstream failed: 502, 503 or 504
        ├── UpstreamConnectError        502: refused, DNS, TLS
        ├── UpstreamTimeout             504: connect, read or write timeout
        ├── UpstreamUnavailable         503: no connection free in the pool in time
        │   └── UpstreamsBusy           503: every server at max_conns, queue full or timed out
        ├── UpstreamProtocolError       502: invalid or truncated response
        ├── UpstreamRefused             its own status: a WebSocket handshake refused
        └── NoLiveUpstreams             502: no server of the pool can be chosen (_upstream.py)

Upstream failures never escape `ProxyPass.__call__`: before the response has started they become
an error response with a short plain-text body and one log line; after, the client connection is
aborted so that a truncated body is never presented as complete.
"""

from __future__ import annotations

import ssl
from types import TracebackType

import httpx2

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "ClientDisconnected",
    "ClientError",
    "ConfigError",
    "HeadersTooLarge",
    "NotFound",
    "ProxyPassError",
    "UnsupportedTransferCoding",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "map_upstream_errors",
]


class ProxyPassError(Exception):
    """The root of every exception this package raises."""

    status_code = 500
    reason = "Internal Server Error"


class ConfigError(ProxyPassError, ValueError):
    """An invalid argument; the message starts with the argument's name."""


class ClientError(ProxyPassError):
    """The client's request cannot be forwarded."""

    status_code = 400
    reason = "Bad Request"


class BadRequest(ClientError):
    """A malformed request: bad escapes, a path that leaves the mount, broken framing."""


class NotFound(ClientError):
    """The path is outside the literal `strip_prefix` of a standalone `ProxyPass`."""

    status_code = 404
    reason = "Not Found"


class BodyTooLarge(ClientError):
    """The request body is larger than `max_body_size` (nginx `client_max_body_size`)."""

    status_code = 413
    reason = "Content Too Large"


class HeadersTooLarge(ClientError):
    """More request headers than `max_headers`, or more bytes than `max_header_size`."""

    status_code = 431
    reason = "Request Header Fields Too Large"


class UnsupportedTransferCoding(ClientError):
    """A request transfer coding other than `chunked` (nginx answers 501 too)."""

    status_code = 501
    reason = "Not Implemented"


class ClientDisconnected(ClientError):
    """The client closed its connection before the exchange finished (nginx logs 499)."""

    status_code = 499
    reason = "Client Closed Request"


class UpstreamError(ProxyPassError):
    """The upstream could not be reached or answered badly."""

    status_code = 502
    reason = "Bad Gateway"


class UpstreamConnectError(UpstreamError):
    """Connection refused, name resolution failure, TLS handshake or verification failure."""


class UpstreamTimeout(UpstreamError):
    """A connect, read or write timeout."""

    status_code = 504
    reason = "Gateway Timeout"


class UpstreamUnavailable(UpstreamError):
    """No upstream connection became free in time (the pool is at its limit)."""

    status_code = 503
    reason = "Service Unavailable"


class UpstreamProtocolError(UpstreamError):
    """An invalid, truncated or prematurely closed upstream response."""


class UpstreamRefused(UpstreamError):
    """The upstream answered a WebSocket handshake with a status other than 101.

    Its status, headers and body are passed on to the client (nginx does the same, W4).
    """

    def __init__(
        self, status_code: int, reason: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        super().__init__(f"refused the handshake with {status_code}")
        self.status_code = status_code
        self.reason = reason
        self.headers = headers
        self.body = body


# Most specific first: httpx2.ConnectTimeout is a TimeoutException, PoolTimeout too.
_TABLE: tuple[tuple[type[Exception], type[UpstreamError]], ...] = (
    (httpx2.PoolTimeout, UpstreamUnavailable),
    (httpx2.TimeoutException, UpstreamTimeout),
    (httpx2.ConnectError, UpstreamConnectError),
    (httpx2.UnsupportedProtocol, UpstreamConnectError),
    (ssl.SSLError, UpstreamConnectError),
    (httpx2.RemoteProtocolError, UpstreamProtocolError),
    (httpx2.LocalProtocolError, UpstreamProtocolError),
    (httpx2.ProtocolError, UpstreamProtocolError),
    (httpx2.NetworkError, UpstreamProtocolError),
    (httpx2.TransportError, UpstreamError),
    (OSError, UpstreamConnectError),
)


class _MapUpstreamErrors:
    # A plain class rather than `@contextlib.contextmanager`: it is entered twice per request,
    # and a generator-based context manager costs a generator and two frames each time.
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, ProxyPassError):
            return
        for source, target in _TABLE:
            if isinstance(exc, source):
                raise target(_describe(exc)) from exc
        # A custom transport's own bug: still a 502 and a log line (with the traceback).
        raise UpstreamError(f"unexpected error in the transport: {_describe(exc)}") from exc


_MAP_UPSTREAM_ERRORS = _MapUpstreamErrors()


def map_upstream_errors() -> _MapUpstreamErrors:
    """Re-raise transport exceptions as `UpstreamError` subclasses, `from` the original.

    Our own exceptions (a client that went away while its body was streamed upstream) pass
    through unchanged, and so do `BaseException`s that are not `Exception`s (a cancellation).
    The context manager holds no state: one instance serves every request.
    """
    return _MAP_UPSTREAM_ERRORS


def _describe(exc: Exception) -> str:
    message = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message != type(exc).__name__ else message
