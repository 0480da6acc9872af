"""`gateway(config)`: routing (pure, then served by uvicorn) and the access log.

The routing decisions are a table of paths; the served tests put the app built from a config
dict behind a real uvicorn on 127.0.0.1, in front of the echo upstream.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from servers import Running, serve
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from ws_servers import ws_upstream

from asgi_proxy_pass._accesslog import Entry, compile_format
from asgi_proxy_pass._config import ENV_VAR
from asgi_proxy_pass._errors import ConfigError
from asgi_proxy_pass._gateway import gateway
from asgi_proxy_pass._proxy import ProxyPass
from asgi_proxy_pass._routing import Route, Routes
from asgi_proxy_pass._types import Receive, Scope, Send


async def nothing(scope: Scope, receive: Receive, send: Send) -> None:
    pass


def routes(*patterns: str) -> Routes:
    return Routes(
        Route(p, p[1:].strip() if p.startswith("=") else p, p.startswith("="), nothing)
        for p in patterns
    )


TYPICAL = routes("/", "/api/", "= /health", "/api2", "/static/", "/api/v2/")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/health", "= /health"),
        ("/health/x", "/"),
        ("/api/", "/api/"),
        ("/api/users", "/api/"),
        ("/api/v2/users", "/api/v2/"),
        ("/api/v2", "redirect /api/v2/"),
        ("/api", "redirect /api/"),
        ("/api2", "/api2"),
        ("/api2/x", "/api2"),
        ("/api2x", "/"),
        ("/static", "redirect /static/"),
        ("/", "/"),
        ("/anything", "/"),
    ],
)
def test_exact_then_longest_prefix(path: str, expected: str) -> None:
    route, redirect = TYPICAL.match(path)
    assert route is not None
    assert (f"redirect {route.pattern}" if redirect else route.pattern) == expected


def test_a_location_without_the_slash_takes_precedence_over_the_redirect() -> None:
    both = routes("/api", "/api/")
    assert both.match("/api") == (both.prefixes[1], False)
    assert both.match("/api/x").route == both.prefixes[0]
    exact = routes("= /api", "/api/")
    assert exact.match("/api").route == exact.exact["/api"]


def test_no_location_matches() -> None:
    assert routes("/api/").match("/other") == (None, False)


def test_routes_are_tried_exact_first_then_longest() -> None:
    assert [r.pattern for r in TYPICAL] == [
        "= /health", "/api/v2/", "/static/", "/api/", "/api2", "/",
    ]  # fmt: skip


@asynccontextmanager
async def front(config: dict[str, Any]) -> AsyncIterator[Running]:
    async with serve(gateway(config), lifespan="on") as running:
        yield running


async def test_routing_through_the_gateway(echo: Running, client: httpx2.AsyncClient) -> None:
    config = {
        "locations": {
            "/api/": {"proxy_pass": echo.url + "/", "request_headers": {"X-Via": "gw"}},
            "= /health": {"proxy_pass": echo.url + "/status"},
            "/": {"proxy_pass": echo.url},
        }
    }
    async with front(config) as gw:
        r = await client.get(f"{gw.url}/api/users?id=1")
        assert r.json()["target"] == "/users?id=1"
        assert ["x-via", "gw"] in r.json()["headers"]
        assert ["x-forwarded-prefix", "/api"] in r.json()["headers"]
        assert (await client.get(f"{gw.url}/health")).json()["target"] == "/status"
        assert (await client.get(f"{gw.url}/healthz")).json()["target"] == "/healthz"
        r = await client.get(f"{gw.url}/api?x=1")
        assert (r.status_code, r.headers["location"]) == (301, "/api/?x=1")
        r = await client.post(f"{gw.url}/api", content=b"data")
        assert (r.status_code, r.headers["location"]) == (308, "/api/")


async def test_no_location_is_a_404(echo: Running, client: httpx2.AsyncClient) -> None:
    async with front({"locations": {"/api/": {"proxy_pass": echo.url}}}) as gw:
        r = await client.get(f"{gw.url}/other")
        assert (r.status_code, r.text) == (404, "404 Not Found\n")


async def test_websockets_per_location() -> None:
    async with ws_upstream() as upstream:
        config = {
            "locations": {
                "/ws/": {"proxy_pass": upstream.url},
                "/": {"proxy_pass": upstream.url, "websocket": False},
            }
        }
        async with front(config) as gw:
            ws_url = gw.url.replace("http", "ws")
            async with connect(f"{ws_url}/ws/chat", proxy=None) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"{ws_url}/other", proxy=None):
                    pass
            assert info.value.response.status_code == 403


async def test_a_cached_location_answers_from_the_cache(
    tmp_path: Path, client: httpx2.AsyncClient
) -> None:
    pytest.importorskip("hishel")
    calls: list[str] = []

    async def origin(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope["path"])
        headers = [(b"cache-control", b"max-age=60"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async with serve(origin) as upstream:
        cache = {"path": str(tmp_path / "cache")}
        config = {"locations": {"/": {"proxy_pass": upstream.url, "cache": cache}}}
        async with front(config) as gw:
            statuses = []
            for _ in range(2):
                r = await client.get(f"{gw.url}/page")
                assert (r.status_code, r.text) == (200, "ok")
                statuses.append(r.headers["x-cache-status"])
    assert statuses == ["MISS", "HIT"]
    assert calls == ["/page"]


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed: connections are refused


async def test_access_log_lists_every_server_tried(
    echo: Running, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_proxy_pass.access")
    dead = f"127.0.0.1:{dead_port()}"
    config = {
        "upstreams": {"pool": {"servers": [f"http://{dead}", echo.url]}},
        "locations": {"/": {"proxy_pass": "pool"}},
    }
    async with front(config) as gw:
        r = await client.get(f"{gw.url}/a%20b?q=1", headers={"User-Agent": 'say "hi"'})
        assert r.status_code == 200
    [line] = [r.getMessage() for r in caplog.records if r.name == "asgi_proxy_pass.access"]
    live = echo.url.removeprefix("http://")
    assert f'"GET /a%20b?q=1 HTTP/1.1" 200 {len(r.content)} "-" "say \\x22hi\\x22"' in line
    assert f'ua="{dead}, {live}" us="502, 200" urt="' in line
    assert line.startswith("127.0.0.1 - - [")


async def test_access_log_format_and_websockets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asgi_proxy_pass.access")
    async with ws_upstream() as upstream:
        server = {"access_log_format": "$request_method $uri $status $upstream_status $http_x_id"}
        config = {"server": server, "locations": {"/": {"proxy_pass": upstream.url}}}
        async with front(config) as gw:
            ws_url = gw.url.replace("http", "ws")
            async with connect(f"{ws_url}/ws", proxy=None, additional_headers={"X-Id": "7"}) as ws:
                await ws.send("hi")
                await ws.recv()
    assert [r.getMessage() for r in caplog.records if r.name == "asgi_proxy_pass.access"] == [
        "GET /ws 101 101 7"
    ]


async def test_access_log_off(
    echo: Running, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_proxy_pass.access")
    config = {"server": {"access_log": False}, "locations": {"/": {"proxy_pass": echo.url}}}
    async with front(config) as gw:
        assert (await client.get(gw.url)).status_code == 200
    assert not [r for r in caplog.records if r.name == "asgi_proxy_pass.access"]


async def test_proxy_pass_notes_the_upstream_in_the_scope(
    echo: Running, client: httpx2.AsyncClient
) -> None:
    seen: list[Scope] = []
    proxy = ProxyPass(echo.url)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await proxy(scope, receive, send)

    async with serve(app) as running:
        assert (await client.get(running.url)).status_code == 200
    await proxy.aclose()
    info = seen[0]["asgi_proxy_pass"]
    assert info["upstream_addr"] == [echo.url.removeprefix("http://")]
    assert info["upstream_status"] == [200]
    [seconds] = info["upstream_response_time"]
    assert isinstance(seconds, float) and seconds >= 0


def test_log_variables_without_upstream() -> None:
    parts = compile_format('$remote_addr "$request" $status $upstream_addr $args $http_referer')
    entry = Entry({"type": "http", "method": "GET", "path": "/é", "query_string": b""})
    entry.status = 404
    line = "".join(part if isinstance(part, str) else part(entry) for part in parts)
    assert line == '- "GET /\\xC3\\xA9 HTTP/1.1" 404 - - -'


def test_a_request_without_an_answer_is_499_or_500() -> None:
    entry = Entry({"type": "http"})
    assert entry.final_status == 499  # the app returned without answering: the client left
    entry.failed = True
    assert entry.final_status == 500  # the app raised: the server answers 500


def test_gateway_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match=f"config: not given, and {ENV_VAR} is not set"):
        gateway()
    path = tmp_path / "gateway.toml"
    path.write_text(f'[locations."/"]\nproxy_pass = {json.dumps("http://127.0.0.1:1")}\n')
    monkeypatch.setenv(ENV_VAR, str(path))
    assert [route.path for route in gateway().routes] == [""]
