"""Response bodies from the cache: streamed from hishel's storage (copied to memory as they
go, when a `Fill` is given), or whole from memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import httpx2

if TYPE_CHECKING:
    from ._cache_memory import Fill

__all__ = ["CachedBody", "MemoryBody", "nothing"]


class CachedBody(httpx2.AsyncByteStream):
    """A response body from hishel (stored, or being stored as it streams); `done` runs once
    it ended or was closed, `unused` is an iterator to close that was never read, `fill`
    copies the body to memory if it is read to its end."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes] | None,
        *,
        upstream: httpx2.Response | None = None,
        done: Callable[[], None] | None = None,
        unused: AsyncIterator[bytes] | None = None,
        fill: Fill | None = None,
    ) -> None:
        self.chunks = chunks
        self.upstream = upstream
        self.done = done or nothing
        self.unused = unused
        self.fill = fill

    async def __aiter__(self) -> AsyncIterator[bytes]:
        fill = self.fill
        if self.chunks is not None:
            async for chunk in self.chunks:
                if fill is not None:
                    fill.add(chunk)
                yield chunk
        if fill is not None:
            # Before `done`: the requests waiting for this response then find it in memory.
            fill.finish()
        self.done()

    async def aclose(self) -> None:
        try:
            for iterator in (self.chunks, self.unused):
                close = getattr(iterator, "aclose", None)
                if close is not None:
                    await close()
            if self.upstream is not None:
                await self.upstream.aclose()
        finally:
            self.done()


class MemoryBody(httpx2.AsyncByteStream):
    """A whole body from memory, in one chunk."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.body:
            yield self.body


def nothing() -> None:
    pass
