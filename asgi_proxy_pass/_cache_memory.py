"""The memory tier: small stored responses kept whole in this process, in front of the storage.

A hit read from hishel's storage costs round trips (SQLite: six hops to its one worker thread,
serialised across all requests; Redis: network calls); a copy in memory costs none. The tier
never decides freshness: a copy carries what `_cache_policy.lookup` needs (the stored request's
`Vary`'d headers, the response headers with their `Date` and `Age`), and the transport asks
the policy about copies exactly as about stored entries. What the tier holds, and when:

    in this process                                   the copies of a key
    a response is stored (MISS, EXPIRED), or a        one is made once its body has been
      fresh one read from the storage (HIT), with       read to its end
      a body of at most `memory_entry_size`
    a request                                         looked up first; a fresh one answers,
                                                        else the storage is read
    purge, an unsafe method, a 304 or a new           dropped
      response replacing a stored entry
    `memory_ttl` after the storage last confirmed     due: the next request reads the storage
      them                                              (`get()` gives it none), the others
                                                        still get them until that read ends;
                                                        `confirm()` then keeps those the
                                                        storage still has, unchanged
    more than `memory_size` bytes in all              the least recently used are dropped

Other processes sharing the storage (several workers on one SQLite file, Redis) purge and
replace entries without telling this one: a copy can answer for `memory_ttl` after that, plus
the time one storage read takes. The reads also keep hot entries alive in the storage
(`inactive`), which a tier answering every request would let expire there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ._cache_policy import raw_headers

if TYPE_CHECKING:
    from uuid import UUID

    from hishel import Entry

__all__ = ["Copy", "Fill", "MemoryTier"]

#: Bytes a copy is counted for besides its body and headers (the objects holding them).
OVERHEAD = 512


@dataclass(eq=False)
class Copy:
    """One stored response, whole: `entry` for the policy (its stream unused), `raw` its
    headers as sent (encoded once, `Age` left out)."""

    key: str
    entry: Entry
    body: bytes
    raw: list[tuple[bytes, bytes]]
    size: int


class _Key:
    """The copies of one key, when the storage last confirmed them (cache clock), and whether
    a request is reading the storage to confirm them now."""

    __slots__ = ("checked", "copies", "reading")

    def __init__(self, checked: float) -> None:
        self.copies: dict[UUID, Copy] = {}
        self.checked = checked
        self.reading = False


class MemoryTier:
    """Copies of small stored responses, by cache key, bounded by `max_size` bytes in all
    (least recently used dropped first), confirmed by the storage every `ttl` seconds (None:
    trusted until dropped).

    `epoch` changes whenever copies are dropped for an invalidation: a copy or a confirmation
    from a storage read or store that started before (a body still streaming when a purge
    came) is refused.
    """

    def __init__(self, max_size: int, max_entry_size: int, ttl: float | None) -> None:
        self.max_size = max_size
        self.max_entry_size = max_entry_size
        self.ttl = ttl
        self.size = 0
        self.epoch = 0
        self._lru: OrderedDict[UUID, Copy] = OrderedDict()  # least recently used first
        self._keys: dict[str, _Key] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: str, now: float) -> list[Copy]:
        """The copies of `key` to look at; none when they are due for confirmation and no
        other request is reading the storage for them: the caller then reads it, and passes
        what it found to `confirm()`."""
        group = self._keys.get(key)
        if group is None:
            return []
        ttl = self.ttl
        if ttl is None or group.reading or 0 <= now - group.checked < ttl:
            return list(group.copies.values())
        group.reading = True
        return []

    def confirm(self, key: str, entries: list[Entry] | None, now: float, epoch: int) -> None:
        """The storage was read for `key` from `now` on (`entries`; None if the read failed):
        the copies of entries it still has, unchanged, are trusted again, the others dropped.
        `epoch` is the one of before the read."""
        group = self._keys.get(key)
        if group is None:
            return
        group.reading = False
        if entries is None or epoch != self.epoch:
            return
        stored = {entry.id: entry for entry in entries}
        for copy in list(group.copies.values()):
            entry = stored.get(copy.entry.id)
            if entry is None or entry.response.headers != copy.entry.response.headers:
                self._drop(copy)
        group.checked = now

    def copy_of(self, key: str, entry: Entry) -> Copy | None:
        """The copy of a stored entry, if there is one."""
        group = self._keys.get(key)
        return group.copies.get(entry.id) if group is not None else None

    def touch(self, copy: Copy) -> None:
        """`copy` answered a request: it is now the most recently used."""
        self._lru.move_to_end(copy.entry.id)

    def put(self, key: str, entry: Entry, body: bytes, now: float, epoch: int) -> bool:
        """Keep a copy of `entry` with its whole `body`, read or stored at `now`, unless it is
        too big or `epoch` is not the current one (something was invalidated since)."""
        if epoch != self.epoch or len(body) > self.max_entry_size:
            return False
        raw = raw_headers(entry.response.headers, drop=frozenset({"age"}))
        size = len(body) + sum(len(name) + len(value) for name, value in raw) + OVERHEAD
        if size > self.max_size:
            return False
        old = self._lru.get(entry.id)
        if old is not None:
            self._drop(old)
        group = self._keys.get(key)
        if group is None:
            group = self._keys[key] = _Key(now)
        group.copies[entry.id] = self._lru[entry.id] = Copy(key, entry, body, raw, size)
        self.size += size
        while self.size > self.max_size:
            self._drop(next(iter(self._lru.values())))
        return True

    def fill(self, key: str, entry: Entry, now: float, epoch: int) -> Fill:
        """A copy of `entry` to make from its body as it is read. `epoch` is the one of before
        the entry was read or stored: an invalidation since then refuses the copy."""
        entry = replace(entry, response=replace(entry.response, stream=None))
        return Fill(self, key, entry, now, epoch)

    def discard(self, key: str, *, prefix: bool = False) -> None:
        """Drop the copies of `key`, or of every key starting with it."""
        self.epoch += 1
        keys = [k for k in self._keys if k.startswith(key)] if prefix else [key]
        for each in keys:
            group = self._keys.pop(each, None)
            for copy in group.copies.values() if group is not None else ():
                del self._lru[copy.entry.id]
                self.size -= copy.size

    def clear(self) -> None:
        self.epoch += 1
        self._lru.clear()
        self._keys.clear()
        self.size = 0

    def _drop(self, copy: Copy) -> None:
        del self._lru[copy.entry.id]
        group = self._keys[copy.key]
        del group.copies[copy.entry.id]
        if not group.copies:
            del self._keys[copy.key]
        self.size -= copy.size


class Fill:
    """A copy being made: `add()` each chunk of the body as it is read, `finish()` at its end.

    A body that grows beyond the tier's `max_entry_size` is let go of at once; one that was
    not read to its end is never finished, so never kept.
    """

    __slots__ = ("entry", "epoch", "key", "memory", "now", "parts", "size")

    def __init__(self, memory: MemoryTier, key: str, entry: Entry, now: float, epoch: int) -> None:
        self.memory = memory
        self.key = key
        self.entry = entry
        self.now = now
        self.epoch = epoch
        self.parts: list[bytes] | None = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        if self.parts is not None:
            self.size += len(chunk)
            if self.size > self.memory.max_entry_size:
                self.parts = None
            else:
                self.parts.append(chunk)

    def finish(self) -> bool:
        """Keep the copy; whether it was kept."""
        if self.parts is None:
            return False
        return self.memory.put(self.key, self.entry, b"".join(self.parts), self.now, self.epoch)
