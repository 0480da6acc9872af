"""The two bits of RFC 6455 framing the relay does itself, for the common case only.

A relay's messages are mostly small, unfragmented and uncompressed. For those, websockets'
general framing (a frame object, checks, extensions, a generator-based parser) costs more than
the rest of the relay, so the upstream connection reads and writes them with these functions;
everything else (control frames, fragments, permessage-deflate, protocol errors) stays with
websockets' sans-I/O parser.

    frame_bounds(data, pos)   where the frame at `pos` has its payload, and whether the relay
                              can deliver it as a message: final, unmasked, Text or Binary,
                              no RSV bit (section 5.2)
    client_frame(...)         a final, masked Text or Binary frame (sections 5.2 and 5.3)
    MaskingKeys               the masking keys for client frames (section 10.3)
"""

from __future__ import annotations

import os
import struct

from websockets.frames import BINARY, TEXT

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets installed without its C extension
    from websockets.utils import apply_mask

__all__ = ["MaskingKeys", "client_frame", "frame_bounds"]

# The first byte of a message in a single frame: FIN set, RSV1-3 clear, then the opcode.
_WHOLE_TEXT = 0x80 | TEXT
_WHOLE_BINARY = 0x80 | BINARY

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


def frame_bounds(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """The frame starting at `data[pos]`: `(opcode, start, end)` of its payload, if complete.

    `opcode` is TEXT or BINARY for a frame that is a whole message by itself (FIN set, no RSV
    bit, unmasked as a server's frames are), 0 for any other frame. `end` may lie beyond the
    data received so far. None when `data` ends inside the header.
    """
    size = len(data)
    if size - pos < 2:
        return None
    head1 = data[pos]
    head2 = data[pos + 1]
    length = head2 & 0x7F
    start = pos + 2
    if length == 126:
        start += 2
        if size < start:
            return None
        (length,) = _U16.unpack_from(data, pos + 2)
    elif length == 127:
        start += 8
        if size < start:
            return None
        (length,) = _U64.unpack_from(data, pos + 2)
    if head2 & 0x80:  # masked: websockets fails the connection (section 5.1)
        return 0, start + 4, start + 4 + length
    if head1 == _WHOLE_TEXT or head1 == _WHOLE_BINARY:
        return head1 & 0x0F, start, start + length
    return 0, start, start + length


def client_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """A final, masked frame carrying `payload` (`opcode` TEXT or BINARY), no extension."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = _HEAD_16.pack(0x80 | opcode, 0x80 | 126, length)
    else:
        head = _HEAD_64.pack(0x80 | opcode, 0x80 | 127, length)
    return b"".join((head, key, apply_mask(payload, key)))


class MaskingKeys:
    """Masking keys, each 4 bytes from `os.urandom`, drawn `batch` at a time.

    RFC 6455 section 10.3 wants keys an intermediary cannot predict, from a strong source of
    entropy; os.urandom is one, but a system call for every message costs as much as framing it.
    """

    def __init__(self, batch: int = 64) -> None:
        self.batch = batch
        self.keys = b""
        self.used = 0

    def next(self) -> bytes:
        """The next unused key."""
        used = self.used
        if used == len(self.keys):
            self.keys = os.urandom(4 * self.batch)
            used = 0
        self.used = used + 4
        return self.keys[used : used + 4]
