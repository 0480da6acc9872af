"""The WebSocket relay, end to end: a websockets client -> uvicorn + ProxyPass -> a websockets
upstream, all on 127.0.0.1; plus table tests for the pure handshake and close-code rules."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from servers import serve
from starlette.applications import Starlette
from starlette.routing import Mount
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.streams import StreamReader
from ws_servers import (
    describe,
    echo,
    header_values,
    raw_frame,
    scripted_upstream,
    silent_server,
    ws_upstream,
)

from asgi_proxy_pass import BadRequest, ProxyPass
from asgi_proxy_pass import Upstream as PoolOf
from asgi_proxy_pass._types import ASGIApp, Receive, Scope, Send
from asgi_proxy_pass._urls import parse_upstream
from asgi_proxy_pass._websocket import handshake_headers, handshake_uri
from asgi_proxy_pass._ws_close import client_close, upstream_close, wire_close
from asgi_proxy_pass._ws_frames import MaskingKeys, client_frame, frame_bounds
from asgi_proxy_pass._ws_upstream import UpstreamConnection


@asynccontextmanager
async def front(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` with uvicorn (its default WebSocket implementation); yield its ws:// URL."""
    async with serve(app) as running:
        yield running.url.replace("http://", "ws://", 1)
    if isinstance(app, ProxyPass):
        await app.aclose()


def open_ws(url: str, **options: Any) -> connect:
    options.setdefault("open_timeout", 10)
    return connect(url, proxy=None, **options)


async def closed_by_peer(ws: ClientConnection) -> Close:
    """Wait for the proxy to close this client; the close frame it sent."""
    with pytest.raises(ConnectionClosed) as info:
        with anyio.fail_after(10):
            await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd


# Messages


@pytest.mark.parametrize("compression", ["deflate", None])
async def test_echo_text_binary_and_empty_messages(compression: str | None) -> None:
    # Compressed, websockets frames each message; uncompressed, the upstream connection does.
    async with ws_upstream() as up:
        async with front(ProxyPass(up.url, websocket_compression=compression)) as url:
            async with open_ws(url + "/chat") as ws:
                for message in ["hello", b"\x00\xff\x80", "", b"", "ü€😀"]:
                    await ws.send(message)
                    assert await ws.recv() == message  # str stays str, bytes stay bytes
        assert up.requests[0].path == "/chat"


async def test_one_mebibyte_messages_both_types() -> None:
    big = bytes(range(256)) * 4096
    async with ws_upstream(max_size=None) as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url, max_size=None) as ws:
            await ws.send(big)
            assert await ws.recv() == big
            await ws.send("x" * len(big))
            assert await ws.recv() == "x" * len(big)


async def test_client_message_over_max_size_closes_both_sides_with_1009(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ws_upstream() as up, front(ProxyPass(up.url, websocket_max_size=1000)) as url:
        async with open_ws(url) as ws:
            await ws.send(b"x" * 1000)
            assert await ws.recv() == b"x" * 1000
            await ws.send("é" * 501)  # 1002 bytes of UTF-8
            assert (await closed_by_peer(ws)).code == 1009
        assert await up.next_close() == (1009, "message too big")
    assert "larger than websocket_max_size (1000 bytes)" in caplog.text


async def test_upstream_message_over_max_size_closes_both_sides_with_1009(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def big(ws: ServerConnection) -> None:
        await ws.send(b"y" * 2000)
        await echo(ws)

    async with ws_upstream(big) as up, front(ProxyPass(up.url, websocket_max_size=1000)) as url:
        async with open_ws(url) as ws:
            close = await closed_by_peer(ws)
            assert (close.code, close.reason) == (1009, "message too big")
        code, _ = await up.next_close()
        assert code == 1009
    assert "upstream 127.0.0.1:" in caplog.text and "websocket_max_size" in caplog.text


# Handshake: subprotocols and headers


async def test_subprotocol_chosen_by_upstream_is_accepted() -> None:
    async with ws_upstream(describe, subprotocols=["v2"]) as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url, subprotocols=["v1", "v2"]) as ws:
            assert ws.subprotocol == "v2"
            seen = json.loads(await ws.recv())
    assert header_values(seen, "sec-websocket-protocol") == ["v1, v2"]
    assert seen["subprotocol"] == "v2"


async def test_no_subprotocol_when_upstream_picks_none() -> None:
    async with ws_upstream(describe) as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url, subprotocols=["v1"]) as ws:
            assert ws.subprotocol is None
            assert json.loads(await ws.recv())["subprotocol"] is None
        async with open_ws(url) as ws:
            seen = json.loads(await ws.recv())
            assert header_values(seen, "sec-websocket-protocol") == []


