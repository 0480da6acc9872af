"""Active health checks: what to ask each server (`HealthCheck`) and the tasks that ask.

Like Caddy's `health_uri`: every `interval`, one `GET path` per server through the pool's own
transports, with the server's `Host`. The verdict is handed back to the pool, which counts
passes and failures in a row and decides (pure code in `Upstream`). Without a `HealthCheck`
nothing here runs. The tasks are asyncio tasks, because they outlive the request that starts
them lazily; `HealthChecker.aclose()` cancels and awaits every one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Container, Mapping
from typing import TYPE_CHECKING

import httpx2

from ._errors import ConfigError, map_upstream_errors
from ._urls import UpstreamURL

if TYPE_CHECKING:
    from ._upstream import Server

__all__ = ["HealthCheck", "HealthChecker", "probe"]


class HealthCheck:
    """Active health checks, like Caddy's `health_uri`: `GET path` on each server every `interval`.

    A server that fails `unhealthy_threshold` checks in a row is skipped by `select()` until it
    passes `healthy_threshold` in a row. Servers start healthy. Checks go through the pool's
    transports with `Host` set to the server's host, and run on asyncio tasks from
    `Upstream.start()` to `Upstream.aclose()`.

    Args:
        path: The request-target to GET, sent as is (not joined with the pool's path).
            Default "/".
        interval: Seconds between two checks of one server. Default 10 (Caddy: 30 s).
        timeout: Seconds for a whole check, body included. Default 5 (Caddy: 5 s).
        expect_status: Statuses that pass: one, a `range` or any container. Default 200-399
            (nginx Plus `health_check`: 2xx and 3xx).
        healthy_threshold: Passes in a row that make an unhealthy server healthy. Default 1
            (Caddy `health_passes`, nginx Plus `passes=`).
        unhealthy_threshold: Failures in a row that make a server unhealthy. Default 1
            (Caddy `health_fails`, nginx Plus `fails=`).
        headers: Extra request headers (Caddy `health_headers`); a `Host` replaces the server's.
    """

    def __init__(
        self,
        path: str = "/",
        *,
        interval: float = 10.0,
        timeout: float = 5.0,
        expect_status: int | range | Container[int] = range(200, 400),
        healthy_threshold: int = 1,
        unhealthy_threshold: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/") or not _printable(path):
            raise ConfigError(f"path: expected a request-target starting with '/', got {path!r}")
        self.path = path
        self.interval = _check_positive(interval, "interval")
        self.timeout = _check_positive(timeout, "timeout")
        if isinstance(expect_status, bool):
            raise ConfigError(f"expect_status: expected a status or statuses, got {expect_status}")
        if isinstance(expect_status, int):
            if not 100 <= expect_status <= 599:
                raise ConfigError(f"expect_status: {expect_status} is not an HTTP status")
            statuses: Container[int] = (expect_status,)
        elif not isinstance(expect_status, Container) or isinstance(expect_status, (str, bytes)):
            raise ConfigError(
                f"expect_status: expected a status, a range or a container, got {expect_status!r}"
            )
        else:
            statuses = expect_status
        self.expect_status = statuses
        for argument, count in (
            ("healthy_threshold", healthy_threshold),
            ("unhealthy_threshold", unhealthy_threshold),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"{argument}: expected an integer >= 1, got {count!r}")
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.headers: list[tuple[bytes, bytes]] = []
        if headers is not None and not isinstance(headers, Mapping):
            raise ConfigError(f"headers: expected a mapping of names to values, got {headers!r}")
        for name, value in (headers or {}).items():
            if not isinstance(name, str) or not name or not _printable(name) or ":" in name:
                raise ConfigError(f"headers: {name!r} is not a valid header name")
            if not isinstance(value, str) or any(c in value for c in "\r\n\x00"):
                raise ConfigError(f"headers: the value of {name!r} must be a string without CR/LF")
            self.headers.append((name.lower().encode("ascii"), value.encode("latin-1")))

    def __repr__(self) -> str:
        return f"HealthCheck({self.path!r}, interval={self.interval}, timeout={self.timeout})"


def _check_positive(value: float, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{argument}: expected positive seconds, got {value!r}")
    return float(value)


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text


async def probe(
    transport: httpx2.AsyncBaseTransport, url: UpstreamURL, check: HealthCheck
) -> str | None:
    """Run one check of the server at `url`: None when it passes, else why it failed."""
    headers = list(check.headers)
    if not any(name == b"host" for name, _ in headers):
        headers.insert(0, (b"host", url.host_header.encode("ascii")))
    seconds = check.timeout
    request = httpx2.Request(
        "GET",
        url.httpx_url(),
        headers=headers,
        extensions={
            "target": check.path.encode("ascii"),
            "timeout": {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds},
        },
    )
    try:
        async with asyncio.timeout(seconds):
            with map_upstream_errors():
                response = await transport.handle_async_request(request)
                try:
                    async for _ in response.aiter_raw():
                        pass  # read to the end, so that the connection can be reused
                finally:
                    await response.aclose()
    except TimeoutError:
        return f"health check: no answer within {seconds:g}s"
    except Exception as exc:
        return f"health check: {str(exc) or type(exc).__name__}"
    if response.status_code not in check.expect_status:
        return f"health check: status {response.status_code}"
    return None


class HealthChecker:
    """One checking loop per watched server, from `watch()` until `unwatch()` or `aclose()`.

    Args:
        check: What to ask.
        transport_for: The pool's transport for a server.
        record: Receives each verdict: the server and None (passed) or the failure reason.
    """

    def __init__(
        self,
        check: HealthCheck,
        transport_for: Callable[[Server], httpx2.AsyncBaseTransport],
        record: Callable[[Server, str | None], None],
    ) -> None:
        self.check = check
        self.transport_for = transport_for
        self.record = record
        self._tasks: dict[Server, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def watch(self, server: Server) -> None:
        """Start checking `server`, now and then every `interval`."""
        if server not in self._tasks:
            self._tasks[server] = asyncio.get_running_loop().create_task(
                self._loop(server), name=f"asgi_proxy_pass health check {server.url.address}"
            )

    def unwatch(self, server: Server) -> None:
        """Stop checking `server`; `aclose()` still awaits the cancelled task."""
        task = self._tasks.pop(server, None)
        if task is not None:
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def aclose(self) -> None:
        """Cancel every loop and wait until none is left."""
        tasks = [*self._tasks.values(), *self._stopping]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, server: Server) -> None:
        while True:
            reason = await probe(self.transport_for(server), server.url, self.check)
            self.record(server, reason)
            await asyncio.sleep(self.check.interval)
