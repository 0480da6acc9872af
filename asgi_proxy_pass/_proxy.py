"""`ProxyPass`: validate the configuration, own the upstream transport, dispatch ASGI scopes."""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote_to_bytes

import httpx2

from ._cache import Cache, CacheConfig
from ._errors import BadRequest, ConfigError, NotFound
from ._failover import NEXT_UPSTREAM, Budget
from ._headers import Headers, HeaderValue, Redirects, TrustedProxies, request_headers
from ._http import SlowExchanges, handle_http
from ._tls import CertTypes, VerifyTypes
from ._types import ASGIApp, Receive, Scope, Send
from ._upstream import DEFAULT_LIMITS, Server, Upstream
from ._urls import (
    PathError,
    UpstreamURL,
    full_raw_path,
    map_target,
    parse_upstream,
    quote_path,
)
from ._websocket import handle_websocket

__all__ = ["DEFAULT_TIMEOUT", "NEXT_UPSTREAM", "ProxyPass", "lifespan"]

#: Read and write timeouts are between two successive operations, 60 s like nginx's
#: `proxy_read_timeout` / `proxy_send_timeout`; connecting gets 10 s (nginx: 60 s), and waiting
#: for a free pooled connection as long.
DEFAULT_TIMEOUT = httpx2.Timeout(60.0, connect=10.0, pool=10.0)