async def test_end_to_end_headers_reach_upstream_handshake_headers_do_not() -> None:
    async with ws_upstream(describe) as up:
        proxy = ProxyPass(up.url, websocket_compression=None)
        async with front(proxy) as url:
            headers = {"Cookie": "a=1", "Authorization": "Bearer t0k", "X-Custom": "yes"}
            async with open_ws(
                url + "/room?x=1",
                additional_headers=headers,
                origin="https://app.example",
                user_agent_header="test-agent/1",
                compression="deflate",
            ) as ws:
                seen = json.loads(await ws.recv())
                assert ws.request is not None
                client_key = ws.request.headers["Sec-WebSocket-Key"]
    host = up.url.removeprefix("http://")
    assert seen["target"] == "/room?x=1"
    assert seen["headers"][0] == ["host", host]
    assert header_values(seen, "host") == [host]
    assert header_values(seen, "cookie") == ["a=1"]
    assert header_values(seen, "authorization") == ["Bearer t0k"]
    assert header_values(seen, "x-custom") == ["yes"]
    assert header_values(seen, "origin") == ["https://app.example"]
    assert header_values(seen, "user-agent") == ["test-agent/1"]
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    # The client offered permessage-deflate; the proxy (compression=None) offers nothing.
    assert header_values(seen, "sec-websocket-extensions") == []
    assert header_values(seen, "sec-websocket-version") == ["13"]
    assert header_values(seen, "sec-websocket-key") != [client_key]
    assert header_values(seen, "upgrade") == ["websocket"]


async def test_compression_is_negotiated_by_the_proxy_itself() -> None:
    async with ws_upstream(describe) as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url, compression=None, user_agent_header=None) as ws:
            seen = json.loads(await ws.recv())
            await ws.send("z" * 10_000)
            assert await ws.recv() == "z" * 10_000
    # Offered by the proxy's own websockets client, though the client offered none.
    assert len(header_values(seen, "sec-websocket-extensions")) == 1
    assert header_values(seen, "sec-websocket-extensions")[0].startswith("permessage-deflate")
    assert header_values(seen, "user-agent") == []  # none from the client, none added


async def test_upstream_handshake_response_headers_reach_the_client() -> None:
    def cookies(ws: ServerConnection, request: Request, response: Response) -> None:
        response.headers["Set-Cookie"] = "a=1; Path=/"
        response.headers["Set-Cookie"] = "b=2"
        response.headers["X-Upstream"] = "yes"

    async with ws_upstream(process_response=cookies) as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url) as ws:
            assert ws.response is not None
            assert ws.response.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=2"]
            assert ws.response.headers["X-Upstream"] == "yes"
            assert len(ws.response.headers.get_all("Sec-WebSocket-Accept")) == 1
            await ws.send("ok")
            assert await ws.recv() == "ok"


async def test_prefix_is_stripped_under_a_starlette_mount() -> None:
    async with ws_upstream(describe) as up:
        proxy = ProxyPass(up.url + "/chat/")
        async with front(Starlette(routes=[Mount("/ws", app=proxy)])) as url:
            async with open_ws(url + "/ws/room/1?token=a%2Fb") as ws:
                seen = json.loads(await ws.recv())
        await proxy.aclose()
    assert seen["target"] == "/chat/room/1?token=a%2Fb"
    assert header_values(seen, "x-forwarded-prefix") == ["/ws"]


# Close handshakes


@pytest.mark.parametrize(
    ("code", "reason"), [(4001, "bye"), (1000, ""), (1001, "restart"), (1011, "oops")]
)
async def test_upstream_close_code_and_reason_reach_the_client(code: int, reason: str) -> None:
    async def close_after_hello(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.close(code, reason)

    async with ws_upstream(close_after_hello) as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url) as ws:
            await ws.send("hello")
            close = await closed_by_peer(ws)
            assert (close.code, close.reason) == (code, reason)


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (4002, "done"), (1001, "tab closed")])
async def test_client_close_code_and_reason_reach_the_upstream(code: int, reason: str) -> None:
    async with ws_upstream() as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.close(code, reason)
        assert await up.next_close() == (code, reason)


