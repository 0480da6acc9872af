"""One WebSocket relay: the upstream handshake first, then two pumps, close codes both ways.

    client (ASGI server)                 ProxyPass                          upstream
    websocket.connect          ->  open_upstream(): handshake   ->  GET + Upgrade
                                                                <-  101, or a refusal
    websocket.accept           <-  subprotocol + end-to-end headers of the 101
      or websocket.http.response   the refusal's status, headers and body (502/504 when
      or websocket.close           unreachable or slow; 403 without the extension)
    messages                  <->  two pumps, one message at a time each way
    websocket.disconnect / close  <->  close code and reason, mapped where RFC 6455 forbids them

The client is accepted only once the upstream has accepted, so a client is never accepted and
then dropped because the upstream was down. The rest is in three modules, one concept each:

    _ws_upstream   UpstreamConnection: websockets' asyncio client (handshake, TLS, unix
                   sockets, subprotocols, permessage-deflate, keepalive, closing handshake)
                   with a relay's receive and send paths: whole messages to one reader,
                   flow-controlled both ways; its framing for the common case is `_ws_frames`
    _ws_relay      Relay: the two pumps, until one side closes or the idle timeout
    _ws_close      the pure rules mapping each side's close code and reason to the other's
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
from websockets.asyncio.client import connect
from websockets.datastructures import Headers as WSHeaders
from websockets.exceptions import (
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.uri import parse_uri

from ._accesslog import record_attempt
from ._errors import (
    BadRequest,
    ClientError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
    _describe,
)
from ._failover import Attempt, classify, counts_as_failure, status_condition
from ._headers import Headers, response_headers
from ._types import Receive, Scope, Send
from ._upstream import NoLiveUpstreams, Server, UpstreamsBusy
from ._urls import UpstreamURL
from ._ws_relay import Relay
from ._ws_upstream import UpstreamConnection

if TYPE_CHECKING:
    from ._proxy import ProxyPass

__all__ = ["handle_websocket", "handshake_headers", "handshake_uri", "open_upstream"]

logger = logging.getLogger("asgi_proxy_pass")

HANDSHAKE_PREFIX = b"sec-websocket-"
# RFC 3986 section 3.2: host (an IP literal or a reg-name) and port; no userinfo, no path.
AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]+)(?::[0-9]{1,5})?")


def raw_headers(headers: WSHeaders) -> Headers:
    """websockets' headers (decoded as ISO-8859-1) as raw pairs, names lowercased."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.raw_items()]


class _Connect(connect):
    # A 3xx answer to the handshake is the client's to follow, not ours.
    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


# Most specific first: TimeoutError and ssl.SSLError are OSErrors.
_HANDSHAKE_ERRORS: tuple[tuple[type[Exception], type[UpstreamError]], ...] = (
    (TimeoutError, UpstreamTimeout),
    (ssl.SSLError, UpstreamConnectError),
    (OSError, UpstreamConnectError),
    (InvalidHandshake, UpstreamProtocolError),
)


@contextlib.contextmanager
def map_handshake_errors() -> Iterator[None]:
    """Re-raise the websockets client's failures as `UpstreamError` subclasses."""
    try:
        yield
    except InvalidStatus as exc:
        response = exc.response
        raise UpstreamRefused(
            response.status_code,
            response.reason_phrase,
            raw_headers(response.headers),
            bytes(response.body),
        ) from exc
    except Exception as exc:
        for source, target in _HANDSHAKE_ERRORS:
            if isinstance(exc, source):
                raise target(_describe(exc)) from exc
        raise


def handshake_headers(headers: Headers) -> tuple[bytes, WSHeaders]:
    """Split `ProxyPass.upstream_headers()` into the `Host` value and the headers to add.

    The handshake headers (`Sec-WebSocket-Key`, `-Version`, `-Extensions`, `-Protocol`,
    `-Accept`) are the websockets client's to produce: copying the client's
    `Sec-WebSocket-Extensions` would promise the upstream a compression the proxy may not speak.
    Values are decoded as ISO-8859-1, which websockets encodes back byte for byte.
    """
    host = b""
    extra = WSHeaders()
    for name, value in headers:
        if name == b"host":
            host = host or value
        elif not name.startswith(HANDSHAKE_PREFIX):
            extra[name.decode("latin-1")] = value.decode("latin-1")
    return host, extra


