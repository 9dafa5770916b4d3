"""The change feed between hosts sharing one PostgreSQL history: the payload every committed
change sends (``pg_notify('mds_changes', 'origin|symbol|timeframe|start|end')``) and the
listener thread that hands other hosts' changes to a callback.

The listener owns its connection (``LISTEN mds_changes``) and nothing else of the tier. When
the connection is lost it reconnects by itself with a bounded backoff. It calls
``callback(None, None, 0, 0)`` whenever it starts or stops listening (the tier's ``listening``
tells which): anything may have changed while it was not listening.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from mds.errors import StorageUnavailableError
from mds.tiers.postgres.connection import close_quietly, connect

logger = logging.getLogger(__name__)

CHANNEL = "mds_changes"
_SQL_LISTEN = f"LISTEN {CHANNEL}"
#: Backoff between reconnect attempts: from the first to the last, doubling.
BACKOFF_S = (0.05, 1.0)
_POLL_S = 0.25  # how often the listener looks at the stop flag while no notification arrives
#: The listener sends itself a heartbeat this often, through another connection, on a channel of
#: its own ...
HEARTBEAT_S = 0.5
#: ... and counts itself deaf (its server process hangs, or the path drops silently until TCP
#: keepalives would notice) when none came back for this long: it then reconnects.
DEAF_AFTER_S = 2.0
_SQL_PING = "SELECT pg_notify(%s, %s)"


class _Deaf(Exception):
    """The listener's own heartbeats stopped arriving."""


Callback = Callable[[str | None, str | None, int, int], None]


def payload(origin: str, symbol: str, tfname: str, start: int, end: int) -> str:
    return f"{origin}|{symbol}|{tfname}|{int(start)}|{int(end)}"


def parse(text: str) -> tuple[str, str, str, int, int] | None:
    """``(origin, symbol, timeframe, start, end)`` of a payload (the origin may hold ``|``); None
    when malformed."""
    parts = text.rsplit("|", 4)
    if len(parts) != 5:
        return None
    try:
        return parts[0], parts[1], parts[2], int(parts[3]), int(parts[4])
    except ValueError:
        return None


class Listener:
    """A daemon thread delivering other origins' changes to ``callback`` until :meth:`stop`."""

    def __init__(self, url: str, where: str, origin: str, callback: Callback, timeout_s: float) -> None:
        self._url = url
        self._where = where
        self._origin = origin
        self._callback = callback
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts a backoff wait short (the server is back, or stop)
        self._conn: psycopg.Connection[Any] | None = None
        self._pinger: psycopg.Connection[Any] | None = None
        self._ping_channel = f"mds_ping_{uuid.uuid4().hex}"  # a letter, then hex: a plain identifier
        self.connected = threading.Event()
        #: How many times the connection was re-established after a loss.
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name=f"mds-pg-listener-{origin}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def pid(self) -> int | None:
        """The server process id of the listening connection (None while disconnected)."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _ping(self) -> None:
        """Send this listener a heartbeat through its own other connection (the listening one may
        hang without an error). A failure is left to the missing heartbeat to tell."""
        try:
            if self._pinger is None or self._pinger.closed:
                self._pinger = connect(self._url, timeout_s=self._timeout_s, readonly=False, application="mds-ping")
            self._pinger.execute(_SQL_PING, (self._ping_channel, ""))
        except (psycopg.Error, StorageUnavailableError) as exc:
            logger.debug("PostgreSQL tier %s: heartbeat not sent: %s", self._where, exc)
            close_quietly(self._pinger)
            self._pinger = None

    def wake(self) -> None:
        """Retry a lost connection now instead of after the rest of the backoff (the tier's own
        connection just came back, so the server is likely up)."""
        self._wake.set()

    def _deliver(self, symbol: str | None, tfname: str | None, start: int, end: int) -> None:
        try:
            self._callback(symbol, tfname, start, end)
        except Exception:
            logger.exception("PostgreSQL tier %s: change-feed callback failed", self._where)

    def _run(self) -> None:
        delay = BACKOFF_S[0]
        first = True
        while not self._stop.is_set():
            try:
                conn = connect(self._url, timeout_s=self._timeout_s, readonly=True, application="mds-listener")
            except StorageUnavailableError as exc:
                logger.info(
                    "PostgreSQL tier %s: listener cannot connect (retrying in %.2fs): %s", self._where, delay, exc
                )
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, BACKOFF_S[1])
                continue
            listened = False
            try:
                conn.execute(_SQL_LISTEN)
                conn.execute(f"LISTEN {self._ping_channel}")
                self._conn = conn
                self.connected.set()
                listened = True
                delay = BACKOFF_S[0]
                if not first:
                    self.reconnects += 1
                first = False
                # from here on every change is reported; before it (the first connect included)
                # changes may have gone unreported
                self._deliver(None, None, 0, 0)
                self._listen(conn)
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    logger.warning("PostgreSQL tier %s: change feed lost its connection: %s", self._where, exc)
            except _Deaf:
                logger.warning(
                    "PostgreSQL tier %s: change feed heard nothing for %.1f s (not even its heartbeat): reconnecting",
                    self._where,
                    DEAF_AFTER_S,
                )
            finally:
                self.connected.clear()
                self._conn = None
                close_quietly(conn)
            if listened and not self._stop.is_set():
                self._deliver(None, None, 0, 0)  # not listening any more: changes may go unreported
        close_quietly(self._pinger)
        self._pinger = None

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        heard = sent = time.monotonic()
        self._ping()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - sent >= HEARTBEAT_S:
                self._ping()
                sent = now
            if now - heard > DEAF_AFTER_S:
                raise _Deaf()
            for note in conn.notifies(timeout=_POLL_S):
                if note.channel == self._ping_channel:
                    heard = time.monotonic()
                    continue
                fields = parse(note.payload)
                if fields is None:
                    logger.warning("PostgreSQL tier %s: malformed change payload %r", self._where, note.payload)
                elif fields[0] != self._origin:
                    began = time.monotonic()
                    self._deliver(*fields[1:])
                    # the callback may wait for the store's lock (a long call holds it): that time
                    # is this thread's, not the server's silence (its heartbeat waits, unread)
                    heard += time.monotonic() - began
                if self._stop.is_set():
                    return
