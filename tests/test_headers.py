"""The pure header rules: hop-by-hop, Host, X-Forwarded-*, trusted proxies, redirects."""

from __future__ import annotations

from typing import Any

import pytest

from asgi_proxy_pass import UpstreamProtocolError
from asgi_proxy_pass._headers import (
    HeaderValue,
    Redirects,
    TrustedProxies,
    request_headers,
    response_headers,
)

NOBODY = TrustedProxies([])


def scope(*headers: tuple[bytes, bytes], client: str | None = "10.1.2.3", **kw: Any) -> Any:
    return {
        "type": "http",
        "scheme": kw.pop("scheme", "http"),
        "headers": [(b"host", b"front.example:8080"), *headers],
        "client": (client, 50000) if client else None,
        **kw,
    }


def build(
    s: dict[str, Any],
    *,
    trusted: TrustedProxies = NOBODY,
    preserve_host: bool = False,
    prefix: str | None = None,
    extra: list[tuple[bytes, HeaderValue]] | None = None,
) -> list[tuple[bytes, bytes]]:
    return request_headers(
        s,
        host=b"b:3000",
        preserve_host=preserve_host,
        trusted=trusted,
        prefix=prefix,
        extra=extra or [],
    )


def test_defaults() -> None:
    out = build(scope((b"accept", b"*/*"), (b"cookie", b"a=1"), (b"cookie", b"b=2")))
    assert out == [
        (b"host", b"b:3000"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"x-forwarded-for", b"10.1.2.3"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"front.example:8080"),
    ]


def test_hop_by_hop_dropped() -> None:
    out = build(
        scope(
            (b"connection", b"keep-alive, X-Hop"),
            (b"x-hop", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-authorization", b"Basic x"),
            (b"proxy-connection", b"keep-alive"),
            (b"te", b"trailers"),
            (b"trailer", b"x-t"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"expect", b"100-continue"),
            (b"content-length", b"5"),
            (b"x-kept", b""),
        )
    )
    names = [n for n, _ in out]
    assert names == [
        b"host",
        b"x-kept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    ]


def test_untrusted_forwarding_headers_dropped() -> None:
    out = build(
        scope(
            (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"evil.example"),
            (b"x-forwarded-port", b"1"),
            (b"x-forwarded-prefix", b"/admin"),
            (b"forwarded", b"for=1.2.3.4"),
            (b"x-real-ip", b"1.2.3.4"),
        )
    )
    assert out == [
        (b"host", b"b:3000"),
        (b"x-forwarded-for", b"10.1.2.3"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"front.example:8080"),
    ]


def test_trusted_chain_kept_and_extended() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    out = build(
        scope(
            (b"x-forwarded-for", b"1.1.1.1"),
            (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3"),
            (b"x-forwarded-for", b""),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"public.example"),
            (b"forwarded", b"for=1.1.1.1"),
            (b"x-real-ip", b"1.1.1.1"),
        ),
        trusted=trusted,
    )
    assert out == [
        (b"host", b"b:3000"),
        (b"forwarded", b"for=1.1.1.1"),
        (b"x-real-ip", b"1.1.1.1"),
        (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"public.example"),
    ]


def test_trust_is_per_peer() -> None:
    trusted = TrustedProxies(["127.0.0.1", "::1"])
    out = build(scope((b"x-forwarded-for", b"1.1.1.1"), client="10.9.9.9"), trusted=trusted)
    assert (b"x-forwarded-for", b"10.9.9.9") in out
    out = build(scope((b"x-forwarded-for", b"1.1.1.1"), client="::1"), trusted=trusted)
    assert (b"x-forwarded-for", b"1.1.1.1, ::1") in out


def test_no_client_address() -> None:
    # A unix-socket server gives no client: nothing to append, untrusted unless "unix".
    out = build(scope((b"x-forwarded-for", b"1.1.1.1"), client=None))
    assert [n for n, _ in out if n == b"x-forwarded-for"] == []
    out = build(
        scope((b"x-forwarded-for", b"1.1.1.1"), client=None), trusted=TrustedProxies(["unix"])
    )
    assert (b"x-forwarded-for", b"1.1.1.1") in out


def test_https_scheme_and_prefix() -> None:
    out = build(scope(scheme="https"), prefix="/api")
    assert (b"x-forwarded-proto", b"https") in out
    assert (b"x-forwarded-prefix", b"/api") in out


def test_preserve_host() -> None:
    assert build(scope(), preserve_host=True)[0] == (b"host", b"front.example:8080")
    no_host: dict[str, Any] = {"type": "http", "headers": [], "client": None}
    assert build(no_host, preserve_host=True)[0] == (b"host", b"b:3000")


def test_overrides() -> None:
    extra: list[tuple[bytes, HeaderValue]] = [
        (b"x-api-key", "secret"),
        (b"accept", None),
        (b"x-forwarded-for", ""),
        (b"x-client", lambda s: s["client"][0]),
        (b"x-none", lambda s: None),
        (b"x-raw", b"bytes"),
    ]
    out = build(scope((b"accept", b"*/*"), (b"x-api-key", b"client's")), extra=extra)
    assert out == [
        (b"host", b"b:3000"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"front.example:8080"),
        (b"x-api-key", b"secret"),
        (b"x-client", b"10.1.2.3"),
        (b"x-raw", b"bytes"),
    ]


@pytest.mark.parametrize("entry", ["nonsense", "10.0.0.0/33", "", "1.2.3.4.5"])
def test_trusted_proxies_rejects(entry: str) -> None:
    with pytest.raises(ValueError, match="^trusted_proxies: "):
        TrustedProxies([entry])


def test_trusted_proxies_rejects_a_bare_string() -> None:
    with pytest.raises(ValueError, match="^trusted_proxies: expected a list"):
        TrustedProxies("10.0.0.0/8")


def test_response_hop_by_hop_dropped_and_order_kept() -> None:
    upstream = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Trailer", b"X-T"),
        (b"Upgrade", b"h2c"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Encoding", b"gzip"),
        (b"Content-Length", b"10"),
        (b"X-Empty", b""),
    ]
    out = response_headers(upstream, redirects=None, client_base=lambda: b"")
    assert out == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"content-encoding", b"gzip"),
        (b"content-length", b"10"),
        (b"x-empty", b""),
    ]


