"""Read connections for threads that share a store: a small pool of read-only tiers.

The Store calls its durable tier under its lock. A read from a server takes a round trip (about
0.2 ms for 1,000 candles here, and up to the call's bound when the server stops answering), so
the Store lets other threads go on while it waits (:meth:`mds.store.health.Tiers.read_db`) and
asks one of these readers instead of the tier's own connection, which stays with the writes and
their transactions. Each reader is a read-only :class:`~mds.tiers.postgres.PostgresTier` with its
own connection and bound; at most :data:`SIZE` are open, a thread beyond that waits for one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from mds.errors import StorageUnavailableError

if TYPE_CHECKING:
    from mds.tiers.postgres.tier import PostgresTier

logger = logging.getLogger(__name__)

#: Readers open at most: threads reading the server at once (more wait for one).
SIZE = 4


class Readers:
    """The pool (see the module). ``open_reader`` makes a new reader; :meth:`close` closes the idle
    ones now and the busy ones when they come back."""

    def __init__(self, open_reader: Callable[[], PostgresTier], wait_s: float | None, size: int = SIZE) -> None:
        self._open_reader = open_reader
        self._wait_s = wait_s  # bound on waiting for a free reader (None: none)
        self._idle: list[PostgresTier] = []
        self._guard = threading.Lock()
        self._free = threading.BoundedSemaphore(size)
        self._closed = False
        #: Readers opened so far (for stats and tests).
        self.opened = 0

    @contextlib.contextmanager
    def reader(self) -> Iterator[PostgresTier | None]:
        """A reader for one call, back to the pool afterwards unless its connection was lost;
        None when none can be had (all busy past the wait, or the server refuses another
        connection: at ``max_connections``): the caller then reads on its tier's own connection."""
        if not self._free.acquire(timeout=-1 if self._wait_s is None else self._wait_s):
            logger.warning("PostgreSQL tier: all %d read connections stayed busy for %g s", SIZE, self._wait_s)
            yield None
            return
        try:
            with self._guard:
                r = None if self._closed else (self._idle.pop() if self._idle else None)
                closed = self._closed
            if r is None and not closed:
                try:
                    r = self._open_reader()
                    self.opened += 1
                except StorageUnavailableError as exc:
                    logger.info("PostgreSQL tier: no read connection (%s); reading on the tier's own", exc)
            if r is None:
                yield None
                return
            try:
                yield r
            finally:
                conn = r._conn
                with self._guard:
                    keep = not self._closed and conn is not None and not conn.closed and not conn.broken
                    if keep:
                        self._idle.append(r)
                if not keep:
                    r.close()
        finally:
            self._free.release()

    def close(self) -> None:
        with self._guard:
            self._closed = True
            idle, self._idle = self._idle, []
        for r in idle:
            r.close()