class ProxyPass:
    """An ASGI app that forwards HTTP requests and WebSockets to an upstream, like nginx's
    `proxy_pass`.

    Args:
        upstream: The upstream URL, in nginx's forms: `"http://host:port"` forwards the client's
            target unchanged, `"http://host:port/uri"` replaces the mount prefix with `/uri`,
            `"http://unix:/run/app.sock"` and `"http://unix:/run/app.sock:/uri"` use a unix socket.
            `https://` upstreams are verified by default. Or an `Upstream` pool, which may be
            shared by several `ProxyPass` apps and then carries the TLS and connection options
            (`verify`, `cert`, `limits`) itself; it is not closed by `aclose()` then.
        strip_prefix: None (the default) strips the mount prefix (`scope["root_path"]`) when the
            URL has a path, like nginx; True always strips it; False never does; a string strips
            that literal prefix and answers 404 outside it (for use without a router).
        timeout: Seconds, or an `httpx2.Timeout`. Read and write timeouts apply between two
            operations (nginx `proxy_read_timeout` / `proxy_send_timeout`). Default: 60 s, and
            10 s to connect (nginx `proxy_connect_timeout`) or to wait for a pooled connection.
        preserve_host: Send the client's `Host` instead of the upstream's (nginx
            `proxy_set_header Host $http_host`).
        trusted_proxies: IPs and CIDR networks (and `"unix"`) of the peers whose
            `X-Forwarded-*`, `Forwarded` and `X-Real-IP` headers are kept; from anyone else they
            are dropped. Default: none.
        request_headers: Headers to set on the upstream request, replacing the client's (nginx
            `proxy_set_header`). A value may be a string, None (remove), or a function of the
            ASGI scope returning either.
        response_headers: The same for the response (nginx `add_header` / `proxy_hide_header`).
        redirect: Rewrite `Location`, `Content-Location` and `Refresh` headers that point at the
            upstream to the client-facing URL (nginx `proxy_redirect default`). Default: True.
        max_body_size: Largest request body in bytes; larger gets 413 (nginx
            `client_max_body_size`, whose default of 1 MiB we do not impose). Default: None.
        max_header_size: Largest request head in bytes (names, values and 4 bytes per header);
            larger gets 431. Default 32 KiB (nginx's `large_client_header_buffers 4 8k`).
        max_headers: Most request headers; more gets 431. Default 100 (Apache's
            `LimitRequestFields`).
        verify: TLS verification of https upstreams: True (system trust), False, a CA bundle
            path or an `ssl.SSLContext`. SNI is the upstream host name.
        cert: A client certificate for https upstreams: a path, or `(certfile, keyfile)`.
        limits: The connection pool's `httpx2.Limits`. Default: `DEFAULT_LIMITS`.
        engine: The HTTP engine of its own pool: `"httptools"` (the default: our HTTP/1.1
            client on uvicorn's C parser, several times faster) or `"httpx"` (httpx2's own
            transport). An `Upstream` pool takes `engine=` itself.
        transport: An `httpx2.AsyncBaseTransport` to forward through instead of the built-in
            pooled one (a mock, a cache, another engine). It is used as is and not closed by us.
        cache: Cache responses in front of the upstream, as a shared cache (nginx
            `proxy_cache`): True for the defaults (SQLite under `.cache/asgi-proxy-pass`), or a
            `CacheConfig`. Needs the `cache` extra (hishel). `proxy.cache` is then the `Cache`,
            for `purge()`; `aclose()` closes its storage. Default: False (docs/caching.md).
        next_upstream: When a failed attempt moves on to the next server of a pool (nginx
            `proxy_next_upstream`): any of `"error"`, `"timeout"`, `"invalid_header"`,
            `"http_500"`, `"http_502"`, `"http_503"`, `"http_504"`, `"http_403"`, `"http_404"`,
            `"http_429"`, `"non_idempotent"`, or `"off"`. Default: `("error", "timeout")`. A
            request that was sent (not just a failed connect) is retried only when its method is
            idempotent (not POST, LOCK, PATCH) or `"non_idempotent"` is listed, and only when its
            body fits in `replay_buffer_size`.
        next_upstream_tries: Attempts at most, the first included; 0 for no limit (nginx
            `proxy_next_upstream_tries`). Default 0.
        next_upstream_timeout: Seconds after the first attempt past which no other is started;
            None for no limit (nginx `proxy_next_upstream_timeout`). Default None.
        replay_buffer_size: Bytes of request body kept to replay on the next server. A larger
            body streams on and is not retried once sent. Default 64 KiB.
        websocket_max_size: Largest WebSocket message in bytes, each way (uvicorn's default, 16
            MiB); larger closes the connection with 1009.
        websocket_ping_interval: Seconds between pings to the upstream, None to send none.
        websocket_ping_timeout: Seconds to wait for a pong before closing, None to wait forever.
        websocket_idle_timeout: Close a WebSocket when no message crossed in either direction
            for this long (nginx `proxy_read_timeout` applies to tunnels too). Default: None.
        websocket_compression: Negotiate permessage-deflate with the upstream (`"deflate"`,
            the default) or not (None). Each side is negotiated on its own.
    """

    def __init__(
        self,
        upstream: str | Upstream,
        *,
        strip_prefix: bool | str | None = None,
        timeout: float | httpx2.Timeout = DEFAULT_TIMEOUT,
        preserve_host: bool = False,
        trusted_proxies: Iterable[str] = (),
        request_headers: Mapping[str, HeaderValue] | None = None,
        response_headers: Mapping[str, HeaderValue] | None = None,
        redirect: bool = True,
        max_body_size: int | None = None,
        max_header_size: int = 32 * 1024,
        max_headers: int = 100,
        verify: VerifyTypes = True,
        cert: CertTypes | None = None,
        limits: httpx2.Limits = DEFAULT_LIMITS,
        engine: str | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
        cache: bool | CacheConfig = False,
        next_upstream: Iterable[str] = ("error", "timeout"),
        next_upstream_tries: int = 0,
        next_upstream_timeout: float | None = None,
        replay_buffer_size: int = 64 * 1024,
        websocket_max_size: int | None = 16 * 1024 * 1024,
        websocket_ping_interval: float | None = 20.0,
        websocket_ping_timeout: float | None = 20.0,
        websocket_idle_timeout: float | None = None,
        websocket_compression: str | None = "deflate",
    ) -> None:
        if isinstance(upstream, Upstream):
            if verify is not True or cert is not None or limits is not DEFAULT_LIMITS:
                raise ConfigError(
                    "verify: with an Upstream pool, give verify, cert and limits to the Upstream"
                )
            if engine is not None:
                raise ConfigError("engine: with an Upstream pool, give engine= to the Upstream")
            self.pool, self._owns_pool = upstream, False
        elif isinstance(upstream, str):
            parse_upstream(upstream)  # errors name `upstream`, not the pool's `servers[0]`
            self.pool = Upstream([upstream], verify=verify, cert=cert, limits=limits, engine=engine)
            self._owns_pool = True
        else:
            raise ConfigError(f"upstream: expected a URL string or an Upstream, got {upstream!r}")
        self._started = False
        self._slow_exchanges = SlowExchanges()
        if not (strip_prefix is None or isinstance(strip_prefix, (bool, str))):
            raise ConfigError(f"strip_prefix: expected bool, str or None, got {strip_prefix!r}")
        if isinstance(strip_prefix, str) and not strip_prefix.startswith("/"):
            raise ConfigError(f"strip_prefix: a prefix must start with '/', got {strip_prefix!r}")
        self.strip_prefix = strip_prefix
        self.timeout = _check_timeout(timeout)
        self.preserve_host = bool(preserve_host)
        self.trusted_proxies = TrustedProxies(trusted_proxies)
        self.request_headers = _check_headers(request_headers, "request_headers")
        self.response_headers = _check_headers(response_headers, "response_headers")
        self.redirects = Redirects(_redirect_bases(self.pool)) if redirect else None
        self.max_body_size = _check_size(max_body_size, "max_body_size")
        self.max_header_size = _check_size(max_header_size, "max_header_size") or 0
        self.max_headers = _check_size(max_headers, "max_headers") or 0
        if transport is not None and not isinstance(transport, httpx2.AsyncBaseTransport):
            raise ConfigError(
                f"transport: expected an httpx2.AsyncBaseTransport, got {transport!r}"
            )
        self._transport = transport
        if not isinstance(cache, (bool, CacheConfig)):
            raise ConfigError(f"cache: expected a bool or a CacheConfig, got {cache!r}")
        config = CacheConfig() if cache is True else cache or None
        self.cache: Cache | None = Cache(config, self.pool) if config is not None else None
        self.next_upstream = _check_next_upstream(next_upstream)
        if (
            isinstance(next_upstream_tries, bool)
            or not isinstance(next_upstream_tries, int)
            or next_upstream_tries < 0
        ):
            raise ConfigError(
                f"next_upstream_tries: expected an integer >= 0, got {next_upstream_tries!r}"
            )
        self.next_upstream_tries = next_upstream_tries
        self.next_upstream_timeout = _check_seconds(next_upstream_timeout, "next_upstream_timeout")
        size = _check_size(replay_buffer_size, "replay_buffer_size")
        self.replay_buffer_size = 0 if size is None else size
        self.clock: Callable[[], float] = time.monotonic
        self.websocket_max_size = _check_size(websocket_max_size, "websocket_max_size")
        self.websocket_ping_interval = _check_seconds(
            websocket_ping_interval, "websocket_ping_interval"
        )
        self.websocket_ping_timeout = _check_seconds(
            websocket_ping_timeout, "websocket_ping_timeout"
        )
        self.websocket_idle_timeout = _check_seconds(
            websocket_idle_timeout, "websocket_idle_timeout"
        )
        if websocket_compression not in ("deflate", None):
            raise ConfigError(
                f"websocket_compression: expected 'deflate' or None, got {websocket_compression!r}"
            )
        self.websocket_compression = websocket_compression
        # httpcore wants the per-request timeout as a dict extension.
        self._timeout_extension = self.timeout.as_dict()
        self._origins: dict[UpstreamURL, httpx2.URL] = {}

    @property
    def upstream(self) -> UpstreamURL:
        """The first server's URL (all servers of a pool share scheme and path)."""
        return self.pool.servers[0].url

    def __repr__(self) -> str:
        if self._owns_pool:
            return f"{type(self).__name__}({self.upstream.url!r})"
        return f"{type(self).__name__}({self.pool!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await handle_http(self, scope, receive, send)
        elif kind == "websocket":
            await handle_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise RuntimeError(f"ProxyPass cannot handle a {kind!r} scope")

    def budget(self) -> Budget:
        """A fresh retry budget for one request (`next_upstream_tries` / `_timeout`)."""
        return Budget(self.next_upstream_tries, self.next_upstream_timeout, self.clock)

    def origin(self, server: Server) -> httpx2.URL:
        """`server`'s scheme, host and port as an `httpx2.URL`, parsed once."""
        url = self._origins.get(server.url)
        if url is None:
            url = self._origins[server.url] = httpx2.URL(server.url.httpx_url())
        return url

    def transport_for(self, server: Server) -> httpx2.AsyncBaseTransport:
        """The transport requests to `server` go through: `transport=`, or the pool's; behind
        the cache, if there is one."""
        transport = self._transport or self.pool.transport_for(server)
        if self.cache is not None:
            return self.cache.transport(transport, server, self.pool, self.next_upstream)
        return transport

    def ssl_context_for(self, server: UpstreamURL) -> ssl.SSLContext | None:
        """The TLS context for connecting to `server`, None for plain http."""
        return self.pool.ssl_context if server.scheme == "https" else None

    async def start(self) -> None:
        """Start the pool's active health checks, if any (done on the first request too)."""
        self._started = True
        await self.pool.start()

    def route(self, scope: Scope) -> tuple[str, bool]:
        """The prefix a request must stay inside, and whether it is replaced by the URL's path."""
        strip = self.strip_prefix
        if isinstance(strip, str):
            return strip, True
        prefix = scope.get("root_path", "")
        if strip is None:
            return prefix, self.pool.path is not None
        return prefix, strip

    def target(self, scope: Scope) -> bytes:
        """The request-target to send upstream for this scope.

        Raises:
            BadRequest: malformed escapes, or a path that leaves the mount once resolved.
            NotFound: a path outside a literal `strip_prefix`.
        """
        prefix, strip = self.route(scope)
        raw = full_raw_path(scope)
        if isinstance(self.strip_prefix, str) and not _under(raw, prefix):
            raise NotFound(f"the path is not under {prefix!r}")
        try:
            return map_target(
                raw,
                scope.get("query_string", b""),
                prefix=prefix,
                strip=strip,
                upstream_path=self.pool.path,
            )
        except PathError as exc:
            raise BadRequest(str(exc)) from None

    def upstream_headers(self, scope: Scope, server: UpstreamURL) -> Headers:
        """The headers to send to `server` for this scope, framing headers excepted."""
        prefix, strip = self.route(scope)
        return request_headers(
            scope,
            host=server.host_header_bytes,
            preserve_host=self.preserve_host,
            trusted=self.trusted_proxies,
            prefix=prefix if strip else None,
            extra=self.request_headers,
        )

    def client_base(self, scope: Scope) -> bytes:
        """The client-facing URL that the upstream path prefix maps to, for redirects."""
        prefix, strip = self.route(scope)
        scheme = b"https" if scope.get("scheme") in ("https", "wss") else b"http"
        host = forwarded_host = forwarded_proto = b""
        for name, value in scope.get("headers") or ():
            if name == b"host":
                host = value
            elif name == b"x-forwarded-host" and not forwarded_host:
                forwarded_host = value.split(b",", 1)[0].strip()
            elif name == b"x-forwarded-proto" and not forwarded_proto:
                forwarded_proto = value.split(b",", 1)[0].strip().lower()
        if forwarded_host or forwarded_proto:
            # Behind a trusted load balancer the client-facing URL is the one it was asked for.
            client = scope.get("client")
            if self.trusted_proxies.trusts(client[0] if client else None):
                host = forwarded_host or host
                scheme = forwarded_proto if forwarded_proto in (b"http", b"https") else scheme
        if not host:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}".encode() if server else b"localhost"
        path = quote_path(prefix.rstrip("/")) if strip else b""
        return scheme + b"://" + host + path

    async def aclose(self) -> None:
        """Close the pooled upstream connections, health checks and the cache's storage.

        A `transport=` and a shared `Upstream` given by the user are left open: close them
        where they were made (`lifespan(proxy, pool)` does both).
        """
        self._started = False
        if self.cache is not None:
            await self.cache.aclose()
        if self._owns_pool:
            await self.pool.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def lifespan(*apps: ProxyPass | Upstream) -> Callable[[ASGIApp], Any]:
    """A Starlette/FastAPI `lifespan` that starts the health checks of these proxies and pools
    at startup and closes their connections at shutdown.

    ```python
    api = ProxyPass("http://127.0.0.1:3000/")
    app = Starlette(routes=[Mount("/api", app=api)], lifespan=lifespan(api))
    ```
    """

    @asynccontextmanager
    async def running(app: ASGIApp) -> AsyncIterator[None]:
        for item in apps:
            await item.start()
        try:
            yield
        finally:
            for item in apps:
                await item.aclose()

    return running


