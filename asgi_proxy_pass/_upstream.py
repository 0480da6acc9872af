"""`Upstream`: a pool of servers, nginx's `upstream { server ...; }` block.

Choosing a server and counting its failures is pure: it reads counters and an injectable clock
and does no I/O, so tables of cases test it. The I/O here is small and optional: transports
created on first use, and active health checks (one GET per server every `interval`).

One attempt, as the proxy drives it:

    server = pool.select(scope, tried)   NoLiveUpstreams (502 at once, no connect) if none is left
    pool.acquire(server)
    ... forward through pool.transport_for(server) ...
    pool.record_success(server)          or  pool.record_failure(server, reason)
    pool.release(server)

Server states, in the order `status()` gives them precedence:

    state        cause                                          selected?
    down         Server(down=True) (nginx `down`)                no
    draining     drain()                                        no; in-flight requests finish
    unhealthy    the active check failed unhealthy_threshold    no, until healthy_threshold
                 times in a row                                 passes in a row
    unavailable  max_fails failures (nginx "temporarily         no, until fail_timeout has
                 disabled")                                     passed; then one probe
    up                                                          yes

Backups are chosen only when no primary can be. A pool of one server (no backups) never marks it
unavailable: every request tries it again (nginx does the same).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import ssl
import time
from collections.abc import Callable, Collection, Iterable
from types import TracebackType
from typing import Self

import httpx2

from ._balancing import STRATEGIES, Ring, least_conn, random_two, smooth_weighted
from ._engine import check_engine, make_transport
from ._errors import ConfigError, UpstreamError, UpstreamUnavailable
from ._health import HealthCheck, HealthChecker
from ._server import Server, check_weight, failed
from ._tls import CertTypes, VerifyTypes, ssl_context
from ._types import Scope
from ._urls import parse_upstream

__all__ = [
    "DEFAULT_LIMITS",
    "HealthCheck",
    "NoLiveUpstreams",
    "Server",
    "Upstream",
    "UpstreamsBusy",
]

logger = logging.getLogger("asgi_proxy_pass")

#: Upstream connections: at most 512 open, 128 kept alive for 4 s. Idle connections close before
#: the 5 s keep-alive timeout of uvicorn and Node.js, so a reused connection is never one that the
#: upstream is closing at that moment.
DEFAULT_LIMITS = httpx2.Limits(
    max_connections=512, max_keepalive_connections=128, keepalive_expiry=4.0
)


class NoLiveUpstreams(UpstreamError):
    """Every server of the pool is down, draining, unhealthy, failed or already tried (502).

    nginx logs "no live upstreams" and answers 502 without a connection attempt.
    """


class UpstreamsBusy(UpstreamUnavailable):
    """Every server that could serve is at its `max_conns`, and the queue is full or the wait
    timed out (503)."""


class Upstream:
    """A pool of servers to balance requests across, nginx's `upstream` block.

    ```python
    pool = Upstream(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
    app = ProxyPass(pool)
    ```

    Args:
        servers: URLs or `Server` objects; all share scheme (`ws`/`wss` count as `http`/`https`)
            and path.
        strategy: `"round_robin"` (the default: nginx's smooth weighted round robin),
            `"least_conn"` (nginx `least_conn`), `"random_two"` (nginx `random two least_conn`),
            `"ip_hash"` (a consistent ring keyed by the client's whole IP address; nginx
            `ip_hash` uses the first three octets of IPv4) or `"hash"` (nginx `hash $key
            consistent`, keyed by `hash_key`).
        hash_key: For `"hash"`: a function of the ASGI scope returning the key, or None to
            fall back to round robin for that request.
        health_check: A `HealthCheck` for active checks. Default None: passive accounting only.
        verify: TLS verification of https servers: True (system trust), False, a CA bundle path
            or an `ssl.SSLContext`. SNI is each server's host name.
        cert: A client certificate for https servers: a path, or `(certfile, keyfile)`.
        limits: The connection pool's `httpx2.Limits`, shared by all servers.
        clock: Seconds, monotonic, for `fail_timeout` and `last_checked`. Default
            `time.monotonic`; tests pass a fake.
        queue: Requests that may wait for a server below its `max_conns` when every server is
            busy (nginx Plus `queue`); more get 503 at once. Default 0: no waiting.
        queue_timeout: Seconds a queued request waits before it gets 503. Default 60 (nginx).
        engine: The HTTP engine: `"httptools"` (the default: our HTTP/1.1 client on uvicorn's
            C parser) or `"httpx"` (httpx2's own transport, pure Python). See
            docs/performance.md.

    Health state lives in this object, so each worker process keeps its own.
    """

    def __init__(
        self,
        servers: Iterable[str | Server],
        *,
        strategy: str = "round_robin",
        hash_key: Callable[[Scope], str | bytes | None] | None = None,
        health_check: HealthCheck | None = None,
        verify: VerifyTypes = True,
        cert: CertTypes | None = None,
        limits: httpx2.Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
        engine: str | None = None,
        queue: int = 0,
        queue_timeout: float = 60.0,
    ) -> None:
        if isinstance(servers, (str, Server)) or not isinstance(servers, Iterable):
            raise ConfigError(
                f"servers: expected a list of URLs or Server objects, got {servers!r}"
            )
        items = list(servers)
        if not items:
            raise ConfigError("servers: the pool is empty; give at least one server")
        if strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}"
            )
        self.strategy = strategy
        if strategy == "hash" and hash_key is None:
            raise ConfigError("hash_key: required with strategy='hash', e.g. lambda scope: ...")
        if hash_key is not None and (strategy != "hash" or not callable(hash_key)):
            raise ConfigError("hash_key: expected a function of the scope, for strategy='hash'")
        self.hash_key = hash_key
        if health_check is not None and not isinstance(health_check, HealthCheck):
            raise ConfigError(f"health_check: expected a HealthCheck, got {health_check!r}")
        self.health_check = health_check
        if not isinstance(limits, httpx2.Limits):
            raise ConfigError(f"limits: expected an httpx2.Limits, got {limits!r}")
        self.limits = limits
        self.engine = check_engine(engine)
        if not callable(clock):
            raise ConfigError(f"clock: expected a function returning seconds, got {clock!r}")
        self._clock = clock
        self._random = random.Random()
        self.servers: list[Server] = []
        first = self._server(items[0], "servers[0]")
        self.scheme: str = first.url.scheme
        self.path: str | None = first.url.path
        self.ssl_context = ssl_context(verify, cert) if self.scheme == "https" else None
        try:
            for i, item in enumerate(items):
                argument = f"servers[{i}]"
                self._insert(first if i == 0 else self._server(item, argument), argument)
        except ConfigError:
            for server in self.servers:  # leave the given Server objects usable elsewhere
                server._owner = None
            raise
        self._rings: dict[bool, tuple[tuple[tuple[int, int], ...], Ring[Server]]] = {}
        self._transports: dict[str | None, httpx2.AsyncBaseTransport] = {}
        self._checker: HealthChecker | None = None
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
            raise ConfigError(f"queue: expected an integer >= 0, got {queue!r}")
        if isinstance(queue_timeout, bool) or not isinstance(queue_timeout, (int, float)):
            raise ConfigError(f"queue_timeout: expected positive seconds, got {queue_timeout!r}")
        if queue_timeout <= 0:
            raise ConfigError(f"queue_timeout: expected positive seconds, got {queue_timeout!r}")
        self.queue = queue
        self.queue_timeout = float(queue_timeout)
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    def __repr__(self) -> str:
        urls = [server.url.url for server in self.servers]
        return f"Upstream({urls!r}, strategy={self.strategy!r})"

    def select(self, scope: Scope, tried: Collection[Server] = ()) -> Server:
        """Choose the server for the next attempt of a request.

        Primaries come first; backups only when no primary can be chosen. A server is skipped
        when it is in `tried`, down, draining, unhealthy, or has `max_fails` failures and its
        `fail_timeout` has not passed (nginx's rule). Once it has passed, the server is chosen
        again for one request, a probe: another failure takes it out for another
        `fail_timeout`.

        Raises:
            NoLiveUpstreams: no server can be chosen ("no live upstreams").
        """
        now = self._clock()
        servers = self.servers
        if len(servers) == 1 and not servers[0].backup:
            # A pool of one (every ProxyPass given a URL): nothing to balance, no list to build.
            server = servers[0]
            if self._available(server, now, tried, not server.draining):
                if now - server._checked > server.fail_timeout:
                    server._checked = now
                return server
            raise self._none_left(now, tried)
        single = self._single()
        for backup in (False, True):
            tier = [server for server in servers if server.backup is backup]
            candidates = [s for s in tier if self._available(s, now, tried, single)]
            if candidates:
                server = self._pick(backup, tier, candidates, scope)
                if now - server._checked > server.fail_timeout:
                    server._checked = now  # opens a new window: this request is the probe
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("upstream: %s selected %s", self.strategy, server.url.address)
                return server
        raise self._none_left(now, tried)

    def _none_left(self, now: float, tried: Collection[Server]) -> UpstreamError:
        # Busy (503, worth queueing for) if some server is out only for its max_conns.
        busy = [s for s in self.servers if s.max_conns and s.in_flight >= s.max_conns]
        for server in busy:
            server.in_flight, saved = 0, server.in_flight
            try:
                if self._available(server, now, tried, self._single()):
                    return UpstreamsBusy("every server is at its max_conns")
            finally:
                server.in_flight = saved
        return NoLiveUpstreams("no live upstreams")

    async def choose(self, scope: Scope, tried: Collection[Server] = ()) -> Server:
        """`select()`, waiting in the queue while every server that could serve is busy.

        Raises:
            UpstreamsBusy: still busy when the queue is full or `queue_timeout` passed (503).
            NoLiveUpstreams: no server can be chosen ("no live upstreams").
        """
        while True:
            try:
                return self.select(scope, tried)
            except UpstreamsBusy:
                if not await self.wait_for_slot():
                    raise

    async def wait_for_slot(self) -> bool:
        """Wait in the queue until a busy server releases a request (nginx Plus `queue`).

        Returns False at once when the queue is full, or after `queue_timeout` seconds.
        """
        if len(self._queue) >= self.queue:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.queue_timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)

    def can_select(self, tried: Collection[Server] = ()) -> bool:
        """Whether `select(scope, tried)` would find a server, without choosing one."""
        now = self._clock()
        single = self._single()
        return any(self._available(server, now, tried, single) for server in self.servers)

    def acquire(self, server: Server) -> None:
        """Count a request or WebSocket starting on `server` (for `least_conn`, `status()`)."""
        server.in_flight += 1
        server.requests += 1

    def release(self, server: Server) -> None:
        """Count a request or WebSocket on `server` as finished, whatever its outcome."""
        server.in_flight -= 1
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # its request tries select() again
                break

    def record_failure(self, server: Server, reason: str) -> None:
        """Count a failed attempt (nginx `proxy_next_upstream` cases: error, timeout, ...).

        `fails` grows by one and the effective weight drops by `weight // max_fails`; at
        `max_fails` the server is out for `fail_timeout`, with a warning. The only server of a
        pool is never taken out.
        """
        server.last_error = reason
        if self._single() and server in self.servers:
            return
        now = self._clock()
        server.fails += 1
        server._accessed = server._checked = now
        if server.max_fails:
            server.effective_weight -= server.weight // server.max_fails
            if server.fails >= server.max_fails:
                logger.warning(
                    "upstream server temporarily disabled: %s after %d failure(s), for %gs: %s",
                    server.url.address,
                    server.fails,
                    server.fail_timeout,
                    reason,
                )
        server.effective_weight = max(server.effective_weight, 0)

    def record_success(self, server: Server) -> None:
        """Count a successful attempt: `fails` resets if the server was chosen after its last
        failure's `fail_timeout` window closed (nginx: "mark peer live if check passed")."""
        if server._accessed < server._checked and server.fails:
            if server.max_fails and server.fails >= server.max_fails:
                logger.info("upstream server %s is back", server.url.address)
            server.fails = 0

    def add(self, server: str | Server) -> Server:
        """Add a server at run time, after the others of its kind (primary or backup)."""
        added = self._insert(self._server(server, "server"), "server")
        if self._checker is not None:
            self._checker.watch(added)
        return added

    def remove(self, server: Server | str) -> None:
        """Remove a server at run time: never chosen again; its in-flight requests finish."""
        found = self._find(server)
        self.servers.remove(found)
        found._owner = None
        if self._checker is not None:
            self._checker.unwatch(found)

    def drain(self, server: Server | str) -> None:
        """Stop sending new requests to a server; in-flight ones continue (nginx Plus `drain`).

        Set `server.draining = False` to undo.
        """
        self._find(server).draining = True

    def set_weight(self, server: Server | str, weight: int) -> None:
        """Change a server's weight at run time (its effective weight restarts from it)."""
        found = self._find(server)
        found.weight = found.effective_weight = check_weight(weight, "")

    def status(self) -> list[dict[str, object]]:
        """One JSON-ready dict per server, primaries then backups: `url`, `address`, `state`
        (`"up"`, `"down"`, `"draining"`, `"unhealthy"` or `"unavailable"`), `backup`, `weight`,
        `effective_weight`, `in_flight`, `requests`, `fails`, `last_error`, `last_checked`.
        """
        now = self._clock()
        single = self._single()
        return [
            {
                "url": server.url.url,
                "address": server.url.address,
                "state": self._state(server, now, single),
                "backup": server.backup,
                "weight": server.weight,
                "effective_weight": server.effective_weight,
                "in_flight": server.in_flight,
                "max_conns": server.max_conns,
                "requests": server.requests,
                "fails": server.fails,
                "last_error": server.last_error,
                "last_checked": server.last_checked,
            }
            for server in self.servers
        ]

    def transport_for(self, server: Server) -> httpx2.AsyncBaseTransport:
        """The pooled transport for `server`: one shared by all TCP servers (the pool keys its
        connections by host and port), one per unix socket path. Created on first use."""
        uds = server.url.uds
        transport = self._transports.get(uds)
        if transport is None:
            transport = make_transport(
                self.engine, ssl_context=self.ssl_context, limits=self.limits, uds=uds
            )
            self._transports[uds] = transport
        return transport

    def ssl_context_for(self, server: Server) -> ssl.SSLContext | None:
        """The TLS context for connecting to `server`, None for plain http."""
        return self.ssl_context if server.url.scheme == "https" else None

    async def start(self) -> None:
        """Start the active health checks, if configured. Calling it again does nothing."""
        if self.health_check is None or self._checker is not None:
            return
        self._checker = HealthChecker(self.health_check, self.transport_for, self._record_check)
        for server in self.servers:
            self._checker.watch(server)

    async def aclose(self) -> None:
        """Stop the health checks and close the pooled connections."""
        checker, self._checker = self._checker, None
        if checker is not None:
            await checker.aclose()
        transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            await transport.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    def _single(self) -> bool:
        # nginx `peers->single`: one server and no backups; a draining server no longer counts.
        serving = [server for server in self.servers if not server.draining]
        return len(serving) == 1 and not serving[0].backup

    def _available(
        self, server: Server, now: float, tried: Collection[Server], single: bool
    ) -> bool:
        if server.down or server.draining or server in tried:
            return False
        if self.health_check is not None and not server.healthy:
            return False
        if server.max_conns and server.in_flight >= server.max_conns:
            return False
        return single or not failed(server, now)

    def _pick(
        self, backup: bool, tier: list[Server], candidates: list[Server], scope: Scope
    ) -> Server:
        if self.strategy == "least_conn":
            return least_conn(candidates)
        if self.strategy == "random_two":
            return random_two(candidates, self._random)
        if self.strategy in ("hash", "ip_hash"):
            key = self._key(scope)
            if key is not None:
                found = self._ring(backup, tier).lookup(key, candidates)
                if found is not None:
                    return found
        return smooth_weighted(candidates)

    def _key(self, scope: Scope) -> bytes | None:
        if self.strategy == "ip_hash":
            client = scope.get("client")
            return str(client[0]).encode() if client else None
        key = self.hash_key(scope) if self.hash_key is not None else None
        if key is None or isinstance(key, bytes):
            return key
        if isinstance(key, str):
            return key.encode("utf-8", "surrogateescape")
        raise TypeError(f"hash_key: expected str, bytes or None, got {key!r}")

    def _ring(self, backup: bool, tier: list[Server]) -> Ring[Server]:
        # Rebuilt only when the tier's servers or weights change (add, remove, set_weight).
        signature = tuple((id(server), server.weight) for server in tier)
        cached = self._rings.get(backup)
        if cached is None or cached[0] != signature:
            ring = Ring((s.url.address, s.weight, s) for s in tier)
            cached = self._rings[backup] = (signature, ring)
        return cached[1]

    def _state(self, server: Server, now: float, single: bool) -> str:
        if server.down:
            return "down"
        if server.draining:
            return "draining"
        if self.health_check is not None and not server.healthy:
            return "unhealthy"
        if not single and failed(server, now):
            return "unavailable"
        return "up"

    def _server(self, item: str | Server, argument: str) -> Server:
        if isinstance(item, Server):
            return item
        if not isinstance(item, str):
            raise ConfigError(f"{argument}: expected a URL string or a Server, got {item!r}")
        try:
            parse_upstream(item, argument=argument)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return Server(item)

    def _insert(self, server: Server, argument: str) -> Server:
        url = server.url
        for i, other in enumerate(self.servers):
            if other._identity == server._identity:
                raise ConfigError(f"{argument}: {url.url!r} is already in the pool (servers[{i}])")
        if server._owner is not None:
            raise ConfigError(f"{argument}: {url.url!r} already belongs to another Upstream")
        if url.scheme != self.scheme:
            raise ConfigError(
                f"{argument}: {url.url!r} is {url.scheme} but the pool is {self.scheme}; "
                "all servers of a pool share one scheme"
            )
        if url.path != self.path:
            raise ConfigError(
                f"{argument}: {url.url!r} has path {url.path!r} but the pool has {self.path!r}; "
                "all servers of a pool share one path"
            )
        position = len(self.servers)
        if not server.backup:
            position = next((i for i, s in enumerate(self.servers) if s.backup), position)
        self.servers.insert(position, server)
        server._owner = self
        return server

    def _find(self, server: Server | str) -> Server:
        if isinstance(server, Server):
            if server in self.servers:
                return server
        else:
            try:
                identity = Server(server)._identity
            except ConfigError:
                raise ConfigError(f"server: {server!r} is not a server URL") from None
            for candidate in self.servers:
                if candidate._identity == identity:
                    return candidate
        raise ConfigError(f"server: {server!r} is not in the pool")

    def _record_check(self, server: Server, reason: str | None) -> None:
        # Consecutive passes and failures, as Caddy counts them (health_passes / health_fails).
        check = self.health_check
        if check is None:
            return
        server.last_checked = self._clock()
        if reason is None:
            server._passes, server._check_fails = server._passes + 1, 0
            if not server.healthy and server._passes >= check.healthy_threshold:
                server.healthy = True
                logger.warning("upstream server %s is healthy again", server.url.address)
            return
        server.last_error = reason
        server._passes, server._check_fails = 0, server._check_fails + 1
        if server.healthy and server._check_fails >= check.unhealthy_threshold:
            server.healthy = False
            logger.warning("upstream server %s is unhealthy: %s", server.url.address, reason)