async def test_upstream_lost_without_close_frame_closes_client_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def vanish(ws: ServerConnection) -> None:
        await ws.recv()
        ws.transport.abort()

    async with ws_upstream(vanish) as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url) as ws:
            await ws.send("hello")
            assert (await closed_by_peer(ws)).code == 1011
    assert "without a close frame" in caplog.text


async def test_client_abort_closes_the_upstream_within_a_second() -> None:
    async with ws_upstream() as up, front(ProxyPass(up.url)) as url:
        async with open_ws(url) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            ws.transport.abort()
            code, _ = await up.next_close(seconds=1.0)
    assert code == 1000  # uvicorn reports a lost client as 1005 (no status), sent on as 1000


async def test_client_leaving_a_backed_up_relay_closes_the_upstream_promptly() -> None:
    backed_up = asyncio.Event()

    async def flood(ws: ServerConnection) -> None:
        while True:
            sending = asyncio.ensure_future(ws.send(b"f" * 65536))
            await asyncio.sleep(0)  # one event loop for all three: let the others run
            if not sending.done():  # waiting for the proxy, which stopped reading
                backed_up.set()
            await sending

    async with ws_upstream(flood) as up:
        async with front(ProxyPass(up.url, websocket_compression=None)) as url:
            async with open_ws(url, compression=None, max_queue=1) as ws:
                with anyio.fail_after(10):
                    await backed_up.wait()
                ws.transport.abort()
                # Reading again, the proxy gets the upstream's Close frame behind the backlog,
                # rather than waiting for it for close_timeout (10 s).
                code, _ = await up.next_close(seconds=3.0)
    assert code == 1000


async def test_idle_timeout_closes_both_sides_with_1001(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "asgi_proxy_pass")
    async with ws_upstream() as up, front(ProxyPass(up.url, websocket_idle_timeout=0.3)) as url:
        async with open_ws(url) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            close = await closed_by_peer(ws)
            assert (close.code, close.reason) == (1001, "idle timeout")
        assert await up.next_close() == (1001, "idle timeout")
    assert "websocket_idle_timeout" in caplog.text


async def test_messages_either_way_keep_an_idle_timeout_away() -> None:
    async with ws_upstream() as up, front(ProxyPass(up.url, websocket_idle_timeout=0.4)) as url:
        async with open_ws(url) as ws:
            for i in range(8):  # 0.8 s in all, twice the timeout, never 0.4 s without a message
                await ws.send(str(i))
                assert await ws.recv() == str(i)
                await asyncio.sleep(0.1)
            await ws.send("still open")
            assert await ws.recv() == "still open"
            close = await closed_by_peer(ws)
            assert (close.code, close.reason) == (1001, "idle timeout")


# Refusals: before the client is accepted


async def test_upstream_refusal_status_and_body_reach_the_client() -> None:
    def forbid(ws: ServerConnection, request: Request) -> Response:
        response = ws.respond(403, "go away\n")
        response.headers["Set-Cookie"] = "seen=1"
        return response

    async with ws_upstream(process_request=forbid) as up, front(ProxyPass(up.url)) as url:
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(url):
                pass  # pragma: no cover
    response = info.value.response
    assert response.status_code == 403
    assert response.body == b"go away\n"
    assert response.headers["Set-Cookie"] == "seen=1"


async def test_upstream_redirect_is_passed_not_followed(client: httpx2.AsyncClient) -> None:
    requests: list[Request] = []

    def redirect(ws: ServerConnection, request: Request) -> Response:
        requests.append(request)
        response = ws.respond(302, "")
        response.headers["Location"] = "/elsewhere"
        return response

    async with ws_upstream(process_request=redirect) as up, front(ProxyPass(up.url)) as url:
        upgrade = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
        r = await client.get(url.replace("ws://", "http://") + "/x", headers=upgrade)
    assert r.status_code == 302
    assert r.headers["location"] == "/elsewhere"
    assert [r.path for r in requests] == ["/x"]


