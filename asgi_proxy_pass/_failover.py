"""Failover decisions, nginx's `proxy_next_upstream`: pure functions, no I/O.

What a failed attempt is, and whether the request may move on to the next server:

    outcome of the attempt            condition            a server failure?   request sent?
    refused, DNS, TLS failure         error                yes                 no
    connect timeout                   timeout              yes                 no
    no pooled connection in time      (none: 503 here)     no                  no
    read or write timeout             timeout              yes                 yes
    closed early, invalid response    error, invalid_header yes                yes
    status 500, 502, 503, 504, 429    http_500 ...         yes                 yes
    status 403, 404                   http_403, http_404   no                  yes

An attempt that failed before the request was sent is always retried (if its condition is
listed). One that was sent is retried only for an idempotent method, or with `non_idempotent`,
and only if the body can be replayed: a client's POST is never sent twice silently (nginx P6,
P9).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx2

from ._errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = [
    "FAILURE_CONDITIONS",
    "NEXT_UPSTREAM",
    "NON_IDEMPOTENT",
    "Attempt",
    "Budget",
    "classify",
    "counts_as_failure",
    "status_condition",
]

#: What can go wrong with an attempt, in nginx's words (`proxy_next_upstream`,
#: `proxy_cache_use_stale`): errors, timeouts, invalid responses and these statuses.
FAILURE_CONDITIONS = frozenset(
    {
        "error",
        "timeout",
        "invalid_header",
        "http_500",
        "http_502",
        "http_503",
        "http_504",
        "http_403",
        "http_404",
        "http_429",
    }
)
#: nginx `proxy_next_upstream` conditions; the default is nginx's.
NEXT_UPSTREAM = FAILURE_CONDITIONS | {"non_idempotent", "off"}
#: nginx: "non-idempotent methods (POST, LOCK, PATCH)".
NON_IDEMPOTENT = frozenset({"POST", "LOCK", "PATCH"})
#: Statuses that move on to the next server without counting against it (nginx).
NOT_A_FAILURE = frozenset({"http_403", "http_404"})


class Attempt:
    """What happened to one attempt: its conditions and whether the request went out."""

    __slots__ = ("conditions", "sent")

    def __init__(self, conditions: frozenset[str], sent: bool) -> None:
        self.conditions = conditions
        self.sent = sent

    def may_retry(self, *, listed: frozenset[str], method: str, replayable: bool) -> bool:
        """Whether nginx's rules allow another server for this request."""
        if not self.conditions & listed:
            return False
        if not self.sent:
            return True
        idempotent = method not in NON_IDEMPOTENT or "non_idempotent" in listed
        return idempotent and replayable


def classify(exc: UpstreamError) -> Attempt:
    """The conditions an upstream failure meets, and whether the request was sent."""
    if isinstance(exc, UpstreamUnavailable):
        return Attempt(frozenset(), sent=False)
    if isinstance(exc, UpstreamTimeout):
        return Attempt(
            frozenset({"timeout"}), sent=not isinstance(exc.__cause__, httpx2.ConnectTimeout)
        )
    if isinstance(exc, UpstreamConnectError):
        return Attempt(frozenset({"error"}), sent=False)
    if isinstance(exc, UpstreamProtocolError):
        return Attempt(frozenset({"error", "invalid_header"}), sent=True)
    return Attempt(frozenset({"error"}), sent=True)


def status_condition(status: int) -> str:
    """The `proxy_next_upstream` condition of a response status."""
    return f"http_{status}"


def counts_as_failure(conditions: frozenset[str], listed: frozenset[str]) -> bool:
    """Whether the attempt counts against the server's `max_fails`.

    nginx counts errors and timeouts always, and statuses when they are listed (but never 403
    and 404).
    """
    if conditions & {"error", "timeout", "invalid_header"}:
        return True
    return bool((conditions & listed) - NOT_A_FAILURE)


class Budget:
    """nginx `proxy_next_upstream_tries` and `proxy_next_upstream_timeout` for one request.

    `tries` counts attempts, the first included (0: no limit); `timeout` is seconds since the
    first attempt (None: no limit).
    """

    __slots__ = ("clock", "started", "timeout", "tries")

    def __init__(self, tries: int, timeout: float | None, clock: Callable[[], float]) -> None:
        self.tries = tries
        self.timeout = timeout
        self.clock = clock
        self.started: float | None = None

    def start(self) -> None:
        """Mark an attempt as started (the first one starts the clock)."""
        if self.started is None and self.timeout is not None:
            self.started = self.clock()

    def allows(self, attempts: int) -> bool:
        """Whether another attempt may start after `attempts` of them."""
        if self.tries and attempts >= self.tries:
            return False
        if self.started is not None and self.timeout is not None:
            return self.clock() - self.started < self.timeout
        return True
