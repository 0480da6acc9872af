"""Upstream URLs and request-target mapping, nginx `proxy_pass` style.

Everything here is pure: strings and bytes in, strings and bytes out, no I/O.

An upstream is written the way nginx writes it:

    http://host[:port]                 the "no URI" form: the client's target goes as it came
    http://host[:port]/uri             the "with URI" form: the mount prefix is replaced by /uri
    http://unix:/path/to.sock          a unix socket, no URI
    http://unix:/path/to.sock:/uri     a unix socket, with URI

Paths are handled as the raw, percent-encoded bytes the client sent, so that an encoded slash in
an id (`/api/a%2Fb`) stays one. Dot segments (also encoded ones, `%2e%2e`) are resolved only to
decide whether a request stays inside its mount (RFC 3986 section 5.2.4).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

from ._errors import ConfigError

__all__ = [
    "PathError",
    "UpstreamURL",
    "full_raw_path",
    "map_target",
    "parse_upstream",
    "quote_path",
]

DEFAULT_PORTS = {"http": 80, "https": 443}
SCHEME_ALIASES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}

# RFC 3986 `pchar` plus `/`, for turning a decoded path back into a target when an ASGI server
# gives us no `raw_path`.
_PATH_SAFE = "/:@!$&'()*+,;=~"
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class PathError(Exception):
    """The request target cannot be forwarded: it leaves the mount or is malformed (-> 400)."""


@dataclasses.dataclass(frozen=True)
class UpstreamURL:
    """A parsed upstream address.

    Attributes:
        url: The string as the user wrote it.
        scheme: `"http"` or `"https"` (`ws`/`wss` are accepted as aliases).
        host: The host name or IP literal (no brackets); `"localhost"` for a unix socket.
        port: The TCP port (the scheme's default when none is written).
        uds: The unix socket path, or None.
        path: The URI part, or None for the "no URI" form.
        host_header: The `Host` value to send (nginx's `$proxy_host`: no default port).
        origin: `scheme://host_header`, what the upstream's absolute redirects start with.
    """

    url: str
    scheme: str
    host: str
    port: int
    uds: str | None
    path: str | None
    host_header: str
    origin: str

    @functools.cached_property
    def address(self) -> str:
        """The address for log lines: `host:port` or `unix:/path`."""
        if self.uds is not None:
            return f"unix:{self.uds}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @functools.cached_property
    def host_header_bytes(self) -> bytes:
        """`host_header`, encoded for the wire."""
        return self.host_header.encode("ascii")

    def httpx_url(self) -> str:
        """The URL handed to the HTTP client: scheme, host and port only.

        The request-target travels separately (httpx2's `target` extension), byte for byte.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"


def parse_upstream(url: str, *, argument: str = "upstream") -> UpstreamURL:
    """Parse an upstream string, raising `ConfigError` naming `argument` when it is unusable."""
    if not isinstance(url, str):
        raise ConfigError(f"{argument}: expected a URL string, got {url!r}")
    scheme_part, sep, rest = url.partition("://")
    scheme = SCHEME_ALIASES.get(scheme_part.lower())
    if not sep or scheme is None:
        raise ConfigError(
            f"{argument}: expected an http://, https://, ws:// or wss:// URL, got {url!r}"
        )
    if rest.startswith("unix:"):
        return _parse_unix(url, scheme, rest[len("unix:") :], argument)

    try:
        parts = urlsplit(f"{scheme}://{rest}")
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{argument}: invalid URL {url!r} ({exc})") from None
    if parts.query or "?" in rest:
        # nginx concatenates such a query naively (`/x/?y=1a?b=2`), which is never meant.
        raise ConfigError(f"{argument}: a query string is not allowed in the upstream URL {url!r}")
    if parts.fragment or "#" in rest:
        raise ConfigError(f"{argument}: a fragment is not allowed in the upstream URL {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{argument}: credentials are not allowed in the upstream URL {url!r}; "
            "send an Authorization header with request_headers= instead"
        )
    host = parts.hostname
    if not host:
        raise ConfigError(f"{argument}: the upstream URL {url!r} has no host")
    if port == 0:
        raise ConfigError(f"{argument}: port 0 is not a valid upstream port in {url!r}")
    if port is None:
        port = DEFAULT_PORTS[scheme]
    is_ipv6 = _is_ipv6(host)
    shown_host = f"[{host}]" if is_ipv6 else host
    host_header = shown_host if port == DEFAULT_PORTS[scheme] else f"{shown_host}:{port}"
    path = parts.path or None
    return UpstreamURL(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        uds=None,
        path=path,
        host_header=host_header,
        origin=f"{scheme}://{host_header}",
    )


def _parse_unix(url: str, scheme: str, rest: str, argument: str) -> UpstreamURL:
    # nginx: the socket path ends at the first ':' (http://unix:/run/app.sock:/uri).
    socket_path, _, path = rest.partition(":")
    if not socket_path.startswith("/"):
        raise ConfigError(
            f"{argument}: a unix socket upstream needs an absolute path, "
            f"as in 'http://unix:/run/app.sock', got {url!r}"
        )
    if path and not path.startswith("/"):
        raise ConfigError(
            f"{argument}: the URI after the socket path must start with '/' in {url!r}"
        )
    if "?" in path or "#" in path:
        raise ConfigError(f"{argument}: a query or fragment is not allowed in {url!r}")
    return UpstreamURL(
        url=url,
        scheme=scheme,
        host="localhost",
        port=DEFAULT_PORTS[scheme],
        uds=socket_path,
        path=path or None,
        host_header="localhost",
        origin=f"{scheme}://localhost",
    )


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def map_target(
    raw_path: bytes,
    query_string: bytes,
    *,
    prefix: str,
    strip: bool,
    upstream_path: str | None,
) -> bytes:
    """Compute the request-target to send upstream.

    Args:
        raw_path: The full path as the client sent it, percent-escapes kept.
        query_string: The raw query string, forwarded byte for byte.
        prefix: The decoded mount prefix (`scope["root_path"]` or a literal `strip_prefix`).
            The request must stay inside it once dot segments are resolved.
        strip: Replace the prefix with `upstream_path` ("with URI" form) instead of forwarding
            the raw target unchanged after `upstream_path` ("no URI" form).
        upstream_path: The URI part of the upstream URL, or None.

    Raises:
        PathError: bad escapes, NUL, or a path that leaves the prefix once resolved.
    """
    # `find()`, not `in`: on every request, and `bytes in bytes` first tries the needle as an
    # integer, raising and clearing a TypeError each time.
    escaped = raw_path.find(b"%") >= 0
    if escaped:
        if _BAD_ESCAPE.search(raw_path):
            raise PathError("invalid percent-encoding in the request path")
        if b"%00" in raw_path:
            raise PathError("encoded NUL in the request path")
    if not raw_path.startswith(b"/"):
        raise PathError("the request path must start with '/'")
    if (
        not escaped
        and raw_path.find(b"/.") < 0
        and raw_path.find(b"\\") < 0
        and raw_path.find(b"//") < 0
    ):
        # The common case: no escapes, no dot segments, nothing that another reader would
        # resolve differently, so the path is its own resolved form and a prefix check suffices.
        return _map_plain(raw_path, query_string, prefix, strip, upstream_path)

    segments = _remove_dot_segments(raw_path.split(b"/"))
    prefix_segments = prefix.rstrip("/").split("/") if prefix.strip("/") else [""]
    n = len(prefix_segments)
    if [_decode(s) for s in segments[:n]] != [p.encode() for p in prefix_segments]:
        raise PathError("the request path leaves the mount")
    _check_decoded(raw_path, prefix_segments)

    if strip:
        rest = b"/".join([b"", *segments[n:]]) if len(segments) > n else b""
        # What is forwarded must not climb either, however the upstream reads it.
        _check_decoded(rest, [""])
        base = (upstream_path or "/").encode()
        path = base if not rest else base.rstrip(b"/") + rest
    else:
        # The client's target goes unchanged, as nginx does once it is known to be inside.
        base = (upstream_path or "").rstrip("/").encode()
        path = base + raw_path
    return path + b"?" + query_string if query_string else path


def _map_plain(
    raw_path: bytes, query_string: bytes, prefix: str, strip: bool, upstream_path: str | None
) -> bytes:
    # `map_target` for a path without `%`, `/.`, `\\` or `//`: the same result, by slicing.
    base = prefix.rstrip("/").encode() if prefix.strip("/") else b""
    if base and raw_path != base and not raw_path.startswith(base + b"/"):
        raise PathError("the request path leaves the mount")
    if strip:
        rest = raw_path[len(base) :]
        prefix_path = (upstream_path or "/").encode()
        path = prefix_path if not rest else prefix_path.rstrip(b"/") + rest
    else:
        path = (upstream_path or "").rstrip("/").encode() + raw_path
    return path + b"?" + query_string if query_string else path


def _remove_dot_segments(segments: list[bytes]) -> list[bytes]:
    # RFC 3986 5.2.4 over segments, with `.` and `..` recognised after percent-decoding.
    # segments[0] is the empty segment before the leading '/'. Above the root -> PathError.
    output: list[bytes] = [b""]
    last = len(segments) - 1
    for i, segment in enumerate(segments[1:], start=1):
        kind = _dot_kind(segment)
        if kind == 0:
            output.append(segment)
            continue
        if kind == 2:
            if len(output) == 1:
                raise PathError("the request path goes above the root")
            output.pop()
        if i == last:
            output.append(b"")  # `/a/..` resolves to `/`, keeping the trailing slash
    return output


def _dot_kind(segment: bytes) -> int:
    if len(segment) > 6 or (b"." not in segment and b"%" not in segment):
        return 0
    decoded = _decode(segment)
    return 1 if decoded == b"." else 2 if decoded == b".." else 0


def _decode(segment: bytes) -> bytes:
    return unquote_to_bytes(segment) if b"%" in segment else segment


def _check_decoded(raw_path: bytes, prefix_segments: list[str]) -> None:
    # Second opinion, for upstreams that decode `%2F`, treat `\` as a separator or merge `//`
    # before resolving dot segments (nginx, Go's path.Clean): the path read their way must not
    # leave the prefix either.
    if b"%" not in raw_path and b"\\" not in raw_path and b"//" not in raw_path:
        return
    decoded = _decode(raw_path).replace(b"\\", b"/")
    parts = decoded.split(b"/")
    merged = [b"", *(part for part in parts[1:-1] if part), parts[-1]] if len(parts) > 1 else parts
    segments = _remove_dot_segments(merged)
    n = len(prefix_segments)
    if segments[:n] != [p.encode() for p in prefix_segments]:
        raise PathError("the request path leaves the mount")


def full_raw_path(scope: Mapping[str, Any]) -> bytes:
    """The whole path the client sent, escapes kept, whatever the mount convention.

    Starlette >= 0.33 leaves the full path in `scope["path"]` and `raw_path`; older routers
    stripped `path` but not `raw_path`. Servers without `raw_path` get the decoded path quoted.
    """
    root = scope.get("root_path", "")
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        path: str = scope["path"]
        return quote_path(path if path.startswith(root) else root + path)
    if root and not _decode(raw).startswith(root.encode("utf-8")):
        return quote_path(root) + raw
    return raw


def quote_path(path: str) -> bytes:
    """A target for a decoded path, for ASGI servers that give no `raw_path`."""
    return quote(path, safe=_PATH_SAFE).encode("ascii")
