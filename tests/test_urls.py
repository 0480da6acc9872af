"""The pure URL rules: parsing upstream strings and mapping request-targets (nginx U1-U20)."""

from __future__ import annotations

import pytest

from asgi_proxy_pass._urls import PathError, full_raw_path, map_target, parse_upstream


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "uds", "path", "host_header"),
    [
        ("http://b:3000", "http", "b", 3000, None, None, "b:3000"),
        ("http://b:3000/", "http", "b", 3000, None, "/", "b:3000"),
        ("http://b:3000/v2/", "http", "b", 3000, None, "/v2/", "b:3000"),
        ("http://b", "http", "b", 80, None, None, "b"),
        ("http://b:80/x", "http", "b", 80, None, "/x", "b"),
        ("https://b", "https", "b", 443, None, None, "b"),
        ("https://b:8443/", "https", "b", 8443, None, "/", "b:8443"),
        ("ws://b:1", "http", "b", 1, None, None, "b:1"),
        ("wss://b", "https", "b", 443, None, None, "b"),
        ("HTTP://B:1", "http", "b", 1, None, None, "b:1"),
        ("http://[::1]:8080/", "http", "::1", 8080, None, "/", "[::1]:8080"),
        ("http://unix:/run/app.sock", "http", "localhost", 80, "/run/app.sock", None, "localhost"),
        (
            "http://unix:/run/app.sock:/v2/",
            "http",
            "localhost",
            80,
            "/run/app.sock",
            "/v2/",
            "localhost",
        ),
        ("https://unix:/s.sock:/", "https", "localhost", 443, "/s.sock", "/", "localhost"),
    ],
)
def test_parse_upstream(
    url: str,
    scheme: str,
    host: str,
    port: int,
    uds: str | None,
    path: str | None,
    host_header: str,
) -> None:
    parsed = parse_upstream(url)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.uds, parsed.path) == (
        scheme,
        host,
        port,
        uds,
        path,
    )
    assert parsed.host_header == host_header


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://b", "expected an http://"),
        ("b:3000", "expected an http://"),
        ("http://", "has no host"),
        ("http://b:x/", "invalid URL"),
        ("http://b:99999/", "invalid URL"),
        ("http://b:0/", "port 0"),
        ("http://b/x/?y=1", "query string is not allowed"),
        ("http://b/#frag", "fragment is not allowed"),
        ("http://user:pw@b/", "credentials are not allowed"),
        ("http://unix:run.sock", "absolute path"),
        ("http://unix:/run.sock:v2", "must start with '/'"),
        ("http://unix:/run.sock:/x?y", "query or fragment"),
    ],
)
def test_parse_upstream_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^upstream: ") as info:
        parse_upstream(url)
    assert message in str(info.value)


def test_parse_upstream_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="upstream: expected a URL string"):
        parse_upstream(3)  # type: ignore[arg-type]


# (raw path, query, prefix, strip, upstream path) -> target. "strip" is the with-URI form.
MAPPINGS = [
    # The table: request /api/users?id=10 to an app mounted at /api.
    (b"/api/users", b"id=10", "/api", False, None, b"/api/users?id=10"),
    (b"/api/users", b"id=10", "/api", True, "/", b"/users?id=10"),
    (b"/api/users", b"id=10", "/api", True, "/v2/", b"/v2/users?id=10"),
    # Escapes are kept in both forms (nginx decodes %2F in the with-URI form: a deliberate
    # difference); the query goes byte for byte.
    (b"/api/a%2Fb", b"x=1", "/api", True, "/", b"/a%2Fb?x=1"),
    (b"/raw/a%2Fb", b"x=1", "/raw", False, None, b"/raw/a%2Fb?x=1"),
    (b"/api/%41%42", b"", "/api", True, "/", b"/%41%42"),
    (b"/api/a%20b", b"q=%2F", "/api", True, "/", b"/a%20b?q=%2F"),
    (b"/api/x", b"a=%zz", "/api", True, "/", b"/x?a=%zz"),
    (b"/api/\xc3\xbc", b"", "/api", True, "/", b"/\xc3\xbc"),
    (b"/api/~x!$&'()*,;=:@", b"", "/api", True, "/", b"/~x!$&'()*,;=:@"),
    # Slashes are not merged (nginx merges them; Caddy does not).
    (b"/api/a//b", b"", "/api", True, "/", b"/a//b"),
    # Dot segments resolve (U4), escapes kept around them.
    (b"/api/a/../b", b"", "/api", True, "/", b"/b"),
    (b"/api/./x", b"", "/api", True, "/", b"/x"),
    (b"/api/a/%2e%2e/b%2Fc", b"", "/api", True, "/", b"/b%2Fc"),
    (b"/api/x/..", b"", "/api", True, "/", b"/"),
    (b"/api/.", b"", "/api", True, "/v2/", b"/v2/"),
    # The no-URI form forwards the raw target once it is known to stay inside (U11).
    (b"/raw/a/../b", b"", "/raw", False, None, b"/raw/a/../b"),
    # The prefix itself, with and without a trailing slash.
    (b"/api", b"", "/api", True, "/v2/", b"/v2/"),
    (b"/api/", b"", "/api", True, "/v2/", b"/v2/"),
    (b"/api/", b"", "/api", True, "/x", b"/x/"),
    (b"/api/y", b"", "/api", True, "/x", b"/x/y"),
    (b"/api/y", b"", "/api/", True, "/", b"/y"),
    # Standalone at the root.
    (b"/users", b"", "", True, "/v2/", b"/v2/users"),
    (b"/", b"", "", True, "/", b"/"),
    (b"/users", b"", "", False, None, b"/users"),
    # strip_prefix=False with a URI: the URI is prepended to the whole path.
    (b"/api/users", b"", "/api", False, "/v2/", b"/v2/api/users"),
    # A decoded mount prefix matches its escaped spelling.
    (b"/ap%69/x", b"", "/api", True, "/", b"/x"),
    # Multi-segment mounts.
    (b"/a/b/c", b"", "/a/b", True, "/", b"/c"),
]


