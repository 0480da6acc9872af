"""Run a proxy in front of a toy upstream: `python examples/quickstart.py [--port 8000]`.

Both servers run in this process and this event loop: the toy upstream on a free port of
127.0.0.1, and in front of it a Starlette app that mounts `ProxyPass` at `/api`. The upstream URL
has a path (`http://127.0.0.1:PORT/`), so `/api` is replaced by `/`: `/api/users?id=10` reaches
the upstream as `/users?id=10`. Ctrl-C (or SIGTERM) stops both.
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
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_proxy_pass import ProxyPass, lifespan


async def echo(request: Request) -> JSONResponse:
    """The toy upstream: it answers with the request-target and headers it received."""
    query = request.scope["query_string"].decode("latin-1")
    target = request.scope["raw_path"].decode("latin-1") + (f"?{query}" if query else "")
    return JSONResponse({"upstream_saw": target, "headers": dict(request.headers)})


class Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `main()` handles Ctrl-C for both servers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def main(port: int) -> None:
    upstream_socket = socket.create_server(("127.0.0.1", 0))
    upstream_url = f"http://127.0.0.1:{upstream_socket.getsockname()[1]}/"
    upstream = Server(uvicorn.Config(Starlette(routes=[Route("/{path:path}", echo)])))

    proxy = ProxyPass(upstream_url)
    app = Starlette(routes=[Mount("/api", app=proxy)], lifespan=lifespan(proxy))
    # The upstream's own Server and Date headers are passed on: uvicorn must not add a second pair.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, server_header=False, date_header=False
    )
    front = Server(config)

    def stop(signum: int, frame: object) -> None:
        front.force_exit = front.should_exit  # a second Ctrl-C does not wait for open requests
        front.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"Proxying http://127.0.0.1:{port}/api/ to the toy upstream at {upstream_url}")
    print(f"Try: curl -i 'http://127.0.0.1:{port}/api/users?id=10'", flush=True)
    upstream_task = asyncio.create_task(upstream.serve(sockets=[upstream_socket]))
    await front.serve()
    upstream.should_exit = True  # the proxy is down: no request can still be on its way
    await upstream_task


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the proxy's port (default 8000)")
    asyncio.run(main(parser.parse_args().port))