async def test_refusal_is_a_403_when_the_server_has_no_http_response_extension() -> None:
    async def forbid(ws: ServerConnection, request: Request) -> Response:
        return ws.respond(401, "who are you?\n")

    async with ws_upstream(process_request=forbid) as up:
        proxy = ProxyPass(up.url)

        async def without_extension(scope: Scope, receive: Receive, send: Send) -> None:
            await proxy({**scope, "extensions": {}}, receive, send)

        async with front(without_extension) as url:
            with pytest.raises(InvalidStatus) as info:
                async with open_ws(url):
                    pass  # pragma: no cover
        await proxy.aclose()
    assert info.value.response.status_code == 403


async def test_unreachable_upstream_is_refused_with_502(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        async with front(ProxyPass(f"http://127.0.0.1:{port}")) as url:
            with pytest.raises(InvalidStatus) as info:
                async with open_ws(url):
                    pass  # pragma: no cover
    assert info.value.response.status_code == 502
    assert info.value.response.body == b"502 Bad Gateway\n"
    assert f"upstream 127.0.0.1:{port} failed" in caplog.text


async def test_handshake_timeout_is_refused_with_504() -> None:
    async with silent_server() as silent:
        timeout = httpx2.Timeout(10, connect=0.3)
        async with front(ProxyPass(f"http://127.0.0.1:{silent.port}", timeout=timeout)) as url:
            with pytest.raises(InvalidStatus) as info:
                async with open_ws(url):
                    pass  # pragma: no cover
    assert info.value.response.status_code == 504


async def test_client_leaving_during_the_handshake_abandons_it() -> None:
    async with silent_server() as silent:
        async with front(ProxyPass(f"http://127.0.0.1:{silent.port}")) as url:
            handshake = open_ws(url)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(handshake.connect)
                await silent.accepted.wait()  # the proxy is waiting for the upstream's 101
                tasks.cancel_scope.cancel()  # the client gives up: its connection is aborted
            with anyio.fail_after(1):
                await silent.closed.wait()


async def test_target_leaving_the_mount_is_refused_with_400() -> None:
    async with ws_upstream() as up, front(ProxyPass(up.url + "/")) as url:
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(url + "/a%zz"):
                pass  # pragma: no cover
    assert info.value.response.status_code == 400
    assert up.requests == []


# TLS, unix sockets, load


async def test_wss_to_a_tls_upstream(server_pem: str, ca_pem: str) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server_pem)
    async with ws_upstream(describe, ssl=server_context) as up:
        verify = ssl.create_default_context(cafile=ca_pem)
        async with front(ProxyPass(up.url + "/secure/", verify=verify)) as url:
            async with open_ws(url + "/x") as ws:
                seen = json.loads(await ws.recv())
                await ws.send(b"over tls")
                assert await ws.recv() == b"over tls"
    assert seen["target"] == "/secure/x"
    assert header_values(seen, "host") == [up.url.removeprefix("https://")]


async def test_tls_upstream_that_fails_verification_is_refused_with_502(server_pem: str) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server_pem)
    async with ws_upstream(ssl=server_context) as up:
        async with front(ProxyPass(up.url)) as url:  # the system trust store: not our CA
            with pytest.raises(InvalidStatus) as info:
                async with open_ws(url):
                    pass  # pragma: no cover
    assert info.value.response.status_code == 502


async def test_unix_socket_upstream(tmp_path: Any) -> None:
    async with ws_upstream(describe, uds=str(tmp_path / "up.sock")) as up:
        async with front(ProxyPass(up.url + ":/u/")) as url:
            async with open_ws(url + "/a?b=1") as ws:
                seen = json.loads(await ws.recv())
                await ws.send("via unix")
                assert await ws.recv() == "via unix"
    assert seen["target"] == "/u/a?b=1"
    assert header_values(seen, "host") == ["localhost"]


async def test_two_hundred_concurrent_connections() -> None:
    async def session(url: str, n: int) -> None:
        async with open_ws(url + f"/c/{n}") as ws:
            for i in range(3):
                await ws.send(f"{n}:{i}")
                assert await ws.recv() == f"{n}:{i}"
            await ws.send(n.to_bytes(2, "big"))
            assert await ws.recv() == n.to_bytes(2, "big")

    async with ws_upstream() as up, front(ProxyPass(up.url)) as url:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                for n in range(200):
                    tasks.start_soon(session, url, n)
        for _ in range(200):
            assert await up.next_close() == (1000, "")
    assert sorted(r.path for r in up.requests) == sorted(f"/c/{n}" for n in range(200))