@pytest.mark.parametrize(("raw", "query", "prefix", "strip", "upath", "expected"), MAPPINGS)
def test_map_target(
    raw: bytes, query: bytes, prefix: str, strip: bool, upath: str | None, expected: bytes
) -> None:
    assert map_target(raw, query, prefix=prefix, strip=strip, upstream_path=upath) == expected


@pytest.mark.parametrize(
    ("raw", "prefix", "message"),
    [
        (b"/api/../admin", "/api", "leaves the mount"),
        (b"/api/%2e%2e/admin", "/api", "leaves the mount"),
        (b"/api/%2E%2E/admin", "/api", "leaves the mount"),
        (b"/api/.%2e/admin", "/api", "leaves the mount"),
        (b"/api/..", "/api", "leaves the mount"),
        (b"/api/../../x", "/api", "above the root"),
        (b"/../x", "", "above the root"),
        (b"/api/..%2f..%2fadmin", "/api", "above the root"),
        (b"/api/..%2Fadmin", "/api", "leaves the mount"),
        (b"/api/..\\admin", "/api", "leaves the mount"),
        (b"/api/..%5cadmin", "/api", "leaves the mount"),
        # Upstreams that merge slashes before resolving (nginx, Go) would climb out.
        (b"/api//..", "/api", "leaves the mount"),
        (b"/api/%2F..", "/api", "leaves the mount"),
        (b"/api/x//../..", "/api", "leaves the mount"),
        (b"/api/a%zzb", "/api", "invalid percent-encoding"),
        (b"/api/a%2", "/api", "invalid percent-encoding"),
        (b"/api/a%00b", "/api", "NUL"),
        (b"/apix/y", "/api", "leaves the mount"),
        (b"api/x", "", "must start with '/'"),
    ],
)
def test_map_target_refuses(raw: bytes, prefix: str, message: str) -> None:
    for strip, upath in ((True, "/"), (False, None)):
        with pytest.raises(PathError, match=message):
            map_target(raw, b"", prefix=prefix, strip=strip, upstream_path=upath)


def test_encoded_slash_inside_the_mount_is_allowed() -> None:
    # Decoded, `a/../b` stays inside: forwarded with its escapes.
    target = map_target(b"/api/a%2F..%2Fb", b"", prefix="/api", strip=True, upstream_path="/")
    assert target == b"/a%2F..%2Fb"


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"path": "/api/a/b", "raw_path": b"/api/a%2Fb", "root_path": "/api"}, b"/api/a%2Fb"),
        # An older router that stripped `path` but kept the full raw_path.
        ({"path": "/a/b", "raw_path": b"/api/a%2Fb", "root_path": "/api"}, b"/api/a%2Fb"),
        # A server whose raw_path lacks its root_path.
        ({"path": "/api/x", "raw_path": b"/x", "root_path": "/api"}, b"/api/x"),
        # No raw_path: the decoded path is quoted back.
        ({"path": "/api/a b", "root_path": "/api"}, b"/api/a%20b"),
        ({"path": "/a b", "root_path": "/api"}, b"/api/a%20b"),
        ({"path": "/x", "raw_path": b"/x"}, b"/x"),
    ],
)
def test_full_raw_path(scope: dict[str, object], expected: bytes) -> None:
    assert full_raw_path(scope) == expected
