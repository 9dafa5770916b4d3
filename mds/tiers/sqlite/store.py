"""The SQLite durable tier's facade, :class:`SqliteStore`: the connection and its transactions,
and the public reads, writes, upkeep and checks, each delegating to a role module of
:mod:`mds.tiers.sqlite` (see there for the map).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import apsw
import numpy as np

from mds import _kernels as _k
from mds.errors import InvalidRequestError, MdsError, StorageUnavailableError
from mds.tiers.sqlite import reads, upkeep
from mds.tiers.sqlite.catalog import Catalog, list_series
from mds.tiers.sqlite.codec import NEG_INF, POS_INF, chunk_key, empty
from mds.tiers.sqlite.connection import (
    PragmaName,
    Snapshot,
    close_quietly,
    pragma_int,
    rollback_quietly,
    translate,
)
from mds.tiers.sqlite.coverage import EMPTY_RANGES, read_coverage
from mds.tiers.sqlite.integrity import invariant_problems, quarantine, sqlite_problems
from mds.tiers.sqlite.schema import SQL_BUMP_SEQ, open_database
from mds.tiers.sqlite.writes import check_batch, delete_rows, write_batch
from mds.timeframes import Timeframe, parse_timeframe

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _translated(method: Callable[Concatenate[SqliteStore, _P], _R]) -> Callable[Concatenate[SqliteStore, _P], _R]:
    """apsw errors leaving ``method`` become :class:`~mds.errors.StorageUnavailableError` naming
    the file. The hot calls (``write``, the range reads, ``data_version``) write the same ``try``
    out instead: one call fewer."""

    @functools.wraps(method)
    def call(self: SqliteStore, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc

    return call


class _Txn:
    """Context manager of :meth:`SqliteStore.transaction` (a class: cheaper than a generator)."""

    __slots__ = ("_s",)

    def __init__(self, store: SqliteStore) -> None:
        self._s = store

    def __enter__(self) -> SqliteStore:
        s = self._s
        if s._conn is None:
            raise StorageUnavailableError(f"SQLite store {s.path} is closed")
        if s._depth == 0:
            try:
                s._conn.execute("BEGIN" if s.readonly else "BEGIN IMMEDIATE")
            except apsw.Error as exc:
                raise translate(exc, s.path) from exc
            s._doomed = False
            if not s.readonly:
                try:
                    # another connection committed since our last look: drop the writer's caches
                    v = pragma_int(s._conn, "data_version")
                    if v != s._data_version:
                        s._data_version = v
                        s._catalog.seals.clear()
                except BaseException as exc:
                    # BEGIN succeeded: without this rollback the connection stays inside a
                    # transaction and every later BEGIN fails
                    _Txn.rollback(s)
                    if isinstance(exc, apsw.Error):
                        raise translate(exc, s.path) from exc
                    raise
        s._depth += 1
        return s

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        s = self._s
        s._depth -= 1
        if s._depth > 0:
            if et is not None:
                s._doomed = True  # inner writes joined the outer transaction: all or nothing
            return
        conn = s._conn
        assert conn is not None
        if et is None and not s._doomed:
            seq: Any = None
            try:
                if s._dirty:
                    # once per transaction, at commit: one statement and one page, not one per write
                    seq = conn.execute(SQL_BUMP_SEQ).fetchall()[0][0]
                conn.execute("COMMIT")
            except apsw.Error as exc:
                _Txn.rollback(s)
                raise translate(exc, s.path) from exc
            if s._dirty:
                s.last_commit_seq = int(seq)
                s._dirty = False
                s._upkeep.run_due(conn, s.transaction, s)
            return
        _Txn.rollback(s)
        if et is None:
            raise MdsError("the transaction was rolled back because a write inside it failed")

    @staticmethod
    def rollback(s: SqliteStore) -> None:
        """Roll back quietly; the catalog's caches go too (the transaction may have made them)."""
        s._catalog.clear()
        s._dirty = False
        if s._conn is not None:
            rollback_quietly(s._conn, s.path)


