"""Pure close-code rules of the WebSocket relay: how one side's close is sent on to the other.

Close codes 1005 (no status), 1006 (abnormal closure) and 1015 (TLS failure) describe a close;
they are never sent in a Close frame (RFC 6455 section 7.4.1). They are mapped:

    observed                          sent to the client       sent to the upstream
    1005 no status                    1000 ""                  1000 ""
    1006 / 1015 / no close frame      1011 ""                  1001 ""
    the proxy hit websocket_max_size  1009 "message too big"   1009 "message too big"
    upstream keepalive or protocol
      failure (we closed it)          1011 ""                  (the code websockets sent)
    websocket_idle_timeout            1001 "idle timeout"      1001 "idle timeout"
    any other code                    unchanged, with its reason
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from websockets.exceptions import ConnectionClosed

__all__ = [
    "IDLE",
    "TOO_BIG",
    "TO_CLIENT",
    "TO_UPSTREAM",
    "client_close",
    "upstream_close",
    "wire_close",
]

# RFC 6455 section 7.4.1: reported, never sent. Observed code -> code sent on, per direction.
TO_CLIENT = {1005: 1000, 1006: 1011, 1015: 1011}
TO_UPSTREAM = {1005: 1000, 1006: 1001, 1015: 1001}
# Codes a Close frame may carry (RFC 6455 section 7.4.1 and the IANA registry).
WIRE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

TOO_BIG = (1009, "message too big")
IDLE = (1001, "idle timeout")


def wire_close(code: int, reason: str, table: dict[int, int]) -> tuple[int, str]:
    """A close code and reason that may be sent on, given the table for that direction."""
    if code in table:
        return table[code], ""
    if code in WIRE_CODES or 3000 <= code < 5000:
        return code, reason
    return 1011, ""


def upstream_close(exc: ConnectionClosed) -> tuple[tuple[int, str], str | None]:
    """How the upstream connection ended -> the close for the client, and a failure to log."""
    rcvd, sent = exc.rcvd, exc.sent
    if rcvd is not None and (sent is None or exc.rcvd_then_sent):
        return wire_close(rcvd.code, rcvd.reason, TO_CLIENT), None
    if sent is not None and sent.code == 1009:
        return TOO_BIG, f"sent a message larger than websocket_max_size ({sent.reason})"
    if sent is not None:
        return (1011, ""), f"failed: {sent.code} {sent.reason}".rstrip()
    return (1011, ""), "closed the connection without a close frame"


def client_close(message: Mapping[str, Any]) -> tuple[int, str]:
    """A `websocket.disconnect` message -> the close for the upstream."""
    return wire_close(message.get("code", 1005), message.get("reason") or "", TO_UPSTREAM)
