"""End to end: a client, uvicorn running the proxy, uvicorn running the upstream, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from servers import Running, echo_app, front, header_values, raw_http, read_body, serve

from asgi_proxy_pass import ProxyPass
from asgi_proxy_pass._types import Receive, Scope, Send


async def get_json(client: httpx2.AsyncClient, url: str, **kw: Any) -> dict[str, Any]:
    response = await client.get(url, **kw)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [("", "/api/users?id=10"), ("/", "/users?id=10"), ("/v2/", "/v2/users?id=10")],
)
async def test_uri_table(
    echo: Running, client: httpx2.AsyncClient, suffix: str, expected: str
) -> None:
    async with front(ProxyPass(echo.url + suffix)) as proxy:
        data = await get_json(client, proxy.url + "/api/users?id=10")
    assert data["target"] == expected


@pytest.mark.parametrize(
    ("suffix", "target", "expected"),
    [
        ("/", b"/api/a%2Fb?x=1&y=%2F", "/a%2Fb?x=1&y=%2F"),
        ("", b"/api/a%2Fb?x=1", "/api/a%2Fb?x=1"),
        ("/", b"/api/%41%42", "/%41%42"),
        ("/", b"/api/a/../b%2Fc", "/b%2Fc"),
        ("", b"/api/a/../b", "/api/a/../b"),
        ("/", b"/api/a//b", "/a//b"),
    ],
)
async def test_raw_target_kept(
    echo: Running, client: httpx2.AsyncClient, suffix: str, target: bytes, expected: str
) -> None:
    async with front(ProxyPass(echo.url + suffix)) as proxy:
        data = await get_json(client, proxy.url + "/", extensions={"target": target})
    assert data["target"] == expected


@pytest.mark.parametrize(
    "target",
    [b"/api/../admin", b"/api/%2e%2e/admin", b"/api/..%2fadmin", b"/api/..%5Cadmin", b"/api/a%zz"],
)
async def test_escapes_refused_without_reaching_upstream(
    client: httpx2.AsyncClient, target: bytes
) -> None:
    hits = []

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        hits.append(scope["path"])
        await echo_app(scope, receive, send)

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        response = await client.get(proxy.url + "/", extensions={"target": target})
    assert response.status_code == 400
    assert response.text == "400 Bad Request\n"
    assert hits == []


async def test_literal_strip_prefix_standalone(echo: Running, client: httpx2.AsyncClient) -> None:
    async with front(ProxyPass(echo.url + "/v2/", strip_prefix="/api"), mount=None) as proxy:
        data = await get_json(client, proxy.url + "/api/x?q")
        outside = await client.get(proxy.url + "/other")
    assert data["target"] == "/v2/x?q"
    assert header_values(data, "x-forwarded-prefix") == ["/api"]
    assert outside.status_code == 404


async def test_request_headers(echo: Running) -> None:
    async with front(ProxyPass(echo.url + "/")) as proxy:
        status, _, body = await raw_http(
            proxy.port,
            b"GET /api/h HTTP/1.1\r\nHost: Front.Example:8080\r\nConnection: close, X-Hop\r\n"
            b"X-Hop: 1\r\nCookie: a=1\r\nCookie: b=2\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"X-Real-IP: 6.6.6.6\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\n"
            b"X-Empty:\r\n\r\n",
        )
    assert status == 200
    data = json.loads(body)
    assert data["headers"] == [
        ["host", echo.url.removeprefix("http://")],
        ["cookie", "a=1"],
        ["cookie", "b=2"],
        ["x-empty", ""],
        ["x-forwarded-for", "127.0.0.1"],
        ["x-forwarded-proto", "http"],
        ["x-forwarded-host", "Front.Example:8080"],
        ["x-forwarded-prefix", "/api"],
    ]
    # No User-Agent, Accept, Accept-Encoding or Connection added by the HTTP client library.
    assert data["http_version"] == "1.1"


async def test_trusted_proxy_chain(echo: Running, client: httpx2.AsyncClient) -> None:
    proxy = ProxyPass(echo.url + "/", trusted_proxies=["127.0.0.0/8"])
    async with front(proxy) as running:
        data = await get_json(
            client,
            running.url + "/api/",
            headers={"X-Forwarded-For": "1.2.3.4", "X-Forwarded-Proto": "https"},
        )
    assert header_values(data, "x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert header_values(data, "x-forwarded-proto") == ["https"]


async def test_preserve_host_and_set_headers(echo: Running, client: httpx2.AsyncClient) -> None:
    proxy = ProxyPass(
        echo.url + "/",
        preserve_host=True,
        request_headers={
            "X-Api-Key": "k",
            "User-Agent": None,
            "X-Path": lambda scope: scope["path"],
        },
    )
    async with front(proxy) as running:
        data = await get_json(client, running.url + "/api/p", headers={"Host": "public.example"})
    assert header_values(data, "host") == ["public.example"]
    assert header_values(data, "x-api-key") == ["k"]
    assert header_values(data, "user-agent") == []
    assert header_values(data, "x-path") == ["/api/p"]


async def test_response_headers_and_cookies(client: httpx2.AsyncClient) -> None:
    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"set-cookie", b"a=1; Path=/"),
            (b"set-cookie", b"b=2; Path=/"),
            (b"connection", b"X-Secret"),
            (b"x-secret", b"s"),
            (b"keep-alive", b"timeout=5"),
            (b"location", b"http://%s/v2/next?x=1" % scope["headers"][0][1]),
            (b"content-length", b"2"),
        ]
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async with serve(upstream) as up, front(ProxyPass(up.url + "/v2/")) as proxy:
        response = await client.get(proxy.url + "/api/x", headers={"Host": "front.example"})
    assert response.status_code == 302
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert "x-secret" not in response.headers
    assert "keep-alive" not in response.headers
    assert response.headers["location"] == "http://front.example/api/next?x=1"


async def test_no_cookie_jar_between_users(client: httpx2.AsyncClient) -> None:
    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/login":
            headers = [(b"set-cookie", b"session=alice"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
        else:
            await echo_app(scope, receive, send)

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        async with httpx2.AsyncClient() as alice, httpx2.AsyncClient() as bob:
            await alice.get(proxy.url + "/api/login")
            data = await get_json(bob, proxy.url + "/api/me")
    assert header_values(data, "cookie") == []


async def test_environment_proxies_ignored(
    echo: Running, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    async with front(ProxyPass(echo.url + "/")) as proxy:
        data = await get_json(client, proxy.url + "/api/x")
    assert data["target"] == "/x"


async def test_streaming_request_body(client: httpx2.AsyncClient) -> None:
    first_chunk_seen = asyncio.Event()
    received: list[bytes] = []

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            received.append(message.get("body", b""))
            if received[-1]:
                first_chunk_seen.set()
            if not message.get("more_body"):
                break
        size = b"%d" % sum(map(len, received))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": size})

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        # The upstream must see the first chunk before the client sends the rest.
        await asyncio.wait_for(first_chunk_seen.wait(), 5)
        yield b"b" * 1000

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        response = await client.post(proxy.url + "/api/upload", content=body())
    assert response.text == "2000"


async def test_streaming_response_body(client: httpx2.AsyncClient) -> None:
    client_got_first = asyncio.Event()

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await asyncio.wait_for(client_got_first.wait(), 5)
        await send({"type": "http.response.body", "body": b"data: 2\n\n"})

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        async with client.stream("GET", proxy.url + "/api/events") as response:
            chunks = []
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
                client_got_first.set()
    assert chunks == [b"data: 1\n\n", b"data: 2\n\n"]


@pytest.mark.parametrize("chunked", [False, True])
async def test_request_framing_kept(echo: Running, chunked: bool) -> None:
    if chunked:
        framing, body = b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"
    else:
        framing, body = b"Content-Length: 5\r\n", b"hello"
    async with front(ProxyPass(echo.url + "/")) as proxy:
        status, _, response = await raw_http(
            proxy.port,
            b"POST /api/u HTTP/1.1\r\nHost: f\r\nConnection: close\r\n" + framing + b"\r\n" + body,
        )
    assert status == 200
    data = json.loads(response)
    assert data["body"] == "hello"
    if chunked:
        assert header_values(data, "transfer-encoding") == ["chunked"]
        assert header_values(data, "content-length") == []
    else:
        assert header_values(data, "content-length") == ["5"]
        assert header_values(data, "transfer-encoding") == []


async def test_expect_100_continue(echo: Running) -> None:
    async with front(ProxyPass(echo.url + "/")) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            b"POST /api/u HTTP/1.1\r\nHost: f\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    data = json.loads(response.partition(b"\r\n\r\n")[2])
    assert data["body"] == "hello"
    assert header_values(data, "expect") == []


async def test_large_upload_and_download_byte_exact(client: httpx2.AsyncClient) -> None:
    payload = bytes(range(256)) * 40_000  # 10 MB

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(0, len(body), 1 << 20):
            await send(
                {"type": "http.response.body", "body": body[i : i + (1 << 20)], "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        response = await client.post(proxy.url + "/api/echo", content=payload)
    assert response.content == payload


async def test_gzip_passthrough(client: httpx2.AsyncClient) -> None:
    compressed = gzip.compress(b"hello world " * 100)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-encoding", b"gzip"),
            (b"content-length", b"%d" % len(compressed)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": compressed})

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        async with client.stream("GET", proxy.url + "/api/z") as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert raw == compressed
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(len(compressed))


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_no_body(client: httpx2.AsyncClient, method: str, status: int) -> None:
    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"etag", b'"x"')]
        if status == 200:
            headers.append((b"content-length", b"11"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if status != 200 else b"hello world"})

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        response = await client.request(method, proxy.url + "/api/x")
    assert response.status_code == status
    assert response.content == b""
    assert response.headers["etag"] == '"x"'
    if status == 200:
        assert response.headers["content-length"] == "11"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_refused_is_502(
    client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    async with front(ProxyPass(f"http://127.0.0.1:{port}/")) as proxy:
        response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 502
    assert response.text == "502 Bad Gateway\n"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    [record] = [r for r in caplog.records if r.name == "asgi_proxy_pass"]
    assert record.levelno == logging.ERROR
    assert f"127.0.0.1:{port}" in record.getMessage()
    assert "answered 502" in record.getMessage()


async def test_dns_failure_is_502(client: httpx2.AsyncClient) -> None:
    async with front(ProxyPass("http://no-such-host.invalid:1/")) as proxy:
        response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 502


async def test_read_timeout_is_504(
    client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()

    async with serve(upstream) as up:
        async with front(ProxyPass(up.url + "/", timeout=0.3)) as proxy:
            response = await client.get(proxy.url + "/api/slow")
        release.set()
    assert response.status_code == 504
    assert response.text == "504 Gateway Timeout\n"
    assert "ReadTimeout" in caplog.text


async def test_quiet_stream_survives_default_timeouts() -> None:
    proxy = ProxyPass("http://127.0.0.1:1/")
    # An SSE stream that is quiet for 10 s must survive: read/write are per operation, 60 s.
    assert proxy.timeout.read == 60.0 and proxy.timeout.write == 60.0
    assert proxy.timeout.connect == 10.0


async def test_invalid_upstream_response_is_502(client: httpx2.AsyncClient) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, front(ProxyPass(f"http://127.0.0.1:{port}/")) as proxy:
        response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 502


async def test_upstream_dies_mid_body_aborts_client(
    client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, front(ProxyPass(f"http://127.0.0.1:{port}/")) as proxy:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(proxy.url + "/api/x")
        # The proxy keeps serving.
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(proxy.url + "/api/x")
    assert "aborted the client connection" in caplog.text


async def test_chunked_upstream_dies_mid_body_aborts_client(client: httpx2.AsyncClient) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, front(ProxyPass(f"http://127.0.0.1:{port}/")) as proxy:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(proxy.url + "/api/x")


async def test_client_disconnect_releases_upstream(client: httpx2.AsyncClient) -> None:
    upstream_saw_disconnect = asyncio.Event()

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        upstream_saw_disconnect.set()

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        async with client.stream("GET", proxy.url + "/api/forever") as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(upstream_saw_disconnect.wait(), 5)


async def test_client_disconnect_during_upload_aborts_upstream() -> None:
    upstream_saw_disconnect = asyncio.Event()
    got_first = asyncio.Event()

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                upstream_saw_disconnect.set()
                return
            if message.get("body"):
                got_first.set()

    async with serve(upstream) as up, front(ProxyPass(up.url + "/")) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /api/u HTTP/1.1\r\nHost: f\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.wait_for(got_first.wait(), 5)
        writer.close()
        # The upstream sees the body cut short, never a complete request.
        await asyncio.wait_for(upstream_saw_disconnect.wait(), 5)


async def test_max_body_size(echo: Running, client: httpx2.AsyncClient) -> None:
    hits = []

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        hits.append(scope["path"])
        await echo_app(scope, receive, send)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 4

    async with serve(upstream) as up, front(ProxyPass(up.url + "/", max_body_size=10)) as proxy:
        too_long = await client.post(proxy.url + "/api/a", content=b"x" * 11)
        fits = await client.post(proxy.url + "/api/b", content=b"x" * 10)
        streamed = await client.post(proxy.url + "/api/c", content=chunks())
    assert too_long.status_code == 413
    assert fits.status_code == 200
    assert streamed.status_code == 413
    assert "/a" not in hits  # decided from Content-Length, upstream not contacted


async def test_lifespan_as_root_app(echo: Running, client: httpx2.AsyncClient) -> None:
    proxy = ProxyPass(echo.url)
    async with front(proxy, mount=None, lifespan="on") as running:
        data = await get_json(client, running.url + "/x?y=1")
        assert proxy.pool._transports
    assert data["target"] == "/x?y=1"
    assert not proxy.pool._transports  # closed by lifespan shutdown


async def test_unix_socket_upstream(tmp_path: Any, client: httpx2.AsyncClient) -> None:
    path = str(tmp_path / "up.sock")
    async with serve(echo_app, uds=path), front(ProxyPass(f"http://unix:{path}:/u/")) as proxy:
        data = await get_json(client, proxy.url + "/api/a%2Fb?x=1")
    assert data["target"] == "/u/a%2Fb?x=1"
    assert header_values(data, "host") == ["localhost"]


async def test_unix_socket_front_without_client(tmp_path: Any, echo: Running) -> None:
    path = str(tmp_path / "front.sock")
    proxy = ProxyPass(echo.url + "/")
    async with front(proxy, uds=path):
        transport = httpx2.AsyncHTTPTransport(uds=path)
        async with httpx2.AsyncClient(transport=transport) as c:
            data = await get_json(c, "http://front/api/x", headers={"X-Forwarded-For": "1.1.1.1"})
    assert header_values(data, "x-forwarded-for") == []


async def test_absolute_form_target_does_not_change_the_upstream(echo: Running) -> None:
    async with front(ProxyPass(echo.url + "/")) as proxy:
        status, _, body = await raw_http(
            proxy.port,
            b"GET http://other.example/api/abs?x=1 HTTP/1.1\r\nHost: front.example\r\n"
            b"Connection: close\r\n\r\n",
        )
    assert status == 200
    data = json.loads(body)
    assert data["target"] == "/abs?x=1"
    assert header_values(data, "host") == [echo.url.removeprefix("http://")]
    assert header_values(data, "x-forwarded-host") == ["front.example"]


async def test_http10_client_without_host(echo: Running) -> None:
    async with front(ProxyPass(echo.url + "/")) as proxy:
        status, _, body = await raw_http(proxy.port, b"GET /api/old HTTP/1.0\r\n\r\n")
    assert status == 200
    data = json.loads(body)
    assert data["target"] == "/old"
    assert data["http_version"] == "1.1"
    assert header_values(data, "host") == [echo.url.removeprefix("http://")]
    assert header_values(data, "x-forwarded-host") == []


async def test_redirects_use_trusted_forwarded_host_and_proto(client: httpx2.AsyncClient) -> None:
    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        host = dict(scope["headers"])[b"host"]
        headers = [(b"location", b"http://%s/v2/next" % host), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.example"}
    async with serve(upstream) as up:
        trusting = ProxyPass(up.url + "/v2/", trusted_proxies=["127.0.0.1"])
        async with front(trusting) as proxy:
            behind_lb = await client.get(proxy.url + "/api/x", headers=forwarded)
        async with front(ProxyPass(up.url + "/v2/")) as proxy:
            spoofed = await client.get(proxy.url + "/api/x", headers=forwarded)
    assert behind_lb.headers["location"] == "https://public.example/api/next"
    assert spoofed.headers["location"] == f"http://127.0.0.1:{proxy.port}/api/next"


async def test_error_answer_is_not_logged_as_a_client_disconnect(
    client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_proxy_pass")
    release = asyncio.Event()

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()

    async with serve(upstream) as up:
        async with front(ProxyPass(up.url + "/", timeout=0.2)) as proxy:
            response = await client.post(proxy.url + "/api/slow", content=b"x")
        release.set()
    assert response.status_code == 504
    assert "499" not in caplog.text


class _Late:
    """Stands in for an `Exchange`: counts the disconnect listeners it is asked to start."""

    def __init__(self) -> None:
        self.watched = 0

    def watch(self) -> None:
        self.watched += 1


async def test_slow_exchanges_get_a_listener_after_one_to_two_ticks() -> None:
    from asgi_proxy_pass._http import WATCH_AFTER, SlowExchanges

    slow = SlowExchanges()
    loop = asyncio.get_running_loop()
    quick, late, later = _Late(), _Late(), _Late()
    slow.add(quick, loop)  # type: ignore[arg-type]
    slow.add(late, loop)  # type: ignore[arg-type]
    assert slow.timer is not None
    slow.timer.cancel()  # the ticks by hand, then the timer's own
    slow.discard(quick)  # over before the first tick
    slow.tick()
    slow.add(later, loop)  # type: ignore[arg-type]
    assert (quick.watched, late.watched, later.watched) == (0, 0, 0)  # one tick: still young
    slow.tick()
    assert (quick.watched, late.watched, later.watched) == (0, 1, 0)
    assert slow.timer is not None  # `later` is left
    await asyncio.sleep(WATCH_AFTER * 4)
    assert (quick.watched, late.watched, later.watched) == (0, 1, 1)
    assert slow.timer is None  # nothing left: the timer stops

    # Another event loop (the first one's timer died with it) starts afresh.
    other = asyncio.new_event_loop()
    try:
        slow.add(_Late(), other)  # type: ignore[arg-type]
        assert slow.loop is other and len(slow.young) == 1 and slow.timer is not None
        slow.timer.cancel()
    finally:
        other.close()


async def test_a_deadline_pushed_back_expires_once_after_the_last_push() -> None:
    from asgi_proxy_pass._deadline import Deadline

    expired: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, lambda: expired.append(loop.time()))
    start = loop.time()
    for _ in range(4):  # pushed back every 0.05 s: due 0.5 s after the last push, at 0.65 s
        deadline.set(0.5)
        await asyncio.sleep(0.05)
    assert expired == []
    await asyncio.sleep(0.6)
    assert len(expired) == 1 and expired[0] - start >= 0.65
    deadline.set(0.05)
    deadline.clear()  # nothing expires until the next set()
    await asyncio.sleep(0.1)
    assert len(expired) == 1
    deadline.set(10)
    deadline.cancel()
    assert deadline.handle is None
