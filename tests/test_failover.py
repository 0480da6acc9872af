"""`ProxyPass` over an `Upstream` pool, end to end: balancing, failover, retries, backups."""

from __future__ import annotations

import asyncio
import collections
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import httpx2
import pytest
from servers import Running, front, read_body, serve

from asgi_proxy_pass import HealthCheck, ProxyPass, Server, Upstream
from asgi_proxy_pass._types import ASGIApp, Receive, Scope, Send


def named(name: str, status: int = 200) -> ASGIApp:
    """An upstream that says who it is, what it received, and answers `status`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        headers = dict(scope["headers"])
        data = json.dumps(
            {"server": name, "host": headers[b"host"].decode(), "body": body.decode("latin-1")}
        ).encode()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": data})

    return app


@asynccontextmanager
async def upstreams(*apps: ASGIApp) -> AsyncIterator[list[Running]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serve(app)) for app in apps]


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def hangup_server(hits: list[str]) -> AsyncIterator[str]:
    """Accepts, reads the request head, closes without a response (nginx P6)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        hits.append(head.split(b" ", 1)[0].decode())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def names(client: httpx2.AsyncClient, url: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        response = await client.get(url)
        assert response.status_code == 200, response.text
        out.append(response.json()["server"])
    return out


async def test_round_robin_and_host_per_server(client: httpx2.AsyncClient) -> None:
    async with upstreams(named("a"), named("b"), named("c")) as ups:
        pool = Upstream([u.url + "/" for u in ups])
        async with front(ProxyPass(pool)) as proxy:
            seen = await names(client, proxy.url + "/api/x", 300)
            hosts = {(await client.get(proxy.url + "/api/x")).json()["host"] for _ in range(3)}
        await pool.aclose()
    assert collections.Counter(seen) == {"a": 100, "b": 100, "c": 100}
    assert hosts == {u.url.removeprefix("http://") for u in ups}


async def test_smooth_weighted_sequence(client: httpx2.AsyncClient) -> None:
    async with upstreams(named("a"), named("b"), named("c")) as ups:
        pool = Upstream([Server(ups[0].url, weight=5), ups[1].url, ups[2].url])
        async with front(ProxyPass(pool), mount=None) as proxy:
            seen = await names(client, proxy.url + "/", 14)
        await pool.aclose()
    assert "".join(seen) == "aabacaa" * 2


async def test_dead_server_skipped_then_probed(
    client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    dead = closed_port()
    async with upstreams(named("ok")) as [ok]:
        pool = Upstream([Server(dead, fail_timeout=10), ok.url], clock=clock)
        async with front(ProxyPass(pool), mount=None) as proxy:
            first = await names(client, proxy.url + "/", 10)
            assert [s["state"] for s in pool.status()] == ["unavailable", "up"]
            assert caplog.text.count("trying the next server") == 1
            clock.now += 11  # fail_timeout passed: one request probes the dead server again
            await names(client, proxy.url + "/", 4)
            assert caplog.text.count("trying the next server") == 2
        await pool.aclose()
    assert first == ["ok"] * 10


async def test_backup_only_when_primaries_are_down(client: httpx2.AsyncClient) -> None:
    async with upstreams(named("primary"), named("backup")) as [primary, backup]:
        pool = Upstream([primary.url, Server(backup.url, backup=True)])
        async with front(ProxyPass(pool), mount=None) as proxy:
            assert await names(client, proxy.url + "/", 4) == ["primary"] * 4
        await pool.aclose()
        dead_pool = Upstream([closed_port(), closed_port(), Server(backup.url, backup=True)])
        async with front(ProxyPass(dead_pool), mount=None) as proxy:
            assert await names(client, proxy.url + "/", 4) == ["backup"] * 4
        await dead_pool.aclose()


async def test_no_live_upstreams(
    client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    pool = Upstream([closed_port(), closed_port()])
    async with front(ProxyPass(pool), mount=None) as proxy:
        first = await client.get(proxy.url + "/")
        assert "trying the next server" in caplog.text
        caplog.clear()
        second = await client.get(proxy.url + "/")
    await pool.aclose()
    assert first.status_code == second.status_code == 502
    # The second request tries nothing: nginx's "no live upstreams".
    assert "no live upstreams" in caplog.text
    assert "ConnectError" not in caplog.text


async def test_pool_of_one_is_never_marked_down(client: httpx2.AsyncClient) -> None:
    async with upstreams(named("only")) as [only]:
        url = only.url
    pool = Upstream([url])  # the port is closed now
    async with front(ProxyPass(pool), mount=None) as proxy:
        statuses = [(await client.get(proxy.url + "/")).status_code for _ in range(3)]
        assert [s["state"] for s in pool.status()] == ["up"]
    await pool.aclose()
    assert statuses == [502, 502, 502]


@pytest.mark.parametrize(
    ("method", "next_upstream", "hits", "status"),
    [
        ("GET", ("error", "timeout"), ["GET"], 200),
        ("POST", ("error", "timeout"), ["POST"], 502),
        ("PATCH", ("error", "timeout"), ["PATCH"], 502),
        ("POST", ("error", "non_idempotent"), ["POST"], 200),
        ("PUT", ("error",), ["PUT"], 200),
        ("GET", ("timeout",), ["GET"], 502),
        ("GET", ("off",), ["GET"], 502),
    ],
)
async def test_sent_request_retried_only_when_safe(
    client: httpx2.AsyncClient,
    method: str,
    next_upstream: tuple[str, ...],
    hits: list[str],
    status: int,
) -> None:
    seen: list[str] = []
    async with hangup_server(seen) as hangup, upstreams(named("ok")) as [ok]:
        pool = Upstream([hangup, ok.url])
        proxy = ProxyPass(pool, next_upstream=next_upstream)
        async with front(proxy, mount=None) as running:
            response = await client.request(method, running.url + "/", content=b"payload")
        await pool.aclose()
    assert seen == hits
    assert response.status_code == status
    if status == 200:
        assert response.json() == {"server": "ok", "host": ok.url[7:], "body": "payload"}


async def test_large_body_is_not_replayed(client: httpx2.AsyncClient) -> None:
    seen: list[str] = []
    async with hangup_server(seen) as hangup, upstreams(named("ok")) as [ok]:
        # max_fails=0: the hangup server stays in rotation and is tried first every time.
        pool = Upstream([Server(hangup, max_fails=0, weight=1000), ok.url])
        async with front(ProxyPass(pool, replay_buffer_size=100), mount=None) as running:
            small = await client.put(running.url + "/", content=b"x" * 100)
            large = await client.put(running.url + "/", content=b"x" * 101)
        await pool.aclose()
    assert small.status_code == 200 and small.json()["body"] == "x" * 100
    assert large.status_code == 502
    assert seen == ["PUT", "PUT"]


async def test_status_retry_returns_the_last_answer(client: httpx2.AsyncClient) -> None:
    async with upstreams(named("a", 500), named("b", 500)) as ups:
        # A listed status counts as a failure (nginx): max_fails=0 keeps both in rotation.
        pool = Upstream([Server(u.url, max_fails=0) for u in ups])
        proxy = ProxyPass(pool, next_upstream=("error", "timeout", "http_500"))
        async with front(proxy, mount=None) as running:
            get = await client.get(running.url + "/")
            post = await client.post(running.url + "/")
        await pool.aclose()
    assert get.status_code == 500
    assert get.json()["server"] == "b"  # tried a, then b: b's own 500 is relayed
    assert post.status_code == 500  # a POST that was answered is not retried
    assert sum(s["requests"] for s in pool.status()) == 3


async def test_status_retry_moves_on(client: httpx2.AsyncClient) -> None:
    async with upstreams(named("a", 503), named("b")) as ups:
        pool = Upstream([u.url for u in ups])
        proxy = ProxyPass(pool, next_upstream=("error", "http_503"))
        async with front(proxy, mount=None) as running:
            assert await names(client, running.url + "/", 3) == ["b"] * 3
        await pool.aclose()


async def test_read_timeout_retries_idempotent_only(client: httpx2.AsyncClient) -> None:
    release = asyncio.Event()
    calls: list[str] = []

    def slow(name: str) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            calls.append(name)
            await release.wait()

        return app

    async with upstreams(slow("a"), slow("b")) as ups:
        pool = Upstream([Server(u.url, max_fails=0) for u in ups])
        async with front(ProxyPass(pool, timeout=0.2), mount=None) as running:
            get = await client.get(running.url + "/")
            assert sorted(calls) == ["a", "b"]
            calls.clear()
            post = await client.post(running.url + "/")
            assert len(calls) == 1
        release.set()
        await pool.aclose()
    assert get.status_code == post.status_code == 504


async def test_next_upstream_tries(client: httpx2.AsyncClient) -> None:
    seen: list[str] = []
    async with hangup_server(seen) as hangup, upstreams(named("ok")) as [ok]:
        pool = Upstream([hangup, ok.url])
        async with front(ProxyPass(pool, next_upstream_tries=1), mount=None) as running:
            response = await client.get(running.url + "/")
        await pool.aclose()
    assert response.status_code == 502
    assert seen == ["GET"]


async def test_next_upstream_timeout(client: httpx2.AsyncClient) -> None:
    seen: list[str] = []
    async with hangup_server(seen) as hangup, upstreams(named("ok")) as [ok]:
        pool = Upstream([hangup, ok.url])
        proxy = ProxyPass(pool, next_upstream_timeout=5)
        ticks = iter([0.0, 6.0])
        proxy.clock = lambda: next(ticks)
        async with front(proxy, mount=None) as running:
            response = await client.get(running.url + "/")
        await pool.aclose()
    assert response.status_code == 502


async def test_shared_pool_across_mounts(client: httpx2.AsyncClient) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    async with upstreams(named("a"), named("b")) as ups:
        pool = Upstream([u.url + "/" for u in ups])
        one, two = ProxyPass(pool), ProxyPass(pool)
        app = Starlette(routes=[Mount("/one", app=one), Mount("/two", app=two)])
        async with serve(app) as running:
            seen = [
                (await client.get(running.url + path)).json()["server"]
                for path in ("/one/x", "/two/x", "/one/x", "/two/x")
            ]
        await one.aclose()
        assert pool._transports  # a shared pool is not closed by one of its proxies
        await pool.aclose()
    assert seen == ["a", "b", "a", "b"]


async def test_active_health_checks_take_a_server_out(client: httpx2.AsyncClient) -> None:
    healthy = {"a": True, "b": True}

    def checked(name: str) -> ASGIApp:
        inner = named(name)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] == "/health":
                status = 200 if healthy[name] else 500
                await send({"type": "http.response.start", "status": status, "headers": []})
                await send({"type": "http.response.body", "body": b""})
            else:
                await inner(scope, receive, send)

        return app

    async with upstreams(checked("a"), checked("b")) as ups:
        pool = Upstream([u.url for u in ups], health_check=HealthCheck("/health", interval=0.05))
        checked = watch_checks(pool)
        proxy = ProxyPass(pool)
        async with front(proxy, mount=None) as running:
            # The first request starts the checks (lazily, as no lifespan runs here).
            assert sorted(await names(client, running.url + "/", 2)) == ["a", "b"]
            healthy["a"] = False
            await wait_for(
                checked, lambda: [s["state"] for s in pool.status()] == ["unhealthy", "up"]
            )
            assert await names(client, running.url + "/", 4) == ["b"] * 4
            healthy["a"] = True
            await wait_for(checked, lambda: [s["state"] for s in pool.status()] == ["up", "up"])
            assert sorted(await names(client, running.url + "/", 4)) == ["a", "a", "b", "b"]
        await pool.aclose()


def watch_checks(pool: Upstream) -> asyncio.Condition:
    """A condition notified after every active health check verdict of `pool`."""
    checked = asyncio.Condition()
    record = pool._record_check

    def recorded(server: Server, reason: str | None) -> None:
        record(server, reason)

        async def notify() -> None:
            async with checked:
                checked.notify_all()

        asyncio.get_running_loop().create_task(notify())

    pool._record_check = recorded  # type: ignore[method-assign]
    return checked


async def wait_for(checked: asyncio.Condition, condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5), checked:
        await checked.wait_for(condition)


async def test_load_with_a_server_killed_midway() -> None:
    async with upstreams(named("a"), named("b")) as [a, b], serve(named("c")) as c:
        pool = Upstream([a.url, b.url, c.url])
        proxy = ProxyPass(pool)
        async with front(proxy, mount=None) as running:
            limits = httpx2.Limits(max_connections=32)
            async with httpx2.AsyncClient(limits=limits, timeout=30) as client:
                results: list[int] = []
                quarter_done = asyncio.Event()

                async def one() -> None:
                    response = await client.get(running.url + "/")
                    results.append(response.status_code)
                    if len(results) == 500:
                        quarter_done.set()

                async def kill_c() -> None:
                    await quarter_done.wait()
                    c.server.should_exit = True

                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(kill_c())
                    for _ in range(2000):
                        tasks.create_task(one())
        await pool.aclose()
    assert len(results) == 2000
    assert collections.Counter(results) == {200: 2000}
    served = {s["address"]: s["requests"] for s in pool.status()}
    assert all(count > 0 for count in served.values())


def test_config_errors() -> None:
    pool = Upstream(["http://a:1"])
    with pytest.raises(ValueError, match="^verify: with an Upstream pool"):
        ProxyPass(pool, verify=False)
    with pytest.raises(ValueError, match="^next_upstream: unknown condition 'http_418'"):
        ProxyPass("http://a:1", next_upstream=("http_418",))
    with pytest.raises(ValueError, match="^next_upstream: 'off' cannot be combined"):
        ProxyPass("http://a:1", next_upstream=("off", "error"))
    with pytest.raises(ValueError, match="^next_upstream_tries: expected an integer"):
        ProxyPass("http://a:1", next_upstream_tries=-1)
    with pytest.raises(ValueError, match="^upstream: expected a URL string or an Upstream"):
        ProxyPass(3)  # type: ignore[arg-type]


def held(name: str, gate: asyncio.Event, entered: asyncio.Event) -> ASGIApp:
    """An upstream whose requests wait for `gate`, signalling `entered` as each arrives."""
    inner = named(name)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await gate.wait()
        await inner(scope, receive, send)

    return app


@pytest.mark.parametrize(
    ("queue", "queue_timeout", "second"),
    [(0, 60.0, 503), (1, 0.2, 503), (1, 30.0, 200)],
)
async def test_max_conns_and_queue(
    client: httpx2.AsyncClient, queue: int, queue_timeout: float, second: int
) -> None:
    gate, entered = asyncio.Event(), asyncio.Event()
    async with upstreams(held("a", gate, entered)) as [a]:
        pool = Upstream([Server(a.url, max_conns=1)], queue=queue, queue_timeout=queue_timeout)
        async with front(ProxyPass(pool), mount=None) as running:
            first = asyncio.create_task(client.get(running.url + "/"))
            await entered.wait()
            assert pool.status()[0]["in_flight"] == 1
            if second == 200:
                # Queued: it is served once the first request releases its slot.
                queued = asyncio.Event()
                wait_for_slot = pool.wait_for_slot

                async def spy() -> bool:
                    queued.set()
                    return await wait_for_slot()

                pool.wait_for_slot = spy  # type: ignore[method-assign]
                waiting = asyncio.create_task(client.get(running.url + "/"))
                await queued.wait()
                gate.set()
                assert (await waiting).status_code == 200
            else:
                response = await client.get(running.url + "/")
                assert response.status_code == 503
                gate.set()
            assert (await first).status_code == 200
        await pool.aclose()


async def test_busy_server_is_skipped(client: httpx2.AsyncClient) -> None:
    gate, entered = asyncio.Event(), asyncio.Event()
    async with upstreams(held("a", gate, entered), named("b")) as [a, b]:
        pool = Upstream([Server(a.url, max_conns=1), b.url])
        async with front(ProxyPass(pool), mount=None) as running:
            first = asyncio.create_task(client.get(running.url + "/"))
            await entered.wait()
            assert await names(client, running.url + "/", 3) == ["b"] * 3
            gate.set()
            assert (await first).json()["server"] == "a"
        await pool.aclose()


def test_max_conns_and_queue_validation() -> None:
    with pytest.raises(ValueError, match="^max_conns: expected an integer >= 0"):
        Server("http://a:1", max_conns=-1)
    with pytest.raises(ValueError, match="^queue: expected an integer >= 0"):
        Upstream(["http://a:1"], queue=-1)
    with pytest.raises(ValueError, match="^queue_timeout: expected positive seconds"):
        Upstream(["http://a:1"], queue_timeout=0)
