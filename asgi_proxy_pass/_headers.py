"""Request and response header rules: pure functions over raw `(bytes, bytes)` pairs.

Headers are never put in a dict: several `Set-Cookie` (or `Cookie`, `X-Dup`) lines stay separate
and in order.

Request (client -> upstream):
- hop-by-hop headers (RFC 9110 section 7.6.1) and every header named in `Connection` are dropped,
  and so is `Expect`: the ASGI server answers `100 Continue` itself (nginx does the same);
- `Host` becomes the upstream's `host[:port]` (nginx's `$proxy_host`) unless `preserve_host`;
- forwarding headers (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`) from the client are dropped
  unless the direct peer is a trusted proxy, Caddy-style; then `X-Forwarded-For` is extended;
- the body framing is the client's: `Content-Length` is kept, a chunked body goes chunked.

Response (upstream -> client): hop-by-hop headers are dropped; `Location`, `Content-Location` and
`Refresh` pointing at the upstream are rewritten to the client-facing URL (nginx's
`proxy_redirect default`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from ._errors import ConfigError, UpstreamProtocolError

__all__ = [
    "HeaderValue",
    "Headers",
    "Redirects",
    "TrustedProxies",
    "request_headers",
    "response_headers",
]

Headers: TypeAlias = list[tuple[bytes, bytes]]
#: A header value to set: a string, None to remove the header, or a function of the ASGI scope.
HeaderValue: TypeAlias = "str | bytes | None | Callable[[dict[str, Any]], str | bytes | None]"

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Dropped from requests only. The ASGI server already answered `Expect: 100-continue`; the host
# header is set by us; the framing headers are set by us from the client's framing.
REQUEST_DROPPED = HOP_BY_HOP | {b"expect", b"host", b"content-length"}
FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-proto",
        b"x-real-ip",
    }
)
logger = logging.getLogger("asgi_proxy_pass")

# `X_Forwarded_For` and the like: CGI-style servers read them as the dashed header. nginx drops
# every name with an underscore; we drop these always, from trusted peers too.
FORWARDING_ALIASES = frozenset(name.replace(b"-", b"_") for name in FORWARDING) - FORWARDING
REDIRECT_HEADERS = frozenset({b"location", b"content-location", b"refresh"})
# Request headers dropped whoever sends them: one set look-up per header.
_NEVER_FORWARDED = REQUEST_DROPPED | FORWARDING_ALIASES


class TrustedProxies:
    """The peers whose forwarding headers are believed: IPs, CIDR networks, or `"unix"`.

    `"unix"` trusts a peer with no address (an ASGI server listening on a unix socket, where
    `scope["client"]` is None).
    """

    def __init__(self, entries: Iterable[str], *, argument: str = "trusted_proxies") -> None:
        if isinstance(entries, (str, bytes)):
            raise ConfigError(
                f"{argument}: expected a list of IPs or CIDR networks, got {entries!r}"
            )
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.unix = False
        for entry in entries:
            if entry == "unix":
                self.unix = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{argument}: {entry!r} is not an IP address, a CIDR network or 'unix'"
                ) from None

    def __bool__(self) -> bool:
        return self.unix or bool(self.networks)

    def trusts(self, peer: str | None) -> bool:
        """Whether the direct peer (an IP string, None for a unix socket) is trusted."""
        if peer is None:
            return self.unix
        if not self.networks:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in network for network in self.networks)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names listed in `Connection` (RFC 9110 section 7.6.1), lowercased.

    Hop-by-hop names (`keep-alive`, `upgrade`) are left out: they are dropped anyway, and most
    messages then have no name left to filter.
    """
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            add_tokens(tokens, value)
    return tokens


def add_tokens(tokens: set[bytes], value: bytes) -> None:
    """Add the names one `Connection` value lists to `tokens`, as `connection_tokens()` does."""
    value = value.lower()
    if value in HOP_BY_HOP:
        return  # `keep-alive`, `upgrade`: the common values, one token dropped anyway
    for token in value.split(b","):
        token = token.strip()
        if token and token not in HOP_BY_HOP:
            tokens.add(token)