# Pure rules


def test_handshake_headers_leave_host_and_handshake_headers_to_websockets() -> None:
    host, extra = handshake_headers(
        [
            (b"host", b"127.0.0.1:9000"),
            (b"cookie", b"a=1"),
            (b"sec-websocket-key", b"abc"),
            (b"sec-websocket-extensions", b"permessage-deflate"),
            (b"sec-websocket-protocol", b"v1"),
            (b"sec-websocket-version", b"13"),
            (b"user-agent", b"ua"),
            (b"x-latin", b"caf\xe9"),
        ]
    )
    assert host == b"127.0.0.1:9000"
    assert list(extra.raw_items()) == [("cookie", "a=1"), ("user-agent", "ua"), ("x-latin", "café")]
    assert extra.serialize().endswith(b"x-latin: caf\xe9\r\n\r\n")  # the same bytes go out


@pytest.mark.parametrize(
    ("upstream", "host", "target", "uri"),
    [
        ("http://b:9000", b"b:9000", b"/a?x=1", "ws://b:9000/a?x=1"),
        ("https://b", b"b", b"/", "wss://b/"),
        ("http://unix:/s.sock", b"localhost", b"/u/x", "ws://localhost/u/x"),
        ("http://b", b"front.example:8080", b"/p", "ws://front.example:8080/p"),
        ("http://b", b"", b"/p", "ws://b/p"),
        ("http://b", b"b", b"/\xc3\xbc/a b#c", "ws://b/%C3%BC/a%20b%23c"),
        ("http://b", b"b", b"/a;p=1//x", "ws://b/a;p=1//x"),
    ],
)
def test_handshake_uri(upstream: str, host: bytes, target: bytes, uri: str) -> None:
    assert handshake_uri(parse_upstream(upstream), host, target) == uri


@pytest.mark.parametrize("host", [b"bad host", b"b:99999", b"a/b", b"u@b", b"b:", b"[::1"])
def test_handshake_uri_rejects_a_host_that_is_no_authority(host: bytes) -> None:
    with pytest.raises(BadRequest):
        handshake_uri(parse_upstream("http://b"), host, b"/")


@pytest.mark.parametrize(
    ("code", "reason", "to_client", "to_upstream"),
    [
        (1000, "", (1000, ""), (1000, "")),
        (4001, "bye", (4001, "bye"), (4001, "bye")),
        (1005, "", (1000, ""), (1000, "")),
        (1006, "", (1011, ""), (1001, "")),
        (1015, "tls", (1011, ""), (1001, "")),
        (1012, "restart", (1012, "restart"), (1012, "restart")),
        (1004, "reserved", (1011, ""), (1011, "")),
        (2500, "unassigned", (1011, ""), (1011, "")),
    ],
)
def test_close_code_mapping(
    code: int, reason: str, to_client: tuple[int, str], to_upstream: tuple[int, str]
) -> None:
    assert wire_close(code, reason, {1005: 1000, 1006: 1011, 1015: 1011}) == to_client
    assert client_close({"type": "websocket.disconnect", "code": code, "reason": reason}) == (
        to_upstream
    )


def test_client_disconnect_without_code_or_reason() -> None:
    assert client_close({"type": "websocket.disconnect"}) == (1000, "")
    assert client_close({"type": "websocket.disconnect", "code": 4000, "reason": None}) == (
        4000,
        "",
    )


@pytest.mark.parametrize(
    ("rcvd", "sent", "rcvd_then_sent", "to_client", "logged"),
    [
        (Close(4001, "bye"), Close(4001, "bye"), True, (4001, "bye"), False),
        (Close(1000, ""), None, None, (1000, ""), False),
        (Close(1005, ""), Close(1000, ""), True, (1000, ""), False),
        (Close(1009, "x"), Close(1009, "over size limit"), False, (1009, "message too big"), True),
        (None, Close(1009, "over size limit"), None, (1009, "message too big"), True),
        (None, Close(1011, "keepalive ping timeout"), None, (1011, ""), True),
        (None, None, None, (1011, ""), True),
    ],
)
def test_upstream_close_mapping(
    rcvd: Close | None,
    sent: Close | None,
    rcvd_then_sent: bool | None,
    to_client: tuple[int, str],
    logged: bool,
) -> None:
    close, failure = upstream_close(ConnectionClosedError(rcvd, sent, rcvd_then_sent))
    assert close == to_client
    assert (failure is not None) == logged


