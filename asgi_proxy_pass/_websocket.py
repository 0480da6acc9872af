"""One WebSocket relay (placeholder until the relay lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._types import Receive, Scope, Send

if TYPE_CHECKING:
    from ._proxy import ProxyPass

__all__ = ["handle_websocket"]


async def handle_websocket(proxy: ProxyPass, scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse the WebSocket: not supported yet."""
    await receive()
    await send({"type": "websocket.close", "code": 1011})
