"""Hostile clients: malformed or smuggling framing, header abuse, paths that try to leave the
mount, spoofed forwarding headers; and property tests of the pure rules."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import Running, echo_app, front, header_values, raw_http, serve

from asgi_proxy_pass import ProxyPass
from asgi_proxy_pass._headers import (
    FORWARDING,
    HOP_BY_HOP,
    TrustedProxies,
    request_headers,
    response_headers,
)
from asgi_proxy_pass._types import Receive, Scope, Send
from asgi_proxy_pass._urls import PathError, map_target

HEAD = b"Host: f\r\nConnection: close\r\n"


@pytest.fixture
async def counted() -> Any:
    """An echo upstream that counts the requests reaching it."""
    hits: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        hits.append(scope["path"])
        await echo_app(scope, receive, send)

    async with serve(app) as up:
        yield up, hits


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # Smuggling: conflicting framing is refused before anything reaches the upstream.
        (
            b"POST /api/x HTTP/1.1\r\n"
            + HEAD
            + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /api/x HTTP/1.1\r\n"
            + HEAD
            + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
        ),
        (
            b"POST /api/x HTTP/1.1\r\n"
            + HEAD
            + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            501,
        ),
        (b"POST /api/x HTTP/1.1\r\n" + HEAD + b"Content-Length: +5\r\n\r\nhello", 400),
        # CR, LF and NUL inside header values; malformed header lines.
        (b"GET /api/x HTTP/1.1\r\n" + HEAD + b"X-A: a\rb\r\n\r\n", 400),
        (b"GET /api/x HTTP/1.1\r\n" + HEAD + b"X-A: a\x00b\r\n\r\n", 400),
        (b"GET /api/x HTTP/1.1\r\n" + HEAD + b"X-A : 1\r\n\r\n", 400),
        (b"GET /api/x HTTP/1.1\r\n" + HEAD + b"X-A: 1\r\n folded\r\n\r\n", 400),
        # Two Hosts: which one would the upstream believe?
        (b"GET /api/x HTTP/1.1\r\n" + HEAD + b"Host: g\r\n\r\n", 400),
        # Oversized and too many headers.
        (b"GET /api/x HTTP/1.1\r\n" + HEAD + b"X-A: " + b"a" * 40_000 + b"\r\n\r\n", 431),
        (
            b"GET /api/x HTTP/1.1\r\n"
            + HEAD
            + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
            + b"\r\n",
            431,
        ),
        # Paths that try to leave the mount; invalid percent-encoding.
        (b"GET /api/../admin HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
        (b"GET /api/%2e%2e/admin HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
        (b"GET /api/%2E%2e%2Fadmin HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
        (b"GET /api/..%2Fadmin HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
        (b"GET /api/..\\admin HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
        (b"GET /api/..%5Cadmin HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
        (b"GET /api/a%zz HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
        (b"GET /api/a%00 HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
    ],
)
async def test_refused_before_reaching_the_upstream(
    counted: tuple[Running, list[str]], request_bytes: bytes, status: int
) -> None:
    up, hits = counted
    async with front(ProxyPass(up.url + "/")) as proxy:
        answered, _, _ = await raw_http(proxy.port, request_bytes)
        # The proxy keeps serving.
        ok, _, _ = await raw_http(proxy.port, b"GET /api/fine HTTP/1.1\r\n" + HEAD + b"\r\n")
    assert answered == status
    assert ok == 200
    assert hits == ["/fine"]


async def test_limits_are_configurable(counted: tuple[Running, list[str]]) -> None:
    up, _ = counted
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
    proxy = ProxyPass(up.url + "/", max_headers=200, max_header_size=64 * 1024)
    async with front(proxy) as running:
        status, _, _ = await raw_http(
            running.port, b"GET /api/x HTTP/1.1\r\n" + HEAD + many + b"\r\n"
        )
    assert status == 200


async def test_forwarding_header_lookalikes_never_cross(echo: Running) -> None:
    trusted = ProxyPass(echo.url + "/", trusted_proxies=["127.0.0.1"])
    async with front(trusted) as proxy:
        _, _, body = await raw_http(
            proxy.port,
            b"GET /api/x HTTP/1.1\r\n"
            + HEAD
            + b"X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n"
            b"X_Other: kept\r\n\r\n",
        )
    data = json.loads(body)
    assert header_values(data, "x_forwarded_for") == []
    assert header_values(data, "x_real_ip") == []
    assert header_values(data, "x_other") == ["kept"]


async def test_spoofed_forwarding_headers_from_an_untrusted_peer(echo: Running) -> None:
    async with front(ProxyPass(echo.url + "/")) as proxy:
        _, _, body = await raw_http(
            proxy.port,
            b"GET /api/x HTTP/1.1\r\n" + HEAD + b"X-Forwarded-For: 6.6.6.6\r\n"
            b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
            b"Forwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\n\r\n",
        )
    data = json.loads(body)
    assert header_values(data, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(data, "x-forwarded-proto") == ["http"]
    assert header_values(data, "x-forwarded-host") == ["f"]
    assert header_values(data, "forwarded") == []
    assert header_values(data, "x-real-ip") == []


# Property tests of the pure parts.

segment = st.one_of(
    st.sampled_from(
        ["..", ".", "%2e%2e", "%2E.", ".%2e", "%2f", "%2F..", "..%2f", "%5c", "\\", ""]
    ),
    st.text(alphabet="abcxyz%2fFeE.\\-_~", min_size=1, max_size=6),
)


@given(st.lists(segment, max_size=8), st.sampled_from(["/api", "/a/b", ""]))
@settings(max_examples=500, deadline=None)
def test_forwarded_path_stays_under_the_mapped_prefix(parts: list[str], prefix: str) -> None:
    raw = (prefix + "/" + "/".join(parts)).encode()
    try:
        target = map_target(raw, b"", prefix=prefix, strip=True, upstream_path="/v2/")
    except PathError:
        return
    assert target.startswith(b"/v2/")
    # Resolved as a decoding upstream would (escapes decoded, backslashes as slashes), the path
    # never climbs above /v2/.
    from urllib.parse import unquote_to_bytes

    depth = 0
    for part in unquote_to_bytes(target[len(b"/v2/") :]).replace(b"\\", b"/").split(b"/"):
        if part == b"..":
            depth -= 1
            assert depth >= 0, target
        elif part not in (b"", b"."):
            depth += 1


header_name = st.one_of(
    st.sampled_from(sorted(n.decode() for n in HOP_BY_HOP | FORWARDING))
    .map(lambda n: n.upper() if len(n) % 2 else n)
    .map(str.lower),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12),
)
header = st.tuples(
    header_name.map(str.encode), st.binary(max_size=20).filter(lambda v: b"\r" not in v)
)


@given(st.lists(header, max_size=12), st.booleans())
@settings(max_examples=300, deadline=None)
def test_hop_by_hop_and_untrusted_forwarding_never_cross(
    headers: list[tuple[bytes, bytes]], with_connection: bool
) -> None:
    if with_connection:
        headers.append((b"connection", b"x-secret, keep-alive"))
        headers.append((b"x-secret", b"1"))
    scope = {"type": "http", "headers": headers, "client": ("10.0.0.1", 1), "scheme": "http"}
    out = request_headers(
        scope, host=b"b", preserve_host=False, trusted=TrustedProxies([]), prefix=None, extra=[]
    )
    names = [n for n, _ in out]
    assert not set(names) & HOP_BY_HOP
    if with_connection:
        assert b"x-secret" not in names
    for name, value in out:
        if name in FORWARDING:
            # Only our own values: the direct peer, the scheme, the client's Host.
            assert (name, value) in {
                (b"x-forwarded-for", b"10.0.0.1"),
                (b"x-forwarded-proto", b"http"),
            } or name == b"x-forwarded-host"
    response = response_headers(headers, redirects=None, client_base=lambda: b"")
    assert not {n for n, _ in response} & HOP_BY_HOP


async def test_slow_consumer_bounds_what_is_in_flight(client: Any) -> None:
    # The client stops reading while the upstream could stream 4 GiB: backpressure must stall
    # the upstream after a few socket buffers, not fill the proxy's memory.
    sent = 0
    chunk = b"x" * (1 << 20)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal sent
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(4096):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
        await send({"type": "http.response.body", "body": b""})

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        async with client.stream("GET", proxy.url + "/api/huge") as response:
            assert response.status_code == 200
            stream = response.aiter_raw()
            await anext(stream)
            # Wait until the upstream stops making progress (it is blocked on backpressure).
            previous = -1
            while sent != previous:
                previous = sent
                await asyncio.sleep(0.5)
            assert sent < 64 * (1 << 20), f"{sent / (1 << 20):.0f} MiB in flight"
