"""A bound on how long one call of the PostgreSQL tier waits for its server.

The server bounds its own statements (``statement_timeout``, set per session by
:func:`mds.tiers.postgres.connection.connect`), but a server that stops answering (a hung
backend, a host that froze, a network path that drops packets silently until TCP keepalives
notice minutes later) enforces nothing, and a call would wait for ever while the Store's lock is
held, stalling every thread of the store, memory hits included.

:class:`Deadline` is the client's bound: a call arms it, and a watchdog thread shuts down the
connection's socket when the call is still waiting ``grace_s`` after the server's own bound. The
blocked call then fails at once (the connection is lost, the server rolls back whatever it had
begun) and the tier raises StorageUnavailableError saying the server did not answer. Arming costs
one clock read: no thread or timer per call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

logger = logging.getLogger(__name__)


class Deadline:
    """The bound on calls to one connection (see the module).

    Parameters
    ----------
    timeout_s : float or None
        The server's bound on a statement; a call still waiting ``timeout_s + grace_s`` after it
        began is cut. None: no bound (nothing is watched).
    where : str
        The server, for messages (redacted).
    grace_s : float
        Time given to the server's own ``statement_timeout`` to end a statement cleanly first.
    """

    def __init__(self, timeout_s: float | None, where: str, grace_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self.where = where
        self.grace_s = float(grace_s)
        self._limit_s = None if timeout_s is None else float(timeout_s) + self.grace_s
        #: The session's own ``statement_timeout`` (ms; 0: none), set at every connect: a URL
        #: that gives a longer one than ``timeout_s`` moves the cut past it.
        self.server_bound_ms = 0
        #: The connection calls wait on (the tier sets it at every connect); None: none open.
        self.conn: Any = None
        #: How many calls were cut.
        self.cuts = 0
        self._since = 0.0  # monotonic start of the call in progress (0.0: none)
        self._cut_at = 0.0  # the start of the call cut last
        self._off = 0  # suspended() depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def limit_s(self) -> float | None:
        """Seconds after which a call is cut (None: never)."""
        limit = self._limit_s
        if limit is None:
            return None
        return max(limit, self.server_bound_ms / 1000 + self.grace_s)

    def arm(self) -> bool:
        """Start bounding a call; False when one is bounded already (the outer call's bound
        holds, the inner one must not :meth:`disarm` it), or there is no bound now."""
        if self._since or self.limit_s is None or self._off:
            return False
        self._since = time.monotonic()
        if self._thread is None:
            self._start()
        return True

    @contextlib.contextmanager
    def bounded(self) -> Iterator[None]:
        """Bound the calls inside (unless an outer block bounds them already: its bound holds)."""
        armed = self.arm()
        try:
            yield
        finally:
            if armed:
                self.disarm()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """No bound on the calls inside (they arm nothing)."""
        self._off += 1
        try:
            yield
        finally:
            self._off -= 1

    def disarm(self) -> None:
        self._since = 0.0

    def cut(self) -> bool:
        """Whether the call bounded now was cut (its connection's socket shut down)."""
        return bool(self._since) and self._cut_at == self._since

    def message(self) -> str:
        return (
            f"PostgreSQL tier {self.where}: the server did not answer within {self.limit_s:g} s "
            "(Config.history_timeout_s and a grace); the connection was dropped, nothing of the call "
            "was acknowledged, and the next call reconnects"
        )

    def close(self) -> None:
        self._stop.set()
        self.conn = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="mds-postgres-deadline", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, (self.limit_s or 2.0) / 8)):
            limit = self.limit_s
            since = self._since
            if limit is None:
                continue
            if not since or since == self._cut_at or time.monotonic() - since < limit:
                continue
            conn = self.conn
            if conn is None or self._since != since:
                continue  # the call ended meanwhile
            self._cut_at = since
            self.cuts += 1
            logger.warning("PostgreSQL tier %s: no answer for %.1f s; dropping the connection", self.where, limit)
            shut(conn)


def shut(conn: Any) -> None:
    """Shut down the connection's socket (None: nothing): a call blocked reading it returns at
    once (EOF), and the connection is broken for psycopg; the descriptor itself is left to
    psycopg to close."""
    if conn is None:
        return
    with contextlib.suppress(OSError, ValueError, psycopg.Error):
        fd = conn.fileno()
        dup = socket.socket(fileno=os.dup(fd))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()