def handshake_uri(server: UpstreamURL, host: bytes, target: bytes) -> str:
    """The URI handed to websockets: its authority is the `Host` to send, its path the target.

    The TCP (or unix socket) destination is passed separately, so the authority only shapes the
    `Host` header; websockets normalises it (lowercase, no default port). Bytes that a URI
    cannot hold as they are (controls, space, `#`, non-ASCII) are percent-encoded.

    Raises:
        BadRequest: a `Host` value (the client's, with `preserve_host`) that is no authority.
    """
    scheme = "wss" if server.scheme == "https" else "ws"
    path = "".join(
        chr(byte) if 0x20 < byte < 0x7F and byte != 0x23 else f"%{byte:02X}" for byte in target
    )
    authority = (host or server.host_header.encode()).decode("latin-1")
    uri = f"{scheme}://{authority}{path}"
    try:
        if not AUTHORITY.fullmatch(authority):
            raise ValueError(authority)
        parse_uri(uri)  # the port's range
    except (InvalidURI, ValueError):
        raise BadRequest(f"cannot send Host {host!r} upstream") from None
    return uri


async def open_upstream(proxy: ProxyPass, server: UpstreamURL, scope: Scope) -> UpstreamConnection:
    """Open the WebSocket to `server` for this scope: connect and complete the handshake.

    Raises:
        ClientError: the request-target cannot be forwarded (400/404).
        UpstreamRefused: the upstream answered with another status than 101.
        UpstreamConnectError: refused, unreachable, TLS failure (502).
        UpstreamTimeout: no handshake within `timeout.connect` (504).
        UpstreamProtocolError: an invalid handshake response (502).
    """
    target = proxy.target(scope)
    host, extra = handshake_headers(proxy.upstream_headers(scope, server))
    uri = handshake_uri(server, host, target)
    options: dict[str, Any] = {}
    if server.uds is not None:
        options.update(unix=True, path=server.uds)
    else:
        options.update(host=server.host, port=server.port)
    context = proxy.ssl_context_for(server)
    if context is not None:
        options.update(ssl=context, server_hostname=server.host)
    with map_handshake_errors():
        upstream = await _Connect(
            uri,
            create_connection=UpstreamConnection,
            subprotocols=list(scope.get("subprotocols") or ()) or None,
            compression=proxy.websocket_compression,
            additional_headers=extra,
            user_agent_header=None,  # the client's User-Agent is in `extra`, if it sent one
            proxy=None,  # never an environment proxy
            open_timeout=proxy.timeout.connect,
            ping_interval=proxy.websocket_ping_interval,
            ping_timeout=proxy.websocket_ping_timeout,
            max_size=proxy.websocket_max_size,
            **options,
        )
    assert isinstance(upstream, UpstreamConnection)
    return upstream


async def handle_websocket(proxy: ProxyPass, scope: Scope, receive: Receive, send: Send) -> None:
    """Relay one WebSocket to a server of the pool, refusing the client if every try fails.

    The handshake fails over like an HTTP GET (nginx `proxy_next_upstream`): connect errors
    and timeouts by default, refusals with a listed status (`http_502` ...) when configured.
    """
    if (await receive())["type"] != "websocket.connect":
        return  # the client left before we started
    if not proxy._started:
        await proxy.start()
    pool = proxy.pool
    tried: list[Server] = []
    budget = proxy.budget()
    failure: ClientError | UpstreamError | None = None
    while True:
        try:
            server = await pool.choose(scope, tried)
        except UpstreamsBusy as exc:
            await refuse(proxy, None, scope, send, exc)
            return
        except NoLiveUpstreams as exc:
            last = tried[-1].url if tried else None
            await refuse(proxy, last, scope, send, failure or exc)
            return
        budget.start()
        tried.append(server)
        pool.acquire(server)
        try:
            failure = await open_and_relay(proxy, server.url, scope, receive, send)
        finally:
            pool.release(server)
        if not isinstance(failure, UpstreamError):
            if failure is None:
                pool.record_success(server)
            else:
                await refuse(proxy, server.url, scope, send, failure)
            return
        attempt = handshake_attempt(failure)
        if counts_as_failure(attempt.conditions, proxy.next_upstream):
            pool.record_failure(server, str(failure))
        retry = budget.allows(len(tried)) and pool.can_select(tried)
        if retry and attempt.may_retry(listed=proxy.next_upstream, method="GET", replayable=True):
            logger.warning(
                "WebSocket %s: upstream %s failed: %s; trying the next server",
                scope["path"],
                server.url.address,
                failure,
            )
            continue
        await refuse(proxy, server.url, scope, send, failure)
        return


def handshake_attempt(failure: UpstreamError) -> Attempt:
    """A failed handshake as a failover attempt: a refusal is its status, like an HTTP GET's."""
    if isinstance(failure, UpstreamRefused):
        return Attempt(frozenset({status_condition(failure.status_code)}), sent=True)
    return classify(failure)


