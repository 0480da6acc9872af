"""The upstream pool: selection, passive and active health, run-time changes, status.

Selection and accounting are pure, so most tests drive `select()` with a fake clock and read the
sequence of chosen servers. Active health checks run against real uvicorn servers on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from servers import serve

from asgi_proxy_pass._errors import ConfigError, UpstreamError
from asgi_proxy_pass._health import HealthCheck
from asgi_proxy_pass._types import Receive, Scope, Send
from asgi_proxy_pass._upstream import NoLiveUpstreams, Server, Upstream

A, B, C, D = (f"http://10.0.0.{i}:8000" for i in range(1, 5))


class Clock:
    """A fake monotonic clock: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def names(pool: Upstream, count: int, scope: Scope | None = None) -> str:
    """The chosen servers, as letters a-d, for `count` selections."""
    letters = {A: "a", B: "b", C: "c", D: "d"}
    return "".join(letters[pool.select(scope or {}).url.url] for _ in range(count))


def by_url(pool: Upstream) -> dict[str, Server]:
    return {server.url.url: server for server in pool.servers}


# Selection strategies


def test_round_robin_is_even() -> None:
    pool = Upstream([A, B, C])
    assert names(pool, 6) == "abcabc"
    assert Counter(names(pool, 300)) == {"a": 100, "b": 100, "c": 100}


def test_smooth_weighted_round_robin_matches_nginx() -> None:
    # P1: server a weight=5; server b; server c; -> a a b a c a a, twice.
    pool = Upstream([Server(A, weight=5), B, C])
    assert names(pool, 14) == "aabacaa" * 2


def test_least_conn_prefers_the_least_loaded() -> None:
    pool = Upstream([A, B, C], strategy="least_conn")
    a, b, c = pool.servers
    pool.acquire(a)
    pool.acquire(a)
    assert names(pool, 4) == "bcbc"  # ties between b and c go round robin
    pool.acquire(b)
    assert names(pool, 2) == "cc"
    pool.release(a)
    pool.release(a)
    assert names(pool, 1) == "a"


def test_least_conn_counts_in_flight_per_weight() -> None:
    pool = Upstream([Server(A, weight=3), B], strategy="least_conn")
    a, b = pool.servers
    for _ in range(2):
        pool.acquire(a)
    assert names(pool, 1) == "b"  # 0/1 < 2/3
    pool.acquire(b)
    assert names(pool, 1) == "a"  # 2/3 < 1/1


def test_random_two_spreads_and_prefers_the_less_loaded() -> None:
    pool = Upstream([A, B, C], strategy="random_two")
    counts = Counter(names(pool, 300))
    assert set(counts) == {"a", "b", "c"}
    assert min(counts.values()) > 50
    a = pool.servers[0]
    for _ in range(5):
        pool.acquire(a)
    # Any pair drawn holds b or c, which beats a.
    assert "a" not in names(pool, 100)


def test_random_two_with_one_candidate() -> None:
    pool = Upstream([A, Server(B, down=True)], strategy="random_two")
    assert names(pool, 3) == "aaa"


def keys_to_servers(pool: Upstream, keys: list[str]) -> dict[str, str]:
    return {key: pool.select({"key": key}).url.url for key in keys}


def hash_pool(*servers: str | Server) -> Upstream:
    return Upstream(list(servers), strategy="hash", hash_key=lambda scope: scope.get("key"))


def test_hash_is_stable_and_remaps_little_when_a_server_is_added() -> None:
    pool = hash_pool(A, B, C)
    keys = [f"user-{i}" for i in range(1000)]
    before = keys_to_servers(pool, keys)
    assert before == keys_to_servers(pool, keys)
    assert min(Counter(before.values()).values()) > 200
    pool.add(D)
    after = keys_to_servers(pool, keys)
    moved = [key for key in keys if before[key] != after[key]]
    assert 0 < len(moved) < 0.35 * len(keys)
    assert {after[key] for key in moved} == {D}


def test_hash_removal_moves_only_the_removed_servers_keys() -> None:
    pool = hash_pool(A, B, C, D)
    keys = [f"k{i}" for i in range(500)]
    before = keys_to_servers(pool, keys)
    pool.remove(D)
    after = keys_to_servers(pool, keys)
    assert all(after[k] == before[k] for k in keys if before[k] != D)