class SqliteStore:
    """Candle history, coverage and maintenance of one SQLite file.

    Inputs are canonical (see docs/ARCHITECTURE.md): ``symbol`` validated, ``tf`` a
    :class:`~mds.timeframes.Timeframe` (a name is accepted too), times int epoch ms, candles
    C-contiguous CANDLE_DTYPE arrays sorted by ``ts`` with unique ``ts``. Arrays returned are new,
    writeable, and share no memory with the database.

    Parameters
    ----------
    path : str or os.PathLike
        Database file; created (with its directory) unless ``readonly``.
    durable : bool
        False: WAL with ``synchronous=NORMAL`` (a killed process loses no committed write; power
        loss may lose the last commits). True: ``synchronous=FULL``, an fsync per commit.
    busy_timeout_ms : int
        How long a write waits for another writer's lock before
        :class:`~mds.errors.StorageUnavailableError`.
    vacuum_threshold : float
        Free-page share above which :meth:`maintain` runs VACUUM (scheduled runs hand free pages
        back with ``incremental_vacuum`` instead, which never blocks for long).
    maintenance_interval_s : float or None
        The writer runs a bounded maintenance step after a commit at most this often; None
        disables it (call :meth:`maintain` yourself).
    compress_after_days : float or None
        Chunks whose newest candle is older than this (by ``clock``) are stored compressed;
        None keeps everything raw.
    readonly : bool
        Open for reading only (a reader process); writes raise StorageUnavailableError.
    clock : callable, optional
        Returns epoch ms; used for compression age and maintenance scheduling.

    Notes
    -----
    Concurrency: WAL mode, one writer process and any number of reader processes. Every write
    call is one transaction; :meth:`transaction` groups many. Readers see whole transactions
    only. One instance must not be shared by threads without a lock held around each call.

    Damage: every chunk and tail row carries a checksum of its candles, checked whenever rows
    are read (reads, and writes or deletes that merge into stored rows). Rows that fail it are
    never returned: the call raises :class:`DamagedChunkError` and changes nothing, until
    :meth:`quarantine_damaged` removes them.

    Raises
    ------
    StorageUnavailableError
        The file cannot be opened, is not an mds database, is corrupt, or was written by a newer
        schema version.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durable: bool = False,
        busy_timeout_ms: int = 5000,
        vacuum_threshold: float = 0.15,
        maintenance_interval_s: float | None = 600.0,
        compress_after_days: float | None = 7.0,
        readonly: bool = False,
        clock: Callable[[], int] | None = None,
        _vfs: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self.durable = bool(durable)
        # the upkeep settings live here (read at each use; assignable), and a bad one fails
        # before the file is created or opened
        self.vacuum_threshold = float(vacuum_threshold)
        self.maintenance_interval_s = maintenance_interval_s
        self.compress_after_days = compress_after_days
        self._upkeep = upkeep.Upkeep(self.path, clock or (lambda: time.time_ns() // 1_000_000))
        self._depth = 0
        self._doomed = False
        self._dirty = False
        self._catalog = Catalog()
        #: :meth:`commit_seq` as of this connection's latest committed data change (None before
        #: one): the number a store records outside the file as acknowledged, at no extra query.
        self.last_commit_seq: int | None = None
        self._conn, self._data_version = open_database(
            self.path,
            self._catalog,
            readonly=self.readonly,
            durable=self.durable,
            busy_timeout_ms=busy_timeout_ms,
            vfs=_vfs,
        )
        self._upkeep.reschedule(self)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the file (idempotent). An open transaction is rolled back."""
        conn = self._conn
        if conn is None:
            return
        try:
            if self._depth:
                self._depth = 0
                _Txn.rollback(self)
            if not self.readonly:
                conn.execute("PRAGMA optimize").fetchall()
        except apsw.Error as exc:
            logger.warning("SQLite store %s: PRAGMA optimize on close failed: %s", self.path, exc)
        finally:
            self._conn = None
            close_quietly(conn, self.path)

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._conn is None

    def transaction(self) -> _Txn:
        """One transaction over many calls: ``with store.transaction(): ...``.

        Nestable: inner blocks (and the write calls inside) join the outermost transaction, which
        commits when it exits normally. If an exception leaves any block, the whole outer
        transaction is rolled back (and a swallowed inner failure makes the outer exit raise
        :class:`~mds.errors.MdsError`). A write transaction takes the write lock at once
        (``BEGIN IMMEDIATE``), waiting up to ``busy_timeout_ms``; in a readonly store it is a
        read snapshot.
        """
        return _Txn(self)

    # ------------------------------------------------------------------ writes
    def write(
        self, symbol: str, tf: Timeframe | str, candles: np.ndarray, covered: Any = None, *, validated: bool = False
    ) -> tuple[int, int, int]:
        """Upsert candles of one series, and optionally record coverage, in one transaction.

        Parameters
        ----------
        symbol : str
            Validated market code.
        tf : Timeframe
            The series' timeframe.
        candles : ndarray of CANDLE_DTYPE
            Sorted by ``ts``, unique, closed candles. An existing ``ts`` is replaced.
        covered : array-like of int64, shape (k, 2), optional
            Half-open ranges to add to the series' coverage in the same transaction.
        validated : bool
            The rows come from ``mds._kernels.prepare`` (the store's write path): their shape,
            order and ``ts`` range are checked, not every row again.

        Returns
        -------
        (inserted, updated, unchanged) : tuple of int
            New timestamps; existing timestamps whose bytes changed; byte-identical rows.

        Raises
        ------
        InvalidCandleError
            The batch is not valid (checked before the transaction opens: nothing changes).
        StorageUnavailableError
            SQLite failed (locked, full, I/O, corrupt); the transaction was rolled back.
        """
        tf = parse_timeframe(tf)
        arr = check_batch(candles, tf, validated)
        cov = None if covered is None else _k.interval_normalize(covered)
        self._writable()
        try:
            with _Txn(self):
                self._dirty = True
                counts = write_batch(self._conn, self.path, self._catalog, symbol, tf, arr, cov)
            return counts
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc

    @_translated
    def add_coverage(self, symbol: str, tf: Timeframe | str, ranges: Any) -> None:
        """Merge half-open ``ranges`` (int64 ``[k, 2]`` or a list of pairs) into the coverage."""
        tf = parse_timeframe(tf)
        cov = _k.interval_normalize(ranges)
        if not len(cov):
            return
        self._writable()
        with _Txn(self):
            self._dirty = True
            write_batch(self._conn, self.path, self._catalog, symbol, tf, empty(), cov)

    @_translated
    def delete(self, symbol: str, tf: Timeframe | str, start: int | None = None, end: int | None = None) -> int:
        """Remove candles with ``start <= ts < end`` (None: unbounded); coverage shrinks with them.

        Returns
        -------
        int
            Number of candles removed.
        """
        tf = parse_timeframe(tf)
        lo = NEG_INF if start is None else int(start)
        hi = POS_INF if end is None else int(end)
        if hi <= lo:
            return 0
        self._writable()
        with _Txn(self):
            sid = self._sid_lookup(symbol, tf)
            if sid is None:
                return 0
            self._dirty = True
            removed = delete_rows(self._conn, self.path, sid, tf, lo, hi)
            self._catalog.seals.pop(sid, None)
        return removed

    @_translated
    def quarantine_damaged(
        self, symbol: str, tf: Timeframe | str, start: int | None = None, end: int | None = None
    ) -> list[tuple[int, int]]:
        """Remove the series' damaged chunks and tail rows that overlap ``[start, end)``.

        In one write transaction: every chunk and tail row of the series that overlaps the range
        and does not decode, does not match its checksum or is malformed is deleted, and its span
        is subtracted from the coverage, so it reads as ``"missing"`` (a store with a Layer 1
        refetches it). Undamaged rows are kept.

        Parameters
        ----------
        symbol, tf : str, Timeframe
            The series.
        start, end : int, optional
            Epoch ms, half-open; None: unbounded. A damaged chunk that overlaps the range is
            removed whole (its rows cannot be trusted singly).

        Returns
        -------
        list of (int, int)
            The removed spans, ascending: a chunk's grid span (:data:`CHUNK_SLOTS` slots) or a
            tail row's interval. Empty when nothing was damaged.

        Raises
        ------
        StorageUnavailableError
            Opened readonly, or SQLite failed; nothing changed.

        Notes
        -----
        Checks every chunk in the range (decompressing compressed ones), so it costs a read of
        that range; call it with the span of a :class:`DamagedChunkError` (or with no range once
        :meth:`integrity_problems` named damage).
        """
        tf = parse_timeframe(tf)
        lo = NEG_INF if start is None else int(start)
        hi = POS_INF if end is None else int(end)
        if hi <= lo:
            return []
        self._writable()
        with _Txn(self):
            sid = self._sid_lookup(symbol, tf)
            if sid is None:
                return []
            spans = quarantine(self._conn, self.path, sid, symbol, tf, lo, hi)
            if spans:
                self._dirty = True
                self._catalog.seals.pop(sid, None)
        return spans

    # ------------------------------------------------------------------ reads
    def read_range(self, symbol: str, tf: Timeframe | str, start: int, end: int) -> np.ndarray:
        """Candles with ``start <= ts < end``, ascending (one consistent snapshot).

        Raises :class:`DamagedChunkError` when a stored chunk or tail row the range touches fails
        its checksum (as do :meth:`read_latest`, :meth:`read_from` and :meth:`gaps`).
        """
        tf = parse_timeframe(tf)
        start, end = int(start), int(end)
        try:
            sid = self._sid_lookup(symbol, tf)
            if sid is None or end <= start:
                return empty()
            return reads.read_range(self._conn_(), self.path, sid, tf, start, end)
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc

    def read_latest(self, symbol: str, tf: Timeframe | str, n: int, end: int | None = None) -> np.ndarray:
        """The newest ``n`` candles with ``ts < end`` (None: no bound), ascending."""
        tf = parse_timeframe(tf)
        n = int(n)
        hi = POS_INF if end is None else int(end)
        try:
            sid = self._sid_lookup(symbol, tf)
            if sid is None or n <= 0:
                return empty()
            with self._snapshot():
                return reads.read_latest(self._conn, self.path, sid, tf, n, hi)
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc

    def read_from(self, symbol: str, tf: Timeframe | str, start: int, n: int) -> np.ndarray:
        """The first ``n`` candles with ``ts >= start``, ascending."""
        tf = parse_timeframe(tf)
        start, n = int(start), int(n)
        try:
            sid = self._sid_lookup(symbol, tf)
            if sid is None or n <= 0:
                return empty()
            with self._snapshot():
                return reads.read_from(self._conn, self.path, sid, tf, start, n)
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc

    @_translated
    def last_ts(self, symbol: str, tf: Timeframe | str) -> int | None:
        """Open time of the newest stored candle, or None."""
        tf = parse_timeframe(tf)
        sid = self._sid_lookup(symbol, tf)
        return None if sid is None else reads.last_ts(self._conn_(), sid, tf)

    @_translated
    def coverage(self, symbol: str, tf: Timeframe | str) -> np.ndarray:
        """Covered ranges of the series as int64 ``[k, 2]``, sorted, merged, half-open."""
        tf = parse_timeframe(tf)
        sid = self._sid_lookup(symbol, tf)
        return EMPTY_RANGES.copy() if sid is None else read_coverage(self._conn_(), self.path, sid)

    @_translated
    def gaps(
        self, symbol: str, tf: Timeframe | str, start: int | None = None, end: int | None = None
    ) -> list[tuple[int, int, Literal["missing", "no_trades"]]]:
        """Absent candles in ``[start, end)`` as ``(start, end, kind)`` ranges, ascending.

        ``kind`` is ``"no_trades"`` inside the coverage (the source was asked and had nothing)
        and ``"missing"`` outside it. Without ``start``/``end`` the range spans the series'
        coverage and data (empty series: no gaps).
        """
        tf = parse_timeframe(tf)
        sid = self._sid_lookup(symbol, tf)
        if sid is None:
            if start is None or end is None:
                return []
            return [(int(start), int(end), "missing")] if tf.ceil(int(start)) < int(end) else []
        with self._snapshot():
            return reads.gaps(self._conn, self.path, sid, tf, start, end)

    @_translated
    def series(self) -> list[tuple[str, str, int, int, int]]:
        """Every series with candles: ``(symbol, timeframe name, count, first_ts, last_ts)``."""
        with self._snapshot():
            return list_series(self._conn)

    @_translated
    def known_series(self) -> list[tuple[str, str]]:
        """Every series in the catalog ``(symbol, timeframe name)``, sorted: with candles, with
        coverage alone (an illiquid span), or neither any more (catalog rows are kept)."""
        rows = self._conn.execute("SELECT symbol, timeframe FROM series ORDER BY symbol, timeframe").fetchall()
        return [(str(sym), str(tfname)) for sym, tfname in rows]

    # ------------------------------------------------------------------ change tracking
    def data_version(self) -> int:
        """A counter that changes whenever another connection (or process) commits to the file.

        Cheap (no disk read); a Store uses it to tell that cached answers may be stale.
        """
        try:
            return pragma_int(self._conn_(), "data_version")
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc

    @_translated
    def commit_seq(self) -> int:
        """How many committed transactions changed this file's data (its commit sequence).

        Incremented by exactly one by every committed transaction that writes candles or
        coverage, deletes, quarantines or migrates (once per transaction however many calls it
        groups; never by a rollback, maintenance or compression). Kept in the file itself, so a
        number recorded elsewhere after an acknowledged write that is higher than this one means
        acknowledged commits were lost (for example a WAL file deleted after a crash). Cheap: one
        row read.
        """
        rows = self._conn_().execute("SELECT v FROM meta WHERE k = 'commit_seq'").fetchall()
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------------ upkeep and checks
    def maybe_maintain(self) -> bool:
        """Run the bounded scheduled maintenance step if ``maintenance_interval_s`` has passed.

        The writer calls this itself after commits; calling it more often is harmless. Outside a
        transaction only. Returns whether a step ran.
        """
        if self.readonly or self._depth or self._conn is None:
            return False
        return self._upkeep.run_due(self._conn, self.transaction, self)

    @_translated
    def maintain(self, force: bool = False) -> dict[str, Any]:
        """Compress old chunks, VACUUM if needed, refresh statistics, check and repair indexes.

        Parameters
        ----------
        force : bool
            VACUUM and ANALYZE even under the thresholds, and run the full ``integrity_check``
            instead of ``quick_check``.

        Returns
        -------
        dict
            ``fragmentation_before``, ``fragmentation_after`` (free-page shares),
            ``page_fragmentation_before``/``_after`` (:meth:`page_fragmentation`),
            ``vacuumed``, ``analyzed``, ``reindexed``, ``compressed_chunks``,
            ``size_before``, ``size_after`` (bytes), ``problems`` (list of str), ``seconds``.

        Raises
        ------
        InvalidRequestError
            Called inside :meth:`transaction` (VACUUM cannot run in a transaction).
        """
        if self._depth:
            raise InvalidRequestError("maintain() cannot run inside a transaction; call it outside batch()")
        self._writable()
        return self._upkeep.maintain(self._conn_(), self.transaction, self, force)

    @_translated
    def integrity_problems(self, full: bool = True) -> list[str]:
        """SQLite's integrity check plus the tier's own invariants; empty when all is well.

        Checked: ``PRAGMA integrity_check`` (``quick_check`` when ``full`` is false); every chunk
        decodes and matches its checksum (else it is named "damaged" with its grid span), holds
        ``n`` rows, sorted and unique, inside its chunk's time span and below the series'
        ``seal_ts``, with ``first_ts``/``last_ts`` matching; tail values are 64 bytes, match their
        checksum and their key, and lie at or above ``seal_ts``; coverage ranges are non-empty,
        sorted and disjoint; every row belongs to a catalogued series. A full pass over the file
        (compressed chunks are decompressed).
        """
        with self._snapshot():
            return sqlite_problems(self._conn, full=full) + invariant_problems(self._conn, self.path)

    @_translated
    def stats(self) -> dict[str, Any]:
        """JSON-ready figures: file size, free-page share, series, chunks (raw/compressed), tail rows."""
        return {**upkeep.stats(self._conn_(), self.path, self._depth > 0), "readonly": self.readonly}

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its WAL."""
        return upkeep.size_bytes(self.path)

    @_translated
    def fragmentation(self) -> float:
        """Share of the file's pages that are free (0.0 to 1.0); cheap (two pragmas)."""
        return upkeep.fragmentation(self._conn_())

    @_translated
    def page_fragmentation(self, max_pages: int = 1 << 18) -> float | None:
        """Share of B-tree pages not stored right after their predecessor in key order.

        Read from the ``dbstat`` table (a full pass over the file); None when the file has more
        than ``max_pages`` pages or dbstat is unavailable.
        """
        return upkeep.page_fragmentation(self._conn_(), max_pages)

    # ------------------------------------------------------------------ internals
    _key = staticmethod(chunk_key)  # tests build chunk keys through the store

    def _conn_(self) -> Any:  # apsw's row types are unions; the schema fixes them, so Any
        conn = self._conn
        if conn is None:
            raise StorageUnavailableError(f"SQLite store {self.path} is closed")
        return conn

    def _pragma_int(self, name: PragmaName) -> int:
        return pragma_int(self._conn_(), name)

    def _sid_lookup(self, symbol: str, tf: Timeframe) -> int | None:
        sid = self._catalog.sids.get((symbol, tf.name))
        return self._catalog.lookup(self._conn_(), symbol, tf) if sid is None else sid

    def _writable(self) -> None:
        if self.readonly:
            raise StorageUnavailableError(f"SQLite store {self.path} was opened readonly; writes need a writer")

    def _snapshot(self) -> Snapshot:
        """A read transaction around several statements (no-op inside one)."""
        return Snapshot(self._conn_(), self._depth > 0)
