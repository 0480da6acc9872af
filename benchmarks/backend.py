"""The benchmark's second backend, beside nginx: an upload sink and a WebSocket echo server.

nginx serves the GETs. It cannot echo WebSocket messages, and answers a POST to a `return`
location before it has read the body; this small server does both on uvloop with httptools, so
that it costs the shared core little:

    POST /upload      reads the whole body (Content-Length or chunked), then answers 200
    GET + Upgrade     the RFC 6455 handshake, then echoes every data frame (no extensions)

    python benchmarks/backend.py PORT
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys

import httptools
import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Backend(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: dict[bytes, bytes] = {}
        self.received = 0
        self.websocket = False
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.websocket:
            self.buffer += data
            self.echo()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrade(data[exc.args[0] :] if exc.args else b"")
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        if b"upgrade" in self.headers:
            return  # HttpParserUpgrade follows
        assert self.transport is not None
        body = b"%d" % self.received
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.received = 0
        self.headers = {}

    def upgrade(self, rest: bytes) -> None:
        assert self.transport is not None
        key = self.headers.get(b"sec-websocket-key", b"")
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.websocket = True
        self.buffer += rest
        self.echo()

    def echo(self) -> None:
        buffer = self.buffer
        assert self.transport is not None
        out = []
        while len(buffer) >= 2:
            opcode = buffer[0] & 0x0F
            length = buffer[1] & 0x7F
            start = 2
            if length == 126:
                length = int.from_bytes(buffer[2:4], "big")
                start = 4
            elif length == 127:
                length = int.from_bytes(buffer[2:10], "big")
                start = 10
            masked = buffer[1] & 0x80
            end = start + (4 if masked else 0) + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[end - length : end])
            if masked:
                mask = bytes(buffer[start : start + 4]) * (length // 4 + 1)
                payload = (
                    int.from_bytes(payload, "little") ^ int.from_bytes(mask[:length], "little")
                ).to_bytes(length, "little")
            del buffer[:end]
            if opcode == 0x8:
                self.transport.write(b"\x88\x02\x03\xe8")
                self.transport.close()
                return
            if opcode == 0x9:
                opcode = 0xA
            elif opcode == 0xA:
                continue
            out.append(frame(opcode, payload))
        if out:
            self.transport.write(b"".join(out))


def frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server frame."""
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, length)) + payload
    if length < 65536:
        return bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big") + payload


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Backend, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
