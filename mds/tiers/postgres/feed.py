"""The change feed between hosts sharing one PostgreSQL history: the payload every committed
change sends (``pg_notify('mds_changes', 'origin|symbol|timeframe|start|end')``) and the
listener thread that hands other hosts' changes to a callback.

The listener owns its connection (``LISTEN mds_changes``) and nothing else of the tier. When
the connection is lost it reconnects by itself with a bounded backoff. It calls
``callback(None, None, 0, 0)`` whenever it starts or stops being trusted (:attr:`Listener.trusted`,
the tier's ``listening``, tells which): anything may have changed while it was not.

A listening connection can go deaf without an error (its server process hangs; a network path
drops packets silently until TCP notices, minutes later). A second thread therefore sends the
listener a heartbeat every :data:`HEARTBEAT_S` through a connection of its own, on a channel of
its own. The server delivers notifications in commit order, so a heartbeat heard means every
change committed before it was sent has been heard too. When a heartbeat whose send began
:data:`SUSPECT_AFTER_S` ago is still not heard (lost, or its send failed or hangs), the listener
stops being trusted (the store's reads then ask the server, so another host's write is seen
within 1 s, DESIGN.md 7); it is trusted again at the next heartbeat, and reconnects after
:data:`DEAF_AFTER_S`. The heartbeat is sent from its own thread, so a send that hangs with the
path cannot stop the listener's clock; and a heartbeat is awaited only from when its send
began, so a pause of this process (both threads waiting for the GIL) is not the server's
silence.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg

from mds.errors import StorageUnavailableError
from mds.tiers.postgres.connection import close_quietly, connect
from mds.tiers.postgres.deadline import shut

logger = logging.getLogger(__name__)

CHANNEL = "mds_changes"
_SQL_LISTEN = f"LISTEN {CHANNEL}"
#: Backoff between reconnect attempts: from the first to the last, doubling.
BACKOFF_S = (0.05, 1.0)
_POLL_S = 0.05  # how often the listener looks at its clock and stop flag while nothing arrives
#: The listener is sent a heartbeat this often, through another connection, on a channel of its
#: own ...
HEARTBEAT_S = 0.1
#: ... stops being trusted when none came back for this long (reads ask the server; a write on
#: another host is then seen within 1 s, DESIGN.md 7: this, plus a poll, plus the read) ...
SUSPECT_AFTER_S = 0.5
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
        #: Set while connected and hearing its heartbeats: every change committed up to
        #: :data:`SUSPECT_AFTER_S` ago has been delivered.
        self.trusted = threading.Event()
        #: Heartbeats sent, or being sent, and not heard yet: (number, monotonic time the send
        #: began). The heartbeat thread appends, the listener pops (a deque does both atomically).
        self._awaited: deque[tuple[int, float]] = deque()
        self._beats = 0
        #: How many times the connection was re-established after a loss.
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name=f"mds-pg-listener-{origin}", daemon=True)
        self._pinger_thread = threading.Thread(target=self._beat, name=f"mds-pg-heartbeat-{origin}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._pinger_thread.start()

    @property
    def pid(self) -> int | None:
        """The server process id of the listening connection (None while disconnected)."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self._pinger_thread.join(min(timeout_s, 2 * HEARTBEAT_S))
        if self._pinger_thread.is_alive():  # a heartbeat hangs on its server: cut it
            shut(self._pinger)
            self._pinger_thread.join(timeout_s)

    def _beat(self) -> None:
        """The heartbeat thread: while the listener is connected, send it a heartbeat every
        :data:`HEARTBEAT_S` (see the module)."""
        while not self._stop.wait(HEARTBEAT_S):
            if self.connected.is_set():
                self._ping()
        close_quietly(self._pinger)
        self._pinger = None

    def _ping(self) -> None:
        """Send the listener a heartbeat through a connection of its own (the listening one may
        hang without an error). It is awaited from the moment its send begins: a send that
        fails or hangs is a heartbeat not heard."""
        self._beats += 1
        self._awaited.append((self._beats, time.monotonic()))
        try:
            if self._pinger is None or self._pinger.closed:
                self._pinger = connect(self._url, timeout_s=self._timeout_s, readonly=False, application="mds-ping")
            self._pinger.execute(_SQL_PING, (self._ping_channel, str(self._beats)))
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
                self._awaited.clear()  # sent before this connection listened: never heard
                self._conn = conn
                self.connected.set()
                self.trusted.set()
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
                shut(self._pinger)  # its heartbeat may hang on the same path: it reconnects too
            finally:
                was_trusted = self.trusted.is_set()
                self.trusted.clear()
                self.connected.clear()
                self._conn = None
                close_quietly(conn)
            if listened and was_trusted and not self._stop.is_set():
                self._deliver(None, None, 0, 0)  # not listening any more: changes may go unreported

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        while not self._stop.is_set():
            self._take(conn, _POLL_S)
            if self._stop.is_set():
                return
            if self._silent_s() > SUSPECT_AFTER_S:
                # what arrived while this process did not run (the GIL held, a callback waiting
                # for the store's lock) is read before the server is blamed
                self._take(conn, 0.0)
                silent = self._silent_s()
                if silent > DEAF_AFTER_S:
                    raise _Deaf()
                if silent > SUSPECT_AFTER_S and self.trusted.is_set():
                    logger.info(
                        "PostgreSQL tier %s: change feed missed its heartbeat for %.1f s: reads ask the server",
                        self._where,
                        silent,
                    )
                    self._trust(False)

    def _take(self, conn: psycopg.Connection[Any], timeout_s: float) -> None:
        """Hand what arrives within ``timeout_s`` to the callback (0: only what has arrived)."""
        for note in conn.notifies(timeout=timeout_s):
            if note.channel == self._ping_channel:
                self._heard(note.payload)
                continue
            fields = parse(note.payload)
            if fields is None:
                logger.warning("PostgreSQL tier %s: malformed change payload %r", self._where, note.payload)
            elif fields[0] != self._origin:
                self._deliver(*fields[1:])
            if self._stop.is_set():
                return

    def _heard(self, text: str) -> None:
        """Heartbeat number ``text`` arrived: it and every one before it are heard, and so is
        every change committed before it was sent (the server delivers in commit order)."""
        try:
            number = int(text)
        except ValueError:
            return
        awaited = self._awaited
        while awaited and awaited[0][0] <= number:
            awaited.popleft()
        if not self.trusted.is_set():
            logger.info("PostgreSQL tier %s: change feed hears its heartbeat again", self._where)
            self._trust(True)

    def _silent_s(self) -> float:
        """Seconds since the oldest heartbeat not heard yet began to be sent (0: none awaited)."""
        try:
            return time.monotonic() - self._awaited[0][1]
        except IndexError:
            return 0.0

    def _trust(self, trusted: bool) -> None:
        """Mark the listener (not) trusted and tell the callback."""
        if trusted:
            self.trusted.set()
        else:
            self.trusted.clear()
        self._deliver(None, None, 0, 0)
