"""The PostgreSQL durable tier's facade, :class:`PostgresTier`: the connection (reconnected after a
loss) and its transactions, the public reads, writes, upkeep and checks (each delegating to a
role module of :mod:`mds.tiers.postgres`), and the change feed between hosts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import psycopg

from mds import _kernels as _k
from mds.errors import InvalidRequestError, MdsError, StorageUnavailableError
from mds.tiers._chunks import EMPTY_RANGES, NEG_INF, POS_INF, check_batch, empty
from mds.tiers.durable import redact
from mds.tiers.postgres import reads, upkeep
from mds.tiers.postgres.catalog import Catalog, Series, StaleCatalog, list_series
from mds.tiers.postgres.connection import LOCK_TIMEOUT_MS, close_quietly, connect, rollback_quietly, translate
from mds.tiers.postgres.coverage import change_coverage, read_coverage
from mds.tiers.postgres.deadline import Deadline
from mds.tiers.postgres.feed import CHANNEL, Callback, Listener, payload
from mds.tiers.postgres.integrity import invariant_problems, quarantine
from mds.tiers.postgres.pool import Readers
from mds.tiers.postgres.schema import ensure_schema
from mds.tiers.postgres.writes import delete_rows, write_rows
from mds.timeframes import Timeframe, parse_timeframe

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: One statement at commit: bump ``commit_seq``, move this origin's entry in the ledger of
#: acknowledged commits to it (returning the entry before: see mds.store.changes.SharedAcks) and
#: queue the change notifications (delivered by the server when, and only if, the transaction
#: commits). The UPDATE serialises every host's commits, so ledger entries grow in commit order.
_SQL_COMMIT_MARK = (
    "WITH s AS (UPDATE mds_meta SET v = v + 1 WHERE k = 'commit_seq' RETURNING v), "
    "p AS (SELECT seq FROM mds_acks WHERE origin = %(o)s), "
    "a AS (INSERT INTO mds_acks(origin, seq) SELECT %(o)s, v FROM s "
    "ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq) "
    f"SELECT s.v, (SELECT seq FROM p), (SELECT count(pg_notify('{CHANNEL}', n)) FROM unnest(%(n)s::text[]) AS n) "
    "FROM s"
)
#: The same without a ledger (a role that may not create it): no commit is recorded.
_SQL_COMMIT_MARK_BARE = (
    "WITH s AS (UPDATE mds_meta SET v = v + 1 WHERE k = 'commit_seq' RETURNING v) "
    f"SELECT s.v, NULL, (SELECT count(pg_notify('{CHANNEL}', n)) FROM unnest(%(n)s::text[]) AS n) FROM s"
)
_SQL_SEQ = "SELECT v FROM mds_meta WHERE k = 'commit_seq'"
#: A call that takes as long as the data needs (see _unbounded), and the session's bounds again.
_SQL_UNBOUNDED = f"SET statement_timeout = 0; SET lock_timeout = {LOCK_TIMEOUT_MS}"
_SQL_BOUNDED = "RESET statement_timeout; RESET lock_timeout"
_SQL_ACKED = "SELECT seq FROM mds_acks WHERE origin = %s"
_SQL_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


def _translated(method: Callable[Concatenate[PostgresTier, _P], _R]) -> Callable[Concatenate[PostgresTier, _P], _R]:
    """psycopg errors leaving ``method`` become StorageUnavailableError naming the server.

    A lost connection is dropped. When the call began outside a transaction it is then retried
    once on a new connection: the server rolled back whatever the lost connection had begun
    (an ambiguous COMMIT is never retried: it leaves as StorageUnavailableError from ``_Txn``).
    So an idle connection cut by a server restart costs no failed call."""

    @functools.wraps(method)
    def call(self: PostgresTier, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        outside = self._depth == 0
        with self._deadline.bounded():  # the call, its retry included (see Deadline)
            try:
                try:
                    return method(self, *args, **kwargs)
                except StaleCatalog as stale:
                    # the tables were created again under this connection: ids looked up afresh
                    logger.warning(
                        "PostgreSQL tier %s: series ids changed (%s); looking them up again", self.where, stale
                    )
                    self._catalog.clear()
                    return method(self, *args, **kwargs)
            except psycopg.Error as exc:
                if self._deadline.cut() or not (self._drop_if_broken() and outside and not self._closed):
                    raise self._failure(exc) from exc
                logger.info("PostgreSQL tier %s: connection lost (%s); reconnecting once", self.where, exc)
            try:
                return method(self, *args, **kwargs)
            except psycopg.Error as exc:
                raise self._failure(exc) from exc

    return call


def _unbounded(method: Callable[Concatenate[PostgresTier, _P], _R]) -> Callable[Concatenate[PostgresTier, _P], _R]:
    """:func:`_translated` for a call that takes as long as the data needs (a VACUUM, a full
    integrity pass): neither the session's ``statement_timeout`` nor the :class:`Deadline` bounds
    it; waiting for another session's lock still ends after :data:`LOCK_TIMEOUT_MS`."""

    @functools.wraps(method)
    def body(self: PostgresTier, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        conn = self._connection()
        conn.execute(_SQL_UNBOUNDED, prepare=False)
        try:
            return method(self, *args, **kwargs)
        finally:
            if self._conn is conn and not conn.broken:
                conn.execute(_SQL_BOUNDED, prepare=False)

    bounded = _translated(body)

    @functools.wraps(method)
    def call(self: PostgresTier, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._deadline.suspended():
            return bounded(self, *args, **kwargs)

    return call


class _Txn:
    """Context manager of :meth:`PostgresTier.transaction`; also the read snapshot of readers."""

    __slots__ = ("_t",)

    def __init__(self, tier: PostgresTier) -> None:
        self._t = tier

    def __enter__(self) -> PostgresTier:
        t = self._t
        if t._depth == 0:
            with t._deadline.bounded():
                try:
                    _Txn.begin(t)
                except psycopg.Error as exc:
                    if t._deadline.cut() or not t._drop_if_broken():
                        raise t._failure(exc) from exc
                    try:  # nothing was begun: a connection cut while idle is replaced once
                        _Txn.begin(t)
                    except psycopg.Error as exc2:
                        raise t._failure(exc2) from exc2
            t._doomed = False
        t._depth += 1
        return t

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        t = self._t
        t._depth -= 1
        if t._depth > 0:
            if et is not None:
                t._doomed = True  # inner writes joined the outer transaction: all or nothing
            return
        conn = t._conn
        if et is None and not t._doomed and conn is not None:
            seq = prev = None
            with t._deadline.bounded():
                try:
                    if t._dirty:
                        params = {"o": t.origin, "n": list(dict.fromkeys(t._spans))}
                        if t._ledger:
                            row = conn.execute(_SQL_COMMIT_MARK, params).fetchone()
                        else:
                            row = conn.execute(_SQL_COMMIT_MARK_BARE, params).fetchone()
                        seq, prev = (None, None) if row is None else row[:2]
                    conn.execute("COMMIT")
                except psycopg.Error as exc:
                    _Txn.rollback(t)
                    raise t._failure(exc) from exc
            if t._dirty:
                t.last_commit_seq = None if seq is None else int(seq)
                t._commit = None if seq is None or not t._ledger else (int(seq), int(prev or 0))
                t._dirty = False
                t._spans.clear()
                t.maybe_maintain()
            return
        _Txn.rollback(t)
        if et is None:
            raise MdsError("the transaction was rolled back because a write inside it failed")

    @staticmethod
    def begin(t: PostgresTier) -> None:
        """BEGIN (READ COMMITTED: each statement after a series lock sees the previous holder's
        commit); readonly: one read-only snapshot."""
        if t.readonly:
            t._connection().execute(_SQL_BEGIN_READ)
        else:
            t._commit = None  # take_commit tells of this transaction's commit alone
            t._connection().execute("BEGIN")

    @staticmethod
    def rollback(t: PostgresTier) -> None:
        """Roll back quietly; the catalog's cache goes too (the transaction may have made rows)."""
        t._catalog.clear()
        t._dirty = False
        t._spans.clear()
        rollback_quietly(t._conn, t.where)


class _Snapshot:
    """One consistent view for reads of several statements: outside a transaction a read-only
    REPEATABLE READ transaction; inside a writer's transaction (READ COMMITTED, a new snapshot
    per statement) a share lock on the series' catalog row, so no other host's writer changes
    the series between the statements."""

    __slots__ = ("_own", "_sid", "_t")

    def __init__(self, tier: PostgresTier, sid: int | None) -> None:
        self._t = tier
        self._sid = sid
        self._own = False

    def __enter__(self) -> psycopg.Connection[Any]:
        t = self._t
        conn = t._connection()
        self._own = t._depth == 0
        if self._own:
            conn.execute(_SQL_BEGIN_READ)
        elif self._sid is not None and not t.readonly:
            conn.execute("SELECT 1 FROM mds_series WHERE sid = %s FOR SHARE", (self._sid,))
        return conn

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if not self._own:
            return
        conn = self._t._conn
        if et is None and conn is not None:
            conn.execute("COMMIT")
        else:
            rollback_quietly(conn, self._t.where)


def _statement_timeout_ms(conn: psycopg.Connection[Any]) -> int:
    """The session's ``statement_timeout`` in ms (0: none), ours or the URL's own."""
    row = conn.execute("SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'").fetchone()
    return 0 if row is None else int(row[0])


def identity(url: str, origin: str) -> int:
    """The server and database ``url`` names, with ``origin``, as a positive 63-bit number: host,
    port, database and user (not the password or session options, which change nothing of what
    is stored). A store directory copied elsewhere is another origin: a new record."""
    try:
        info = dict(psycopg.conninfo.conninfo_to_dict(url))
    except psycopg.Error:
        info = {"url": redact(url)}
    info["origin"] = origin
    names = ("host", "hostaddr", "port", "dbname", "user", "url", "origin")
    key = "\x00".join(f"{k}={info.get(k, '')}" for k in names)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1 or 1


class PostgresTier:
    """Candle history, coverage and change tracking in a PostgreSQL database shared by many hosts.

    Implements :class:`mds.tiers.durable.DurableTier` with the SQLite tier's semantics
    (last-wins upsert, all-or-nothing transactions, checksummed rows) and, for hosts sharing the
    database, :meth:`subscribe` (the change feed). Inputs are canonical (see
    :mod:`mds.tiers.durable`); arrays returned are new and writeable.

    Parameters
    ----------
    url : str
        A libpq connection string or ``postgresql://`` URL. The ``mds_*`` tables are created in
        it on first open (by a writer).
    readonly : bool
        Read only (sessions are ``default_transaction_read_only``); writes raise
        StorageUnavailableError.
    clock : callable, optional
        Epoch ms; for the age of chunks to compress and the maintenance schedule.
    origin : str
        This host's name in the change feed; its own changes are not reported back to it. Empty:
        a random one (each instance its own origin).
    connect_timeout_s : float
        Bound on every connection attempt (open, reconnect, the listener).
    timeout_s : float or None
        Bound on every statement (the session's ``statement_timeout``, and its ``lock_timeout``
        at most), and on every call when the server does not answer at all: a call still waiting
        2 s after it is cut (see :mod:`mds.tiers.postgres.deadline`). :meth:`maintain` and
        :meth:`integrity_problems` are not bounded. None: no bound.
    compress_after_days : float or None
        Chunks whose newest candle is older than this are stored compressed; None: all raw.
    vacuum_threshold : float
        Dead-tuple share above which :meth:`maintain` runs VACUUM.

    Notes
    -----
    Concurrency: one connection for writes, transactions and the reads inside them, not
    thread-safe by itself (the Store calls it under its lock); :meth:`off_lock` lends a read-only
    tier of a pooled connection (:attr:`readers`, :mod:`mds.tiers.postgres.pool`) for a read
    other threads need not wait for.
    Writers on any number of hosts: every write takes the series' row lock in ``mds_series``
    first (``SELECT ... FOR UPDATE``), so two writers of one series follow one another and the
    later batch wins per ``ts``; writers of different series do not wait for each other. A
    transaction grouping several series locks them in call order; two such transactions locking
    the same series in opposite orders can deadlock, and the server then rolls one back
    (StorageUnavailableError, nothing of it stored).

    Failures: every psycopg error is a StorageUnavailableError naming the cause. A lost
    connection is dropped and the next call reconnects (within ``connect_timeout_s``); a
    transaction it interrupted was rolled back by the server, whole.

    Raises
    ------
    StorageUnavailableError
        At open: the URL is malformed, the server is unreachable or refuses the credentials,
        the database is missing, has a newer schema, or (``readonly``) has no mds tables.
    """

    #: Seconds between scheduled upkeep steps after commits (None: never; assignable).
    maintenance_interval_s: float | None = 600.0

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        clock: Callable[[], int] | None = None,
        origin: str = "",
        connect_timeout_s: float = 5.0,
        timeout_s: float | None = 10.0,
        compress_after_days: float | None = 7.0,
        vacuum_threshold: float = 0.15,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.readonly = bool(readonly)
        self.origin = origin or uuid.uuid4().hex
        self.connect_timeout_s = float(connect_timeout_s)
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.compress_after_days = compress_after_days
        self.vacuum_threshold = float(vacuum_threshold)
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._next_upkeep_ms = self._clock() + (self.maintenance_interval_s or 0) * 1000
        self._depth = 0
        self._doomed = False
        self._dirty = False
        self._spans: list[str] = []
        self._catalog = Catalog()
        self._listener: Listener | None = None
        self._closed = False
        #: The client's bound on every call (see :class:`~mds.tiers.postgres.deadline.Deadline`).
        self._deadline = Deadline(timeout_s, self.where)
        limit = self._deadline.limit_s
        #: Read-only tiers for reads off the Store's lock (see :meth:`off_lock`).
        self.readers = Readers(self._open_reader, None if limit is None else 2 * limit + self.connect_timeout_s)
        #: The commit sequence of this connection's latest committed data change (None before one).
        self.last_commit_seq: int | None = None
        self._commit: tuple[int, int] | None = None  # see take_commit
        #: The server's address and this origin as a number (see :func:`identity`): what a record
        #: of the commits it acknowledged to this origin is kept for.
        self.identity = identity(url, self.origin)
        self._conn: psycopg.Connection[Any] | None = None
        self._ledger = False  # whether the database keeps mds_acks (settled at every connect)
        with self._deadline.bounded():
            try:
                self._connection()
            except BaseException as exc:
                if isinstance(exc, psycopg.Error):
                    failure = self._failure(exc)
                    self.close()
                    raise failure from exc
                self.close()
                raise

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the change feed and close the connection (idempotent); an open transaction is
        rolled back."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        self._deadline.close()
        self.readers.close()
        conn, self._conn = self._conn, None
        if self._depth:
            self._depth = 0
            rollback_quietly(conn, self.where)
        close_quietly(conn)

    def __enter__(self) -> PostgresTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def listening(self) -> bool:
        """Whether the change feed hears every change now: connected and hearing its heartbeat
        (False before :meth:`subscribe`, while its connection is lost, and while its heartbeat is
        late; see :mod:`mds.tiers.postgres.feed`): while False, other hosts' changes may go
        unreported."""
        listener = self._listener
        return listener is not None and listener.trusted.is_set()

    @property
    def feed_late(self) -> bool:
        """Whether the change feed is connected but its heartbeat is late: the server may answer
        other hosts, whose changes this host may not have heard."""
        listener = self._listener
        return listener is not None and listener.connected.is_set() and not listener.trusted.is_set()

    def off_lock(self, writable: bool = False) -> AbstractContextManager[PostgresTier | None] | None:
        """A tier of its own connection for one call while the caller lets other threads use the
        store: a read-only one from :attr:`readers`, or (``writable``, for :meth:`maintain`) a new
        one of this tier's mode, closed afterwards. The context gives None when none can be had;
        None inside a transaction, whose calls must see its writes on this connection."""
        if self._depth or self._closed:
            return None
        return self._side() if writable else self.readers.reader()

    @contextlib.contextmanager
    def _side(self) -> Iterator[PostgresTier | None]:
        try:
            side = self._sibling(self.readonly)
        except StorageUnavailableError as exc:
            logger.info("PostgreSQL tier %s: no connection to spare (%s); using the tier's own", self.where, exc)
            yield None
            return
        try:
            yield side
        finally:
            side.close()

    def _open_reader(self) -> PostgresTier:
        return self._sibling(True)

    def _sibling(self, readonly: bool) -> PostgresTier:
        """Another tier on this one's server and settings, with a connection of its own."""
        return PostgresTier(
            self.url,
            readonly=readonly,
            clock=self._clock,
            origin=self.origin,
            connect_timeout_s=self.connect_timeout_s,
            timeout_s=self.timeout_s,
            compress_after_days=self.compress_after_days,
            vacuum_threshold=self.vacuum_threshold,
        )

    def transaction(self) -> _Txn:
        """One transaction over many calls: ``with tier.transaction(): ...`` (nestable; if an
        exception leaves any block the whole outer transaction is rolled back, and a swallowed
        inner failure makes the outer exit raise MdsError). Readonly: one read snapshot."""
        return _Txn(self)

    def subscribe(self, callback: Callback) -> None:
        """Call ``callback(symbol, timeframe, start, end)`` from a daemon thread for every change
        another origin commits to the database (``[start, end)``: the span changed), and
        ``callback(None, None, 0, 0)`` each time the feed starts or stops listening
        (:attr:`listening` tells which; anything may have changed while it was not). The thread
        has its own connection, reconnects by itself with a bounded backoff, and stops at
        :meth:`close`. A second call replaces the callback."""
        if self._closed:
            raise StorageUnavailableError(f"PostgreSQL tier {self.where} is closed")
        if self._listener is not None:
            self._listener.stop()
        self._listener = Listener(self.url, self.where, self.origin, callback, self.connect_timeout_s)
        self._listener.start()

    # ------------------------------------------------------------------ writes
    @_translated
    def write(
        self, symbol: str, tf: Timeframe | str, candles: np.ndarray, covered: Any = None, *, validated: bool = False
    ) -> tuple[int, int, int]:
        """Upsert candles of one series (an existing ``ts`` is replaced) and add ``covered``
        ranges to its coverage, in one transaction; ``(inserted, updated, unchanged)``.

        Raises InvalidCandleError for an invalid batch (before anything is sent) and
        StorageUnavailableError when the server fails (nothing was stored). ``validated``: as
        :meth:`mds.tiers.durable.DurableTier.write`.
        """
        tf = parse_timeframe(tf)
        arr = check_batch(candles, tf, validated)
        cov = None if covered is None else _k.interval_normalize(covered)
        self._writable()
        if not len(arr) and (cov is None or not len(cov)):
            return 0, 0, 0
        with _Txn(self):
            conn = self._connection()
            s, seal = self._catalog.lock(conn, symbol, tf)
            self._dirty = True
            counts = write_rows(conn, self.where, s, seal, arr) if len(arr) else (0, 0, 0)
            lo, hi = POS_INF, NEG_INF
            if len(arr):
                lo, hi = int(arr["ts"][0]), tf.next(int(arr["ts"][-1]))
            if cov is not None and len(cov):
                change_coverage(conn, self.where, s.sid, symbol, tf.name, cov, add=True)
                lo, hi = min(lo, int(cov[0, 0])), max(hi, int(cov[-1, 1]))
            self._changed(s, lo, hi)
        return counts

    @_translated
    def delete(self, symbol: str, tf: Timeframe | str, start: int | None = None, end: int | None = None) -> int:
        """Remove candles with ``start <= ts < end`` (None: unbounded) and that span from the
        coverage, in one transaction; the number of candles removed."""
        tf = parse_timeframe(tf)
        lo = NEG_INF if start is None else int(start)
        hi = POS_INF if end is None else int(end)
        self._writable()
        if hi <= lo:
            return 0
        with _Txn(self):
            conn = self._connection()
            if self._catalog.lookup(conn, symbol, tf) is None:
                return 0
            s, _ = self._catalog.lock(conn, symbol, tf)
            self._dirty = True
            removed = delete_rows(conn, self.where, s, lo, hi)
            self._changed(s, lo, hi)
        return removed

    @_translated
    def quarantine_damaged(
        self, symbol: str, tf: Timeframe | str, start: int | None = None, end: int | None = None
    ) -> list[tuple[int, int]]:
        """Remove the series' damaged chunks, tail rows and coverage rows overlapping
        ``[start, end)`` and subtract their spans from the coverage (one transaction); the spans
        removed, ascending (empty: nothing was damaged, nothing changed)."""
        tf = parse_timeframe(tf)
        lo = NEG_INF if start is None else int(start)
        hi = POS_INF if end is None else int(end)
        self._writable()
        if hi <= lo:
            return []
        with _Txn(self):
            conn = self._connection()
            if self._catalog.lookup(conn, symbol, tf) is None:
                return []
            s, _ = self._catalog.lock(conn, symbol, tf)
            spans = quarantine(conn, self.where, s, lo, hi)
            if spans:
                self._dirty = True
                self._changed(s, spans[0][0], max(b for _, b in spans))
        return spans

    # ------------------------------------------------------------------ reads
    @_translated
    def read_range(self, symbol: str, tf: Timeframe | str, start: int, end: int) -> np.ndarray:
        """Candles with ``start <= ts < end``, ascending (one statement: one snapshot).

        Raises DamagedChunkError when stored rows the range touches fail their checksum (as do
        the other reads)."""
        tf = parse_timeframe(tf)
        start, end = int(start), int(end)
        s = self._series(symbol, tf)
        if s is None or end <= start:
            return empty()
        return reads.read_range(self._connection(), self.where, s, start, end)

    @_translated
    def read_latest(self, symbol: str, tf: Timeframe | str, n: int, end: int | None = None) -> np.ndarray:
        """The newest ``n`` candles with ``ts < end`` (None: no bound), ascending."""
        tf = parse_timeframe(tf)
        s = self._series(symbol, tf)
        if s is None or int(n) <= 0:
            return empty()
        with _Snapshot(self, s.sid) as conn:
            return reads.read_latest(conn, self.where, s, int(n), POS_INF if end is None else int(end))

    @_translated
    def read_from(self, symbol: str, tf: Timeframe | str, start: int, n: int) -> np.ndarray:
        """The first ``n`` candles with ``ts >= start``, ascending."""
        tf = parse_timeframe(tf)
        s = self._series(symbol, tf)
        if s is None or int(n) <= 0:
            return empty()
        with _Snapshot(self, s.sid) as conn:
            return reads.read_from(conn, self.where, s, int(start), int(n))

    @_translated
    def last_ts(self, symbol: str, tf: Timeframe | str) -> int | None:
        """Open time of the newest stored candle, or None."""
        s = self._series(symbol, parse_timeframe(tf))
        return None if s is None else reads.last_ts(self._connection(), s)

    @_translated
    def coverage(self, symbol: str, tf: Timeframe | str) -> np.ndarray:
        """Covered ranges of the series, int64 ``(k, 2)``, merged, ascending, half-open."""
        tf = parse_timeframe(tf)
        s = self._series(symbol, tf)
        if s is None:
            return EMPTY_RANGES.copy()
        return read_coverage(self._connection(), self.where, s.sid, symbol, tf.name)

    @_translated
    def series(self) -> list[tuple[str, str, int, int, int]]:
        """Every series with candles: ``(symbol, timeframe name, count, first_ts, last_ts)``."""
        return list_series(self._connection())

    @_translated
    def known_series(self) -> list[tuple[str, str]]:
        """Every series in the catalog ``(symbol, timeframe name)``, sorted: with candles, with
        coverage alone (an illiquid span), or neither any more (catalog rows are kept)."""
        rows = self._connection().execute("SELECT symbol, timeframe FROM mds_series ORDER BY symbol, timeframe")
        return [(str(sym), str(tfname)) for sym, tfname in rows.fetchall()]

    # ------------------------------------------------------------------ change tracking
    @_translated
    def data_version(self) -> int:
        """The database's ``commit_seq``: it changes whenever any host commits a data change
        (one indexed row read; hosts that subscribe to the change feed need not poll it)."""
        row = self._connection().execute(_SQL_SEQ).fetchone()
        return 0 if row is None else int(row[0])

    def take_commit(self) -> tuple[int, int] | None:
        """``(commit_seq, entry before)`` of the latest commit of a data change, once (None: no
        commit since the last call). The entry before is this origin's ledger entry before that
        commit (0: none); see :class:`mds.store.changes.SharedAcks`."""
        out, self._commit = self._commit, None
        return out

    @_translated
    def acknowledged(self) -> int | None:
        """This origin's entry in the ledger of acknowledged commits: the ``commit_seq`` of its
        latest commit (0: none); None when the database has no ledger (written by an older mds,
        opened readonly)."""
        try:
            row = self._connection().execute(_SQL_ACKED, (self.origin,)).fetchone()
        except psycopg.errors.UndefinedTable:
            return None
        return 0 if row is None else int(row[0])

    def commit_seq(self) -> int:
        """How many committed transactions changed the data, counted in ``mds_meta`` by every
        host: each committed write, delete or quarantine that changed something adds exactly one
        (once per transaction however many calls it groups; never a rollback or upkeep)."""
        return self.data_version()

    # ------------------------------------------------------------------ upkeep and checks
    def maybe_maintain(self) -> bool:
        """Compress old chunks for a bounded time if ``maintenance_interval_s`` has passed (outside
        a transaction; a failure is logged and retried next time); whether a step ran."""
        interval = self.maintenance_interval_s
        if interval is None or self.readonly or self._depth or self._conn is None:
            return False
        now = self._clock()
        if now < self._next_upkeep_ms:
            return False
        self._next_upkeep_ms = now + interval * 1000
        cutoff = self._compress_cutoff()
        if cutoff is not None:
            with self._deadline.bounded():
                try:
                    upkeep.compress_old(self._conn, self.where, cutoff, time.perf_counter() + 0.05)
                except psycopg.Error as exc:
                    self._drop_if_broken()
                    logger.warning("PostgreSQL tier %s: scheduled upkeep failed (will retry): %s", self.where, exc)
        return True

    @_unbounded
    def maintain(self, force: bool = False) -> dict[str, Any]:
        """Compress old chunks, then VACUUM (when the dead-tuple share passed
        ``vacuum_threshold``, or ``force``) and ANALYZE the tier's tables on the server.

        Returns ``fragmentation_before``/``_after`` (dead-tuple share of the tables, from the
        server's statistics), ``vacuumed``, ``analyzed``, ``compressed_chunks``,
        ``size_before``/``_after`` (bytes), ``problems`` and ``seconds``.
        """
        if self._depth:
            raise InvalidRequestError("maintain() cannot run inside a transaction; call it outside batch()")
        self._writable()
        report = upkeep.maintain(
            self._connection(), self.where, self._compress_cutoff(), self.vacuum_threshold, bool(force)
        )
        self._next_upkeep_ms = self._clock() + (self.maintenance_interval_s or 0) * 1000
        return report

    @_unbounded
    def integrity_problems(self) -> list[str]:
        """Every chunk, tail row and coverage row checked against its checksum, plus the layout's
        invariants (see :mod:`mds.tiers.postgres`); empty when all is sound. A full pass."""
        with _Snapshot(self, None) as conn:
            return invariant_problems(conn)

    @_translated
    def stats(self) -> dict[str, Any]:
        """JSON-ready figures: server, sizes, dead-tuple share, series, chunks, tail rows, feed."""
        out = upkeep.stats(self._connection(), self.where)
        listener = self._listener
        out.update(
            readonly=self.readonly,
            origin=self.origin,
            listening=self.listening,
            feed_reconnects=0 if listener is None else listener.reconnects,
        )
        return out

    # ------------------------------------------------------------------ internals
    def _connection(self) -> psycopg.Connection[Any]:
        """The connection, reconnecting after a loss (not inside a transaction: that was lost)."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if self._closed:
            raise StorageUnavailableError(f"PostgreSQL tier {self.where} is closed")
        if self._depth:
            raise StorageUnavailableError(
                f"PostgreSQL tier {self.where}: the connection was lost inside a transaction; it was rolled back"
            )
        close_quietly(conn)
        self._conn = None
        conn = connect(
            self.url, timeout_s=self.connect_timeout_s, readonly=self.readonly, statement_timeout_s=self.timeout_s
        )
        self._deadline.conn = conn
        # A new connection may meet another database under the same URL (created again, restored
        # from a backup): the cached series ids may name other series there, and the tables may
        # be missing or older. Both are settled before the connection is used.
        self._catalog.clear()
        try:
            self._ledger = ensure_schema(conn, self.where, self.readonly)
            self._deadline.server_bound_ms = _statement_timeout_ms(conn)
        except BaseException:
            self._deadline.conn = None
            close_quietly(conn)
            raise
        self._conn = conn
        listener = self._listener
        if listener is not None and not listener.connected.is_set():
            listener.wake()  # the server answers again: the feed need not wait out its backoff
        return self._conn

    def _failure(self, exc: psycopg.Error) -> StorageUnavailableError:
        """The error a call raises for ``exc``: the server did not answer within the bound (the
        connection was cut), or ``exc`` translated; a lost connection is dropped."""
        self._drop_if_broken()
        if isinstance(exc, psycopg.errors.UndefinedTable) and self._conn is not None and not self._depth:
            # the tables went (a database restored or created again under this URL): the next
            # call reconnects, and connecting settles the schema
            logger.warning("PostgreSQL tier %s: a table is missing (%s); reconnecting", self.where, exc)
            self._drop()
        if self._deadline.cut():
            return StorageUnavailableError(self._deadline.message())
        return translate(exc, self.where)

    def _drop_if_broken(self) -> bool:
        """Drop the connection if it is lost (the next use reconnects); whether it was."""
        conn = self._conn
        if conn is None or not (conn.closed or conn.broken):
            return False
        logger.warning("PostgreSQL tier %s: connection lost; the next call reconnects", self.where)
        self._drop()
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._catalog.clear()  # the next connection may meet another database under the URL
        close_quietly(conn)

    def _series(self, symbol: str, tf: Timeframe) -> Series | None:
        conn = self._connection()  # first: a new connection forgets the cached ids (see _connection)
        sid = self._catalog.sids.get((symbol, tf.name))
        return Series(sid, symbol, tf) if sid is not None else self._catalog.lookup(conn, symbol, tf)

    def _changed(self, s: Series, start: int, end: int) -> None:
        self._spans.append(payload(self.origin, s.symbol, s.tf.name, start, end))

    def _compress_cutoff(self) -> int | None:
        days = self.compress_after_days
        return None if days is None else int(self._clock() - days * 86_400_000)

    def _writable(self) -> None:
        if self.readonly:
            raise StorageUnavailableError(f"PostgreSQL tier {self.where} was opened readonly; writes need a writer")
