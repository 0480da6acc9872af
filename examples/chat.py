"""A WebSocket chat room behind the proxy: `python examples/chat.py [--port 8000]`.

Open http://127.0.0.1:8000/ in two browser tabs and type. Both servers run in this process: the
toy upstream, a `websockets` server on a free port of 127.0.0.1 that sends every message to
everyone in the room, and in front of it a Starlette app that serves the page at `/` and mounts
`ProxyPass` at `/chat`. The page's WebSocket to `/chat/` is relayed to the upstream's `/`.
Ctrl-C (or SIGTERM) stops both.
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
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from websockets.asyncio.server import ServerConnection, broadcast, serve

from asgi_proxy_pass import ProxyPass, lifespan

PAGE = """<!doctype html>
<meta charset="utf-8"><title>Chat through asgi-proxy-pass</title>
<ul id="log"></ul>
<form id="form"><input id="text" autocomplete="off" autofocus> <button>Send</button></form>
<script>
  const ws = new WebSocket(location.origin.replace(/^http/, "ws") + "/chat/");
  const log = (text) => document.getElementById("log").append(
    Object.assign(document.createElement("li"), {textContent: text}));
  ws.onmessage = (event) => log(event.data);
  ws.onclose = (event) => log(`closed: ${event.code} ${event.reason}`);
  document.getElementById("form").onsubmit = (event) => {
    event.preventDefault();
    ws.send(document.getElementById("text").value);
    document.getElementById("text").value = "";
  };
</script>
"""

room: set[ServerConnection] = set()


async def chat(websocket: ServerConnection) -> None:
    """The toy upstream: every message goes to everyone in the room, the sender included."""
    room.add(websocket)
    try:
        async for message in websocket:
            broadcast(room, message)
    finally:
        room.discard(websocket)


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


class Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `main()` handles Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def main(port: int) -> None:
    upstream_socket = socket.create_server(("127.0.0.1", 0))
    upstream_url = f"http://127.0.0.1:{upstream_socket.getsockname()[1]}/"
    proxy = ProxyPass(upstream_url)
    app = Starlette(routes=[Route("/", page), Mount("/chat", app=proxy)], lifespan=lifespan(proxy))
    # The upstream's own Server and Date headers are passed on: uvicorn must not add a second pair.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, server_header=False, date_header=False
    )
    front = Server(config)

    def stop(signum: int, frame: object) -> None:
        front.should_exit = True  # open WebSockets are closed with 1012, relayed upstream

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    async with serve(chat, sock=upstream_socket):
        print(f"Chat on http://127.0.0.1:{port}/ (upstream {upstream_url})", flush=True)
        await front.serve()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the proxy's port (default 8000)")
    asyncio.run(main(parser.parse_args().port))
