"""A pool of two upstreams behind one ProxyPass, with the pool's status as JSON.

`python examples/pool_status.py [--port 8000]` starts two toy upstreams on free ports and the
app on --port. Then try:

    curl http://127.0.0.1:8000/hello     # answered by a, then b, then a...
    curl http://127.0.0.1:8000/_pool     # per server: state, weight, in_flight, fails...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_proxy_pass import HealthCheck, ProxyPass, Upstream


def create_app(upstream_urls: list[str]) -> Starlette:
    pool = Upstream(upstream_urls, health_check=HealthCheck("/", interval=5.0))

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(pool.status())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with pool:  # health checks run, then stop and close the connections
            yield

    routes = [Route("/_pool", status), Mount("/", app=ProxyPass(pool))]
    return Starlette(routes=routes, lifespan=lifespan)


def toy_upstream(name: str) -> Starlette:
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"server": name, "path": request.url.path})

    return Starlette(routes=[Route("/{path:path}", hello)])


class Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `main()` handles Ctrl-C for all servers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def main(port: int) -> None:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    urls = [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    upstreams = [Server(uvicorn.Config(toy_upstream(n), access_log=False)) for n in "ab"]
    front = Server(uvicorn.Config(create_app(urls), host="127.0.0.1", port=port))

    def stop(signum: int, frame: object) -> None:
        front.force_exit = front.should_exit
        front.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    pairs = zip(upstreams, sockets, strict=True)
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in pairs]
    await front.serve()
    for upstream in upstreams:
        upstream.should_exit = True
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the app's port (default 8000)")
    asyncio.run(main(parser.parse_args().port))
