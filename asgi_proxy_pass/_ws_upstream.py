"""The upstream end of a WebSocket relay: websockets' asyncio client, cut down to one reader.

websockets' `ClientConnection` keeps doing what it does well: the opening handshake, TLS and
unix sockets, subprotocol and permessage-deflate negotiation, keepalive pings, `max_size`, and
the closing handshake. What it does for any application, a relay does not need: its receive path
(an Assembler of frames behind a queue, serialising concurrent `recv()` calls) and its send path
(an async context manager around every message, for senders racing a close) cost more than the
relay itself. `UpstreamConnection` replaces those two paths, and nothing else:

    upstream bytes -> data_received -> split(): a frame that is a whole message by itself
                                        -> deliver()
                                      every other frame -> websockets' parser -> process_event
                                        -> deliver(): fragments joined, text decoded
        deliver() -> `messages` -> next_message()
    send_message() -> client_frame() (websockets' framing with permessage-deflate)
        -> transport.write -> drain() only while the write buffer is over `write_limit`

Splitting needs to know where frames start: it begins right after the handshake response,
tracks how many bytes of the frame websockets is reading it still owes it (`owed`), and holds
back a header cut by a read (`partial`). It stops for good once the connection is not OPEN any
more or when an extension was negotiated: then websockets parses every byte, as it did.

Flow control, both ways, as websockets does it: reading from the upstream pauses while
`max_queue` messages wait for the reader and resumes once a quarter are left; a send waits while
the transport's write buffer is over `write_limit`.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from typing import Any, NoReturn

from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.frames import BINARY, CONT, PONG, TEXT, CloseCode, Frame
from websockets.protocol import OPEN, Event
from websockets.typing import BytesLike

from ._ws_frames import MaskingKeys, client_frame, frame_bounds

__all__ = ["UpstreamConnection"]

# A message, or the decoding error that replaced a Text message and fails the connection.
Message = str | bytes | UnicodeDecodeError

HEAD_END = b"\r\n\r\n"


class UpstreamConnection(ClientConnection):
    """A websockets client connection whose messages are read by one task, in order.

    Use `next_message()` and `send_message()` instead of `recv()` and `send()`; `close()`
    drops the messages nobody will read; the rest of `ClientConnection` (`ping()`, `response`,
    `subprotocol`, keepalive ...) is unchanged.
    """

    def __init__(self, protocol: ClientProtocol, **options: Any) -> None:
        super().__init__(protocol, **options)
        self.messages: collections.deque[Message] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        high = self.max_queue_high
        self.queue_high = sys.maxsize if high is None else high
        low = self.max_queue_low
        self.queue_low = self.queue_high // 4 if low is None else low
        self.reading_paused = False
        self.dropping = False  # closing: nobody reads messages any more
        # The Text or Binary message being reassembled from its fragments (RFC 6455 5.4).
        self.fragments = bytearray()
        self.fragmented_text = False
        # The handshake response read so far; then the state of split().
        self.head = bytearray()
        self.splitting = False
        self.owed = 0
        self.partial = b""
        self.keys = MaskingKeys()

    async def next_message(self) -> str | bytes:
        """The next whole message from the upstream: `str` for Text, `bytes` for Binary.

        Raises:
            ConnectionClosed: the connection is closed, and every message before the close
                was returned (websockets' `recv()` contract).
        """
        messages = self.messages
        while not messages:
            if self.connection_lost_waiter.done():
                raise self.close_exc
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = messages.popleft()
        if self.reading_paused and len(messages) <= self.queue_low:
            self.reading_paused = False
            self.transport.resume_reading()
        if isinstance(message, UnicodeDecodeError):
            await self.fail_invalid_text(message)
        return message

    async def send_message(self, message: str | bytes) -> bool:
        """Send one whole message; False, without waiting, if the connection is not open.

        Waits only while the write buffer is over `write_limit` (asyncio's `drain()`).
        """
        protocol = self.protocol
        if protocol.state is not OPEN:
            return False
        if protocol.extensions:  # permessage-deflate: websockets compresses and frames
            if isinstance(message, str):
                protocol.send_text(message.encode())
            else:
                protocol.send_binary(message)
            self.send_data()
        elif isinstance(message, str):
            self.transport.write(client_frame(TEXT, message.encode(), self.keys.next()))
        else:
            self.transport.write(client_frame(BINARY, message, self.keys.next()))
        if self.paused:
            await self.drain()
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Perform the closing handshake (websockets' `close()`), dropping unread messages.

        Reading resumes first: the upstream's Close frame comes after everything it sent
        before, and a reader paused at `max_queue` would wait `close_timeout` for it.
        """
        self.dropping = True
        self.messages.clear()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        await super().close(code, reason)

    def data_received(self, data: bytes) -> None:
        """Bytes from the upstream: split into frames once the handshake is done."""
        if self.splitting:
            self.split(data)
        elif self.response is None and self.protocol.handshake_exc is None:
            self.receive_handshake(data)
        else:
            super().data_received(data)

    def receive_handshake(self, data: bytes) -> None:
        """Feed websockets the handshake response, then split what follows it."""
        head = self.head
        head += data
        end = head.find(HEAD_END)
        if end < 0:
            super().data_received(data)
            return
        # A 101 response has no body (RFC 9110 section 15.2): frames follow the empty line.
        after = len(head) - end - len(HEAD_END)
        self.head = bytearray()
        super().data_received(data[: len(data) - after])
        self.splitting = self.protocol.state is OPEN and not self.protocol.extensions
        if after:
            self.data_received(data[len(data) - after :])

    def split(self, data: bytes) -> None:
        """Deliver the frames that are whole messages; feed websockets' parser the others."""
        owed = self.owed
        if owed:
            if len(data) <= owed:
                self.owed = owed - len(data)
                super().data_received(data)
                return
            self.owed = 0
            super().data_received(data[:owed])
            data = data[owed:]
        if self.partial:
            data = self.partial + data
            self.partial = b""
        protocol = self.protocol
        max_size = protocol.max_message_size
        size = len(data)
        pos = 0
        while pos < size:
            if protocol.state is not OPEN:  # closing: websockets reads the rest
                self.splitting = False
                super().data_received(data[pos:])
                return
            bounds = frame_bounds(data, pos)
            if bounds is None:
                self.partial = data[pos:]
                return
            opcode, start, end = bounds
            if (
                opcode
                and end <= size
                and protocol.current_size is None  # not inside a fragmented message
                and (max_size is None or end - start <= max_size)
            ):
                self.deliver(data[start:end], opcode == TEXT)
            else:
                self.owed = max(end - size, 0)
                super().data_received(data[pos:end])
            pos = end

    def process_event(self, event: Event) -> None:
        """Handle one event of websockets' parser: join data frames into messages."""
        if self.response is None:  # the handshake response
            super().process_event(event)
            return
        assert isinstance(event, Frame)
        opcode = event.opcode
        # websockets' parser has checked the order of fragments and the size of the message.
        if opcode is TEXT or opcode is BINARY:
            if event.fin:
                self.deliver(event.data, opcode is TEXT)
            else:
                self.fragments = bytearray(event.data)
                self.fragmented_text = opcode is TEXT
        elif opcode is CONT:
            self.fragments += event.data
            if event.fin:
                self.deliver(self.fragments, self.fragmented_text)
                self.fragments = bytearray()
        elif opcode is PONG:
            self.acknowledge_pings(bytes(event.data))

    def deliver(self, data: BytesLike, text: bool) -> None:
        """Queue a whole message for `next_message()`; pause reading at `max_queue`."""
        if self.dropping:
            return
        message: Message
        if text:
            try:
                message = str(data, "utf-8")
            except UnicodeDecodeError as exc:
                message = exc
        else:
            message = bytes(data)
        messages = self.messages
        messages.append(message)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(messages) >= self.queue_high and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    async def fail_invalid_text(self, exc: UnicodeDecodeError) -> NoReturn:
        """Fail the connection with 1007 (RFC 6455 section 8.1), as websockets' `recv()` does."""
        self.set_connection_exc(exc)
        async with self.send_context():
            self.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        await asyncio.shield(self.connection_lost_waiter)
        raise self.close_exc

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is closed: wake `next_message()`, which raises ConnectionClosed."""
        super().connection_lost(exc)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
