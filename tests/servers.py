"""Real servers on 127.0.0.1 (and unix sockets) for the end-to-end tests.

`serve(app)` runs uvicorn in this event loop on a port the kernel picks; `echo_app` is an upstream
that answers with what it received, so a test can assert on the exact request-target, headers and
body that crossed the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from asgi_proxy_pass._types import ASGIApp, Receive, Scope, Send


@dataclass
class Running:
    url: str
    port: int
    server: uvicorn.Server
    uds: str | None = None


@asynccontextmanager
async def serve(
    app: ASGIApp,
    *,
    uds: str | None = None,
    ssl_certfile: str | None = None,
    http: str = "httptools",
    lifespan: str = "off",
    **config: Any,
) -> AsyncIterator[Running]:
    """Run `app` under uvicorn until the block ends."""
    sockets: list[socket.socket] = []
    if uds is None:
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    conf = uvicorn.Config(
        app,
        uds=uds,
        http=http,
        lifespan=lifespan,
        log_level="warning",
        server_header=False,
        date_header=False,
        proxy_headers=False,
        ssl_certfile=ssl_certfile,
        timeout_graceful_shutdown=1,
        **config,
    )
    server = uvicorn.Server(conf)
    task = asyncio.create_task(server._serve(sockets=sockets or None))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.005)
    scheme = "https" if ssl_certfile else "http"
    if uds is not None:
        running = Running(url=f"{scheme}://unix:{uds}", port=0, server=server, uds=uds)
    else:
        port = sockets[0].getsockname()[1]
        running = Running(url=f"{scheme}://127.0.0.1:{port}", port=port, server=server)
    try:
        yield running
    finally:
        server.should_exit = True
        await task
        for sock in sockets:
            sock.close()


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer with a JSON description of the request: target, headers, body size and digest."""
    assert scope["type"] == "http"
    body = await read_body(receive)
    target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
    payload = {
        "method": scope["method"],
        "target": target.decode("latin-1"),
        "http_version": scope["http_version"],
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
        "body_size": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body": body[:1000].decode("latin-1"),
    }
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(data)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def header_values(payload: dict[str, Any], name: str) -> list[str]:
    """All values of a header in an `echo_app` payload, in order."""
    return [v for n, v in payload["headers"] if n == name]


@asynccontextmanager
async def front(proxy: Any, mount: str | None = "/api", **config: Any) -> AsyncIterator[Running]:
    """Serve `proxy` under uvicorn, mounted at `mount` in a Starlette app (or as the root app)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount(mount, app=proxy)]) if mount else proxy
    try:
        async with serve(app, **config) as running:
            yield running
    finally:
        await proxy.aclose()


async def raw_http(port: int, request: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send raw request bytes (which should ask for `Connection: close`); parse the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = [
        (n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines)
    ]
    return int(status_line.split()[1]), headers, body
