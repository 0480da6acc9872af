"""Mount proxies inside a Starlette app, next to its own routes, and close them at shutdown.

`python examples/starlette_mount.py [--port 8000]` starts a toy upstream on a free port and the
app on --port. Then try:

    curl http://127.0.0.1:8000/                   # the app's own route
    curl 'http://127.0.0.1:8000/api/users?id=10'  # with a URI: the upstream sees /users?id=10
    curl http://127.0.0.1:8000/legacy/report      # no URI: the upstream sees /legacy/report
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_proxy_pass import ProxyPass, lifespan


def create_app(upstream_url: str) -> Starlette:
    api = ProxyPass(upstream_url + "/")  # "with URI": /api is replaced by /
    legacy = ProxyPass(upstream_url)  # "no URI": the path goes as the client sent it
    return Starlette(
        routes=[
            Route("/", homepage),
            Mount("/api", app=api),
            Mount("/legacy", app=legacy),
        ],
        # Close both proxies' pooled upstream connections when the server stops.
        lifespan=lifespan(api, legacy),
    )


async def homepage(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Served by the app itself; /api/ and /legacy/ go upstream.\n")


async def echo(request: Request) -> JSONResponse:
    """The toy upstream: it answers with the request-target it received."""
    query = request.scope["query_string"].decode("latin-1")
    target = request.scope["raw_path"].decode("latin-1") + (f"?{query}" if query else "")
    return JSONResponse({"upstream_saw": target})


class Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `main()` handles Ctrl-C for both servers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def main(port: int) -> None:
    upstream_socket = socket.create_server(("127.0.0.1", 0))
    upstream_url = f"http://127.0.0.1:{upstream_socket.getsockname()[1]}"
    upstream = Server(uvicorn.Config(Starlette(routes=[Route("/{path:path}", echo)])))
    app = create_app(upstream_url)
    front = Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, server_header=False, date_header=False)
    )

    def stop(signum: int, frame: object) -> None:
        front.force_exit = front.should_exit
        front.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    upstream_task = asyncio.create_task(upstream.serve(sockets=[upstream_socket]))
    await front.serve()
    upstream.should_exit = True
    await upstream_task


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the app's port (default 8000)")
    asyncio.run(main(parser.parse_args().port))
