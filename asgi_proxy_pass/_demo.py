"""`asgi-proxy-pass demo`: two toy backends and a gateway with a pool in front, to try it out.

Everything runs in this process and event loop: backends `a` and `b` on free ports of
127.0.0.1 (HTTP, a WebSocket echo at `/ws`, `/healthz` for the health check), and the gateway,
built from a configuration like any other and served the same way. Ctrl-C or SIGTERM stops the
gateway gracefully, then the backends; the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging.config
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ._config import load_config
from ._errors import ConfigError
from ._gateway import build
from ._keys import Listen, parse_listen
from ._schema import Invalid
from ._serve import GatewayServer, bind, log_config, uvicorn_config

__all__ = ["backend", "main"]


def backend(name: str) -> Starlette:
    """A toy backend that says who it is and what it received, and echoes WebSocket messages."""

    async def hello(request: Request) -> JSONResponse:
        query = request.scope["query_string"].decode("latin-1")
        target = request.scope["raw_path"].decode("latin-1") + (f"?{query}" if query else "")
        return JSONResponse({"backend": name, "target": target, "headers": dict(request.headers)})

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.send_text(f"{name}: {await websocket.receive_text()}")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            WebSocketRoute("/ws", echo),
            Route("/{path:path}", hello, methods=["GET", "HEAD", "POST", "PUT", "DELETE"]),
        ]
    )


class Backend(uvicorn.Server):
    """A backend server; the gateway's server handles the signals for the whole process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main(argv: Sequence[str]) -> int:
    """`asgi-proxy-pass demo [--listen ADDR]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="asgi-proxy-pass demo",
        description="Start two toy backends and a gateway with a pool in front of them.",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="ADDR",
        help='where the gateway listens (default "127.0.0.1:8080")',
    )
    options = parser.parse_args(argv)
    try:
        listen = parse_listen(options.listen)
    except Invalid as exc:
        print(f"asgi-proxy-pass demo: --listen: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(run(listen))
    except ConfigError as exc:
        print(f"asgi-proxy-pass demo: {exc}", file=sys.stderr)
        return 1


def configuration(listen: Listen, backends: list[str]) -> dict[str, Any]:
    """The demo gateway's configuration: one pool of both backends behind `/`."""
    return {
        "server": {"listen": str(listen), "log_level": "warning", "shutdown_timeout": 5},
        "upstreams": {
            "demo": {"servers": backends, "health_check": {"path": "/healthz", "interval": 5}}
        },
        "locations": {"/": {"proxy_pass": "demo"}},
    }


async def run(listen: Listen) -> int:
    try:
        front = bind(listen)
    except OSError as exc:
        raise ConfigError(
            f"--listen: cannot listen on {listen}: {exc.strerror or exc}; "
            "choose another address with --listen 127.0.0.1:PORT"
        ) from None
    sockets = [bind(Listen("127.0.0.1", 0)) for _ in range(2)]
    for sock in sockets:
        # Listening now queues the first health checks until the backends serve: no race.
        sock.listen(128)
    urls = [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    config = load_config(configuration(listen, urls), source="demo")
    built = build(config)
    logging.config.dictConfig(log_config(config.server))
    backends = [
        Backend(uvicorn.Config(backend(name), lifespan="off", log_config=None, access_log=False))
        for name in ("a", "b")
    ]
    tasks = [
        asyncio.create_task(server.serve(sockets=[sock]))
        for server, sock in zip(backends, sockets, strict=True)
    ]
    print(banner(listen, urls), flush=True)
    try:
        grace = config.server["shutdown_timeout"]
        gateway = GatewayServer(uvicorn_config(built.app, config.server), grace=grace)
        await gateway.serve(sockets=[front])
    finally:
        for server in backends:
            server.should_exit = True
        await asyncio.gather(*tasks)
        front.close()
    return 0


def banner(listen: Listen, backends: list[str]) -> str:
    """What the demo prints at startup: the URLs, what to try, and the same gateway as a file."""
    url = f"http://{listen}"
    servers = ", ".join(f'"{backend}"' for backend in backends)
    return f"""\
asgi-proxy-pass demo: a gateway in front of two toy backends

  backend a   {backends[0]}
  backend b   {backends[1]}
  gateway     {url}  (round robin over a and b, health check GET /healthz every 5s)

Try it (the backends take turns; each request logs a line below, ua= is the backend):

  curl -i {url}/hello
  python -m websockets ws://{listen}/ws

The same gateway from a file, run with `asgi-proxy-pass --config gateway.toml`:

  [server]
  listen = "{listen}"

  [upstreams.demo]
  servers = [{servers}]
  health_check = {{ path = "/healthz", interval = 5 }}

  [locations."/"]
  proxy_pass = "demo"

Ctrl-C stops everything.
"""
