"""The access log: one nginx-style line per request or WebSocket, with what the upstream did.

`ProxyPass` notes every upstream attempt in the ASGI scope, cheaply (no formatting), so that a
middleware around it can log it once the request is over:

    scope["asgi_proxy_pass"] = {
        "upstream_addr": ["127.0.0.1:9000", "127.0.0.1:9001"],   # every server tried, in order
        "upstream_status": [502, 200],                            # its status, or 502/503/504
        "upstream_response_time": [0.002, 0.031],                 # seconds to response headers
    }

A failover lists every attempt, as nginx's `$upstream_addr` does. The time runs from the start
of the attempt to the upstream's response headers (for a WebSocket, its handshake response), or
to the failure: nginx's `$upstream_header_time`. A streamed body or a tunnel can last for hours,
and `$request_time` covers the whole exchange.

`AccessLog` formats the line from nginx's variable names (`$remote_addr`, `$status`, ...) when
the request ends, and logs it at INFO on the `asgi_proxy_pass.access` logger.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import datetime

from ._errors import ConfigError
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DEFAULT_FORMAT", "SCOPE_KEY", "VARIABLES", "AccessLog", "record_attempt"]

SCOPE_KEY = "asgi_proxy_pass"

#: nginx's `combined` format, then the request time and the upstream's address, status and time.
DEFAULT_FORMAT = (
    '$remote_addr - - [$time_local] "$request" $status $body_bytes_sent '
    '"$http_referer" "$http_user_agent" rt=$request_time '
    'ua="$upstream_addr" us="$upstream_status" urt="$upstream_response_time"'
)


def record_attempt(scope: Scope, address: str, status: int, started: float) -> None:
    """Note one upstream attempt in `scope["asgi_proxy_pass"]`.

    Args:
        scope: The request's scope.
        address: The server's `host:port` (or `unix:/path`).
        status: Its status, 101 for an accepted WebSocket, or the status a failure became.
        started: `time.monotonic()` when the attempt started.
    """
    elapsed = time.monotonic() - started
    info = scope.get(SCOPE_KEY)
    if info is None:
        info = scope[SCOPE_KEY] = {}
    addresses = info.get("upstream_addr")
    if addresses is None:
        info["upstream_addr"] = [address]
        info["upstream_status"] = [status]
        info["upstream_response_time"] = [elapsed]
    else:
        addresses.append(address)
        info["upstream_status"].append(status)
        info["upstream_response_time"].append(elapsed)


class Entry:
    """What the log line needs from one request, gathered from the messages the app sends."""

    __slots__ = ("failed", "info", "scope", "sent", "started", "status", "wall")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        info = scope.get(SCOPE_KEY)
        if info is None:
            # Made here, so that an app that copies the scope still fills in ours.
            info = scope[SCOPE_KEY] = {}
        self.info: dict[str, list[object]] = info
        self.started = time.monotonic()
        self.wall = time.time()
        self.status = 0
        self.sent = 0
        self.failed = False

    def observe(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body" or kind == "websocket.http.response.body":
            self.sent += len(message.get("body", b""))
        elif kind == "websocket.send":
            data = message.get("bytes")
            if data is None:
                text: str = message.get("text") or ""
                self.sent += len(text) if text.isascii() else len(text.encode("utf-8"))
            else:
                self.sent += len(data)
        elif kind == "http.response.start" or kind == "websocket.http.response.start":
            self.status = message["status"]
        elif kind == "websocket.accept":
            self.status = 101
        elif kind == "websocket.close" and not self.status:
            self.status = 403  # a close before the accept is a refusal (ASGI spec)

    @property
    def final_status(self) -> int:
        if self.status:
            return self.status
        # An app that failed before answering gets a 500 from the server; one that returned
        # without answering lost its client (nginx's 499).
        return 500 if self.failed else 499


def _escape(data: bytes) -> str:
    # nginx's default log escaping: `"`, `\`, controls and non-ASCII bytes become \xHH.
    text = data.decode("latin-1")
    if data.isascii() and text.isprintable() and b'"' not in data and b"\\" not in data:
        return text
    return "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in b'"\\' else f"\\x{byte:02X}"
        for byte in data
    )


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers") or ():
        if key == name:
            return _escape(value) or "-"
    return "-"


def _http_header(name: str) -> Callable[[Entry], str]:
    header = name.replace("_", "-").lower().encode("latin-1")
    return lambda entry: _header(entry.scope, header)


def _request_uri(scope: Scope) -> str:
    raw = scope.get("raw_path")
    path: bytes = raw if raw is not None else scope["path"].encode("utf-8", "surrogateescape")
    query: bytes = scope.get("query_string", b"")
    return _escape(path + b"?" + query if query else path)


def _time_local(entry: Entry) -> str:
    moment = datetime.fromtimestamp(entry.wall).astimezone()
    month = "JanFebMarAprMayJunJulAugSepOctNovDec"[3 * moment.month - 3 : 3 * moment.month]
    return moment.strftime(f"%d/{month}/%Y:%H:%M:%S %z")


def _request(entry: Entry) -> str:
    scope = entry.scope
    method = scope.get("method", "GET")  # a WebSocket handshake is a GET
    return f"{method} {_request_uri(scope)} HTTP/{scope.get('http_version', '1.1')}"


def _client(entry: Entry, part: int) -> str:
    client = entry.scope.get("client")
    return str(client[part]) if client else "-"


def _upstream(key: str, show: Callable[[object], str]) -> Callable[[Entry], str]:
    def value(entry: Entry) -> str:
        values = entry.info.get(key)
        return ", ".join(map(show, values)) if values else "-"

    return value


def _seconds(value: object) -> str:
    return f"{value:.3f}"


#: The variables a format may use, with nginx's names and meanings; `$http_NAME` is any request
#: header (`$http_x_request_id` is `X-Request-ID`).
VARIABLES: dict[str, Callable[[Entry], str]] = {
    "remote_addr": lambda entry: _client(entry, 0),
    "remote_port": lambda entry: _client(entry, 1),
    "time_local": _time_local,
    "time_iso8601": lambda e: datetime.fromtimestamp(e.wall).astimezone().isoformat("T", "seconds"),
    "msec": lambda entry: f"{entry.wall:.3f}",
    "request": _request,
    "request_method": lambda entry: entry.scope.get("method", "GET"),
    "request_uri": lambda entry: _request_uri(entry.scope),
    "uri": lambda entry: _escape(entry.scope["path"].encode("utf-8", "surrogateescape")),
    "args": lambda entry: _escape(entry.scope.get("query_string", b"")) or "-",
    "server_protocol": lambda entry: f"HTTP/{entry.scope.get('http_version', '1.1')}",
    "scheme": lambda entry: entry.scope.get("scheme", "http"),
    "host": lambda entry: _header(entry.scope, b"host"),
    "status": lambda entry: str(entry.final_status),
    "body_bytes_sent": lambda entry: str(entry.sent),
    "request_time": lambda entry: f"{time.monotonic() - entry.started:.3f}",
    "upstream_addr": _upstream("upstream_addr", str),
    "upstream_status": _upstream("upstream_status", str),
    "upstream_response_time": _upstream("upstream_response_time", _seconds),
    "upstream_header_time": _upstream("upstream_response_time", _seconds),
}

_VARIABLE = re.compile(r"\$([A-Za-z0-9_]+)")


def compile_format(format: str) -> list[str | Callable[[Entry], str]]:
    """The format as literal strings and variable getters, checked once.

    Raises:
        ConfigError: an unknown variable (the message starts with `access_log_format:`).
    """
    if not isinstance(format, str):
        raise ConfigError(f"access_log_format: expected a string, got {format!r}")
    parts: list[str | Callable[[Entry], str]] = []
    position = 0
    for match in _VARIABLE.finditer(format):
        parts.append(format[position : match.start()])
        name = match[1]
        if name.startswith("http_"):
            parts.append(_http_header(name[len("http_") :]))
        elif name in VARIABLES:
            parts.append(VARIABLES[name])
        else:
            raise ConfigError(
                f"access_log_format: unknown variable ${name}; expected $http_NAME or one of "
                + ", ".join(f"${known}" for known in VARIABLES)
            )
        position = match.end()
    parts.append(format[position:])
    return [part for part in parts if part != ""]


class AccessLog:
    """ASGI middleware that logs one nginx-style line per request and per WebSocket.

    ```python
    app.add_middleware(AccessLog)  # a Starlette or FastAPI app
    ```

    The line is written when the response (or the WebSocket) is over, at INFO on the
    `asgi_proxy_pass.access` logger: attach a handler to it. Requests that a `ProxyPass` forwarded
    carry the upstream's address, status and time; failovers list every server tried. A request
    whose client left before any answer is logged with status 499, like nginx.

    Args:
        app: The ASGI app to log.
        format: nginx `log_format` syntax: `$remote_addr`, `$request`, `$status`,
            `$upstream_addr`, `$http_user_agent` ... Default `DEFAULT_FORMAT`, nginx's
            `combined` plus `rt=$request_time ua="$upstream_addr" us="$upstream_status"
            urt="$upstream_response_time"`.
        logger: The logger or its name. Default `"asgi_proxy_pass.access"`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        format: str = DEFAULT_FORMAT,
        logger: logging.Logger | str = "asgi_proxy_pass.access",
    ) -> None:
        self.app = app
        self.format = format
        self._parts = compile_format(format)
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        entry = Entry(scope)

        async def observe(message: Message) -> None:
            entry.observe(message)
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except Exception:
            entry.failed = True
            raise
        finally:
            self.logger.info("%s", self.line(entry))

    def line(self, entry: Entry) -> str:
        """The log line for a finished request."""
        return "".join(part if isinstance(part, str) else part(entry) for part in self._parts)