async def open_and_relay(
    proxy: ProxyPass, server: UpstreamURL, scope: Scope, receive: Receive, send: Send
) -> ClientError | UpstreamError | None:
    """Open the upstream WebSocket and relay until either side closes.

    Returns the handshake's failure, for the caller to fail over or refuse; None once the
    client was accepted (or left during the handshake).
    """
    opening = Opening()
    async with anyio.create_task_group() as tasks:
        # Before the accept, the client can only leave: then the handshake is abandoned.
        tasks.start_soon(opening.watch_disconnect, receive, tasks.cancel_scope)
        await opening.open(proxy, server, scope)
        tasks.cancel_scope.cancel()
    if opening.failure is not None:
        return opening.failure
    upstream = opening.upstream
    if upstream is None or opening.disconnected:
        logger.info("WebSocket %s: the client left during the upstream handshake", scope["path"])
        if upstream is not None:
            await upstream.close(1001)
        return None
    try:
        await Relay(proxy, server, scope, receive, send, upstream).run(
            accept_message(proxy, scope, upstream)
        )
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.close(1011)  # a no-op unless something unexpected ended the relay
    return None


class Opening:
    """The upstream handshake, raced against the client leaving."""

    def __init__(self) -> None:
        self.upstream: UpstreamConnection | None = None
        self.failure: ClientError | UpstreamError | None = None
        self.disconnected = False

    async def open(self, proxy: ProxyPass, server: UpstreamURL, scope: Scope) -> None:
        started = time.monotonic()
        try:
            self.upstream = await open_upstream(proxy, server, scope)
        except (ClientError, UpstreamError) as exc:
            self.failure = exc
            if isinstance(exc, UpstreamError):
                record_attempt(scope, server.address, exc.status_code, started)
        else:
            record_attempt(scope, server.address, 101, started)

    async def watch_disconnect(self, receive: Receive, cancel_scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "websocket.disconnect":
            pass
        self.disconnected = True
        cancel_scope.cancel()


async def refuse(
    proxy: ProxyPass,
    server: UpstreamURL | None,
    scope: Scope,
    send: Send,
    failure: ClientError | UpstreamError,
) -> None:
    """Log the failure and refuse the handshake: with the upstream's own refusal, or our status.

    Without the `websocket.http.response` extension the only refusal ASGI has is a close before
    the accept, which the server sends as a 403.
    """
    path = scope["path"]
    address = server.address if server is not None else "(none)"
    if isinstance(failure, UpstreamRefused):
        logger.info("WebSocket %s: upstream %s %s", path, address, failure)
        status, body = failure.status_code, failure.body
        headers = client_headers(proxy, scope, failure.headers)
    else:
        if isinstance(failure, ClientError):
            logger.info("WebSocket %s: %s (%d)", path, failure, failure.status_code)
        else:
            logger.error(
                "WebSocket %s: upstream %s failed: %s; answered %d",
                path,
                address,
                failure,
                failure.status_code,
            )
        status, body = failure.status_code, f"{failure.status_code} {failure.reason}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
    if "websocket.http.response" in (scope.get("extensions") or {}):
        messages: list[dict[str, Any]] = [
            {"type": "websocket.http.response.start", "status": status, "headers": headers},
            {"type": "websocket.http.response.body", "body": body, "more_body": False},
        ]
    else:
        messages = [{"type": "websocket.close", "code": 1008}]
    with contextlib.suppress(OSError):
        for message in messages:
            await send(message)


def client_headers(proxy: ProxyPass, scope: Scope, headers: Headers) -> Headers:
    """The upstream's handshake response headers for the client: end-to-end ones only.

    The framing is the ASGI server's (`Content-Length`), and so are the handshake headers.
    """
    filtered = response_headers(
        headers,
        redirects=proxy.redirects,
        client_base=lambda: proxy.client_base(scope),
        extra=proxy.response_headers,
        scope=scope,
    )
    return [
        (name, value)
        for name, value in filtered
        if not name.startswith(HANDSHAKE_PREFIX) and name != b"content-length"
    ]


def accept_message(proxy: ProxyPass, scope: Scope, upstream: UpstreamConnection) -> dict[str, Any]:
    """The `websocket.accept` for the client: the upstream's subprotocol and end-to-end headers."""
    response = raw_headers(upstream.response.headers) if upstream.response else []
    return {
        "type": "websocket.accept",
        "subprotocol": upstream.subprotocol,
        "headers": client_headers(proxy, scope, response),
    }