def _under(raw_path: bytes, prefix: str) -> bool:
    path = unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path
    base = prefix.rstrip("/").encode("utf-8")
    return path == base or path.startswith(base + b"/")


def _redirect_bases(pool: Upstream) -> list[bytes]:
    path = (pool.path or "").rstrip("/")
    bases = []
    for server in pool.servers:
        bases.append(server.url.origin)
        if server.url.uds is None:
            # An upstream that spells its default port out (`http://b:80/`) is the same place.
            bases.append(f"{server.url.scheme}://{server.url.address}")
    return [(base + path).encode("latin-1") for base in bases]


def _check_next_upstream(conditions: Iterable[str]) -> frozenset[str]:
    if isinstance(conditions, str) or not isinstance(conditions, Iterable):
        raise ConfigError(f"next_upstream: expected a list of conditions, got {conditions!r}")
    checked = frozenset(conditions)
    unknown = sorted(checked - NEXT_UPSTREAM)
    if unknown:
        raise ConfigError(
            f"next_upstream: unknown condition {unknown[0]!r}; "
            f"expected some of {', '.join(sorted(NEXT_UPSTREAM))}"
        )
    if "off" in checked and len(checked) > 1:
        raise ConfigError("next_upstream: 'off' cannot be combined with other conditions")
    return frozenset() if "off" in checked else checked