# Pools


async def test_handshake_fails_over_to_the_next_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with ws_upstream(echo) as up:
        pool = PoolOf([dead, up.url])
        async with front(ProxyPass(pool)) as url:
            for _ in range(3):
                async with open_ws(url) as ws:
                    await ws.send("hi")
                    assert await ws.recv() == "hi"
        assert [s["state"] for s in pool.status()] == ["unavailable", "up"]
        assert [s["in_flight"] for s in pool.status()] == [0, 0]
        await pool.aclose()


async def test_refused_handshake_moves_on_only_when_listed() -> None:
    def unavailable(ws: ServerConnection, request: Request) -> Response:
        return ws.respond(503, "busy\n")

    async with ws_upstream(process_request=unavailable) as busy, ws_upstream(echo) as up:
        pool = PoolOf([busy.url, up.url])
        async with front(ProxyPass(pool, next_upstream=("error", "http_503"))) as url:
            async with open_ws(url) as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
        await pool.aclose()
        pool = PoolOf([busy.url, up.url])
        async with front(ProxyPass(pool)) as url:
            with pytest.raises(InvalidStatus) as info:
                async with open_ws(url):
                    pass  # pragma: no cover
        assert info.value.response.status_code == 503
        await pool.aclose()


# The upstream connection: frames cut anywhere, bad frames, flow control, its own framing

SCRIPT = [
    raw_frame(Opcode.BINARY, bytes(range(200))),  # a 16-bit length
    raw_frame(Opcode.PING, b"p1"),
    raw_frame(Opcode.TEXT, b"frag", fin=False),
    raw_frame(Opcode.CONT, b"m\xc3", fin=False),  # "é" cut between two fragments
    raw_frame(Opcode.PING, b"p2"),
    raw_frame(Opcode.CONT, b"\xa9nted"),
    raw_frame(Opcode.TEXT, "ü€😀".encode()),
    raw_frame(Opcode.TEXT, b""),
    raw_frame(Opcode.BINARY, b""),
    raw_frame(Opcode.CLOSE, Close(4001, "bye").serialize()),
]