REDIRECTS = Redirects([b"http://127.0.0.1:19001/two", b"http://127.0.0.1:19001/two"])


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        # nginx R3, with the client-facing base http://front.example:18080/redir.
        (
            b"location",
            b"http://127.0.0.1:19001/two/some/uri?q=1",
            b"http://front.example:18080/redir/some/uri?q=1",
        ),
        (
            b"content-location",
            b"http://127.0.0.1:19001/two/x",
            b"http://front.example:18080/redir/x",
        ),
        (b"location", b"http://127.0.0.1:19001/two", b"http://front.example:18080/redir/"),
        (b"location", b"http://127.0.0.1:19001/two?a", b"http://front.example:18080/redir?a"),
        (b"location", b"http://127.0.0.1:19001/other/uri", b"http://127.0.0.1:19001/other/uri"),
        (b"location", b"http://127.0.0.1:19001/twox", b"http://127.0.0.1:19001/twox"),
        (b"location", b"HTTP://127.0.0.1:19001/two/x", b"HTTP://127.0.0.1:19001/two/x"),
        (b"location", b"/two/rel", b"/two/rel"),
        (
            b"refresh",
            b"0; url=http://127.0.0.1:19001/two/some",
            b"0; url=http://front.example:18080/redir/some",
        ),
        (
            b"refresh",
            b"5;URL='http://127.0.0.1:19001/two/q'",
            b"5;URL='http://front.example:18080/redir/q'",
        ),
        (b"refresh", b"5", b"5"),
        (b"refresh", b"5; url=/two/x", b"5; url=/two/x"),
    ],
)
def test_redirect_rewrite(name: bytes, value: bytes, expected: bytes) -> None:
    base = b"http://front.example:18080/redir"
    out = response_headers([(name, value)], redirects=REDIRECTS, client_base=lambda: base)
    assert out == [(name, expected)]


def test_redirect_base_is_computed_only_on_a_match() -> None:
    def fail() -> bytes:
        raise AssertionError("not needed")

    out = response_headers([(b"location", b"/x")], redirects=REDIRECTS, client_base=fail)
    assert out == [(b"location", b"/x")]


def test_response_overrides() -> None:
    out = response_headers(
        [(b"server", b"gunicorn"), (b"x-a", b"1")],
        redirects=None,
        client_base=lambda: b"",
        extra=[(b"server", None), (b"x-frame-options", "DENY")],
        scope={},
    )
    assert out == [(b"x-a", b"1"), (b"x-frame-options", b"DENY")]


def test_computed_values_cannot_split_the_header_block(caplog: pytest.LogCaptureFixture) -> None:
    extra: list[tuple[bytes, HeaderValue]] = [(b"x-evil", lambda s: "a\r\nInjected: 1")]
    out = build(scope(), extra=extra)
    assert [n for n, _ in out if n in (b"x-evil", b"injected")] == []
    assert "CR, LF or NUL" in caplog.text


def test_response_transfer_encoding_dropped() -> None:
    upstream = [(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")]
    out = response_headers(upstream, redirects=None, client_base=lambda: b"")
    assert out == [(b"x-a", b"1")]


def test_response_with_both_framings_is_refused() -> None:
    upstream = [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")]
    with pytest.raises(UpstreamProtocolError, match="both Content-Length and Transfer-Encoding"):
        response_headers(upstream, redirects=None, client_base=lambda: b"")
