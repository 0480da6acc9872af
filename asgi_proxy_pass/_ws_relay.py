"""An accepted WebSocket: two pumps, one message at a time each way, until one side closes.

    client (ASGI receive)  -> client_to_upstream -> UpstreamConnection.send_message()
    client (ASGI send)     <- upstream_to_client <- UpstreamConnection.next_message()

Each pump awaits every send, so a slow reader on one side slows the other side's reads: the
upstream connection stops reading at `max_queue` waiting messages, and the ASGI server stops
reading from the client while the client pump waits for the upstream's write buffer to drain.
Whichever pump ends first decides how both connections close (the rules of `_ws_close`) and
cancels the other; `websocket_idle_timeout` cancels both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import anyio
from websockets.exceptions import ConnectionClosed

from ._deadline import Deadline
from ._types import Receive, Scope, Send
from ._urls import UpstreamURL
from ._ws_close import IDLE, TOO_BIG, client_close, upstream_close
from ._ws_upstream import UpstreamConnection

if TYPE_CHECKING:
    from ._proxy import ProxyPass

__all__ = ["Relay"]

logger = logging.getLogger("asgi_proxy_pass")


class Relay:
    """One accepted WebSocket: `run()` pumps messages both ways until one side closes."""

    def __init__(
        self,
        proxy: ProxyPass,
        server: UpstreamURL,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: UpstreamConnection,
    ) -> None:
        self.proxy = proxy
        self.server = server
        self.scope = scope
        self.receive = receive
        self.send = send
        self.upstream = upstream
        # Both pumps run inside these: `idle` is cancelled when no message crossed for
        # websocket_idle_timeout, `pumps` by whichever side ends first, after setting
        # `ending`: the close to send the client and the upstream (None: it is closed).
        self.idle = anyio.CancelScope()
        # With websocket_idle_timeout: cancels `idle` (one timer, not one per message).
        self.idle_deadline: Deadline | None = None
        self.pumps = anyio.CancelScope()
        self.ending: tuple[tuple[int, str] | None, tuple[int, str] | None] | None = None

    async def run(self, accept: dict[str, Any]) -> None:
        """Accept the client with `accept`, relay until one side closes, then close both."""
        upstream = self.upstream
        if not await self.send_client(accept):
            self.ending = (None, (1001, ""))
        else:
            if self.proxy.websocket_idle_timeout is not None:
                self.idle_deadline = Deadline(asyncio.get_running_loop(), self.idle.cancel)
                self.touch()
            try:
                with self.idle, self.pumps:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(self.upstream_to_client)
                        tasks.start_soon(self.client_to_upstream)
            finally:
                if self.idle_deadline is not None:
                    self.idle_deadline.cancel()
            if self.ending is None and self.idle.cancelled_caught:
                self.log(
                    logging.INFO,
                    "no message for websocket_idle_timeout (%gs); closed both sides with 1001",
                    self.proxy.websocket_idle_timeout,
                )
                self.ending = (IDLE, IDLE)
        to_client, to_upstream = self.ending or (None, None)
        if to_client is not None:
            code, reason = to_client
            await self.send_client({"type": "websocket.close", "code": code, "reason": reason})
        if to_upstream is not None:
            await upstream.close(*to_upstream)

    def touch(self) -> None:
        """A message crossed: push the idle deadline back."""
        if self.idle_deadline is not None:
            assert self.proxy.websocket_idle_timeout is not None
            self.idle_deadline.set(self.proxy.websocket_idle_timeout)

    def end(self, to_client: tuple[int, str] | None, to_upstream: tuple[int, str] | None) -> None:
        if self.ending is None:
            self.ending = (to_client, to_upstream)
        self.pumps.cancel()

    async def send_client(self, message: dict[str, Any]) -> bool:
        """Send to the client; False if it is gone.

        An ASGI server raises an OSError subclass once the client is gone; uvicorn raises a
        RuntimeError for a send that races its own close (keepalive timeout, oversized
        message), which means the same.
        """
        try:
            await self.send(message)
        except (OSError, RuntimeError):
            return False
        return True

    async def upstream_to_client(self) -> None:
        try:
            while True:
                data = await self.upstream.next_message()
                self.touch()
                key = "text" if isinstance(data, str) else "bytes"
                if not await self.send_client({"type": "websocket.send", key: data}):
                    self.end(None, (1001, ""))
                    return
        except ConnectionClosed as exc:
            to_client, failure = upstream_close(exc)
            if failure is not None:
                level = logging.WARNING if to_client == TOO_BIG else logging.ERROR
                self.log(level, "the upstream %s; closed the client with %d", failure, to_client[0])
            self.end(to_client, None)

    async def client_to_upstream(self) -> None:
        max_size = self.proxy.websocket_max_size
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                self.end(None, client_close(message))
                return
            if message["type"] != "websocket.receive":
                continue
            text: str | None = message.get("text")
            data: str | bytes = (message.get("bytes") or b"") if text is None else text
            if max_size is not None and _size(data) > max_size:
                self.log(
                    logging.WARNING,
                    "the client sent a message larger than websocket_max_size (%d bytes); "
                    "closed both sides with 1009",
                    max_size,
                )
                self.end(TOO_BIG, TOO_BIG)
                return
            self.touch()
            if not await self.upstream.send_message(data):
                return  # upstream_to_client sees the same close and decides

    def log(self, level: int, message: str, *args: object) -> None:
        logger.log(
            level,
            "WebSocket %s (upstream %s): " + message,
            self.scope["path"],
            self.server.address,
            *args,
        )


def _size(data: str | bytes) -> int:
    if isinstance(data, bytes) or data.isascii():
        return len(data)
    return len(data.encode("utf-8"))
