"""Response caching: the pure rules as tables, then end to end through real uvicorn servers
(a client, the proxy, an origin whose answers each test sets), with a fake clock for freshness.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import httpx2
import pytest
from hishel import Entry, Headers, Request, Response
from servers import Running, front, read_body, serve

from asgi_proxy_pass import ConfigError, ProxyPass, Upstream
from asgi_proxy_pass._cache import Cache, CacheConfig, KeyTemplate
from asgi_proxy_pass._cache_memory import MemoryTier
from asgi_proxy_pass._cache_policy import (
    current_age,
    freshness_lifetime,
    http_date,
    lookup,
    not_modified,
    stale_usable,
)
from asgi_proxy_pass._types import Receive, Scope, Send

T0 = 1_800_000_000.0


class Clock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Origin:
    """An upstream whose answer the test sets; it records every request it receives and
    answers a matching If-None-Match with 304."""

    def __init__(self) -> None:
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = [(b"cache-control", b"max-age=60")]
        self.body = b"v1"
        self.etag: bytes | None = None
        self.requests: list[dict[bytes, bytes]] = []
        self.gate: asyncio.Event | None = None
        self.chunks: list[bytes] | None = None
        self.between: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    @property
    def hits(self) -> int:
        return len(self.requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        headers = dict(scope["headers"])
        headers[b":method"] = scope["method"].encode()
        self.requests.append(headers)
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        extra = [(b"etag", self.etag)] if self.etag else []
        if self.etag is not None and headers.get(b"if-none-match") == self.etag:
            await send({"type": "http.response.start", "status": 304, "headers": extra})
            await send({"type": "http.response.body", "body": b""})
            return
        chunks = self.chunks or [self.body]
        length = str(sum(map(len, chunks))).encode()
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [*self.headers, *extra, (b"content-length", length)],
            }
        )
        for index, chunk in enumerate(chunks):
            if index and self.between is not None:
                await self.between.wait()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def origin() -> AsyncIterator[tuple[Origin, Running]]:
    app = Origin()
    async with serve(app) as running:
        yield app, running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(
    params=[{}, {"memory_size": 0}, {"memory_ttl": None}],
    ids=["memory", "no-memory", "memory-kept"],
)
def memory(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The memory tier as configured by default, off, and keeping copies until invalidated:
    the cache's behaviour is the same with all three."""
    config: dict[str, Any] = request.param
    return config