def request_headers(
    scope: Mapping[str, Any],
    *,
    host: bytes,
    preserve_host: bool,
    trusted: TrustedProxies,
    prefix: str | None,
    extra: Sequence[tuple[bytes, HeaderValue]],
) -> Headers:
    """Build the upstream request's headers from an ASGI HTTP or WebSocket scope.

    Args:
        scope: The ASGI scope; its `headers` are lowercased raw pairs per the ASGI spec.
        host: The upstream's own `Host` value.
        preserve_host: Send the client's `Host` instead (nginx `proxy_set_header Host $http_host`).
        trusted: Peers whose incoming forwarding headers are kept and extended.
        prefix: The stripped mount prefix, sent as `X-Forwarded-Prefix`; None or "" for none.
        extra: `(lowercased name, value)` pairs set last, replacing any header of that name
            (nginx `proxy_set_header`); a None value removes it.

    Returns:
        Raw pairs: `Host` first, then the client's headers in their order, then `X-Forwarded-*`,
        then `extra`. `Content-Length`/`Transfer-Encoding` are left to the caller.
    """
    raw: Sequence[tuple[bytes, bytes]] = scope.get("headers") or ()
    tokens = connection_tokens(raw)
    client = scope.get("client")
    peer = client[0] if client else None
    trust = trusted.trusts(peer)

    client_host = b""
    forwarded_for: list[bytes] = []
    forwarded_proto = forwarded_host = b""
    out: Headers = [(b"host", host)]
    for name, value in raw:
        name = name.lower()
        if name == b"host":
            client_host = value
            continue
        if name in _NEVER_FORWARDED or (tokens and name in tokens):
            continue
        if name in FORWARDING:
            if not trust:
                continue
            if name == b"x-forwarded-for":
                if value.strip():
                    forwarded_for.append(value)
                continue
            if name == b"x-forwarded-proto":
                forwarded_proto = forwarded_proto or value
                continue
            if name == b"x-forwarded-host":
                forwarded_host = forwarded_host or value
                continue
            if name == b"x-forwarded-prefix" and prefix:
                continue  # ours replaces it
        out.append((name, value))

    if preserve_host and client_host:
        out[0] = (b"host", client_host)
    if peer is not None:
        forwarded_for.append(peer.encode("latin-1"))
    if forwarded_for:
        out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    scheme = scope.get("scheme", "http")
    proto = b"https" if scheme in ("https", "wss") else b"http"
    out.append((b"x-forwarded-proto", forwarded_proto or proto))
    if forwarded_host or client_host:
        out.append((b"x-forwarded-host", forwarded_host or client_host))
    if prefix:
        out.append((b"x-forwarded-prefix", prefix.encode("utf-8")))
    if extra:
        out = apply_overrides(out, extra, scope)
    return out


def apply_overrides(
    headers: Headers, extra: Sequence[tuple[bytes, HeaderValue]], scope: Mapping[str, Any]
) -> Headers:
    """Replace or remove headers by name; values may be functions of the scope."""
    names = {name for name, _ in extra}
    kept = [(n, v) for n, v in headers if n not in names]
    for name, value in extra:
        if callable(value):
            value = value(dict(scope))
        if value is None or value == "" or value == b"":
            continue  # nginx: an empty proxy_set_header value removes the header
        raw = value.encode("latin-1") if isinstance(value, str) else value
        if b"\r" in raw or b"\n" in raw or b"\0" in raw:
            # A computed value must not split the header block (static ones are checked once).
            logger.warning("header %r: a computed value with CR, LF or NUL was not sent", name)
            continue
        kept.append((name, raw))
    return kept


class Redirects:
    """nginx's `proxy_redirect default`: map upstream URLs back to client-facing ones.

    `upstream_bases` are the absolute URLs that the upstream side of the mapping starts with (the
    upstream's origin followed by the URL's path, without its trailing slash). The client side is
    computed only when a header matches, from the request: its origin plus the mount prefix.
    """

    def __init__(self, upstream_bases: Iterable[bytes]) -> None:
        self.upstream_bases = tuple(dict.fromkeys(upstream_bases))

    def rewrite_url(self, url: bytes, client_base: Callable[[], bytes]) -> bytes:
        for base in self.upstream_bases:
            if url.startswith(base):
                rest = url[len(base) :]
                if not rest:
                    return client_base() + b"/"
                if rest[:1] in (b"/", b"?", b"#"):
                    return client_base() + rest
        return url

    def rewrite(self, name: bytes, value: bytes, client_base: Callable[[], bytes]) -> bytes:
        if name != b"refresh":
            return self.rewrite_url(value, client_base)
        # `Refresh: 5; url=http://upstream/x`, the URL possibly quoted.
        head, sep, url = value.partition(b"=")
        if not sep or not head.rstrip().lower().endswith(b"url"):
            return value
        stripped = url.strip()
        quote = stripped[:1] if stripped[:1] in (b"'", b'"') else b""
        inner = stripped.strip(b"'\"") if quote else stripped
        rewritten = self.rewrite_url(inner, client_base)
        return value if rewritten is inner else head + sep + quote + rewritten + quote


def response_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    redirects: Redirects | None,
    client_base: Callable[[], bytes],
    extra: Sequence[tuple[bytes, HeaderValue]] = (),
    scope: Mapping[str, Any] | None = None,
) -> Headers:
    """Filter the upstream response's headers for the client.

    Hop-by-hop headers and those named in `Connection` are dropped, `Content-Length` and
    everything else end-to-end is kept in order, redirect headers are mapped back.

    Raises:
        UpstreamProtocolError: both `Content-Length` and `Transfer-Encoding` (a smuggling
            vector; nginx >= 1.23 answers 502 too).
    """
    # One pass over the raw pairs; the names a `Connection` header lists are dropped after it,
    # since it may come last.
    out: Headers = []
    tokens: set[bytes] = set()
    framing = 0
    for name, value in headers:
        name = name.lower()
        if name in HOP_BY_HOP:
            if name == b"transfer-encoding":
                framing |= 2
            elif name == b"connection":
                add_tokens(tokens, value)
            continue
        if name == b"content-length":
            framing |= 1
        elif redirects is not None and name in REDIRECT_HEADERS:
            value = redirects.rewrite(name, value, client_base)
        out.append((name, value))
    if tokens:
        out = [(name, value) for name, value in out if name not in tokens]
    if framing == 3:
        raise UpstreamProtocolError("the response has both Content-Length and Transfer-Encoding")
    if extra:
        out = apply_overrides(out, extra, scope or {})
    return out
