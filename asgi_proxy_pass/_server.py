"""`Server`: one server of an `Upstream` pool, its options and its run-time counters.

The counters are changed by the pool (`_upstream.py`), which also decides from them whether the
server may be chosen; `failed()` is nginx's rule for a server taken out by passive accounting.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ._errors import ConfigError
from ._urls import UpstreamURL, parse_upstream

if TYPE_CHECKING:
    from ._upstream import Upstream

__all__ = ["Server", "check_weight", "failed"]


class Server:
    """One server of an `Upstream` pool (nginx `server address [parameters];`).

    Args:
        url: The server, as for `ProxyPass`: `"http://10.0.0.1:8000"`, `"https://b/v2/"`,
            `"http://unix:/run/app.sock"`. All servers of a pool share scheme and path.
        weight: Its share of requests relative to the others. Default 1 (nginx `weight=1`).
        max_fails: Failures within `fail_timeout` after which it is out for `fail_timeout`;
            0 never takes it out. Default 1 (nginx `max_fails=1`).
        fail_timeout: Seconds a failed server stays out. Default 10 (nginx `fail_timeout=10s`).
        backup: Chosen only when no primary server can be (nginx `backup`). Default False.
        down: Never chosen while True; may be changed at run time (nginx `down`). Default False.
        max_conns: Requests and WebSockets it may serve at once; a busy server is skipped, and
            when every server is busy a request waits in the pool's queue (nginx `max_conns`
            and `queue`). Default 0: no limit.

    Besides the arguments, these attributes describe it at run time: `url` (the parsed
    `UpstreamURL`), `in_flight` (requests and WebSockets using it now), `requests` (times it was
    acquired), `fails` (failures counted by passive accounting), `effective_weight` (its weight
    after failures, recovering by one per selection), `draining`, `healthy` (the active health
    check's verdict, True without checks), `last_error` and `last_checked` (when the active
    check last ran, on the pool's clock).
    """

    def __init__(
        self,
        url: str,
        *,
        weight: int = 1,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        backup: bool = False,
        down: bool = False,
        max_conns: int = 0,
    ) -> None:
        try:
            self.url: UpstreamURL = parse_upstream(url, argument="url")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.weight = check_weight(weight, f" for {url!r}")
        if isinstance(max_fails, bool) or not isinstance(max_fails, int) or max_fails < 0:
            raise ConfigError(f"max_fails: expected an integer >= 0, got {max_fails!r} for {url!r}")
        self.max_fails = max_fails
        if (
            isinstance(fail_timeout, bool)
            or not isinstance(fail_timeout, (int, float))
            or not 0 < fail_timeout < math.inf
        ):
            raise ConfigError(
                f"fail_timeout: expected positive seconds, got {fail_timeout!r} for {url!r}"
            )
        self.fail_timeout = float(fail_timeout)
        for name, value in (("backup", backup), ("down", down)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: expected a bool, got {value!r} for {url!r}")
        self.backup = backup
        self.down = down
        if isinstance(max_conns, bool) or not isinstance(max_conns, int) or max_conns < 0:
            raise ConfigError(f"max_conns: expected an integer >= 0, got {max_conns!r} for {url!r}")
        self.max_conns = max_conns
        self.draining = False
        self.in_flight = 0
        self.requests = 0
        self.fails = 0
        self.effective_weight = weight
        self.current_weight = 0
        self.healthy = True
        self.last_error: str | None = None
        self.last_checked: float | None = None
        # nginx's `checked` and `accessed`: when the fail_timeout window was last opened by a
        # selection, and when the last failure happened.
        self._checked = -math.inf
        self._accessed = -math.inf
        self._passes = 0
        self._check_fails = 0
        self._owner: Upstream | None = None

    def __repr__(self) -> str:
        options = "".join(
            f", {name}={getattr(self, name)!r}"
            for name, default in (
                ("weight", 1),
                ("max_fails", 1),
                ("fail_timeout", 10.0),
                ("max_conns", 0),
            )
            if getattr(self, name) != default
        )
        flags = "".join(f", {name}=True" for name in ("backup", "down") if getattr(self, name))
        return f"Server({self.url.url!r}{options}{flags})"

    @property
    def _identity(self) -> tuple[str, str]:
        return self.url.scheme, self.url.address


def failed(server: Server, now: float) -> bool:
    """Whether `server` is out after `max_fails` failures within `fail_timeout`."""
    # ngx_http_upstream_get_peer: skipped while fails >= max_fails within fail_timeout.
    return (
        server.max_fails > 0
        and server.fails >= server.max_fails
        and now - server._checked <= server.fail_timeout
    )


def check_weight(weight: int, where: str) -> int:
    """`weight`, checked: an integer >= 1 (`ConfigError` names the field otherwise)."""
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ConfigError(f"weight: expected an integer >= 1, got {weight!r}{where}")
    return weight