def test_hash_skips_unusable_servers_and_keeps_the_rest() -> None:
    pool = hash_pool(A, B, C)
    keys = [f"k{i}" for i in range(300)]
    before = keys_to_servers(pool, keys)
    by_url(pool)[B].down = True
    after = keys_to_servers(pool, keys)
    assert B not in after.values()
    assert all(after[k] == before[k] for k in keys if before[k] != B)
    # A retry goes to the next server on the ring, never back to a tried one.
    first = pool.select({"key": "k1"})
    assert pool.select({"key": "k1"}, tried=[first]) not in (first, by_url(pool)[B])


def test_hash_weight_means_more_points() -> None:
    pool = hash_pool(Server(A, weight=2), B)
    counts = Counter(keys_to_servers(pool, [f"k{i}" for i in range(2000)]).values())
    assert 1.4 < counts[A] / counts[B] < 2.8


def test_hash_without_key_falls_back_to_round_robin() -> None:
    pool = hash_pool(A, B)
    assert names(pool, 4) == "abab"


def test_hash_key_may_be_bytes_and_must_be_text() -> None:
    pool = Upstream([A, B], strategy="hash", hash_key=lambda scope: scope["key"])
    assert pool.select({"key": b"x"}) is pool.select({"key": "x"})
    with pytest.raises(TypeError, match="hash_key"):
        pool.select({"key": 3})


def test_ip_hash_is_stable_per_client() -> None:
    pool = Upstream([A, B, C], strategy="ip_hash")
    for ip in ("192.0.2.7", "2001:db8::1", "198.51.100.200"):
        chosen = {pool.select({"client": (ip, port)}) for port in range(1000, 1020)}
        assert len(chosen) == 1
    spread = {pool.select({"client": (f"203.0.113.{i}", 1)}) for i in range(60)}
    assert len(spread) == 3
    # No client address (a unix socket): round robin.
    assert names(pool, 3, {"client": None}) == "abc"


# Passive health: max_fails, fail_timeout, backups, down


def test_down_server_is_never_selected() -> None:
    pool = Upstream([A, Server(B, down=True), C])
    assert set(names(pool, 30)) == {"a", "c"}
    pool.servers[1].down = False
    assert set(names(pool, 30)) == {"a", "b", "c"}


def test_backup_is_used_only_when_no_primary_can_be_chosen() -> None:
    clock = Clock()
    pool = Upstream([Server(A), Server(B, backup=True)], clock=clock)
    a, b = pool.servers
    assert names(pool, 5) == "aaaaa"
    # P3: within one request, a retry after the only primary goes to the backup.
    assert pool.select({}, tried=[a]) is b
    pool.record_failure(a, "refused")
    assert names(pool, 3) == "bbb"
    clock.now += 10.5
    assert names(pool, 1) == "a"  # the probe
    pool.record_success(a)
    assert names(pool, 3) == "aaa"


def test_failed_server_is_skipped_then_probed_once_after_fail_timeout() -> None:
    clock = Clock()
    pool = Upstream([A, B], clock=clock)
    a, b = pool.servers
    assert pool.select({}) is a
    pool.record_failure(a, "connection refused")  # P2
    assert pool.select({}, tried=[a]) is b
    assert names(pool, 4) == "bbbb"
    clock.now += 10.0  # `now - checked <= fail_timeout`: still out at exactly 10 s
    assert names(pool, 2) == "bb"
    clock.now += 0.5
    assert names(pool, 6).count("a") == 1  # one request probes a; the others stay on b
    pool.record_failure(a, "connection refused")  # out for another fail_timeout
    clock.now += 5
    assert names(pool, 4) == "bbbb"
    clock.now += 5.5
    assert names(pool, 6).count("a") == 1
    pool.record_success(a)
    assert a.fails == 0
    assert names(pool, 8).count("a") == 4


def test_max_fails_counts_failures_and_zero_never_marks_down() -> None:
    clock = Clock()
    pool = Upstream([Server(A, max_fails=3), Server(B, max_fails=0)], clock=clock)
    a, b = pool.servers
    for _ in range(2):
        pool.record_failure(a, "timeout")
    assert "a" in names(pool, 4)
    pool.record_failure(a, "timeout")
    assert names(pool, 4) == "bbbb"
    for _ in range(50):
        pool.record_failure(b, "timeout")
    assert pool.select({}) is b