class Counted:
    """hishel's storage, counting lookups: a hit from memory makes none."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.reads = 0

    async def get_entries(self, key: str) -> list[Entry]:
        self.reads += 1
        entries: list[Entry] = await self.storage.get_entries(key)
        return entries

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def counted(proxy: ProxyPass) -> Counted:
    assert proxy.cache is not None
    storage = Counted(proxy.cache.storage)
    proxy.cache._storage = storage  # type: ignore[assignment]
    return storage


def cached(url: str, path: Path, clock: Clock, **config: Any) -> ProxyPass:
    proxy = ProxyPass(url, cache=CacheConfig(path=str(path), **config))
    assert proxy.cache is not None
    proxy.cache.clock = clock
    return proxy


async def settled(*proxies: ProxyPass) -> None:
    """Until the responses being stored are stored: a client that read a Content-Length body
    to its end can be faster than the proxy publishing it."""
    for proxy in proxies:
        assert proxy.cache is not None
        for fill in list(proxy.cache.fills.values()):
            await fill.wait()


async def get(client: httpx2.AsyncClient, url: str, **kw: Any) -> tuple[str | None, bytes]:
    response = await client.get(url, **kw)
    assert response.status_code == 200, response.text
    return response.headers.get("x-cache-status"), response.content


# Configuration


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"path": ""}, "cache.path:"),
        ({"redis_url": "http://x"}, "cache.redis_url:"),
        ({"key": "$scheme$nope"}, "cache.key: unknown variable $nope"),
        ({"max_size": -1}, "cache.max_size:"),
        ({"max_entry_size": True}, "cache.max_entry_size:"),
        ({"inactive": 0}, "cache.inactive:"),
        ({"lock_timeout": None}, "cache.lock_timeout:"),
        ({"use_stale": "error"}, "cache.use_stale: expected a list"),
        ({"use_stale": ["error", "updating"]}, "cache.use_stale: unknown condition 'updating'"),
        ({"lock": "yes"}, "cache.lock:"),
        ({"status_header": "X Cache"}, "cache.status_header:"),
        ({"memory_size": -1}, "cache.memory_size:"),
        ({"memory_entry_size": None}, "cache.memory_entry_size:"),
        ({"memory_ttl": 0}, "cache.memory_ttl:"),
    ],
)
def test_config_errors_name_the_field(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("$", r"\$")):
        CacheConfig(**config)


def test_cache_argument() -> None:
    with pytest.raises(ConfigError, match="cache: expected a bool or a CacheConfig"):
        ProxyPass("http://b:1", cache="yes")  # type: ignore[arg-type]
    assert ProxyPass("http://b:1").cache is None
    assert ProxyPass("http://b:1", cache=False).cache is None
    proxy = ProxyPass("http://b:1", cache=True)
    assert proxy.cache is not None and proxy.cache.config == CacheConfig()


def test_from_mapping() -> None:
    config = CacheConfig.from_mapping({"path": "/var/cache/p", "use_stale": ["error"]})
    assert config.path == "/var/cache/p"
    assert config.use_stale == frozenset({"error"})
    with pytest.raises(ConfigError, match="cache: unknown key 'size'"):
        CacheConfig.from_mapping({"size": 1})


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$scheme://$host$request_uri", "http://b:1/a%2Fb?x=1"),
        ("${scheme}|$uri|$args", "http|/a%2Fb|x=1"),
        ("$host$uri:$http_accept_language", "b:1/a%2Fb:en,fr"),
        ("static", "static"),
    ],
)
def test_key_template(template: str, expected: str) -> None:
    headers = httpx2.Headers([(b"accept-language", b"en"), (b"Accept-Language", b"fr")])
    assert KeyTemplate(template).render("http", "b:1", "/a%2Fb?x=1", headers) == expected


# Pure rules


def response(status: int = 200, **headers: str) -> Response:
    return Response(status, Headers({k.replace("_", "-"): v for k, v in headers.items()}))


DATE = http_date(T0)


@pytest.mark.parametrize(
    ("stored", "lifetime"),
    [
        (response(cache_control="max-age=60", date=DATE), 60),
        (response(cache_control="max-age=60, s-maxage=5", date=DATE), 5),
        (response(date=DATE, expires=http_date(T0 + 30)), 30),
        (response(date=DATE, expires="0"), 0),
        (response(date=DATE, last_modified=http_date(T0 - 1000)), 100),
        (response(404, date=DATE, last_modified=http_date(T0 - 1000)), 100),
        (response(500, date=DATE, last_modified=http_date(T0 - 1000)), None),
        (response(date=DATE), None),
    ],
)
def test_freshness_lifetime(stored: Response, lifetime: float | None) -> None:
    assert freshness_lifetime(stored) == lifetime


def test_current_age_counts_a_stored_age() -> None:
    assert current_age(response(date=DATE), T0 + 10) == 10
    assert current_age(response(date=DATE, age="100"), T0 + 10) == 110
    assert current_age(response(date=http_date(T0 + 5)), T0) == 0


@pytest.mark.parametrize(
    ("cache_control", "condition", "use_stale", "usable"),
    [
        ("max-age=10", "error", {"error"}, True),
        ("max-age=10", "timeout", {"error"}, False),
        ("max-age=10", "http_500", {"http_500"}, True),
        ("max-age=10, must-revalidate", "error", {"error"}, False),
        ("max-age=10, proxy-revalidate", "error", {"error"}, False),
        ("max-age=10, stale-if-error=100", "error", set(), True),
        ("max-age=10, stale-if-error=100", "http_503", set(), True),
        ("max-age=10, stale-if-error=100", "http_404", set(), False),
        ("max-age=10, stale-if-error=30", "error", set(), False),
    ],
)
def test_stale_usable(
    cache_control: str, condition: str, use_stale: set[str], usable: bool
) -> None:
    # Stored at T0, fresh for 10 s, now 50 s old: 40 s stale.
    stored = response(cache_control=cache_control, date=DATE)
    assert stale_usable(stored, condition, T0 + 50, frozenset(use_stale)) is usable


@pytest.mark.parametrize(
    ("request_headers", "expected"),
    [
        ({"if-none-match": '"a"'}, True),
        ({"if-none-match": 'W/"a", "b"'}, True),
        ({"if-none-match": '"b"'}, False),
        ({"if-none-match": "*"}, True),
        ({"if-modified-since": http_date(T0)}, True),
        ({"if-modified-since": http_date(T0 - 1)}, False),
        ({"if-none-match": '"b"', "if-modified-since": http_date(T0)}, False),
        ({}, False),
    ],
)
def test_not_modified(request_headers: dict[str, str], expected: bool) -> None:
    stored = response(etag='"a"', last_modified=http_date(T0))
    assert not_modified(Request("GET", "k", Headers(request_headers)), stored) is expected


def test_lookup_prefers_fresh_and_matches_vary() -> None:
    def entry(method: str, lang: str, age: int) -> Entry:
        request = Request(method, "k", Headers({"accept-language": lang}))
        stored = response(
            cache_control="max-age=60", date=http_date(T0 - age), vary="Accept-Language"
        )
        return Entry(id=__import__("uuid").uuid4(), request=request, response=stored)

    fresh_en, stale_en, fresh_fr = (
        entry("GET", "en", 10),
        entry("GET", "en", 100),
        entry("GET", "fr", 5),
    )
    head_en = entry("HEAD", "en", 1)
    found = lookup(
        Request("GET", "k", Headers({"accept-language": "en"})),
        [stale_en, fresh_fr, head_en, fresh_en],
        T0,
    )
    assert found.fresh is fresh_en and found.age == 10
    assert found.stale == [stale_en]
    forced = lookup(
        Request("GET", "k", Headers({"accept-language": "en", "cache-control": "no-cache"})),
        [stale_en, fresh_en],
        T0,
    )
    assert forced.fresh is None and forced.stale == [fresh_en, stale_en]


# End to end


async def test_fresh_then_expired_then_revalidated(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    app.etag = b'"v1"'
    async with front(cached(up.url, tmp_path, clock, **memory), mount=None) as proxy:
        url = proxy.url + "/doc?x=1"
        assert await get(client, url) == ("MISS", b"v1")
        clock.now += 30
        response = await client.get(url)
        assert (response.headers["x-cache-status"], response.headers["age"]) == ("HIT", "30")
        assert app.hits == 1

        clock.now += 31  # 61 s old, max-age=60: stale, so revalidated with its ETag
        assert await get(client, url) == ("REVALIDATED", b"v1")
        assert app.requests[-1][b"if-none-match"] == b'"v1"'
        assert await get(client, url) == ("HIT", b"v1")
        assert app.hits == 2

        app.etag, app.body = b'"v2"', b"v2"
        clock.now += 61
        assert await get(client, url) == ("EXPIRED", b"v2")
        assert await get(client, url) == ("HIT", b"v2")
        assert app.hits == 3


async def test_last_modified_validation(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    modified = http_date(T0 - 3600).encode()
    app.headers = [(b"cache-control", b"max-age=10"), (b"last-modified", modified)]
    async with front(cached(up.url, tmp_path, clock, **memory), mount=None) as proxy:
        assert await get(client, proxy.url + "/lm") == ("MISS", b"v1")
        clock.now += 11
        app.status = 200
        app.body = b"v2"
        assert await get(client, proxy.url + "/lm") == ("EXPIRED", b"v2")
    assert app.requests[-1][b"if-modified-since"] == modified


async def test_shared_cache_rules(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    cases: list[tuple[list[tuple[bytes, bytes]], dict[str, str], list[str]]] = [
        ([(b"cache-control", b"max-age=0, s-maxage=60")], {}, ["MISS", "HIT"]),
        ([(b"cache-control", b"private, max-age=60")], {}, ["MISS", "MISS"]),
        ([(b"cache-control", b"no-store")], {}, ["MISS", "MISS"]),
        ([(b"cache-control", b"max-age=60"), (b"set-cookie", b"s=1")], {}, ["MISS", "MISS"]),
        ([(b"cache-control", b"max-age=60")], {"authorization": "Bearer t"}, ["MISS", "MISS"]),
        ([(b"cache-control", b"s-maxage=60")], {"authorization": "Bearer t"}, ["MISS", "HIT"]),
        ([(b"cache-control", b"max-age=60"), (b"vary", b"*")], {}, ["MISS", "MISS"]),
        ([(b"cache-control", b"max-age=60")], {"range": "bytes=0-0"}, ["BYPASS", "BYPASS"]),
    ]
    async with front(cached(up.url, tmp_path, clock, **memory), mount=None) as proxy:
        for number, (headers, request_headers, statuses) in enumerate(cases):
            app.headers = headers
            url = f"{proxy.url}/case/{number}"
            got = [(await client.get(url, headers=request_headers)).headers["x-cache-status"]]
            got.append((await client.get(url, headers=request_headers)).headers["x-cache-status"])
            assert got == statuses, (headers, request_headers)


async def test_set_cookie_stored_when_asked(
    origin: tuple[Origin, Running], client: httpx2.AsyncClient, clock: Clock, tmp_path: Path
) -> None:
    app, up = origin
    app.headers = [
        (b"cache-control", b"max-age=60"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    async with front(cached(up.url, tmp_path, clock, store_set_cookie=True), mount=None) as proxy:
        await client.get(proxy.url + "/c")
        response = await client.get(proxy.url + "/c")
    assert response.headers["x-cache-status"] == "HIT"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]


async def test_vary(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    app.headers = [(b"cache-control", b"max-age=60"), (b"vary", b"Accept-Language")]
    async with front(cached(up.url, tmp_path, clock, **memory), mount=None) as proxy:
        statuses = []
        for language in ("en", "fr", "en", "fr"):
            response = await client.get(proxy.url + "/v", headers={"accept-language": language})
            statuses.append(response.headers["x-cache-status"])
    assert statuses == ["MISS", "MISS", "HIT", "HIT"]
    assert app.hits == 2


async def test_head_from_a_stored_get_and_client_conditionals(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    app.etag, app.body = b'"e"', b"x" * 1000
    async with front(cached(up.url, tmp_path, clock, **memory), mount=None) as proxy:
        await client.get(proxy.url + "/h")
        head = await client.head(proxy.url + "/h")
        not_modified = await client.get(proxy.url + "/h", headers={"if-none-match": '"e"'})
    assert (head.status_code, head.headers["x-cache-status"], head.content) == (200, "HIT", b"")
    assert head.headers["content-length"] == "1000"
    assert (not_modified.status_code, not_modified.headers["etag"]) == (304, '"e"')
    assert app.hits == 1


async def test_unsafe_method_invalidates(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    async with front(cached(up.url, tmp_path, clock, **memory), mount=None) as proxy:
        url = proxy.url + "/r?q"
        statuses = [(await client.get(url)).headers["x-cache-status"] for _ in range(2)]
        statuses.append((await client.post(url, content=b"new")).headers["x-cache-status"])
        statuses.append((await client.get(url)).headers["x-cache-status"])
    assert statuses == ["MISS", "HIT", "BYPASS", "MISS"]


async def test_date_is_added_and_pool_members_share_entries(
    client: httpx2.AsyncClient, clock: Clock, tmp_path: Path
) -> None:
    first, second = Origin(), Origin()
    async with serve(first) as a, serve(second) as b:
        proxy = ProxyPass(Upstream([a.url, b.url]), cache=CacheConfig(path=str(tmp_path)))
        assert proxy.cache is not None
        proxy.cache.clock = clock
        async with front(proxy, mount=None) as running:
            statuses = [(await client.get(running.url + "/p")).headers["x-cache-status"]]
            stored = await client.get(running.url + "/p")
            statuses.append(stored.headers["x-cache-status"])
            await proxy.pool.aclose()
    assert statuses == ["MISS", "HIT"]
    assert stored.headers["date"] == http_date(T0)  # the origin sent none (RFC 9110 6.6.1)
    assert first.hits + second.hits == 1


class CountedEvent:
    """Stands for the fill event of one key, and tells when `expected` requests wait on it
    (counted by the cache, which counts those that were already waiting too)."""

    def __init__(self, event: anyio.Event, cache: Cache, expected: int) -> None:
        self.event = event
        self.cache = cache
        self.expected = expected
        self.all_waiting = asyncio.Event()
        self.check()

    def check(self) -> None:
        if self.cache.waiting >= self.expected:
            self.all_waiting.set()

    async def wait(self) -> None:
        self.check()
        await self.event.wait()


async def test_coalescing(origin: tuple[Origin, Running], clock: Clock, tmp_path: Path) -> None:
    app, up = origin
    app.gate = asyncio.Event()
    proxy = cached(up.url, tmp_path, clock)
    assert proxy.cache is not None
    limits = httpx2.Limits(max_connections=100)
    async with (
        front(proxy, mount=None) as running,
        httpx2.AsyncClient(trust_env=False, timeout=30, limits=limits) as client,
    ):
        tasks = [asyncio.create_task(client.get(running.url + "/hot")) for _ in range(100)]
        await app.arrived.wait()
        # Every other request waits for the first one's response.
        fill = proxy.cache.fills[up.url + "/hot"]
        counted = proxy.cache.fills[up.url + "/hot"] = CountedEvent(fill, proxy.cache, 99)  # type: ignore[assignment]
        await counted.all_waiting.wait()
        assert app.hits == 1
        app.gate.set()
        responses = await asyncio.gather(*tasks)
    statuses = sorted(r.headers["x-cache-status"] for r in responses)
    assert statuses == ["HIT"] * 99 + ["MISS"]
    assert {r.content for r in responses} == {b"v1"}
    assert app.hits == 1


async def test_stale_when_the_upstream_is_down(
    client: httpx2.AsyncClient, clock: Clock, tmp_path: Path, memory: dict[str, Any]
) -> None:
    app = Origin()
    app.headers = [(b"cache-control", b"max-age=10")]
    async with serve(app) as up:
        strict = cached(up.url, tmp_path / "strict", clock, **memory)
        lenient = cached(
            up.url, tmp_path / "lenient", clock, use_stale=["error", "timeout"], **memory
        )
        async with front(strict, mount=None) as a, front(lenient, mount=None) as b:
            for running in (a, b):
                assert await get(client, running.url + "/s") == ("MISS", b"v1")
            # The origin stops (connection refused from now on), and the entries go stale.
            await up.server.shutdown()
            clock.now += 100
            refused = await client.get(a.url + "/s")
            stale = await client.get(b.url + "/s")
    assert refused.status_code == 502
    assert (stale.status_code, stale.headers["x-cache-status"], stale.content) == (
        200,
        "STALE",
        b"v1",
    )
    assert stale.headers["age"] == "100"


async def test_stale_if_error_from_the_response(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    app.headers = [(b"cache-control", b"max-age=10, stale-if-error=60")]
    async with front(cached(up.url, tmp_path, clock, **memory), mount=None) as proxy:
        assert await get(client, proxy.url + "/e") == ("MISS", b"v1")
        app.status, app.body = 503, b"down"
        clock.now += 30  # 20 s stale: within stale-if-error
        assert await get(client, proxy.url + "/e") == ("STALE", b"v1")
        clock.now += 60  # 80 s stale: the 503 goes through
        response = await client.get(proxy.url + "/e")
    assert (response.status_code, response.content) == (503, b"down")


async def test_streams_while_storing_and_size_cap(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    app.chunks = [b"a" * 300_000, b"b" * 300_000]
    app.between = asyncio.Event()
    proxy = cached(up.url, tmp_path, clock, max_entry_size=1_000_000, **memory)
    async with front(proxy, mount=None) as running:
        async with client.stream("GET", running.url + "/big") as response:
            assert response.headers["x-cache-status"] == "MISS"
            received = b""
            async for chunk in response.aiter_raw():
                received += chunk
                if len(received) >= 300_000:
                    # The first half reached the client before the origin sent the second.
                    app.between.set()
        assert received == b"a" * 300_000 + b"b" * 300_000
        assert await get(client, running.url + "/big") == ("HIT", received)

        app.chunks = [b"c" * 600_000, b"d" * 600_000]  # above max_entry_size: not stored
        assert await get(client, running.url + "/bigger") == (
            "MISS",
            b"c" * 600_000 + b"d" * 600_000,
        )
        assert (await get(client, running.url + "/bigger"))[0] == "MISS"
    assert app.hits == 3


async def test_purge(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    memory: dict[str, Any],
) -> None:
    app, up = origin
    proxy = cached(up.url, tmp_path, clock, **memory)
    assert proxy.cache is not None
    async with front(proxy, mount=None) as running:
        for path in ("/a/1", "/a/2", "/b/1"):
            await client.get(running.url + path)
        await settled(proxy)
        assert await proxy.cache.purge(up.url + "/a/1") == 1
        assert await proxy.cache.purge(up.url + "/a/", prefix=True) == 1
        assert await proxy.cache.purge(up.url + "/a/", prefix=True) == 0
        statuses = [
            (await client.get(running.url + path)).headers["x-cache-status"]
            for path in ("/a/1", "/a/2", "/b/1")
        ]
    assert statuses == ["MISS", "MISS", "HIT"]
    assert proxy.cache._storage is None  # closed by aclose()


# The memory tier


def stored(url: str) -> Entry:
    return Entry(id=uuid4(), request=Request("GET", url), response=response(date=DATE))


def test_memory_tier_keeps_the_least_recently_used_within_its_size() -> None:
    one = MemoryTier(10_000, 100, None)
    assert one.put("k", stored("k"), b"x" * 100, T0, one.epoch)
    memory = MemoryTier(3 * one.size, 100, None)
    for key in "abc":
        assert memory.put(key, stored(key), b"x" * 100, T0, memory.epoch)
    copy = memory.get("a", T0)[0]
    memory.touch(copy)
    assert memory.put("d", stored("d"), b"x" * 100, T0, memory.epoch)
    assert [key for key in "abcd" if memory.get(key, T0)] == ["a", "c", "d"]
    assert (len(memory), memory.size) == (3, 3 * one.size)
    # Copied again (read from the storage again): replaced, not counted twice.
    assert memory.put("a", copy.entry, copy.body, T0 + 1, memory.epoch)
    assert (len(memory), memory.size) == (3, 3 * one.size)
    # Too big for a copy or for the whole tier, or stored before an invalidation: not kept.
    assert not memory.put("e", stored("e"), b"x" * 101, T0, memory.epoch)
    assert not MemoryTier(one.size - 1, 100, None).put("e", stored("e"), b"x" * 100, T0, 0)
    epoch = memory.epoch
    memory.discard("c")
    assert not memory.put("f", stored("f"), b"", T0, epoch)
    memory.discard("a", prefix=True)
    assert [key for key in "abcd" if memory.get(key, T0)] == ["d"]
    fill = memory.fill("g", stored("g"), T0, memory.epoch)
    for chunk in (b"x" * 60, b"x" * 60):
        fill.add(chunk)
    assert not fill.finish() and not memory.get("g", T0)


def test_memory_tier_has_the_storage_confirm_copies_every_ttl() -> None:
    memory = MemoryTier(10_000, 100, 1.0)
    kept, changed, gone = stored("k"), stored("k"), stored("k")
    for entry in (kept, changed, gone):
        memory.put("k", entry, b"x", T0, memory.epoch)
    assert len(memory.get("k", T0 + 0.5)) == 3
    assert memory.get("k", T0 + 1) == []  # due: this request reads the storage...
    assert len(memory.get("k", T0 + 1)) == 3  # ...and the others keep the copies meanwhile
    changed_there = replace(changed, response=response(date=http_date(T0 + 1)))
    memory.confirm("k", [kept, changed_there], T0 + 1, memory.epoch)
    assert [copy.entry for copy in memory.get("k", T0 + 1.5)] == [kept]

    assert memory.get("k", T0 + 2) == []
    memory.confirm("k", None, T0 + 2, memory.epoch)  # the read failed: still due
    assert memory.get("k", T0 + 2) == []
    epoch = memory.epoch
    memory.discard("other")
    memory.confirm("k", [kept], T0 + 2, epoch)  # something was invalidated during the read
    assert memory.get("k", T0 + 2) == []
    memory.confirm("k", [kept], T0 + 2, memory.epoch)
    assert len(memory.get("k", T0 + 2.5)) == 1
    assert memory.get("k", T0 + 1) == []  # the clock went back: due


@pytest.mark.parametrize(("config", "reads"), [({}, 0), ({"memory_size": 0}, 5)])
async def test_hits_from_memory_do_not_read_the_storage(
    origin: tuple[Origin, Running],
    client: httpx2.AsyncClient,
    clock: Clock,
    tmp_path: Path,
    config: dict[str, Any],
    reads: int,
) -> None:
    app, up = origin
    app.etag = b'"e"'
    app.headers = [(b"cache-control", b"max-age=60"), (b"vary", b"Accept-Language")]
    proxy = cached(up.url, tmp_path, clock, **config)
    storage = counted(proxy)
    async with front(proxy, mount=None) as running:
        url = running.url + "/m"
        for language in ("en", "fr"):
            response = await client.get(url, headers={"accept-language": language})
            assert response.headers["x-cache-status"] == "MISS"
        await settled(proxy)
        before = storage.reads
        clock.now += 0.5  # within memory_ttl
        for language in ("en", "fr", "en"):
            response = await client.get(url, headers={"accept-language": language})
            assert (response.headers["x-cache-status"], response.headers["age"]) == ("HIT", "0")
        assert response.headers["content-length"] == "2"
        assert response.headers.get_list("vary") == ["Accept-Language"]
        head = await client.head(url, headers={"accept-language": "fr"})
        assert (head.status_code, head.headers["x-cache-status"], head.content) == (
            200,
            "HIT",
            b"",
        )
        assert head.headers["content-length"] == "2"
        not_modified = await client.get(
            url, headers={"accept-language": "en", "if-none-match": '"e"'}
        )
        assert (not_modified.status_code, not_modified.headers["etag"]) == (304, '"e"')
        assert "content-length" not in not_modified.headers
        # Another variant is not answered from these copies.
        response = await client.get(url, headers={"accept-language": "de"})
        assert response.headers["x-cache-status"] == "MISS"
        assert storage.reads - before == reads + 2  # "de": looked up twice (the lock)
    assert app.hits == 3


async def test_memory_copies_are_read_again_after_memory_ttl(
    origin: tuple[Origin, Running], client: httpx2.AsyncClient, clock: Clock, tmp_path: Path
) -> None:
    app, up = origin
    proxy = cached(up.url, tmp_path, clock, memory_ttl=5)
    storage = counted(proxy)
    async with front(proxy, mount=None) as running:
        assert await get(client, running.url + "/t") == ("MISS", b"v1")
        await settled(proxy)
        before = storage.reads
        clock.now += 5
        for _ in range(3):
            assert await get(client, running.url + "/t") == ("HIT", b"v1")
        assert storage.reads - before == 1  # then copied to memory again
    assert app.hits == 1


async def test_memory_is_bounded_and_holds_small_responses_only(
    origin: tuple[Origin, Running], client: httpx2.AsyncClient, clock: Clock, tmp_path: Path
) -> None:
    app, up = origin
    proxy = cached(up.url, tmp_path, clock, memory_size=2500, memory_entry_size=1000)
    assert proxy.cache is not None and proxy.cache.memory is not None
    storage = counted(proxy)
    async with front(proxy, mount=None) as running:
        app.body = b"a" * 1000
        await get(client, running.url + "/a")
        app.body = b"b" * 1000
        await get(client, running.url + "/b")  # there is room for one: /a is dropped
        app.body = b"c" * 1001
        await get(client, running.url + "/c")  # too big for memory
        await settled(proxy)
        assert proxy.cache.memory.size <= 2500 and len(proxy.cache.memory) == 1
        before = storage.reads
        assert await get(client, running.url + "/b") == ("HIT", b"b" * 1000)
        assert storage.reads == before
        assert await get(client, running.url + "/c") == ("HIT", b"c" * 1001)
        assert await get(client, running.url + "/a") == ("HIT", b"a" * 1000)
        assert storage.reads == before + 2
    assert app.hits == 3


async def test_purge_and_unsafe_methods_drop_memory_copies(
    origin: tuple[Origin, Running], client: httpx2.AsyncClient, clock: Clock, tmp_path: Path
) -> None:
    app, up = origin
    proxy = cached(up.url, tmp_path, clock, memory_ttl=None)
    assert proxy.cache is not None and proxy.cache.memory is not None
    memory = proxy.cache.memory
    async with front(proxy, mount=None) as running:
        for path in ("/p/1", "/p/2", "/q"):
            await get(client, running.url + path)
        await settled(proxy)
        assert len(memory) == 3
        await proxy.cache.purge(up.url + "/p/", prefix=True)
        assert [bool(memory.get(up.url + path, clock.now)) for path in ("/p/1", "/q")] == [
            False,
            True,
        ]
        await client.delete(running.url + "/q")
        assert len(memory) == 0
        statuses = [
            (await client.get(running.url + path)).headers["x-cache-status"]
            for path in ("/p/1", "/q")
        ]
    assert statuses == ["MISS", "MISS"]


async def test_a_purge_while_storing_keeps_no_copy_in_memory(
    origin: tuple[Origin, Running], client: httpx2.AsyncClient, clock: Clock, tmp_path: Path
) -> None:
    app, up = origin
    app.chunks = [b"a" * 10, b"b" * 10]
    app.between = asyncio.Event()
    proxy = cached(up.url, tmp_path, clock, memory_ttl=None)
    assert proxy.cache is not None and proxy.cache.memory is not None
    async with front(proxy, mount=None) as running:
        async with client.stream("GET", running.url + "/s") as response:
            chunks = response.aiter_raw()
            assert await chunks.__anext__() == b"a" * 10
            await proxy.cache.purge(up.url + "/s")
            app.between.set()
            assert b"".join([chunk async for chunk in chunks]) == b"b" * 10
        await settled(proxy)
        assert len(proxy.cache.memory) == 0
        # The storage did keep it: hishel's purge does not see an entry still being written.
        assert await get(client, running.url + "/s") == ("HIT", b"a" * 10 + b"b" * 10)


async def test_stale_copies_in_memory_are_not_answers(
    origin: tuple[Origin, Running], client: httpx2.AsyncClient, clock: Clock, tmp_path: Path
) -> None:
    app, up = origin
    app.etag = b'"v1"'
    app.headers = [(b"cache-control", b"max-age=10, must-revalidate")]
    proxy = cached(up.url, tmp_path, clock, memory_ttl=None, use_stale=["error"])
    async with front(proxy, mount=None) as running:
        url = running.url + "/stale"
        assert await get(client, url) == ("MISS", b"v1")
        clock.now += 11  # stale: the copy is kept, but the policy sends it to revalidation
        assert await get(client, url) == ("REVALIDATED", b"v1")
        assert await get(client, url) == ("HIT", b"v1")
        clock.now += 11
        app.status, app.etag = 500, b'"v2"'  # must-revalidate: no stale answer, use_stale or not
        response = await client.get(url)
    assert (response.status_code, response.headers["x-cache-status"]) == (500, "EXPIRED")
    assert app.hits == 3


# Redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def redis_url() -> Iterator[str]:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # an event, not a delay: redis says when it is ready
            if "Ready to accept connections" in line:
                break
        else:
            pytest.fail("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


async def test_redis_shared_by_two_proxies(
    redis_url: str, origin: tuple[Origin, Running], client: httpx2.AsyncClient, clock: Clock
) -> None:
    app, up = origin
    first = cached(up.url, Path("unused"), clock, redis_url=redis_url)
    second = cached(up.url, Path("unused"), clock, redis_url=redis_url)
    assert first.cache is not None and second.cache is not None
    async with front(first, mount=None) as a, front(second, mount=None) as b:
        assert await get(client, a.url + "/shared") == ("MISS", b"v1")
        await settled(first)
        assert await get(client, b.url + "/shared") == ("HIT", b"v1")
        assert await get(client, b.url + "/other") == ("MISS", b"v1")
        await settled(second)
        assert await second.cache.purge(up.url + "/", prefix=True) == 2
        # The first proxy's own copy in memory answers until memory_ttl (1 s) has passed.
        assert await get(client, a.url + "/shared") == ("HIT", b"v1")
        clock.now += 1
        assert await get(client, a.url + "/shared") == ("MISS", b"v1")
    assert app.hits == 3
