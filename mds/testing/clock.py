"""A settable simulated clock (epoch ms) for a store, its FakeUpbit and a test together."""

from __future__ import annotations

import threading

from mds.errors import InvalidRequestError

__all__ = ["ANCHOR_MS", "MarketClock"]

#: 2025-01-27 00:00 UTC, where :class:`MarketClock` starts by default.
ANCHOR_MS = 1_737_936_000_000


class MarketClock:
    """A settable clock in epoch ms, safe to read from the fake exchange's threads."""

    def __init__(self, start_ms: int = ANCHOR_MS) -> None:
        self._now = int(start_ms)
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return self._now

    def set(self, ms: int) -> None:
        """Move the clock to ``ms`` (not backwards: the store refuses a clock that goes back)."""
        with self._lock:
            if int(ms) < self._now:
                raise InvalidRequestError(f"the clock does not go back ({ms} < {self._now})")
            self._now = int(ms)

    def advance(self, ms: int) -> int:
        """Move the clock forward by ``ms``; the new time."""
        if int(ms) < 0:
            raise InvalidRequestError("the clock does not go back")
        with self._lock:
            self._now += int(ms)
            return self._now

    def __repr__(self) -> str:
        return f"MarketClock({self._now})"