def test_success_inside_the_window_does_not_reset_fails() -> None:
    # nginx resets `fails` only on a success after the fail_timeout window has passed.
    clock = Clock()
    pool = Upstream([Server(A, max_fails=2), B], clock=clock)
    a = pool.servers[0]
    pool.record_failure(a, "timeout")
    pool.record_success(a)
    assert a.fails == 1
    clock.now += 11
    assert pool.select({}) is a
    pool.record_success(a)
    assert a.fails == 0


def test_no_live_upstreams_when_every_server_failed() -> None:
    clock = Clock()
    pool = Upstream([A, B], clock=clock)
    a, b = pool.servers
    pool.record_failure(a, "refused")
    pool.record_failure(b, "refused")
    with pytest.raises(NoLiveUpstreams, match="^no live upstreams$") as caught:
        pool.select({})
    assert isinstance(caught.value, UpstreamError)
    assert caught.value.status_code == 502
    clock.now += 10.5
    assert {pool.select({}), pool.select({})} == {a, b}  # both probed again


def test_no_live_upstreams_when_every_server_was_tried() -> None:
    pool = Upstream([A, B])
    with pytest.raises(NoLiveUpstreams):
        pool.select({}, tried=list(pool.servers))


def test_a_pool_of_one_never_marks_its_server_down() -> None:
    # P5: every request tries the only server again.
    pool = Upstream([A], clock=Clock())
    a = pool.servers[0]
    for _ in range(5):
        pool.record_failure(a, "refused")
        assert pool.select({}) is a
    assert a.fails == 0
    assert a.last_error == "refused"
    assert pool.status()[0]["state"] == "up"
    with pytest.raises(NoLiveUpstreams):
        pool.select({}, tried=[a])
    a.down = True
    with pytest.raises(NoLiveUpstreams):
        pool.select({})


def test_a_pool_with_a_backup_is_not_a_pool_of_one() -> None:
    pool = Upstream([A, Server(B, backup=True)], clock=Clock())
    a, b = pool.servers
    pool.record_failure(a, "refused")
    assert pool.select({}) is b


def test_effective_weight_drops_on_failure_and_recovers_gradually() -> None:
    pool = Upstream([Server(A, weight=4, max_fails=2), B], clock=Clock())
    a, b = pool.servers
    pool.record_failure(a, "timeout")  # fails 1 < max_fails 2: still selectable
    assert a.effective_weight == 2  # weight 4 - 4 // 2
    seen = []
    for _ in range(3):
        pool.select({})
        seen.append(a.effective_weight)
    assert seen == [3, 4, 4]  # +1 per selection, up to the weight


def test_effective_weight_shifts_the_share() -> None:
    healthy = Upstream([Server(A, weight=10), B], clock=Clock())
    hurt = Upstream([Server(A, weight=10, max_fails=10), B], clock=Clock())
    for _ in range(9):
        hurt.record_failure(hurt.servers[0], "timeout")
    assert hurt.servers[0].effective_weight == 1
    assert names(healthy, 4) == "aaaa"
    assert names(hurt, 4) == "abaa"


def test_marking_down_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    pool = Upstream([A, B], clock=Clock())
    with caplog.at_level(logging.DEBUG, logger="asgi_proxy_pass"):
        pool.select({})
        pool.record_failure(pool.servers[0], "connection refused")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "temporarily disabled" in warnings[0].getMessage()
    assert "10.0.0.1:8000" in warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "selected" in r.getMessage() for r in caplog.records)


# Run-time changes and status


def test_add_remove_at_run_time() -> None:
    pool = Upstream([A, Server(C, backup=True)])
    added = pool.add(B)
    assert [s.url.url for s in pool.servers] == [A, B, C]  # primaries, then backups
    assert names(pool, 4) == "abab"
    a = pool.servers[0]
    pool.acquire(a)
    pool.remove(A)  # by URL; the in-flight request finishes
    assert names(pool, 3) == "bbb"
    pool.release(a)
    assert a.in_flight == 0
    assert [entry["url"] for entry in pool.status()] == [B, C]
    pool.remove(added)
    assert names(pool, 2) == "cc"  # only the backup is left
    pool.add(Server(A))  # a removed server may come back
    assert names(pool, 1) == "a"