@pytest.mark.parametrize("piece", [1, 3, 10_000])
async def test_upstream_frames_cut_anywhere_arrive_whole_and_in_order(piece: int) -> None:
    # The first frame shares a read with the 101; the others arrive `piece` bytes at a time.
    first = raw_frame(Opcode.TEXT, b"first")
    async with scripted_upstream(first, b"".join(SCRIPT), piece) as up:
        async with front(ProxyPass(up.url)) as url, open_ws(url) as ws:
            received = [await ws.recv() for _ in range(6)]
            close = await closed_by_peer(ws)
    assert received == ["first", bytes(range(200)), "fragménted", "ü€😀", "", b""]
    assert (close.code, close.reason) == (4001, "bye")
    pongs = [bytes(frame.data) for frame in up.frames if frame.opcode is Opcode.PONG]
    assert pongs == [b"p1", b"p2"]
    assert up.close_code() == 4001


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (raw_frame(Opcode.TEXT, b"ok \xff"), 1007),  # invalid UTF-8
        (raw_frame(Opcode.TEXT, b"\xc3", fin=False) + raw_frame(Opcode.CONT, b"("), 1007),
        (Frame(Opcode.TEXT, b"masked").serialize(mask=True), 1002),  # RFC 6455 section 5.1
        (b"\xc1\x01x", 1002),  # RSV1, with no extension negotiated
        (raw_frame(Opcode.CONT, b"x"), 1002),  # no message to continue
    ],
)
async def test_bad_upstream_frame_fails_it_and_closes_the_client_with_1011(
    frame: bytes, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    async with scripted_upstream(frame) as up:
        async with front(ProxyPass(up.url)) as url, open_ws(url) as ws:
            assert (await closed_by_peer(ws)).code == 1011
    assert up.close_code() == code
    assert f"failed: {code}" in caplog.text


class Watched(UpstreamConnection):
    """An upstream connection that tells when it stops reading, and when its writes back up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped_reading = asyncio.Event()
        self.stopped_writing = asyncio.Event()

    def deliver(self, data: bytes | bytearray | memoryview, text: bool) -> None:
        super().deliver(data, text)
        if self.reading_paused:
            self.stopped_reading.set()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.stopped_writing.set()


async def watched(url: str, **options: Any) -> Watched:
    # No permessage-deflate: the repeated bytes of the tests' messages would shrink to nothing.
    upstream = await connect(
        url.replace("http", "ws", 1),
        create_connection=Watched,
        compression=None,
        proxy=None,
        **options,
    )
    assert isinstance(upstream, Watched)
    return upstream


async def test_upstream_connection_stops_reading_at_max_queue() -> None:
    big = b"m" * 65536

    async def flood(ws: ServerConnection) -> None:
        for n in range(100):
            await ws.send(n.to_bytes(2, "big") + big)
        await ws.wait_closed()

    async with ws_upstream(flood) as up:
        upstream = await watched(up.url, max_queue=4)
        with anyio.fail_after(10):
            await upstream.stopped_reading.wait()
        assert len(upstream.messages) < 100  # the rest waits in the sockets
        received = [await upstream.next_message() for _ in range(100)]
        assert not upstream.reading_paused
        await upstream.close()
    assert received == [n.to_bytes(2, "big") + big for n in range(100)]


async def test_upstream_connection_answers_pings_and_sends_nothing_once_closed() -> None:
    async with ws_upstream() as up:
        upstream = await watched(up.url)
        with anyio.fail_after(5):
            assert await (await upstream.ping()) >= 0  # the pong came back through process_event
        await upstream.close()
        assert await upstream.send_message("late") is False


async def test_upstream_connection_send_waits_for_a_full_write_buffer() -> None:
    release = anyio.Event()
    big = b"s" * 1024 * 1024
    got: list[bytes] = []

    async def slow(ws: ServerConnection) -> None:
        await release.wait()
        for _ in range(64):
            got.append(await ws.recv(decode=False))

    async with ws_upstream(slow, max_size=None) as up:
        upstream = await watched(up.url)
        sent: list[int] = []

        async def sender() -> None:
            for n in range(64):
                assert await upstream.send_message(n.to_bytes(1, "big") + big)
                sent.append(n)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sender)
            with anyio.fail_after(10):
                await upstream.stopped_writing.wait()
            assert len(sent) < 64  # the sender waits in drain()
            release.set()
        await upstream.close()
    assert [message[0] for message in got] == list(range(64))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_client_frame_is_what_websockets_parses(size: int, opcode: Opcode) -> None:
    payload = bytes(n % 251 for n in range(size))
    key = MaskingKeys().next()
    reader = StreamReader()
    reader.feed_data(client_frame(opcode, payload, key))
    parser = Frame.parse(reader.read_exact, mask=True)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame = done.value.value
    assert (frame.opcode, frame.fin, bytes(frame.data)) == (opcode, True, payload)
    assert not reader.buffer


@pytest.mark.parametrize(
    ("data", "bounds"),
    [
        (b"", None),
        (b"\x81", None),
        (b"\x81\x05hello", (1, 2, 7)),
        (b"\x82\x05hel", (2, 2, 7)),  # the payload may still be on its way
        (b"\x82\x7e\x01", None),
        (b"\x82\x7e\x01\x00", (2, 4, 260)),
        (b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00", None),
        (b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00", (2, 10, 65546)),
        (b"\x01\x05hello", (0, 2, 7)),  # not final
        (b"\xc1\x05hello", (0, 2, 7)),  # RSV1: compressed
        (b"\x89\x02hi", (0, 2, 4)),  # ping
        (b"\x80\x02hi", (0, 2, 4)),  # continuation
        (b"\x81\x82abcdhi", (0, 6, 8)),  # masked
    ],
)
def test_frame_bounds(data: bytes, bounds: tuple[int, int, int] | None) -> None:
    assert frame_bounds(data, 0) == bounds
    assert frame_bounds(b"xyz" + data, 3) == (
        None if bounds is None else (bounds[0], bounds[1] + 3, bounds[2] + 3)
    )


def test_masking_keys_are_drawn_in_batches_and_not_repeated() -> None:
    keys = MaskingKeys(batch=2)
    drawn = [keys.next() for _ in range(5)]
    assert all(len(key) == 4 for key in drawn)
    assert len(set(drawn)) == 5
