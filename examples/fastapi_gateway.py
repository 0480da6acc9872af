"""A FastAPI gateway: its own routes, plus `/users` forwarded to a users service.

Every forwarded request carries an `X-Request-ID` for the service's logs: the client's own, or a
new one. `python examples/fastapi_gateway.py [--port 8000]` starts a toy users service on a free
port and the gateway on --port. Then try:

    curl http://127.0.0.1:8000/health
    curl -H 'X-Request-ID: abc123' http://127.0.0.1:8000/users/42   # the service sees /v1/users/42
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_proxy_pass import ProxyPass, lifespan


def request_id(scope: dict[str, Any]) -> str:
    """The value of `X-Request-ID` for the upstream: the client's, or a new one."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"x-request-id":
            return value.decode("latin-1")
    return uuid.uuid4().hex


def create_gateway(users_url: str) -> FastAPI:
    # /users/42 -> /v1/users/42 on the users service.
    users = ProxyPass(users_url + "/v1/users/", request_headers={"X-Request-ID": request_id})
    app = FastAPI(lifespan=lifespan(users))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.mount("/users", users)
    return app


async def get_user(request: Request) -> JSONResponse:
    """The toy users service."""
    return JSONResponse(
        {
            "id": request.path_params["user_id"],
            "path": request.url.path,
            "request_id": request.headers.get("x-request-id"),
        }
    )


class Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `main()` handles Ctrl-C for both servers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def main(port: int) -> None:
    users_socket = socket.create_server(("127.0.0.1", 0))
    users_url = f"http://127.0.0.1:{users_socket.getsockname()[1]}"
    users = Server(uvicorn.Config(Starlette(routes=[Route("/v1/users/{user_id}", get_user)])))
    gateway = create_gateway(users_url)
    front = Server(
        uvicorn.Config(gateway, host="127.0.0.1", port=port, server_header=False, date_header=False)
    )

    def stop(signum: int, frame: object) -> None:
        front.force_exit = front.should_exit
        front.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    users_task = asyncio.create_task(users.serve(sockets=[users_socket]))
    await front.serve()
    users.should_exit = True
    await users_task


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the gateway's port (default 8000)")
    asyncio.run(main(parser.parse_args().port))
