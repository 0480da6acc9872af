"""`CacheTransport`: the cache in front of the transport of one attempt.

One cacheable request (GET or HEAD, no body, no Range), as `handle_async_request` runs it:

    copies = memory.get(key)                   small responses kept whole (_cache_memory.py)
    lookup(...) -> fresh?                      HIT, served from memory: no storage I/O
    entries = storage.get_entries(key)         hishel's storage
    lookup(...) -> fresh?                      HIT, served from the storage as it streams
                                               (and copied to memory)
    another request is filling this key?       wait for it (lock_timeout at most), look again
    send upstream, conditional if an entry     If-None-Match / If-Modified-Since (hishel)
      is stale
    the upstream failed and stale_usable()     STALE, and the failure counts for the pool
    304                                        hishel freshens the entry: REVALIDATED
    a full response                            hishel decides if it may be stored; it then
                                               streams to the client while hishel stores it
                                               (and copied to memory): MISS, or EXPIRED if it
                                               replaced a stale entry

Any other request passes through (BYPASS); an unsafe method that succeeds removes the entries
of its URL (RFC 9111 4.4). Whatever removes or changes stored entries drops the key's copies in
memory first. The status goes out in `CacheConfig.status_header`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import anyio
import httpx2
from hishel import (
    AnyState,
    CacheMiss,
    CacheOptions,
    Entry,
    Headers,
    NeedRevalidation,
    NeedToBeUpdated,
    Request,
    Response,
    StoreAndUse,
)
from hishel import InvalidateEntries as InvalidateEntriesState
from hishel._core._headers import Vary
from hishel._core._spec import make_conditional_request

from ._cache_bodies import CachedBody, MemoryBody, nothing
from ._cache_memory import Copy, Fill
from ._cache_policy import (
    current_age,
    http_date,
    internal_headers,
    lookup,
    not_modified,
    raw_headers,
    stale_usable,
)
from ._errors import UpstreamError, map_upstream_errors
from ._failover import classify, counts_as_failure, status_condition

if TYPE_CHECKING:
    from ._cache import Cache
    from ._upstream import Server, Upstream

__all__ = ["CacheTransport"]

logger = logging.getLogger("asgi_proxy_pass")

#: hishel's rules as a shared (proxy) cache: s-maxage, private, Authorization (RFC 9111 3.5).
OPTIONS = CacheOptions(shared=True, supported_methods=["GET", "HEAD"])
#: A GET or HEAD with one of these request headers is not looked up (a Range, a body).
NOT_LOOKED_UP = ("range", "content-length", "transfer-encoding")
#: RFC 9110 9.2.1.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: What a 304 to a client carries (RFC 9110 15.4.5), besides our status header.
NOT_MODIFIED_HEADERS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)
#: Replaced by the age the cache computes (RFC 9111 5.1).
AGE = frozenset({"age"})


class CacheTransport(httpx2.AsyncBaseTransport):
    """`inner` with `cache` in front of it, for attempts on `server` of `pool`."""

    def __init__(
        self,
        cache: Cache,
        inner: httpx2.AsyncBaseTransport,
        server: Server,
        pool: Upstream,
        next_upstream: frozenset[str],
    ) -> None:
        self.cache = cache
        self.inner = inner
        self.server = server
        self.pool = pool
        self.next_upstream = next_upstream
        self.status_header = (
            cache.config.status_header.lower().encode("ascii")
            if cache.config.status_header
            else None
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        method = request.method
        headers = internal_headers(request.headers.raw) if method in ("GET", "HEAD") else None
        if headers is None or any(headers.get_list(name) is not None for name in NOT_LOOKED_UP):
            response = await self.inner.handle_async_request(request)
            if method not in SAFE_METHODS and response.status_code < 400:
                await self.cache.purge(self.key_for(request))
            return self.labelled(response, "BYPASS")

        # No body: read its end now, so that the proxy starts watching for a disconnect even
        # when the upstream is never asked.
        if isinstance(request.stream, httpx2.AsyncByteStream):
            async for _ in request.stream:
                pass
        cache = self.cache
        key = self.key_for(request)
        internal = Request(method, key, headers)
        found, stale = await self.find(internal)
        if found is not None:
            return found

        release = nothing
        if cache.config.lock:
            fill = cache.fills.get(key)
            if fill is not None:
                cache.waiting += 1
                try:
                    with anyio.move_on_after(cache.config.lock_timeout):
                        await fill.wait()
                finally:
                    cache.waiting -= 1
            else:
                fill = cache.fills[key] = anyio.Event()
                release = _releaser(cache.fills, key, fill)
            # Looked up again: the request that filled it may have finished in the meantime.
            found, stale = await self.find(internal)
            if found is not None:
                release()
                return found
        try:
            return await self.forward(request, internal, stale, release)
        except BaseException:
            release()
            raise

    def key_for(self, request: httpx2.Request) -> str:
        host = ""
        for name, value in request.headers.raw:
            if name.lower() == b"host":
                host = value.decode("latin-1")
                break
        if self.cache.pool_host is not None and host == self.server.url.host_header:
            host = self.cache.pool_host
        target = request.extensions.get("target") or request.url.raw_path
        return self.cache.key.render(
            self.server.url.scheme, host, target.decode("latin-1"), request.headers
        )

    async def find(self, internal: Request) -> tuple[httpx2.Response | None, list[Entry]]:
        """A fresh stored response (memory first, then the storage), else the stale candidates.

        The policy decides on copies in memory as on stored entries. A copy that is not fresh
        is not an answer (the storage may hold a newer entry): the storage is read then, and
        that read confirms or drops the key's copies.
        """
        cache = self.cache
        now = cache.clock()
        key = internal.url
        memory = cache.memory
        epoch = 0
        if memory is not None:
            copies = memory.get(key, now)
            if copies:
                found = lookup(internal, [copy.entry for copy in copies], now)
                for copy in copies:
                    if copy.entry is found.fresh:
                        memory.touch(copy)
                        return self.from_memory(copy, internal, found.age), []
            epoch = memory.epoch
        entries: list[Entry] | None = None
        try:
            entries = await cache.storage.get_entries(key)
        finally:
            if memory is not None:
                memory.confirm(key, entries, now, epoch)
        found = lookup(internal, entries, now)
        if found.fresh is None:
            return None, found.stale
        fill = None
        if memory is not None:
            confirmed = memory.copy_of(key, found.fresh)
            if confirmed is not None:  # just now: its body need not be read again
                memory.touch(confirmed)
                return self.from_memory(confirmed, internal, found.age), []
            fill = memory.fill(key, found.fresh, now, epoch)
        return self.stored(found.fresh, internal, "HIT", found.age, fill=fill), []

    async def forward(
        self,
        request: httpx2.Request,
        internal: Request,
        candidates: list[Entry],
        release: Callable[[], None],
    ) -> httpx2.Response:
        cache, storage = self.cache, self.cache.storage
        sent = internal
        upstream_request = request
        if candidates:
            sent = make_conditional_request(internal, candidates[0].response)
            upstream_request = _with_headers(request, sent, ("if-none-match", "if-modified-since"))
        try:
            with map_upstream_errors():
                response = await self.inner.handle_async_request(upstream_request)
        except UpstreamError as exc:
            conditions = classify(exc).conditions
            stale = self.usable_stale(candidates, conditions)
            if stale is None:
                raise
            self.record_failure(conditions, str(exc))
            release()
            return self.stored(stale, internal, "STALE", current_age(stale.response, cache.clock()))

        if candidates:
            condition = status_condition(response.status_code)
            stale = self.usable_stale(candidates, frozenset({condition}))
            if stale is not None:
                await response.aclose()
                self.record_failure(frozenset({condition}), f"status {response.status_code}")
                release()
                return self.stored(
                    stale, internal, "STALE", current_age(stale.response, cache.clock())
                )

        if candidates and response.status_code == 304:
            await response.aclose()
            fresh = internal_headers(response.headers.raw)
            if "date" not in fresh:
                fresh["date"] = http_date(cache.clock())
            state: AnyState = NeedRevalidation(
                request=sent,
                original_request=internal,
                revalidating_entries=candidates,
                options=OPTIONS,
            ).next(Response(304, fresh))
            cache.forget(internal.url)
            while isinstance(state, InvalidateEntriesState):
                for entry_id in state.entry_ids:
                    await storage.remove_entry(entry_id)
                state = state.next()
            if isinstance(state, NeedToBeUpdated):
                for updated in state.updating_entries:
                    if "age" not in fresh:
                        # The stored Age was the old response's; the new Date restarts it.
                        updated.response.headers.pop("age", None)
                    await storage.update_headers(updated.id, updated.response.headers)
                release()
                entry = state.updating_entries[-1]
                age = current_age(entry.response, cache.clock())
                return self.stored(entry, internal, "REVALIDATED", age)
            # No stored response matches the 304: ask again, unconditionally.
            response = await self.inner.handle_async_request(request)
            candidates = []

        status = "EXPIRED" if candidates else "MISS"
        if candidates and response.status_code < 500:
            # A full response says that none of the stored ones is suitable (RFC 9111 4.3.3).
            cache.forget(internal.url)
            for entry in candidates:
                await storage.remove_entry(entry.id)
        stored = internal_headers(response.headers.raw)
        now = cache.clock()
        if "date" not in stored:
            # RFC 9110 6.6.1: a cache adds the Date it received a response at, when missing.
            stored["date"] = http_date(now)
        state = CacheMiss(request=internal, options=OPTIONS).next(
            Response(response.status_code, stored, response.aiter_raw())
        )
        if not isinstance(state, StoreAndUse) or not self.may_store(response):
            release()
            return self.labelled(response, status)

        # Only the request headers that Vary names are needed later; Authorization and
        # Cookie values are not written to the storage.
        vary = Vary.from_value(state.response.headers.get("vary", "")).values
        kept = {name: internal.headers.get_list(name) or [] for name in vary if name != "*"}
        memory = cache.memory
        epoch = memory.epoch if memory is not None else 0
        entry = await storage.create_entry(
            replace(internal, headers=Headers(kept)), state.response, internal.url
        )
        body = entry.response.stream
        assert isinstance(body, AsyncIterator)
        # Copied to memory once hishel has read it all, and so stored it (or failed to: the
        # copy then answers for memory_ttl at most, as a response hishel decided to store).
        fill = memory.fill(internal.url, entry, now, epoch) if memory is not None else None
        return httpx2.Response(
            response.status_code,
            headers=self.with_status(response.headers.raw, status),
            stream=CachedBody(body, upstream=response, done=release, fill=fill),
            extensions=response.extensions,
        )

    def may_store(self, response: httpx2.Response) -> bool:
        """Our rules on top of hishel's: no Set-Cookie (nginx), nothing declared too big."""
        config = self.cache.config
        if not config.store_set_cookie and "set-cookie" in response.headers:
            return False
        length = response.headers.get("content-length")
        limit = config.max_entry_size
        return not (limit is not None and length and length.isdigit() and int(length) > limit)

    def usable_stale(self, candidates: list[Entry], conditions: frozenset[str]) -> Entry | None:
        now = self.cache.clock()
        use_stale = frozenset(self.cache.config.use_stale)
        for entry in candidates:
            if any(stale_usable(entry.response, c, now, use_stale) for c in conditions):
                return entry
        return None

    def record_failure(self, conditions: frozenset[str], reason: str) -> None:
        # The client is answered from the cache, but the server did fail: count it (nginx
        # still marks a server failed when it serves stale).
        logger.warning(
            "upstream %s failed: %s; answered with a stale cached response",
            self.server.url.address,
            reason,
        )
        if counts_as_failure(conditions, self.next_upstream):
            self.pool.record_failure(self.server, reason)

    def stored(
        self,
        entry: Entry,
        internal: Request,
        status: str,
        age: float,
        *,
        fill: Fill | None = None,
    ) -> httpx2.Response:
        """A response from a stored entry: HEAD gets no body, a matching conditional a 304;
        `fill` copies the body to memory if it is read."""
        response = entry.response
        body = response.stream
        assert isinstance(body, AsyncIterator)
        raw = raw_headers(response.headers, drop=AGE)
        code, send_body, raw = self.conditional(internal, response, raw)
        return httpx2.Response(
            code,
            headers=self.with_status([*raw, (b"age", b"%d" % int(age))], status),
            stream=CachedBody(body, fill=fill) if send_body else CachedBody(None, unused=body),
        )

    def from_memory(self, copy: Copy, internal: Request, age: float) -> httpx2.Response:
        """`stored()` for a copy in memory: its headers are already encoded."""
        code, send_body, raw = self.conditional(internal, copy.entry.response, copy.raw)
        return httpx2.Response(
            code,
            headers=self.with_status([*raw, (b"age", b"%d" % int(age))], "HIT"),
            stream=MemoryBody(copy.body if send_body else b""),
        )

    @staticmethod
    def conditional(
        internal: Request, response: Response, raw: list[tuple[bytes, bytes]]
    ) -> tuple[int, bool, list[tuple[bytes, bytes]]]:
        """The status, whether a body goes out, and the headers (without `Age`)."""
        if not_modified(internal, response):
            return 304, False, [(n, v) for n, v in raw if n in NOT_MODIFIED_HEADERS]
        return response.status_code, internal.method != "HEAD", raw

    def labelled(self, response: httpx2.Response, status: str) -> httpx2.Response:
        if self.status_header is not None:
            response.headers[self.status_header.decode("ascii")] = status
        return response

    def with_status(self, raw: list[tuple[bytes, bytes]], status: str) -> list[tuple[bytes, bytes]]:
        if self.status_header is None:
            return list(raw)
        return [*raw, (self.status_header, status.encode("ascii"))]

    async def aclose(self) -> None:
        # The transport it wraps belongs to the pool or to the user; the storage to the Cache.
        pass


def _releaser(fills: dict[str, anyio.Event], key: str, fill: anyio.Event) -> Callable[[], None]:
    def release() -> None:
        if fills.get(key) is fill:
            del fills[key]
        fill.set()

    return release


def _with_headers(
    request: httpx2.Request, internal: Request, names: tuple[str, ...]
) -> httpx2.Request:
    """`request` with these headers replaced by `internal`'s values; the rest stay raw."""
    raw = [(n, v) for n, v in request.headers.raw if n.lower().decode("latin-1") not in names]
    for name in names:
        for value in internal.headers.get_list(name) or ():
            raw.append((name.encode("latin-1"), value.encode("latin-1")))
    return httpx2.Request(
        request.method,
        request.url,
        headers=raw,
        stream=request.stream,
        extensions=request.extensions,
    )
