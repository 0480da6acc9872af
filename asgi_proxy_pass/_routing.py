"""Which location takes a request: nginx's exact and longest-prefix rules.

    location     takes                                   the app sees root_path
    = /health    /health only                            /health
    /api/        /api/ and everything under it           /api
    /api         /api and /api/..., not /apiv2           /api
    /            everything                              (unchanged)

An exact location is looked up first; then the longest prefix that matches wins, whatever the
order of the file. A request for `/api` when only `/api/` exists gets a redirect to `/api/`
(301 for GET and HEAD, 308 otherwise, so that a POST stays a POST), as nginx does for prefix
locations ending in `/`; a location `/api` or `= /api` takes it instead, if there is one.

One difference from nginx: a prefix without a trailing slash matches whole path segments, so
`/api` does not take `/apiv2` (nginx compares strings, and would).

Matching is pure (`Routes.match`), on the decoded path; the proxy then checks the raw path
against the same prefix (a `..` that leaves it gets a 400).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote

from ._http import send_error
from ._types import ASGIApp, Receive, Scope, Send

__all__ = ["Match", "Route", "Router", "Routes"]


@dataclass(frozen=True)
class Route:
    """A location: its pattern as written, its path, and the app that serves it."""

    pattern: str
    path: str
    exact: bool
    app: ASGIApp
    websocket: bool = True

    @property
    def mount(self) -> str:
        """What the app gets appended to `scope["root_path"]`: the path without its last `/`."""
        return self.path.rstrip("/")

    def takes(self, path: str) -> bool:
        """Whether this location matches `path` (not counting the redirect rule)."""
        if self.exact:
            return path == self.path
        if self.path.endswith("/"):
            return path.startswith(self.path)
        return path == self.path or path.startswith(self.path + "/")


class Match(NamedTuple):
    """The location for a path, or None; `redirect` when the answer is a redirect to `path/`."""

    route: Route | None
    redirect: bool = False


class Routes:
    """The locations, indexed for `match()`; iterating gives them in the order they are tried."""

    def __init__(self, routes: Iterable[Route]) -> None:
        items = list(routes)
        self.exact = {route.path: route for route in sorted(items, key=_by_path) if route.exact}
        # Longest first; the first that takes a path is the longest match.
        self.prefixes = sorted(
            (route for route in items if not route.exact), key=lambda r: (-len(r.path), r.path)
        )
        self.slashed = {r.path: r for r in self.prefixes if r.path.endswith("/") and r.path != "/"}

    def __iter__(self) -> Iterator[Route]:
        yield from self.exact.values()
        yield from self.prefixes

    def match(self, path: str) -> Match:
        """The location for a decoded request path."""
        route = self.exact.get(path)
        if route is not None:
            return Match(route)
        route = next((route for route in self.prefixes if route.takes(path)), None)
        slashed = self.slashed.get(path + "/")
        if slashed is not None and (route is None or route.path != path):
            return Match(slashed, redirect=True)
        return Match(route)


def _by_path(route: Route) -> str:
    return route.path


class Router:
    """An ASGI app that hands each request to its location's app, with `root_path` extended by
    the location's prefix (as Starlette's `Mount` does), and answers 404 when none matches.

    A WebSocket to a location with `websocket=False` is refused with 403.
    """

    def __init__(self, routes: Routes) -> None:
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return  # lifespan is the enclosing app's
        root: str = scope.get("root_path", "")
        path: str = scope["path"]
        route, redirect = self.routes.match(path[len(root) :] if path.startswith(root) else path)
        if route is None or (redirect and kind == "websocket"):
            await refuse(scope, send, 404, "Not Found")
        elif redirect:
            await redirect_slash(scope, send)
        elif kind == "websocket" and not route.websocket:
            await refuse(scope, send, 403, "Forbidden")
        else:
            scope["root_path"] = root + route.mount
            await route.app(scope, receive, send)


async def refuse(scope: Scope, send: Send, status: int, reason: str) -> None:
    """An HTTP error; for a WebSocket, the same status if the server can send one, else a close
    before the accept (a 403)."""
    if scope["type"] == "http":
        await send_error(send, status, reason)
    elif "websocket.http.response" in (scope.get("extensions") or {}):
        body = f"{status} {reason}\n".encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def redirect_slash(scope: Scope, send: Send) -> None:
    """Redirect `/api?q` to `/api/?q`: 301 for GET and HEAD, 308 for other methods."""
    raw = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
    query = scope.get("query_string", b"")
    location = raw + b"/" + (b"?" + query if query else b"")
    status = 301 if scope["method"] in ("GET", "HEAD") else 308
    body = b"%d Moved Permanently\n" % status if status == 301 else b"308 Permanent Redirect\n"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"location", location),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
