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
change committed before it was sent has been heard too. While a heartbeat whose send began
:data:`SUSPECT_AFTER_S` ago (or :data:`SUSPECT_AFTER_S` after the listening connection
listened, if later) is not heard (lost, or its send failed or hangs), the listener is not
trusted (the store's reads then ask the server, so another host's write is seen within 1 s,
DESIGN.md 7); it is trusted again when a heartbeat is heard. The failures are told apart:

- a heartbeat sent (committed) and not heard for :data:`DEAF_AFTER_S`: the listening connection
  is deaf; it reconnects, and so does the heartbeat's;
- a send that hangs for :data:`DEAF_AFTER_S`: the heartbeat's connection is cut (its next
  heartbeat connects again);
- a heartbeat that cannot be sent (no connection to be had: a connection limit, the server
  down): the listener stays untrusted but connected (reconnecting it would not help), and the
  heartbeat retries with a backoff.

The heartbeat is sent from its own thread, so a send that hangs with the path cannot stop the
listener's clock; and a heartbeat is awaited only from when its send began, so a pause of this
process (both threads waiting for the GIL) is not the server's silence. Heartbeats awaited
when the listening connection is replaced stay awaited (a hung send is still cut); they are
timed from the new connection's start.
"""

from __future__ import annotations

import contextlib
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
#: A heartbeat is a transaction (NOTIFY takes a transaction id); it need not wait for the WAL
#: to reach the disk: losing one in a crash costs nothing.
_SQL_PING_SESSION = "SET synchronous_commit TO off"

#: How a heartbeat's send went: under way; done (committed: the listener should hear it); or
#: lost (the send failed or was cut, or it was committed before the listening connection
#: listened: the listener cannot hear it, only a later one).
_SENDING, _SENT, _LOST = "sending", "sent", "lost"


class _Beat:
    """One heartbeat: its number, when its send began (monotonic), how the send went, and the
    connection it is sent through with when it was had (None while it is being made: a connect
    is bounded by its own timeout)."""

    __slots__ = ("began", "conn", "number", "on", "state")

    def __init__(self, number: int, began: float) -> None:
        self.number = number
        self.began = began
        self.state = _SENDING
        self.conn: psycopg.Connection[Any] | None = None
        self.on = began


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
        #: Heartbeats sent, or being sent, and not heard yet, oldest first (at most one lost: a
        #: later lost one tells nothing more). The heartbeat thread appends and marks, the
        #: listener pops, marks and collapses; all under ``_mu``.
        self._awaited: deque[_Beat] = deque()
        self._mu = threading.Lock()
        self._beats = 0
        self._listening_since = 0.0  # monotonic time the listening connection listened
        self._sending_fails = False  # the last heartbeat could not be sent (logged once)
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
        :data:`HEARTBEAT_S`, backing off while none can be sent (see the module)."""
        wait = HEARTBEAT_S
        while not self._stop.wait(wait):
            if not self.connected.is_set():
                continue
            try:
                sent = self._ping()
            except Exception:  # a bug here must not end the heartbeats: the feed would go unchecked
                logger.exception("PostgreSQL tier %s: heartbeat failed", self._where)
                sent = False
            wait = HEARTBEAT_S if sent else min(wait * 2, BACKOFF_S[1])
        close_quietly(self._pinger)
        self._pinger = None

    def _ping(self) -> bool:
        """Send the listener a heartbeat through a connection of its own (the listening one may
        hang without an error). It is awaited from the moment its send begins: a send that
        fails or hangs is a heartbeat not heard. True when it was sent."""
        self._beats += 1
        beat = _Beat(self._beats, time.monotonic())
        with self._mu:
            self._awaited.append(beat)
        try:
            pinger = self._pinger
            fresh = pinger is None or pinger.closed
            if pinger is None or pinger.closed:
                self._pinger = None
                pinger = self._pinger = connect(
                    self._url, timeout_s=self._timeout_s, readonly=False, application="mds-ping"
                )
            with self._mu:
                beat.conn, beat.on = pinger, time.monotonic()
            if fresh:
                pinger.execute(_SQL_PING_SESSION)
            pinger.execute(_SQL_PING, (self._ping_channel, str(beat.number)))
        except Exception as exc:
            self._lost(beat)
            close_quietly(self._pinger)
            self._pinger = None
            if not isinstance(exc, (psycopg.Error, StorageUnavailableError)):
                raise
            if not self._sending_fails and not self._stop.is_set():
                logger.warning(
                    "PostgreSQL tier %s: change feed heartbeat cannot be sent (reads ask the server until it can): %s",
                    self._where,
                    exc,
                )
            self._sending_fails = True
            return False
        if self._sending_fails:
            logger.info("PostgreSQL tier %s: change feed heartbeat sent again", self._where)
            self._sending_fails = False
        with self._mu:
            if beat.state == _SENDING:
                beat.state = _SENT
        return True

    def _lost(self, beat: _Beat) -> None:
        """``beat`` cannot be heard; it stays awaited (the feed's silence is timed from it)
        unless an older lost one already is."""
        with self._mu:
            beat.state = _LOST
            older = [b for b in self._awaited if b.state == _LOST and b.number < beat.number]
            if older:
                with contextlib.suppress(ValueError):
                    self._awaited.remove(beat)

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
                self._listened()
                self._conn = conn
                self.connected.set()
                if not self._sending_fails:  # else trusted once a heartbeat is heard
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
                self._judge()

    def _judge(self) -> None:
        """A heartbeat is late: tell a deaf listener (raise :class:`_Deaf`), a hung send (cut
        it) and a heartbeat that could not be sent apart, and stop trusting the feed."""
        now = time.monotonic()
        since = self._listening_since
        with self._mu:
            awaited = list(self._awaited)
            sent = [b for b in awaited if b.state == _SENT]
            if sent and now - max(sent[0].began, since) > DEAF_AFTER_S:
                raise _Deaf()
            # a send under way on a connection for this long hangs (one still connecting is
            # bounded by the connect timeout)
            hung = [b for b in awaited if b.state == _SENDING and b.conn is not None and now - b.on > DEAF_AFTER_S]
            for b in hung:
                b.state = _LOST  # cut once: the heartbeat thread connects again
        for b in hung:
            logger.warning(
                "PostgreSQL tier %s: change feed heartbeat send hangs for %.1f s: cutting its connection",
                self._where,
                now - b.on,
            )
            shut(b.conn)
        silent = self._silent_s()
        if silent > SUSPECT_AFTER_S and self.trusted.is_set():
            lost = bool(awaited) and awaited[0].state == _LOST
            logger.info(
                "PostgreSQL tier %s: change feed %s for %.1f s: reads ask the server",
                self._where,
                "could not send its heartbeat" if lost else "missed its heartbeat",
                silent,
            )
            self._trust(False)

    def _listened(self) -> None:
        """A new listening connection listens: the heartbeats committed before cannot be heard
        on it. They collapse into one lost heartbeat (the feed's silence is timed from now, until
        a later heartbeat is heard); a send still under way stays awaited (it may be heard, or
        hang and be cut)."""
        with self._mu:
            self._listening_since = time.monotonic()
            before = [b for b in self._awaited if b.state != _SENDING]
            keep = [b for b in self._awaited if b.state == _SENDING]
            if before:
                before[0].state = _LOST
                keep.insert(0, before[0])
            self._awaited = deque(keep)

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
        with self._mu:
            awaited = self._awaited
            while awaited and awaited[0].number <= number:
                awaited.popleft()
        if not self.trusted.is_set() and self._silent_s() <= SUSPECT_AFTER_S:
            logger.info("PostgreSQL tier %s: change feed hears its heartbeat again", self._where)
            self._trust(True)

    def _silent_s(self) -> float:
        """Seconds since the oldest heartbeat not heard yet began to be sent, or since the
        listening connection listened if later (0: none awaited)."""
        with self._mu:
            if not self._awaited:
                return 0.0
            began = self._awaited[0].began
        return time.monotonic() - max(began, self._listening_since)

    def _trust(self, trusted: bool) -> None:
        """Mark the listener (not) trusted and tell the callback."""
        if trusted:
            self.trusted.set()
        else:
            self.trusted.clear()
        self._deliver(None, None, 0, 0)