def test_drain_stops_new_requests_only() -> None:
    pool = Upstream([A, B])
    a, b = pool.servers
    pool.acquire(a)
    pool.drain(A)
    assert names(pool, 3) == "bbb"
    assert a.in_flight == 1
    assert pool.status()[0]["state"] == "draining"
    a.draining = False
    assert "a" in names(pool, 2)


def test_draining_the_other_server_makes_a_pool_of_one() -> None:
    pool = Upstream([A, B], clock=Clock())
    a, b = pool.servers
    pool.drain(b)
    pool.record_failure(a, "refused")
    assert pool.select({}) is a


def test_set_weight_at_run_time() -> None:
    pool = Upstream([A, B])
    pool.set_weight(A, 3)
    assert names(pool, 8).count("a") == 6
    hashed = hash_pool(A, B)
    before = Counter(keys_to_servers(hashed, [f"k{i}" for i in range(1000)]).values())
    hashed.set_weight(hashed.servers[0], 3)
    after = Counter(keys_to_servers(hashed, [f"k{i}" for i in range(1000)]).values())
    assert after[A] > before[A] * 1.3


def test_run_time_changes_reject_bad_input() -> None:
    pool = Upstream([A, B])
    with pytest.raises(ConfigError, match="^server: .* is already in the pool"):
        pool.add(A)
    with pytest.raises(ConfigError, match="^server: .* is not in the pool"):
        pool.remove(C)
    with pytest.raises(ConfigError, match="^server: .* is not in the pool"):
        pool.drain(Server(C))
    with pytest.raises(ConfigError, match="^server: 'nope' is not a server URL"):
        pool.remove("nope")
    with pytest.raises(ConfigError, match="^weight: expected an integer >= 1, got 0"):
        pool.set_weight(A, 0)
    with pytest.raises(ConfigError, match="^server: .* is https but the pool is http"):
        pool.add("https://10.0.0.9")


def test_status_describes_every_server() -> None:
    clock = Clock()
    pool = Upstream(
        [A, Server(B, weight=2), Server(C, down=True), Server(D, backup=True)],
        health_check=HealthCheck("/health"),
        clock=clock,
    )
    a, b, c, d = pool.servers
    pool.acquire(a)
    pool.record_failure(b, "connection refused")
    pool._record_check(a, "health check: status 500")
    assert pool.status() == [
        {
            "url": A,
            "address": "10.0.0.1:8000",
            "state": "unhealthy",
            "backup": False,
            "weight": 1,
            "effective_weight": 1,
            "in_flight": 1,
            "max_conns": 0,
            "requests": 1,
            "fails": 0,
            "last_error": "health check: status 500",
            "last_checked": 1000.0,
        },
        {
            "url": B,
            "address": "10.0.0.2:8000",
            "state": "unavailable",
            "backup": False,
            "weight": 2,
            "effective_weight": 0,
            "in_flight": 0,
            "max_conns": 0,
            "requests": 0,
            "fails": 1,
            "last_error": "connection refused",
            "last_checked": None,
        },
        {
            "url": C,
            "address": "10.0.0.3:8000",
            "state": "down",
            "backup": False,
            "weight": 1,
            "effective_weight": 1,
            "in_flight": 0,
            "max_conns": 0,
            "requests": 0,
            "fails": 0,
            "last_error": None,
            "last_checked": None,
        },
        {
            "url": D,
            "address": "10.0.0.4:8000",
            "state": "up",
            "backup": True,
            "weight": 1,
            "effective_weight": 1,
            "in_flight": 0,
            "max_conns": 0,
            "requests": 0,
            "fails": 0,
            "last_error": None,
            "last_checked": None,
        },
    ]
    assert pool.select({}) is d  # a unhealthy, b unavailable, c down: the backup
    clock.now += 11
    assert pool.status()[1]["state"] == "up"
    assert pool.select({}) is b


def test_active_health_thresholds_count_in_a_row() -> None:
    check = HealthCheck(healthy_threshold=2, unhealthy_threshold=3)
    pool = Upstream([A, B], health_check=check, clock=Clock())
    a = pool.servers[0]
    for verdict in ("fail", "fail", None, "fail", "fail"):
        pool._record_check(a, verdict)
    assert a.healthy
    pool._record_check(a, "fail")
    assert not a.healthy
    assert names(pool, 3) == "bbb"
    pool._record_check(a, None)
    assert not a.healthy
    pool._record_check(a, None)
    assert a.healthy
    assert "a" in names(pool, 2)