def _check_timeout(timeout: float | httpx2.Timeout) -> httpx2.Timeout:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, httpx2.Timeout)):
        raise ConfigError(f"timeout: expected seconds or an httpx2.Timeout, got {timeout!r}")
    if not isinstance(timeout, httpx2.Timeout):
        timeout = httpx2.Timeout(timeout)
    for name, value in timeout.as_dict().items():
        if value is not None and value <= 0:
            raise ConfigError(f"timeout: the {name} timeout must be positive, got {value!r}")
    return timeout


def _check_seconds(value: float | None, argument: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{argument}: expected positive seconds or None, got {value!r}")
    return float(value)


def _check_size(value: int | None, argument: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{argument}: expected a number of bytes (>= 0) or None, got {value!r}")
    return value


def _check_headers(
    headers: Mapping[str, HeaderValue] | None, argument: str
) -> list[tuple[bytes, HeaderValue]]:
    if headers is None:
        return []
    if not isinstance(headers, Mapping):
        raise ConfigError(f"{argument}: expected a mapping of header names to values")
    checked: list[tuple[bytes, HeaderValue]] = []
    for name, value in headers.items():
        if not isinstance(name, str) or not name or not _is_token(name):
            raise ConfigError(f"{argument}: {name!r} is not a valid header name")
        if isinstance(value, str | bytes):
            raw = value.encode("latin-1") if isinstance(value, str) else value
            if any(c in raw for c in (b"\r", b"\n", b"\x00")):
                raise ConfigError(f"{argument}: the value of {name!r} contains CR, LF or NUL")
        elif value is not None and not callable(value):
            raise ConfigError(
                f"{argument}: the value of {name!r} must be a string, None or a function"
            )
        checked.append((name.lower().encode("ascii"), value))
    return checked


_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _is_token(name: str) -> bool:
    return all(c in _TOKEN_CHARS for c in name)
