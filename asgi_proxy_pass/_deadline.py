"""`Deadline`: a timeout pushed back on every event and rarely due, for one event-loop timer.

A read timeout restarted at every wait, or an idle timeout restarted at every message, would
make and cancel a loop timer each time (about 3.5 us under uvloop, more than a small request's
own header rules). A `Deadline` keeps one timer and moves it only when it fires early: pushing
the deadline back is an attribute store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Deadline"]


class Deadline:
    """Calls `on_expiry()` once the loop's clock passes the last deadline `set()`.

    `clear()` forgets the deadline (nothing expires until the next `set()`); `cancel()` also
    drops the timer, for good or until the next `set()`.
    """

    __slots__ = ("handle", "loop", "on_expiry", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self.loop = loop
        self.on_expiry = on_expiry
        self.when: float | None = None
        self.handle: asyncio.TimerHandle | None = None

    def set(self, seconds: float) -> None:
        """Expire `seconds` from now, instead of at any earlier or later deadline."""
        self.when = when = self.loop.time() + seconds
        if self.handle is None or self.handle.when() > when:
            self.schedule(when)

    def clear(self) -> None:
        self.when = None

    def cancel(self) -> None:
        self.when = None
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def schedule(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.loop.call_at(when, self.fire)

    def fire(self) -> None:
        self.handle = None
        when = self.when
        if when is None:
            return  # cleared: the next set() schedules again
        if self.loop.time() < when:
            self.schedule(when)  # pushed back since this timer was set
        else:
            self.when = None
            self.on_expiry()