def test_repr() -> None:
    assert repr(Server(A, weight=2, backup=True)) == f"Server({A!r}, weight=2, backup=True)"
    assert repr(Upstream([A, B])) == f"Upstream([{A!r}, {B!r}], strategy='round_robin')"
    assert repr(HealthCheck("/h", interval=1, timeout=2)) == (
        "HealthCheck('/h', interval=1.0, timeout=2.0)"
    )


# Configuration


def test_scheme_aliases_and_shared_paths_are_accepted() -> None:
    pool = Upstream(["ws://10.0.0.1:1/v2/", "http://10.0.0.2:2/v2/"])
    assert (pool.scheme, pool.path) == ("http", "/v2/")
    pool = Upstream(["wss://10.0.0.1", "https://10.0.0.2"])
    assert pool.scheme == "https"


def other_pool_server() -> Server:
    server = Server(B)
    Upstream([server])
    return server


BAD_CONFIGS: list[tuple[Callable[[], object], str]] = [
    (lambda: Upstream([]), r"^servers: the pool is empty"),
    (lambda: Upstream(A), r"^servers: expected a list"),
    (lambda: Upstream(3), r"^servers: expected a list"),  # type: ignore[arg-type]
    (lambda: Upstream([A, 3]), r"^servers\[1\]: expected a URL string or a Server"),  # type: ignore[list-item]
    (lambda: Upstream([A, "ftp://b"]), r"^servers\[1\]: expected an http://"),
    (lambda: Upstream([A, "https://b"]), r"^servers\[1\]: 'https://b' is https .* one scheme"),
    (lambda: Upstream([A + "/v2/", B + "/v1/"]), r"^servers\[1\]: .* has path '/v1/' .* path"),
    (lambda: Upstream([A, B + "/"]), r"^servers\[1\]: .* has path '/' but the pool has None"),
    (lambda: Upstream([A, B, A]), r"^servers\[2\]: .* is already in the pool \(servers\[0\]\)"),
    (lambda: Upstream([A, "ws://10.0.0.1:8000"]), r"^servers\[1\]: .* already in the pool"),
    (lambda: Upstream([A, other_pool_server()]), r"^servers\[1\]: .* another Upstream"),
    (lambda: Upstream([A], strategy="fastest"), r"^strategy: expected one of round_robin"),
    (lambda: Upstream([A], strategy="hash"), r"^hash_key: required with strategy='hash'"),
    (lambda: Upstream([A], hash_key=lambda s: "k"), r"^hash_key: .* for strategy='hash'"),
    (lambda: Upstream([A], health_check="/health"), r"^health_check: expected a HealthCheck"),  # type: ignore[arg-type]
    (lambda: Upstream([A], limits=10), r"^limits: expected an httpx2.Limits"),  # type: ignore[arg-type]
    (lambda: Upstream([A], clock=5.0), r"^clock: expected a function"),  # type: ignore[arg-type]
    (lambda: Upstream(["https://b"], verify="/no/such/ca.pem"), r"^verify: no CA bundle"),
    (lambda: Server("b:80"), r"^url: expected an http://"),
    (lambda: Server(A, weight=0), r"^weight: expected an integer >= 1, got 0 for"),
    (lambda: Server(A, weight=1.5), r"^weight: expected an integer >= 1, got 1.5"),  # type: ignore[arg-type]
    (lambda: Server(A, weight=True), r"^weight: expected an integer"),
    (lambda: Server(A, max_fails=-1), r"^max_fails: expected an integer >= 0, got -1"),
    (lambda: Server(A, fail_timeout=0), r"^fail_timeout: expected positive seconds, got 0"),
    (lambda: Server(A, backup="yes"), r"^backup: expected a bool"),  # type: ignore[arg-type]
    (lambda: Server(A, down=1), r"^down: expected a bool"),  # type: ignore[arg-type]
    (lambda: HealthCheck("health"), r"^path: expected a request-target starting with '/'"),
    (lambda: HealthCheck("/a b"), r"^path: expected a request-target"),
    (lambda: HealthCheck(interval=0), r"^interval: expected positive seconds"),
    (lambda: HealthCheck(timeout=-1), r"^timeout: expected positive seconds"),
    (lambda: HealthCheck(expect_status=99), r"^expect_status: 99 is not an HTTP status"),
    (lambda: HealthCheck(expect_status="200"), r"^expect_status: expected a status"),  # type: ignore[arg-type]
    (lambda: HealthCheck(expect_status=True), r"^expect_status: expected a status"),
    (lambda: HealthCheck(healthy_threshold=0), r"^healthy_threshold: expected an integer >= 1"),
    (lambda: HealthCheck(unhealthy_threshold=0), r"^unhealthy_threshold: expected an integer"),
    (lambda: HealthCheck(headers=[("a", "b")]), r"^headers: expected a mapping"),  # type: ignore[arg-type]
    (lambda: HealthCheck(headers={"a b": "c"}), r"^headers: 'a b' is not a valid header name"),
    (lambda: HealthCheck(headers={"x": "a\r\nb"}), r"^headers: the value of 'x' must be"),
]


@pytest.mark.parametrize(
    ("make", "message"), BAD_CONFIGS, ids=[message for _, message in BAD_CONFIGS]
)
def test_bad_configuration(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_a_failed_construction_leaves_servers_usable() -> None:
    server = Server(A)
    with pytest.raises(ConfigError):
        Upstream([server, "ftp://b"])
    Upstream([server])


# Transports


async def test_transports_are_shared_per_tcp_and_per_socket_path() -> None:
    async with (
        Upstream([A, B]) as tcp,
        Upstream(["http://unix:/run/a.sock", "http://unix:/run/b.sock"]) as uds,
    ):
        a, b = tcp.servers
        assert tcp.transport_for(a) is tcp.transport_for(b)
        assert tcp.ssl_context_for(a) is None
        x, y = uds.servers
        assert uds.transport_for(x) is uds.transport_for(x)
        assert uds.transport_for(x) is not uds.transport_for(y)


async def test_https_pool_has_one_ssl_context(ca_pem: str) -> None:
    context = ssl.create_default_context(cafile=ca_pem)
    async with Upstream(["https://10.0.0.1", "https://10.0.0.2"], verify=context) as pool:
        assert pool.ssl_context_for(pool.servers[1]) is context
    unverified = Upstream(["https://10.0.0.1"], verify=False)
    assert unverified.ssl_context is not None
    assert unverified.ssl_context.verify_mode == ssl.CERT_NONE


# Active health checks, against real servers


class HealthApp:
    """An upstream whose /health answers `status`, recording what each check sent."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.seen: list[tuple[str, dict[bytes, bytes]]] = []
        self.release = asyncio.Event()
        self.hang = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.seen.append((scope["raw_path"].decode(), dict(scope["headers"])))
        if self.hang:
            await self.release.wait()
        body = b"ok" if self.status < 400 else b"broken"
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": body})


class Verdicts:
    """Wakes the test on each health verdict the pool records: waits use events, not sleeps.

    Created before the checks start, since the checker takes the pool's recorder then.
    """

    def __init__(self, pool: Upstream) -> None:
        self.count = 0
        self._event = asyncio.Event()
        record = pool._record_check

        def counting(server: Server, reason: str | None) -> None:
            record(server, reason)
            self.count += 1
            self._event.set()

        pool._record_check = counting  # type: ignore[method-assign]

    async def until(self, predicate: Callable[[], bool], seconds: float = 10.0) -> None:
        with anyio.fail_after(seconds):
            while not predicate():
                self._event = asyncio.Event()
                await self._event.wait()

    async def until_count(self, count: int) -> None:
        await self.until(lambda: self.count >= count)


def check_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("asgi_proxy_pass health")]


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def two() -> AsyncIterator[tuple[HealthApp, str, HealthApp, str]]:
    good, bad = HealthApp(200), HealthApp(500)
    async with serve(good) as one, serve(bad) as other:
        yield good, one.url, bad, other.url


async def test_failing_server_is_skipped_until_it_recovers(
    two: tuple[HealthApp, str, HealthApp, str], caplog: pytest.LogCaptureFixture
) -> None:
    good, good_url, bad, bad_url = two
    check = HealthCheck("/health?deep=1", interval=0.02, healthy_threshold=2, unhealthy_threshold=2)
    pool = Upstream([good_url, bad_url], health_check=check)
    verdicts = Verdicts(pool)
    async with pool:
        await pool.start()  # again: nothing more starts
        assert len(check_tasks()) == 2
        ok, broken = pool.servers
        await verdicts.until(lambda: not broken.healthy)
        assert len(bad.seen) >= 2
        assert broken.last_error == "health check: status 500"
        assert pool.status()[1]["state"] == "unhealthy"
        assert {pool.select({}) for _ in range(10)} == {ok}
        bad.status = 200
        await verdicts.until(lambda: broken.healthy)
        assert {pool.select({}) for _ in range(10)} == {ok, broken}
        assert ok.healthy and ok.last_checked is not None
    assert check_tasks() == []
    path, headers = good.seen[0]
    assert path == "/health"
    assert headers[b"host"] == good_url.removeprefix("http://").encode()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("is unhealthy: health check: status 500" in m for m in messages)
    assert any("is healthy again" in m for m in messages)


async def test_health_check_headers_and_expected_status() -> None:
    app = HealthApp(204)
    check = HealthCheck(
        "/ping", interval=0.02, expect_status=204, headers={"Host": "svc.internal", "X-Probe": "1"}
    )
    async with serve(app) as running:
        pool = Upstream([running.url], health_check=check)
        verdicts = Verdicts(pool)
        async with pool:
            await verdicts.until_count(2)
            assert pool.servers[0].healthy
    path, headers = app.seen[0]
    assert (path, headers[b"host"], headers[b"x-probe"]) == ("/ping", b"svc.internal", b"1")
    assert list(headers).count(b"host") == 1


async def test_refused_and_silent_servers_are_unhealthy() -> None:
    app = HealthApp()
    app.hang = True
    check = HealthCheck(interval=0.02, timeout=0.2)
    with refused_port() as port:
        async with serve(app) as silent:
            try:
                pool = Upstream([f"http://127.0.0.1:{port}", silent.url], health_check=check)
                verdicts = Verdicts(pool)
                async with pool:
                    refused, hanging = pool.servers
                    await verdicts.until(lambda: not refused.healthy and not hanging.healthy)
                    assert refused.last_error is not None
                    assert refused.last_error.startswith("health check: ")
                    assert hanging.last_error == "health check: no answer within 0.2s"
                    with pytest.raises(NoLiveUpstreams):
                        pool.select({})
            finally:
                app.release.set()
    assert check_tasks() == []


async def test_add_and_remove_during_checks(two: tuple[HealthApp, str, HealthApp, str]) -> None:
    good, good_url, bad, bad_url = two
    pool = Upstream([good_url], health_check=HealthCheck(interval=0.02))
    verdicts = Verdicts(pool)
    async with pool:
        added = pool.add(bad_url)
        await verdicts.until(lambda: not added.healthy)
        tasks = check_tasks()
        assert len(tasks) == 2
        pool.remove(added)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        assert len(check_tasks()) == 1
        assert added.url.address in next(t for t in tasks if t.done()).get_name()
    assert check_tasks() == []


async def test_checks_over_tls_and_unix_sockets(
    server_pem: str, ca_pem: str, tmp_path: Path
) -> None:
    tls_app, unix_app = HealthApp(), HealthApp()
    check = HealthCheck(interval=0.02)
    sock = str(tmp_path / "up.sock")
    async with serve(tls_app, ssl_certfile=server_pem) as tls, serve(unix_app, uds=sock) as unix:
        for url in (tls.url, unix.url):
            pool = Upstream([url], health_check=check, verify=ca_pem)  # verify: for https only
            verdicts = Verdicts(pool)
            async with pool:
                await verdicts.until_count(2)
                assert pool.servers[0].healthy, pool.servers[0].last_error
        assert len(tls_app.seen) >= 2
        assert unix_app.seen[0][1][b"host"] == b"localhost"
    assert check_tasks() == []


async def test_no_health_check_starts_nothing() -> None:
    pool = Upstream([A, B])
    await pool.start()
    assert check_tasks() == []
    await pool.aclose()
    await pool.aclose()


async def test_transport_reaches_the_server() -> None:
    app = HealthApp()
    async with serve(app) as running, Upstream([running.url]) as pool:
        server = pool.select({})
        request = httpx2.Request(
            "GET", server.url.httpx_url(), headers={"host": server.url.host_header}
        )
        response = await pool.transport_for(server).handle_async_request(request)
        await response.aread()
        assert response.status_code == 200
