"""The durable tier: full candle history and coverage in one SQLite file, through apsw.

Layout (schema version 3; the measurements behind it are in docs/ARCHITECTURE.md, "SQLite tier"):

- ``series``: the catalog. One row per ``(symbol, timeframe)`` with an integer ``sid`` that never
  changes (rows are kept when a series is deleted) and ``seal_ts``, the live-edge boundary.
- ``chunk``: sealed history. Candles with ``ts < seal_ts`` live in chunks of up to
  :data:`CHUNK_SLOTS` grid slots, stored as the raw CANDLE_DTYPE bytes (codec 0) or, once older
  than ``compress_after_days``, delta + byte-shuffle + zlib (codec 1). The rowid packs
  ``(sid, chunk number)`` so one B-tree probe finds a chunk and a range scan walks a series.
  ``crc`` is :func:`mds._checksum.row_checksum` of the decoded rows (stored as a signed 64-bit
  integer), so compressing a chunk does not change it.
- ``tail``: the live edge. Candles with ``ts >= seal_ts`` are rows keyed by ``(sid, ts)``
  (WITHOUT ROWID) whose value is 64 bytes: the 56-byte candle, then its ``row_checksum`` as a
  little-endian uint64. Upserting the newest candle touches one small row instead of rewriting a
  chunk. When a series' tail passes :data:`TAIL_MAX` rows it is folded into chunks.
- ``coverage``: half-open covered ranges per series, kept merged.
- ``meta``: ``commit_seq`` (incremented once by every committed transaction that changes data,
  see :meth:`SqliteStore.commit_seq`) and ``last_maintenance_ms``.

Every ``ts`` lives in exactly one place (chunk or tail), so a read concatenates the two without
de-duplication. Every read of stored rows checks their checksum first: damaged rows are never
served, they raise :class:`DamagedChunkError` (see :meth:`SqliteStore.quarantine_damaged`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import pairwise
from math import isfinite
from typing import Any, Literal

import apsw
import numpy as np

from mds import _kernels as _k
from mds._checksum import WORDS_PER_ROW, row_checksum, row_checksums
from mds._dtypes import CANDLE_DTYPE, CANDLE_RAW
from mds.errors import InvalidCandleError, InvalidRequestError, MdsError, StorageUnavailableError
from mds.tiers.durable import DamagedChunkError
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import iso_utc

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_SLOTS", "SCHEMA_VERSION", "TAIL_MAX", "DamagedChunkError", "SqliteStore"]

#: On-disk schema version (``PRAGMA user_version``). 1 was a row-per-candle table keyed by text;
#: 2 had chunks and tail rows without checksums.
SCHEMA_VERSION = 3
#: Grid slots per chunk: 1,024 slots are 56 KiB of raw candles (17 h of 1m candles).
CHUNK_SLOTS = 1024
#: A series' live-edge rows are folded into chunks once there are more than this many.
TAIL_MAX = 16
#: Codec ids stored in ``chunk.codec``.
CODEC_RAW = 0
CODEC_ZLIB_DELTA_SHUFFLE = 1

_ROW = CANDLE_DTYPE.itemsize
_TAIL_V = _ROW + 8  # a tail value: the candle, then its checksum
_TAIL_WORDS = struct.Struct(f"<{2 * (_ROW // 8)}IQ")  # the row's 4-byte half-words, then its checksum
_ROW_WEIGHTS = tuple(range(3, 3 + 4 * (_ROW // 8), 2))  # row_checksum's weights for one row
_TAIL_RECORD = np.dtype([("row", CANDLE_RAW), ("crc", "<u8")])
_U64 = (1 << 64) - 1
_FIELDS: tuple[str, ...] = tuple(CANDLE_DTYPE.names or ())
_CID_BITS = 36
_CID_OFFSET = 1 << (_CID_BITS - 1)
_CID_MIN = -_CID_OFFSET
_CID_MAX = _CID_OFFSET - 1
_CID_MASK = (1 << _CID_BITS) - 1
_TS_LIMIT = 1 << 50  # about year 37,600: keeps chunk numbers inside their 36 bits
_NEG_INF = -(1 << 62)
_POS_INF = 1 << 62
_EMPTY_RANGES = np.zeros((0, 2), dtype=np.int64)
_COMPRESS_BUDGET_S = 0.05  # time one scheduled maintenance run may spend compressing
_INCREMENTAL_VACUUM_PAGES = 4096  # pages one scheduled run may hand back to the file system

_SCHEMA_V1 = """
CREATE TABLE candles(
    symbol TEXT NOT NULL, timeframe TEXT NOT NULL, ts INTEGER NOT NULL,
    open REAL NOT NULL, high REAL NOT NULL, low REAL NOT NULL, close REAL NOT NULL,
    volume REAL NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (symbol, timeframe, ts)) WITHOUT ROWID;
CREATE TABLE coverage(
    symbol TEXT NOT NULL, timeframe TEXT NOT NULL, start_ts INTEGER NOT NULL, end_ts INTEGER NOT NULL,
    PRIMARY KEY (symbol, timeframe, start_ts)) WITHOUT ROWID;
PRAGMA user_version = 1;
"""

# Version 2 (no checksums): what _migrate_v2 starts from; tests build version-2 files with it.
_SCHEMA_V2 = """
CREATE TABLE series(
    sid INTEGER PRIMARY KEY,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    seal_ts INTEGER NOT NULL,
    UNIQUE (symbol, timeframe));
CREATE TABLE chunk(
    key INTEGER PRIMARY KEY,      -- (sid << 36) + chunk number + 2**35
    n INTEGER NOT NULL,
    first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    data BLOB NOT NULL);
CREATE INDEX chunk_uncompressed ON chunk(last_ts) WHERE codec = 0;
CREATE TABLE tail(
    sid INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    v BLOB NOT NULL,               -- one CANDLE_DTYPE row, 56 bytes
    PRIMARY KEY (sid, ts)) WITHOUT ROWID;
CREATE TABLE coverage(
    sid INTEGER NOT NULL,
    start_ts INTEGER NOT NULL,
    end_ts INTEGER NOT NULL,
    PRIMARY KEY (sid, start_ts)) WITHOUT ROWID;
CREATE TABLE meta(k TEXT PRIMARY KEY, v) WITHOUT ROWID;
"""

# Version 3: checksums. Kept in pieces so the v2 -> v3 migration rebuilds ``chunk`` with the same
# DDL as a new file (``crc`` before ``data``: read without walking the blob's overflow pages).
_SCHEMA_V3_CHUNK = """
CREATE TABLE chunk(
    key INTEGER PRIMARY KEY,      -- (sid << 36) + chunk number + 2**35
    n INTEGER NOT NULL,
    first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    crc INTEGER NOT NULL,         -- row_checksum of the decoded rows, as a signed 64-bit integer
    data BLOB NOT NULL);
CREATE INDEX chunk_uncompressed ON chunk(last_ts) WHERE codec = 0;
"""
_SCHEMA_V3_COVERAGE = """
CREATE TABLE coverage(
    sid INTEGER NOT NULL,
    start_ts INTEGER NOT NULL,
    end_ts INTEGER NOT NULL,
    crc INTEGER NOT NULL,          -- _coverage_crc(sid, start_ts, end_ts)
    PRIMARY KEY (sid, start_ts)) WITHOUT ROWID;
"""
_SCHEMA_V3 = (
    """
CREATE TABLE series(
    sid INTEGER PRIMARY KEY,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    seal_ts INTEGER NOT NULL,
    UNIQUE (symbol, timeframe));
"""
    + _SCHEMA_V3_CHUNK
    + """
CREATE TABLE tail(
    sid INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    v BLOB NOT NULL,               -- one CANDLE_DTYPE row (56 bytes), then its row_checksum (<u8)
    PRIMARY KEY (sid, ts)) WITHOUT ROWID;
"""
    + _SCHEMA_V3_COVERAGE
    + """
CREATE TABLE meta(k TEXT PRIMARY KEY, v) WITHOUT ROWID;
INSERT INTO meta(k, v) VALUES ('commit_seq', 0);
"""
)
# One statement per committed data-changing transaction (see SqliteStore.commit_seq).
_SQL_BUMP_SEQ = (
    "INSERT INTO meta(k, v) VALUES ('commit_seq', 1) ON CONFLICT(k) DO UPDATE SET v = v + 1 RETURNING v"
)

_SQL_RANGE = (
    "SELECT codec, crc, key, data FROM chunk WHERE key BETWEEN ?1 AND ?2 "
    "UNION ALL "
    "SELECT -1, 0, 0, CAST(group_concat(v, x'') AS BLOB) FROM "
    "(SELECT v FROM tail WHERE sid = ?3 AND ts >= ?4 AND ts < ?5 ORDER BY ts)"
)
_SQL_TAIL_RANGE = (
    "SELECT CAST(group_concat(v, x'') AS BLOB) FROM "
    "(SELECT v FROM tail WHERE sid = ? AND ts >= ? AND ts < ? ORDER BY ts)"
)
_SQL_TAIL_LATEST = (
    "SELECT CAST(group_concat(v, x'') AS BLOB) FROM "
    "(SELECT v FROM tail WHERE sid = ? AND ts < ? ORDER BY ts DESC LIMIT ?)"
)
_SQL_TAIL_FROM = (
    "SELECT CAST(group_concat(v, x'') AS BLOB) FROM (SELECT v FROM tail WHERE sid = ? AND ts >= ? ORDER BY ts LIMIT ?)"
)

_MESSAGES: list[tuple[type[BaseException], str]] = [
    (
        apsw.BusyError,
        "the database is locked by another writer (waited busy_timeout_ms); "
        "only one process may write at a time: close the other writer or raise busy_timeout_ms",
    ),
    (apsw.LockedError, "the database is locked by another connection of this process; finish that transaction first"),
    (
        apsw.FullError,
        "the disk is full (or the file hit its size limit); the transaction was rolled back: free space, then retry",
    ),
    (apsw.NotADBError, "the file is not an SQLite database: point mds at another path or move the file away"),
    (
        apsw.CorruptError,
        "the database file is corrupt: restore a backup, or move it away and let mds rebuild it from Layer 1",
    ),
    (
        apsw.IOError,
        "an I/O error occurred (disk removed, file system error); the transaction was rolled back: "
        "check the disk, then retry",
    ),
    (apsw.CantOpenError, "cannot open the database file: check that the directory exists and is writable"),
    (apsw.ReadOnlyError, "the database is read-only (opened readonly, or file/directory permissions)"),
    (apsw.PermissionsError, "permission denied on the database file: check file and directory permissions"),
]


def _translate(exc: apsw.Error, path: str) -> StorageUnavailableError:
    for cls, msg in _MESSAGES:
        if isinstance(exc, cls):
            return StorageUnavailableError(f"SQLite store {path}: {msg} ({exc})")
    return StorageUnavailableError(f"SQLite store {path}: {exc}")


_ROW_STRUCT = struct.Struct("<q6d")


def _row_ok(arr: np.ndarray, tf: Timeframe) -> bool:
    """Whether the single candle in ``arr`` passes every check of ``validate`` (no ``now``)."""
    ts, o, h, lo, c, v, q = _ROW_STRUCT.unpack_from(arr.data)
    if not (isfinite(o) and isfinite(h) and isfinite(lo) and isfinite(c) and isfinite(v) and isfinite(q)):
        return False
    if lo > o or lo > c or h < o or h < c or v < 0.0 or q < 0.0:
        return False
    if not (o > 0.0 and h > 0.0 and lo > 0.0 and c > 0.0):  # DESIGN.md section 6: prices are > 0
        return False
    if tf.is_month:
        return tf.is_aligned(ts)
    return (ts - tf.origin_ms) % tf.interval_ms == 0


class _Damage(Exception):
    """Stored rows that cannot be served; the caller turns it into a :class:`DamagedChunkError`."""


def _coverage_crc(sid: int, start: int, end: int) -> int:
    """Checksum of one coverage row, bound to its series: a flipped bit in a bound (which would
    make never-fetched slots read as no_trades) or a row moved to another series fails it."""
    digest = hashlib.blake2b(_COV_ROW.pack(sid, start, end), digest_size=8, person=b"mds-coverage").digest()
    return int.from_bytes(digest, "little", signed=True)


_COV_ROW = struct.Struct("<qqq")


def _signed(crc: int) -> int:
    """A checksum in ``[0, 2**64)`` as the signed 64-bit integer SQLite stores."""
    return crc - (1 << 64) if crc >> 63 else crc


def _chunk_span(key: int, tf: Timeframe) -> tuple[int, int]:
    """The grid span ``[start, end)`` a chunk key stands for (what :meth:`SqliteStore._key` maps in)."""
    cid = (key & _CID_MASK) - _CID_OFFSET
    width = tf.interval_ms * CHUNK_SLOTS
    start = _NEG_INF if cid <= _CID_MIN else tf.origin_ms + cid * width
    end = _POS_INF if cid >= _CID_MAX else tf.origin_ms + (cid + 1) * width
    return start, end


def _verified(codec: int, crc: int, data: Any) -> np.ndarray:
    """The rows of a stored chunk, checked against its checksum (raises :class:`_Damage`)."""
    try:
        a = _decode(codec, data)
    except zlib.error as exc:
        raise _Damage(f"does not decompress ({exc})") from None
    except ValueError:
        raise _Damage(f"holds {len(data)} bytes, not whole rows") from None
    if not len(a):
        raise _Damage("holds no rows")
    if row_checksum(a, 0, len(a)) != crc & _U64:
        raise _Damage("rows do not match their checksum")
    return a


def _tail_values(rows: np.ndarray) -> list[bytes]:
    """The stored tail values of ``rows`` (C-contiguous): each candle followed by its checksum."""
    words = rows.view(np.uint64).reshape(len(rows), WORDS_PER_ROW)
    raw = np.concatenate([words, row_checksums(words)[:, None]], axis=1).tobytes()
    return [raw[i : i + _TAIL_V] for i in range(0, len(raw), _TAIL_V)]


def _tail_value(row: np.ndarray) -> bytes:
    """The stored tail value of a one-row array."""
    raw = row.tobytes()
    return raw + row_checksum(raw, 0, 1).to_bytes(8, "little")


def _tail_rows(data: Any, lo: int, hi: int, descending: bool = False) -> np.ndarray | None:
    """Candles of concatenated tail values (ascending, or descending if so read), sorted
    ascending; None unless every value is whole, matches its checksum and lies in ``[lo, hi)``.

    A live edge is a few rows: checked one by one in Python, which costs less here than the fixed
    overhead of a handful of numpy calls (the same weighted sum as :func:`row_checksum`).
    """
    if len(data) % _TAIL_V:
        return None
    tss = []
    for w in _TAIL_WORDS.iter_unpack(data):
        if sum(k * h for k, h in zip(_ROW_WEIGHTS, w)) & _U64 != w[-1]:
            return None
        t = w[0] | (w[1] << 32)
        tss.append(t - (1 << 64) if t >> 63 else t)
    a = np.frombuffer(data, dtype=_TAIL_RECORD)["row"].view(CANDLE_DTYPE)
    if descending:
        a = a[::-1]
        tss.reverse()
    if len(tss) > 1 and any(x >= y for x, y in pairwise(tss)):  # group_concat order is not promised
        order = sorted(range(len(tss)), key=tss.__getitem__)
        a = a[order]
        tss = [tss[i] for i in order]
    if not (lo <= tss[0] and tss[-1] < hi):
        return None  # a row whose key says otherwise
    return a


def _tail_row_problem(ts: int, v: Any) -> str | None:
    """Why the stored tail row ``(ts, v)`` cannot be served, or None."""
    if not isinstance(v, bytes) or len(v) != _TAIL_V:
        return f"malformed ({len(v) if isinstance(v, bytes) else type(v).__name__} bytes, not {_TAIL_V})"
    if row_checksum(v, 0, 1) != int.from_bytes(v[_ROW:], "little"):
        return "does not match its checksum"
    if int.from_bytes(v[:8], "little", signed=True) != ts:
        return "holds another ts than its key"
    return None


def _on_readonly_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): not known to be read-only
        return False


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=CANDLE_DTYPE)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """One new array of the parts (rows copied as raw bytes, not field by field)."""
    if not parts:
        return _empty()
    if len(parts) == 1:
        return parts[0].view(CANDLE_RAW).copy().view(CANDLE_DTYPE)
    return np.concatenate([p.view(CANDLE_RAW) for p in parts]).view(CANDLE_DTYPE)


def _encode(arr: np.ndarray) -> bytes:
    """Codec 1: int64 delta of every 8-byte word against the previous row, byte shuffle, zlib 6."""
    words = arr.view(np.int64).reshape(-1, 7)
    delta = words.copy()
    delta[1:] -= words[:-1]  # wraps on overflow; undone exactly by the cumulative sum
    return zlib.compress(np.ascontiguousarray(delta.view(np.uint8).reshape(len(arr), _ROW).T).tobytes(), 6)


def _decode(codec: int, data: bytes) -> np.ndarray:
    if codec == CODEC_RAW:
        return np.frombuffer(data, dtype=CANDLE_DTYPE)
    if codec == CODEC_ZLIB_DELTA_SHUFFLE:
        planes = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
        n = len(planes) // _ROW
        words = np.ascontiguousarray(planes.reshape(_ROW, n).T).view(np.int64)
        return np.cumsum(words, axis=0, dtype=np.int64).view(CANDLE_DTYPE).reshape(n)
    raise _Damage(f"has an unknown codec {codec}")


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
                raise _translate(exc, s.path) from exc
            s._doomed = False
            if not s.readonly:
                try:
                    s._check_foreign_commits()
                except BaseException as exc:
                    # BEGIN succeeded: without this rollback the connection stays inside a
                    # transaction and every later BEGIN fails
                    s._rollback_quietly()
                    if isinstance(exc, apsw.Error):
                        raise _translate(exc, s.path) from exc
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
                    seq = conn.execute(_SQL_BUMP_SEQ).fetchall()[0][0]
                conn.execute("COMMIT")
            except apsw.Error as exc:
                s._rollback_quietly()
                raise _translate(exc, s.path) from exc
            if s._dirty:
                s.last_commit_seq = int(seq)
                s._dirty = False
                s._after_commit()
            return
        s._rollback_quietly()
        if et is None:
            raise MdsError("the transaction was rolled back because a write inside it failed")


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
        self.vacuum_threshold = float(vacuum_threshold)
        self.maintenance_interval_s = maintenance_interval_s
        self.compress_after_days = compress_after_days
        self._clock: Callable[[], int] = clock or (lambda: time.time_ns() // 1_000_000)
        self._conn: Any = None  # apsw.Connection
        self._depth = 0
        self._doomed = False
        self._dirty = False
        self._sids: dict[tuple[str, str], int] = {}
        self._state: dict[int, list[int]] = {}  # sid -> [seal_ts, tail rows, newest tail ts]; writer only
        self._data_version = -1
        #: :meth:`commit_seq` as of this connection's latest committed data change (None before
        #: one): the number a store records outside the file as acknowledged, at no extra query.
        self.last_commit_seq: int | None = None
        self._next_maintenance = 0.0
        flags = apsw.SQLITE_OPEN_READONLY if self.readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        if not self.readonly:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            if self.path != ":memory:":
                # Private from the start: SQLite gives the -wal and -shm files the database
                # file's permissions, so creating it 0600 keeps all three owner-only.
                with suppress(FileExistsError):
                    create = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                    os.close(os.open(self.path, create, 0o600))
        try:
            conn = self._connect(flags, _vfs)
            self._conn = conn
            conn.set_busy_timeout(int(busy_timeout_ms))
            if not self.readonly:
                # Only takes effect on a new file, and setting it takes the write lock: an opener
                # would wait for (and fail behind) another process's write transaction.
                if conn.execute("PRAGMA page_count").fetchall()[0][0] == 0:
                    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
                if str(mode).lower() != "wal":
                    logger.warning("SQLite store %s: journal_mode is %s, not wal", self.path, mode)
                conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
            conn.execute("PRAGMA cache_size = -65536")  # 64 MiB page cache
            self._open_schema()
            self._data_version = self._pragma_int("data_version")
        except apsw.Error as exc:
            self._close_quietly()
            raise _translate(exc, self.path) from exc
        except BaseException:
            self._close_quietly()
            raise
        self._next_maintenance = self._now_s() + (maintenance_interval_s or 0.0)

    def _connect(self, flags: int, vfs: str | None) -> Any:
        """Open the connection. A WAL database on a read-only file system cannot be opened in
        the usual way when its ``-shm`` file is gone (SQLite would have to create it): there,
        and only there, it is opened ``immutable`` - nobody can change a read-only mount."""
        conn = apsw.Connection(self.path, flags=flags, vfs=vfs) if vfs else apsw.Connection(self.path, flags=flags)
        if not self.readonly:
            return conn
        try:
            conn.execute("PRAGMA user_version").fetchall()  # SQLite opens the file lazily
            return conn
        except apsw.CantOpenError:
            conn.close()
            if not (_on_readonly_fs(self.path) and os.path.exists(self.path)):
                raise
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?immutable=1"
        logger.info("SQLite store %s: on a read-only file system, opened immutable", self.path)
        flags |= apsw.SQLITE_OPEN_URI
        return apsw.Connection(uri, flags=flags, vfs=vfs) if vfs else apsw.Connection(uri, flags=flags)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the file (idempotent). An open transaction is rolled back."""
        conn = self._conn
        if conn is None:
            return
        try:
            if self._depth:
                self._depth = 0
                self._rollback_quietly()
            if not self.readonly:
                conn.execute("PRAGMA optimize").fetchall()
        except apsw.Error as exc:
            logger.warning("SQLite store %s: PRAGMA optimize on close failed: %s", self.path, exc)
        finally:
            self._close_quietly()

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
    def write(self, symbol: str, tf: Timeframe | str, candles: np.ndarray, covered: Any = None) -> tuple[int, int, int]:
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
        arr = self._check_batch(candles, tf)
        cov = None if covered is None else _k.interval_normalize(covered)
        self._writable()
        try:
            with _Txn(self):
                self._dirty = True
                sid = self._sid_for_write(symbol, tf)
                counts = self._write_sid(sid, tf, arr) if len(arr) else (0, 0, 0)
                if cov is not None and len(cov):
                    self._change_coverage(sid, cov, add=True)
            return counts
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def add_coverage(self, symbol: str, tf: Timeframe | str, ranges: Any) -> None:
        """Merge half-open ``ranges`` (int64 ``[k, 2]`` or a list of pairs) into the coverage."""
        tf = parse_timeframe(tf)
        cov = _k.interval_normalize(ranges)
        if not len(cov):
            return
        self._writable()
        try:
            with _Txn(self):
                self._dirty = True
                self._change_coverage(self._sid_for_write(symbol, tf), cov, add=True)
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def delete(self, symbol: str, tf: Timeframe | str, start: int | None = None, end: int | None = None) -> int:
        """Remove candles with ``start <= ts < end`` (None: unbounded); coverage shrinks with them.

        Returns
        -------
        int
            Number of candles removed.
        """
        tf = parse_timeframe(tf)
        lo = _NEG_INF if start is None else int(start)
        hi = _POS_INF if end is None else int(end)
        if hi <= lo:
            return 0
        self._writable()
        try:
            with _Txn(self):
                sid = self._sid_lookup(symbol, tf)
                if sid is None:
                    return 0
                self._dirty = True
                removed = 0
                rows = (
                    self._conn_()
                    .execute(
                        "SELECT key, n, first_ts, last_ts FROM chunk WHERE key BETWEEN ? AND ?",
                        (self._key(sid, tf, lo), self._key(sid, tf, hi - 1)),
                    )
                    .fetchall()
                )
                for key, n, first, last in rows:
                    if last < lo or first >= hi:
                        continue
                    if first >= lo and last < hi:
                        self._conn_().execute("DELETE FROM chunk WHERE key = ?", (key,))
                        removed += n
                        continue
                    arr = self._load_chunk(key, tf)
                    ts = arr["ts"]
                    keep = arr[(ts < lo) | (ts >= hi)]
                    removed += len(arr) - len(keep)
                    self._put_chunk(key, keep, exists=True)
                conn = self._conn_()
                removed += conn.execute(
                    "SELECT count(*) FROM tail WHERE sid = ? AND ts >= ? AND ts < ?", (sid, lo, hi)
                ).fetchall()[0][0]
                conn.execute("DELETE FROM tail WHERE sid = ? AND ts >= ? AND ts < ?", (sid, lo, hi))
                self._change_coverage(sid, np.array([[lo, hi]], dtype=np.int64), add=False)
                self._state.pop(sid, None)
            return int(removed)
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

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
        lo = _NEG_INF if start is None else int(start)
        hi = _POS_INF if end is None else int(end)
        if hi <= lo:
            return []
        self._writable()
        try:
            with _Txn(self):
                sid = self._sid_lookup(symbol, tf)
                if sid is None:
                    return []
                conn = self._conn_()
                bad_keys: list[int] = []
                # damaged coverage rows go first (whatever their span says): the subtraction
                # below reads the coverage, and a damaged row must not stay to prove anything
                spans: list[tuple[int, int]] = self._damaged_coverage(sid)
                if spans:
                    self._dirty = True
                cur = conn.execute(
                    "SELECT key, codec, crc, data FROM chunk WHERE key BETWEEN ? AND ?",
                    (self._key(sid, tf, lo), self._key(sid, tf, hi - 1)),
                )
                try:
                    for key, codec, crc, data in cur:
                        try:
                            _verified(codec, crc, data)
                        except _Damage as exc:
                            logger.warning(
                                "SQLite store %s: quarantining chunk %d of %s %s: %s",
                                self.path,
                                key,
                                symbol,
                                tf.name,
                                exc,
                            )
                            bad_keys.append(key)
                            spans.append(_chunk_span(key, tf))
                finally:
                    cur.close()
                bad_tail: list[tuple[int, int]] = []
                for ts, v in conn.execute(
                    "SELECT ts, v FROM tail WHERE sid = ? AND ts >= ? AND ts < ?", (sid, lo, hi)
                ).fetchall():
                    why = _tail_row_problem(int(ts), v)
                    if why is not None:
                        logger.warning(
                            "SQLite store %s: quarantining tail row %d of %s %s: %s",
                            self.path,
                            ts,
                            symbol,
                            tf.name,
                            why,
                        )
                        bad_tail.append((sid, int(ts)))
                        spans.append((int(ts), tf.next(int(ts))))
                if not spans:
                    return []
                self._dirty = True
                conn.executemany("DELETE FROM chunk WHERE key = ?", [(k,) for k in bad_keys])
                conn.executemany("DELETE FROM tail WHERE sid = ? AND ts = ?", bad_tail)
                self._change_coverage(sid, _k.interval_normalize(np.array(spans, dtype=np.int64)), add=False)
                self._state.pop(sid, None)
            return sorted(spans)
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

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
                return _empty()
            parts: list[np.ndarray] = []
            args = (self._key(sid, tf, start), self._key(sid, tf, end - 1), sid, start, end)
            cur = self._conn_().execute(_SQL_RANGE, args)
            try:
                for codec, crc, key, data in cur:
                    if codec < 0:
                        if data:
                            parts.append(self._tail_checked(data, sid, tf, start, end))
                        continue
                    try:
                        a = _verified(codec, crc, data)
                    except _Damage as exc:
                        raise self._chunk_damaged(key, tf, str(exc)) from None
                    ts = a["ts"]
                    if ts[0] < start or ts[-1] >= end:
                        i, j = np.searchsorted(ts, (start, end))
                        a = a[i:j]
                    if len(a):
                        parts.append(a)
            finally:
                cur.close()  # an error leaves the loop early: end the read now, not when collected
            return _concat(parts)
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def read_latest(self, symbol: str, tf: Timeframe | str, n: int, end: int | None = None) -> np.ndarray:
        """The newest ``n`` candles with ``ts < end`` (None: no bound), ascending."""
        tf = parse_timeframe(tf)
        n = int(n)
        hi = _POS_INF if end is None else int(end)
        try:
            sid = self._sid_lookup(symbol, tf)
            if sid is None or n <= 0:
                return _empty()
            with self._snapshot():
                conn = self._conn_()
                data = conn.execute(_SQL_TAIL_LATEST, (sid, hi, n)).fetchall()[0][0]
                parts: list[np.ndarray] = []
                have = 0
                if data:
                    t = self._tail_checked(data, sid, tf, _NEG_INF, hi, descending=True)
                    parts.append(t)
                    have = len(t)
                if have < n:
                    cur = conn.execute(
                        "SELECT codec, crc, key, data FROM chunk WHERE key BETWEEN ? AND ? ORDER BY key DESC",
                        (self._key(sid, tf, _NEG_INF), self._key(sid, tf, hi - 1)),
                    )
                    try:
                        for codec, crc, key, blob in cur:
                            try:
                                a = _verified(codec, crc, blob)
                            except _Damage as exc:
                                raise self._chunk_damaged(key, tf, str(exc)) from None
                            if a["ts"][-1] >= hi:
                                a = a[: np.searchsorted(a["ts"], hi)]
                            if len(a) > n - have:
                                a = a[len(a) - (n - have) :]
                            if len(a):
                                parts.insert(0, a)
                                have += len(a)
                            if have >= n:
                                break
                    finally:
                        cur.close()
            out = _concat(parts)
            return self._sorted_tail_guard(out)
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def read_from(self, symbol: str, tf: Timeframe | str, start: int, n: int) -> np.ndarray:
        """The first ``n`` candles with ``ts >= start``, ascending."""
        tf = parse_timeframe(tf)
        start, n = int(start), int(n)
        try:
            sid = self._sid_lookup(symbol, tf)
            if sid is None or n <= 0:
                return _empty()
            parts: list[np.ndarray] = []
            have = 0
            with self._snapshot():
                conn = self._conn_()
                cur = conn.execute(
                    "SELECT codec, crc, key, data FROM chunk WHERE key BETWEEN ? AND ?",
                    (self._key(sid, tf, start), self._key(sid, tf, _POS_INF)),
                )
                try:
                    for codec, crc, key, blob in cur:
                        try:
                            a = _verified(codec, crc, blob)
                        except _Damage as exc:
                            raise self._chunk_damaged(key, tf, str(exc)) from None
                        if a["ts"][0] < start:
                            a = a[np.searchsorted(a["ts"], start) :]
                        a = a[: n - have]
                        if len(a):
                            parts.append(a)
                            have += len(a)
                        if have >= n:
                            break
                finally:
                    cur.close()
                if have < n:
                    data = conn.execute(_SQL_TAIL_FROM, (sid, start, n - have)).fetchall()[0][0]
                    if data:
                        parts.append(self._tail_checked(data, sid, tf, start, _POS_INF))
            return _concat(parts)
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def last_ts(self, symbol: str, tf: Timeframe | str) -> int | None:
        """Open time of the newest stored candle, or None."""
        tf = parse_timeframe(tf)
        try:
            sid = self._sid_lookup(symbol, tf)
            if sid is None:
                return None
            row = (
                self._conn_()
                .execute(
                    "SELECT coalesce((SELECT max(ts) FROM tail WHERE sid = ?1), "
                    "(SELECT last_ts FROM chunk WHERE key BETWEEN ?2 AND ?3 ORDER BY key DESC LIMIT 1))",
                    (sid, self._key(sid, tf, _NEG_INF), self._key(sid, tf, _POS_INF)),
                )
                .fetchall()
            )
            return None if row[0][0] is None else int(row[0][0])
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def coverage(self, symbol: str, tf: Timeframe | str) -> np.ndarray:
        """Covered ranges of the series as int64 ``[k, 2]``, sorted, merged, half-open."""
        tf = parse_timeframe(tf)
        try:
            sid = self._sid_lookup(symbol, tf)
            return _EMPTY_RANGES.copy() if sid is None else self._coverage_sid(sid)
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def gaps(
        self, symbol: str, tf: Timeframe | str, start: int | None = None, end: int | None = None
    ) -> list[tuple[int, int, Literal["missing", "no_trades"]]]:
        """Absent candles in ``[start, end)`` as ``(start, end, kind)`` ranges, ascending.

        ``kind`` is ``"no_trades"`` inside the coverage (the source was asked and had nothing)
        and ``"missing"`` outside it. Without ``start``/``end`` the range spans the series'
        coverage and data (empty series: no gaps).
        """
        tf = parse_timeframe(tf)
        try:
            sid = self._sid_lookup(symbol, tf)
            if sid is None:
                if start is None or end is None:
                    return []
                return [(int(start), int(end), "missing")] if tf.ceil(int(start)) < int(end) else []
            with self._snapshot():
                cov = self._coverage_sid(sid)
                if start is None or end is None:
                    first = self.read_from(symbol, tf, _NEG_INF, 1)
                    last = self.last_ts(symbol, tf)
                    lows = [int(cov[0, 0])] if len(cov) else []
                    highs = [int(cov[-1, 1])] if len(cov) else []
                    if len(first):
                        lows.append(int(first["ts"][0]))
                    if last is not None:
                        highs.append(tf.next(last))
                    if not lows:
                        return []
                    start = min(lows) if start is None else int(start)
                    end = max(highs) if end is None else int(end)
                start, end = int(start), int(end)
                if end <= start:
                    return []
                data = self.read_range(symbol, tf, start, end)
            holes = _k.find_gaps(data["ts"], *tf.kernel_args, start, end)
            missing = _k.interval_subtract(holes, cov)
            no_trades = _k.interval_subtract(holes, missing)
            out: list[tuple[int, int, Literal["missing", "no_trades"]]] = [
                (int(a), int(b), "missing") for a, b in missing
            ]
            out += [(int(a), int(b), "no_trades") for a, b in no_trades]
            out.sort()
            return out
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def series(self) -> list[tuple[str, str, int, int, int]]:
        """Every series with candles: ``(symbol, timeframe name, count, first_ts, last_ts)``."""
        try:
            out = []
            with self._snapshot():
                conn = self._conn_()
                for sid, symbol, tfname in conn.execute(
                    "SELECT sid, symbol, timeframe FROM series ORDER BY symbol, timeframe"
                ).fetchall():
                    lo, hi = sid << _CID_BITS, ((sid + 1) << _CID_BITS) - 1
                    cn, cf, cl = conn.execute(
                        "SELECT coalesce(sum(n), 0), min(first_ts), max(last_ts) FROM chunk WHERE key BETWEEN ? AND ?",
                        (lo, hi),
                    ).fetchall()[0]
                    tn, tfst, tl = conn.execute(
                        "SELECT count(*), min(ts), max(ts) FROM tail WHERE sid = ?", (sid,)
                    ).fetchall()[0]
                    count = int(cn) + int(tn)
                    if count:
                        first = cf if cf is not None else tfst
                        last = tl if tl is not None else cl
                        out.append((symbol, tfname, count, int(first), int(last)))
            return out
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    # ------------------------------------------------------------------ maintenance
    def data_version(self) -> int:
        """A counter that changes whenever another connection (or process) commits to the file.

        Cheap (no disk read); a Store uses it to tell that cached answers may be stale.
        """
        try:
            return self._pragma_int("data_version")
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def commit_seq(self) -> int:
        """How many committed transactions changed this file's data (its commit sequence).

        Incremented by exactly one by every committed transaction that writes candles or
        coverage, deletes, quarantines or migrates (once per transaction however many calls it
        groups; never by a rollback, maintenance or compression). Kept in the file itself, so a
        number recorded elsewhere after an acknowledged write that is higher than this one means
        acknowledged commits were lost (for example a WAL file deleted after a crash). Cheap: one
        row read.
        """
        try:
            rows = self._conn_().execute("SELECT v FROM meta WHERE k = 'commit_seq'").fetchall()
            return int(rows[0][0]) if rows else 0
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def maybe_maintain(self) -> bool:
        """Run the bounded scheduled maintenance step if ``maintenance_interval_s`` has passed.

        The writer calls this itself after commits; calling it more often is harmless. Outside a
        transaction only. Returns whether a step ran.
        """
        if self.readonly or self._depth or self._conn is None or self.maintenance_interval_s is None:
            return False
        if self._now_s() < self._next_maintenance:
            return False
        self._after_commit()
        return True

    def stats(self) -> dict[str, Any]:
        """JSON-ready figures: file size, free-page share, series, chunks (raw/compressed), tail rows."""
        try:
            with self._snapshot():
                conn = self._conn_()
                series = conn.execute("SELECT count(*) FROM series").fetchall()[0][0]
                chunks = dict(conn.execute("SELECT codec, count(*) FROM chunk GROUP BY codec").fetchall())
                tail = conn.execute("SELECT count(*) FROM tail").fetchall()[0][0]
            return {
                "path": self.path,
                "schema_version": SCHEMA_VERSION,
                "size_bytes": self.size_bytes(),
                "fragmentation": self.fragmentation(),
                "series": int(series),
                "chunks_raw": int(chunks.get(CODEC_RAW, 0)),
                "chunks_compressed": int(chunks.get(CODEC_ZLIB_DELTA_SHUFFLE, 0)),
                "tail_rows": int(tail),
                "readonly": self.readonly,
            }
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its WAL."""
        total = 0
        for p in (self.path, self.path + "-wal"):
            with suppress(OSError):
                total += os.path.getsize(p)
        return total

    def fragmentation(self) -> float:
        """Share of the file's pages that are free (0.0 to 1.0); cheap (two pragmas)."""
        try:
            pages = self._pragma_int("page_count")
            return self._pragma_int("freelist_count") / pages if pages else 0.0
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def page_fragmentation(self, max_pages: int = 1 << 18) -> float | None:
        """Share of B-tree pages not stored right after their predecessor in key order.

        Read from the ``dbstat`` table (a full pass over the file); None when the file has more
        than ``max_pages`` pages or dbstat is unavailable.
        """
        try:
            conn = self._conn_()
            if self._pragma_int("page_count") > max_pages:
                return None
            rows = conn.execute("SELECT name, pageno FROM dbstat WHERE pagetype != 'overflow'").fetchall()
        except apsw.SQLError:
            return None
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc
        if len(rows) < 2:
            return 0.0
        names = np.array([hash(r[0]) for r in rows])
        pages = np.array([r[1] for r in rows], dtype=np.int64)
        same = names[1:] == names[:-1]
        jumps = same & (np.diff(pages) != 1)
        return float(jumps.sum()) / max(int(same.sum()), 1)

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
        t0 = time.perf_counter()
        try:
            report: dict[str, Any] = {
                "fragmentation_before": self.fragmentation(),
                "page_fragmentation_before": self.page_fragmentation(),
                "size_before": self.size_bytes(),
            }
            report["compressed_chunks"] = self._compress_old(budget_s=None)
            conn = self._conn_()
            problems = self._sqlite_check(full=force)
            reindexed = False
            if any("index" in p for p in problems):
                logger.warning("SQLite store %s: index problems, running REINDEX: %s", self.path, problems[:3])
                conn.execute("REINDEX")
                reindexed = True
                problems = self._sqlite_check(full=True)
            frag = self.fragmentation()
            vacuumed = False
            if force or frag > self.vacuum_threshold:
                self._checkpoint()
                conn.execute("VACUUM")
                vacuumed = True
            if force or vacuumed or not self._has_stats():
                conn.execute("ANALYZE")
                analyzed = True
            else:
                analyzed = self._optimize()
            self._checkpoint()
            self._set_meta("last_maintenance_ms", int(self._clock()))
            report.update(
                fragmentation_after=self.fragmentation(),
                page_fragmentation_after=self.page_fragmentation(),
                size_after=self.size_bytes(),
                vacuumed=vacuumed,
                analyzed=analyzed,
                reindexed=reindexed,
                problems=problems,
                seconds=time.perf_counter() - t0,
            )
            self._next_maintenance = self._now_s() + (self.maintenance_interval_s or 0.0)
            logger.info(
                "SQLite store %s maintained: fragmentation %.3f -> %.3f, vacuumed=%s, %d chunks compressed",
                self.path,
                report["fragmentation_before"],
                report["fragmentation_after"],
                vacuumed,
                report["compressed_chunks"],
            )
            return report
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

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
        try:
            with self._snapshot():
                problems = self._sqlite_check(full=full)
                problems += self._invariant_problems()
            return problems
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    # ------------------------------------------------------------------ internals: schema
    def _open_schema(self) -> None:
        conn = self._conn_()
        version = self._pragma_int("user_version")
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StorageUnavailableError(
                f"SQLite store {self.path} has schema version {version}, newer than this mds "
                f"({SCHEMA_VERSION}): upgrade mds"
            )
        if self.readonly:
            raise StorageUnavailableError(
                f"SQLite store {self.path} has schema version {version} and needs a migration: "
                "open it once with a writer"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._pragma_int("user_version")  # another process may have won the race
            if version == 0:
                tables = conn.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'table'").fetchall()[0][0]
                if tables:
                    raise StorageUnavailableError(
                        f"SQLite store {self.path} holds tables but no mds schema version: not an mds database"
                    )
                conn.execute(_SCHEMA_V3)
            elif version == 1:
                self._migrate_v1()
            elif version == 2:
                self._migrate_v2()
            if version < SCHEMA_VERSION:
                if version:
                    conn.execute(_SQL_BUMP_SEQ).fetchall()  # a migration rewrites the data: one commit
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback_quietly()
            self._sids.clear()
            self._state.clear()
            raise

    def _migrate_v1(self) -> None:
        """v1 (row per candle keyed by text) -> v3 (catalog, chunks, tail), inside the open transaction."""
        conn = self._conn_()
        logger.info("SQLite store %s: migrating schema 1 -> %d", self.path, SCHEMA_VERSION)
        conn.execute("ALTER TABLE candles RENAME TO v1_candles; ALTER TABLE coverage RENAME TO v1_coverage;")
        conn.execute(_SCHEMA_V3)
        pairs = conn.execute(
            "SELECT DISTINCT symbol, timeframe FROM v1_candles UNION SELECT DISTINCT symbol, timeframe FROM v1_coverage"
        ).fetchall()
        for symbol, tfname in pairs:
            tf = parse_timeframe(tfname)
            sid = self._sid_for_write(symbol, tf)
            rows = conn.execute(
                "SELECT ts, open, high, low, close, volume, value FROM v1_candles "
                "WHERE symbol = ? AND timeframe = ? ORDER BY ts",
                (symbol, tfname),
            ).fetchall()
            if rows:
                arr = np.array(rows, dtype=np.float64)
                out = np.empty(len(rows), dtype=CANDLE_DTYPE)
                out["ts"] = np.array([r[0] for r in rows], dtype=np.int64)
                for i, name in enumerate(_FIELDS[1:], start=1):
                    out[name] = arr[:, i]
                self._write_sid(sid, tf, out)
            cov = conn.execute(
                "SELECT start_ts, end_ts FROM v1_coverage WHERE symbol = ? AND timeframe = ?", (symbol, tfname)
            ).fetchall()
            if cov:
                self._change_coverage(sid, _k.interval_normalize(np.array(cov, dtype=np.int64)), add=True)
        conn.execute("DROP TABLE v1_candles; DROP TABLE v1_coverage;")

    def _migrate_v2(self) -> None:
        """v2 -> v3 (checksums), inside the open transaction.

        ``chunk`` is rebuilt with a ``crc`` column (an UPDATE would rewrite every row as well) and
        every tail value gets its checksum appended. The checksums are those of the rows as they
        are now: damage that happened before this migration cannot be told from data. A chunk that
        does not decode keeps a checksum of 0, so it stays refused as damaged.
        """
        conn = self._conn_()
        logger.info("SQLite store %s: migrating schema 2 -> 3 (checksums)", self.path)
        conn.execute("DROP INDEX chunk_uncompressed; ALTER TABLE chunk RENAME TO v2_chunk;")
        conn.execute(_SCHEMA_V3_CHUNK)

        def chunks() -> Iterator[tuple[Any, ...]]:
            for key, n, first, last, codec, data in conn.execute(
                "SELECT key, n, first_ts, last_ts, codec, data FROM v2_chunk"
            ):
                try:
                    a = _decode(codec, data)
                    crc = _signed(row_checksum(a, 0, len(a))) if len(a) else 0
                except (_Damage, zlib.error, ValueError) as exc:
                    logger.warning(
                        "SQLite store %s: v2 chunk %d does not decode (%s); kept as damaged", self.path, key, exc
                    )
                    crc = 0
                yield key, n, first, last, codec, crc, data

        # a second connection-level cursor reads v2_chunk while executemany inserts into chunk
        conn.executemany(
            "INSERT INTO chunk(key, n, first_ts, last_ts, codec, crc, data) VALUES (?, ?, ?, ?, ?, ?, ?)", chunks()
        )
        conn.execute("DROP TABLE v2_chunk")
        fixed = []
        for sid, ts, v in conn.execute("SELECT sid, ts, v FROM tail").fetchall():
            if isinstance(v, bytes) and len(v) == _ROW:
                fixed.append((v + row_checksum(v, 0, 1).to_bytes(8, "little"), sid, ts))
            else:  # malformed already: left as it is, refused as damaged
                logger.warning(
                    "SQLite store %s: v2 tail row (%d, %d) is malformed; kept as damaged", self.path, sid, ts
                )
        conn.executemany("UPDATE tail SET v = ? WHERE sid = ? AND ts = ?", fixed)
        conn.execute("ALTER TABLE coverage RENAME TO v2_coverage")
        conn.execute(_SCHEMA_V3_COVERAGE)
        conn.executemany(
            "INSERT INTO coverage(sid, start_ts, end_ts, crc) VALUES (?, ?, ?, ?)",
            [(sid, a, b, _coverage_crc(sid, a, b)) for sid, a, b in conn.execute(
                "SELECT sid, start_ts, end_ts FROM v2_coverage").fetchall()],
        )
        conn.execute("DROP TABLE v2_coverage")
        conn.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('commit_seq', 0)")

    # ------------------------------------------------------------------ internals: plumbing
    def _conn_(self) -> Any:  # apsw's row types are unions; the schema fixes them, so Any
        conn = self._conn
        if conn is None:
            raise StorageUnavailableError(f"SQLite store {self.path} is closed")
        return conn

    def _pragma_int(self, name: str) -> int:
        return int(self._conn_().execute(f"PRAGMA {name}").fetchall()[0][0])

    def _writable(self) -> None:
        if self.readonly:
            raise StorageUnavailableError(f"SQLite store {self.path} was opened readonly; writes need a writer")

    def _now_s(self) -> float:
        return self._clock() / 1000.0

    def _close_quietly(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except apsw.Error as exc:
                logger.warning("SQLite store %s: close failed: %s", self.path, exc)

    def _rollback_quietly(self) -> None:
        self._sids.clear()
        self._state.clear()
        self._dirty = False
        conn = self._conn
        if conn is None:
            return
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except apsw.Error as exc:
            logger.warning("SQLite store %s: rollback failed: %s", self.path, exc)

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """A read transaction around several statements (no-op inside one)."""
        conn = self._conn_()
        if self._depth or conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _check_foreign_commits(self) -> None:
        """Drop writer caches when another connection committed since our last look."""
        v = self._pragma_int("data_version")
        if v != self._data_version:
            self._data_version = v
            self._state.clear()

    def _after_commit(self) -> None:
        if self.maintenance_interval_s is None:
            return
        now = self._now_s()
        if now < self._next_maintenance:
            return
        self._next_maintenance = now + self.maintenance_interval_s
        try:
            self._scheduled_maintenance()
        except (apsw.Error, MdsError) as exc:
            logger.warning("SQLite store %s: scheduled maintenance failed (will retry): %s", self.path, exc)

    def _scheduled_maintenance(self) -> None:
        """Bounded work after a commit: compress some old chunks, hand free pages back, optimize."""
        conn = self._conn_()
        n = self._compress_old(budget_s=_COMPRESS_BUDGET_S)
        frag = self.fragmentation()
        if frag > self.vacuum_threshold:
            if self._pragma_int("auto_vacuum") == 2:
                # frees one page per step: the statement must be run to its end, not just started
                conn.execute(f"PRAGMA incremental_vacuum({_INCREMENTAL_VACUUM_PAGES})").fetchall()
            else:
                logger.info("SQLite store %s: fragmentation %.3f; call maintain() to VACUUM", self.path, frag)
        self._optimize()
        logger.debug("SQLite store %s: scheduled maintenance compressed %d chunks", self.path, n)

    def _optimize(self) -> bool:
        """``PRAGMA optimize``; returns whether it recomputed statistics (ran an ANALYZE).

        SQLite does not report what optimize did, so its debug form (mask bit 0x01 added to the
        default 0xfffe) first lists the ANALYZE statements it would run, on this connection, now.
        """
        conn = self._conn_()
        planned = conn.execute("PRAGMA optimize(0xffff)").fetchall()
        conn.execute("PRAGMA optimize").fetchall()
        return bool(planned)

    def _checkpoint(self) -> None:
        """``PRAGMA wal_checkpoint(TRUNCATE)``, stepped to its end (it returns a row)."""
        busy, log, done = self._conn_().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
        if busy:
            logger.info(
                "SQLite store %s: WAL checkpoint incomplete (%s of %s frames): readers hold it", self.path, done, log
            )

    def _has_stats(self) -> bool:
        return bool(
            self._conn_().execute("SELECT count(*) FROM sqlite_schema WHERE name = 'sqlite_stat1'").fetchall()[0][0]
        )

    def _set_meta(self, k: str, v: Any) -> None:
        self._conn_().execute("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)", (k, v))

    def _sqlite_check(self, full: bool) -> list[str]:
        rows = self._conn_().execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchall()
        msgs = [str(r[0]) for r in rows]
        return [] if msgs == ["ok"] else msgs

    # ------------------------------------------------------------------ internals: catalog
    @staticmethod
    def _key(sid: int, tf: Timeframe, ts: int) -> int:
        cid = (ts - tf.origin_ms) // (tf.interval_ms * CHUNK_SLOTS)
        cid = _CID_MIN if cid < _CID_MIN else _CID_MAX if cid > _CID_MAX else cid
        return (sid << _CID_BITS) + cid + _CID_OFFSET

    def _sid_lookup(self, symbol: str, tf: Timeframe) -> int | None:
        k = (symbol, tf.name)
        sid = self._sids.get(k)
        if sid is None:
            rows = self._conn_().execute("SELECT sid FROM series WHERE symbol = ? AND timeframe = ?", k).fetchall()
            if not rows:
                return None
            sid = self._sids[k] = int(rows[0][0])
        return sid

    def _sid_for_write(self, symbol: str, tf: Timeframe) -> int:
        sid = self._sid_lookup(symbol, tf)
        if sid is None:
            conn = self._conn_()
            conn.execute("INSERT INTO series(symbol, timeframe, seal_ts) VALUES (?, ?, ?)", (symbol, tf.name, _NEG_INF))
            sid = self._sids[(symbol, tf.name)] = int(conn.last_insert_rowid())
            self._state[sid] = [_NEG_INF, 0, _NEG_INF]
        return sid

    def _seal_state(self, sid: int) -> list[int]:
        st = self._state.get(sid)
        if st is None:
            conn = self._conn_()
            seal = conn.execute("SELECT seal_ts FROM series WHERE sid = ?", (sid,)).fetchall()[0][0]
            n, newest = conn.execute("SELECT count(*), max(ts) FROM tail WHERE sid = ?", (sid,)).fetchall()[0]
            st = self._state[sid] = [int(seal), int(n), _NEG_INF if newest is None else int(newest)]
        return st

    # ------------------------------------------------------------------ internals: candles
    def _check_batch(self, candles: Any, tf: Timeframe) -> np.ndarray:
        if not isinstance(candles, np.ndarray) or candles.dtype != CANDLE_DTYPE or candles.ndim != 1:
            raise InvalidCandleError(
                f"candles must be a 1-D CANDLE_DTYPE array, got {getattr(candles, 'dtype', type(candles))}"
            )
        arr = np.ascontiguousarray(candles)
        n = len(arr)
        if not n:
            return arr
        ts = arr["ts"]
        if n > 1 and not bool(np.all(ts[1:] > ts[:-1])):
            raise InvalidCandleError("candles must be sorted by ts with unique ts (sort_dedup them first)")
        if not (int(ts[0]) > -_TS_LIMIT and int(ts[-1]) < _TS_LIMIT):
            raise InvalidCandleError(f"candle ts out of range (|ts| must be below {_TS_LIMIT} ms)")
        if n == 1 and _row_ok(arr, tf):
            return arr  # the scalar twin of validate() below: a kernel call costs more for one row
        idx, reason = _k.validate(arr, *tf.kernel_args)
        if len(idx):
            names = [_k.REASONS.get(int(r), str(int(r))) for r in reason]
            raise InvalidCandleError(
                f"{len(idx)} invalid candle(s), first at row {int(idx[0])}: {names[0]}; nothing was stored",
                rows=[int(i) for i in idx],
                reasons=names,
            )
        return arr

    def _write_sid(self, sid: int, tf: Timeframe, arr: np.ndarray) -> tuple[int, int, int]:
        st = self._seal_state(sid)
        seal, tail_n, _ = st
        if int(arr["ts"][0]) >= seal:
            k = 0
        elif int(arr["ts"][-1]) < seal:
            k = len(arr)
        else:
            k = int(np.searchsorted(arr["ts"], seal))
        ins = upd = unch = 0
        if k:
            ins, upd, unch = self._write_chunks(sid, tf, arr[:k])
        if k == len(arr):
            return ins, upd, unch
        hi = arr[k:]
        if len(hi) == 1 and tail_n < TAIL_MAX:
            a, b, c = self._upsert_tail_one(sid, hi, st)
        elif tail_n + len(hi) <= TAIL_MAX:
            a, b, c = self._upsert_tail_many(sid, tf, hi, st)
        else:
            a, b, c = self._fold(sid, tf, hi, st)
        return ins + a, upd + b, unch + c

    def _upsert_tail_one(self, sid: int, row: np.ndarray, st: list[int]) -> tuple[int, int, int]:
        conn = self._conn_()
        ts = int(row["ts"][0])
        blob = _tail_value(row)
        if ts > st[2]:  # newer than every tail row: certainly new (the common live-edge case)
            conn.execute("INSERT INTO tail(sid, ts, v) VALUES (?, ?, ?)", (sid, ts, blob))
            st[1] += 1
            st[2] = ts
            return 1, 0, 0
        old = conn.execute("SELECT v FROM tail WHERE sid = ? AND ts = ?", (sid, ts)).fetchall()
        if not old:
            conn.execute("INSERT INTO tail(sid, ts, v) VALUES (?, ?, ?)", (sid, ts, blob))
            st[1] += 1
            return 1, 0, 0
        if old[0][0] == blob:
            return 0, 0, 1
        # A damaged old value is simply replaced by the new candle (nothing of it is read).
        conn.execute("UPDATE tail SET v = ? WHERE sid = ? AND ts = ?", (blob, sid, ts))
        return 0, 1, 0

    def _upsert_tail_many(self, sid: int, tf: Timeframe, hi: np.ndarray, st: list[int]) -> tuple[int, int, int]:
        conn = self._conn_()
        ts = hi["ts"]
        data = conn.execute(_SQL_TAIL_RANGE, (sid, int(ts[0]), int(ts[-1]) + 1)).fetchall()[0][0]
        n = len(hi)
        if data:
            old = np.ascontiguousarray(self._tail_checked(data, sid, tf, int(ts[0]), int(ts[-1]) + 1))
            pos = np.searchsorted(old["ts"], ts)
            pos_c = np.minimum(pos, len(old) - 1)
            found = old["ts"][pos_c] == ts
            same = found & np.all(old.view(np.int64).reshape(-1, 7)[pos_c] == hi.view(np.int64).reshape(-1, 7), axis=1)
            write = np.flatnonzero(~same)
            ins = int(n - found.sum())
            unch = int(same.sum())
            upd = n - ins - unch
        else:
            write = np.arange(n)
            ins, upd, unch = n, 0, 0
        if len(write):
            values = _tail_values(hi)
            tss = ts.tolist()
            conn.executemany(
                "INSERT OR REPLACE INTO tail(sid, ts, v) VALUES (?, ?, ?)",
                [(sid, tss[i], values[i]) for i in write.tolist()],
            )
        st[1] += ins
        st[2] = max(st[2], int(ts[-1]))
        return ins, upd, unch

    def _fold(self, sid: int, tf: Timeframe, hi: np.ndarray, st: list[int]) -> tuple[int, int, int]:
        """Move the whole live edge plus ``hi`` into chunks, keeping only the newest candle as a row."""
        conn = self._conn_()
        if st[1]:
            # checked: a damaged row folded into a chunk would get a fresh, matching checksum
            data = conn.execute(_SQL_TAIL_RANGE, (sid, _NEG_INF, _POS_INF)).fetchall()[0][0]
            old = np.ascontiguousarray(self._tail_checked(data, sid, tf, _NEG_INF, _POS_INF)) if data else _empty()
        else:
            old = _empty()
        if len(old):
            merged, ins, upd, unch = _k.merge(old, hi)
        else:
            merged, ins, upd, unch = hi, len(hi), 0, 0
        newest = merged[-1:]
        new_seal = int(newest["ts"][0])
        if len(merged) > 1:
            self._write_chunks(sid, tf, merged[:-1])
        conn.execute("DELETE FROM tail WHERE sid = ?", (sid,))
        conn.execute("INSERT INTO tail(sid, ts, v) VALUES (?, ?, ?)", (sid, new_seal, _tail_value(newest)))
        conn.execute("UPDATE series SET seal_ts = ? WHERE sid = ?", (new_seal, sid))
        st[0], st[1], st[2] = new_seal, 1, new_seal
        return ins, upd, unch

    def _write_chunks(self, sid: int, tf: Timeframe, lo: np.ndarray) -> tuple[int, int, int]:
        conn = self._conn_()
        span = tf.interval_ms * CHUNK_SLOTS
        ts = lo["ts"]
        n = len(lo)
        if int(ts[0] - tf.origin_ms) // span == int(ts[-1] - tf.origin_ms) // span:
            starts, ends = [0], [n]
        else:
            cids = (ts - tf.origin_ms) // span
            cut = (np.flatnonzero(cids[1:] != cids[:-1]) + 1).tolist()
            starts, ends = [0, *cut], [*cut, n]
        k_first = self._key(sid, tf, int(ts[0]))
        k_last = self._key(sid, tf, int(ts[-1]))
        existing = {r[0] for r in conn.execute("SELECT key FROM chunk WHERE key BETWEEN ? AND ?", (k_first, k_last))}
        ins = upd = unch = 0
        new_rows = []
        raw = lo.view(np.uint8)
        for s, e in zip(starts, ends):
            key = self._key(sid, tf, int(ts[s]))
            part = lo[s:e]
            if key in existing:
                merged, a, b, c = _k.merge(self._load_chunk(key, tf), part)
                ins, upd, unch = ins + a, upd + b, unch + c
                if a or b:
                    self._put_chunk(key, merged, exists=True)
            else:
                crc = _signed(row_checksum(raw, s * _ROW, e - s))
                new_rows.append((key, e - s, int(ts[s]), int(ts[e - 1]), crc, raw[s * _ROW : e * _ROW]))
                ins += e - s
        if new_rows:
            conn.executemany(
                "INSERT INTO chunk(key, n, first_ts, last_ts, codec, crc, data) VALUES (?, ?, ?, ?, 0, ?, ?)",
                new_rows,
            )
        return ins, upd, unch

    def _load_chunk(self, key: int, tf: Timeframe) -> np.ndarray:
        """A chunk's rows for a read-modify-write, checked: merging damaged rows would store them
        again under a fresh, matching checksum."""
        codec, crc, data = (
            self._conn_().execute("SELECT codec, crc, data FROM chunk WHERE key = ?", (key,)).fetchall()[0]
        )
        try:
            return _verified(codec, crc, data)
        except _Damage as exc:
            raise self._chunk_damaged(key, tf, str(exc)) from None

    def _put_chunk(self, key: int, arr: np.ndarray, *, exists: bool) -> None:
        conn = self._conn_()
        if not len(arr):
            conn.execute("DELETE FROM chunk WHERE key = ?", (key,))
            return
        arr = np.ascontiguousarray(arr)
        crc = _signed(row_checksum(arr, 0, len(arr)))
        args = (len(arr), int(arr["ts"][0]), int(arr["ts"][-1]), crc, arr.view(np.uint8), key)
        if exists:
            conn.execute(
                "UPDATE chunk SET n = ?, first_ts = ?, last_ts = ?, codec = 0, crc = ?, data = ? WHERE key = ?", args
            )
        else:
            conn.execute(
                "INSERT INTO chunk(n, first_ts, last_ts, codec, crc, data, key) VALUES (?, ?, ?, 0, ?, ?, ?)", args
            )

    def _tail_checked(
        self, data: Any, sid: int, tf: Timeframe, lo: int, hi: int, *, descending: bool = False
    ) -> np.ndarray:
        """The candles of tail values read for ``lo <= ts < hi``, ascending, checked (read-only,
        possibly strided: callers copy)."""
        a = _tail_rows(data, lo, hi, descending)
        if a is None:
            raise self._tail_damaged(sid, tf, lo, hi)
        return a

    def _damaged(self, sid: int, tf: Timeframe, start: int, end: int, what: str) -> DamagedChunkError:
        rows = self._conn_().execute("SELECT symbol FROM series WHERE sid = ?", (sid,)).fetchall()
        symbol = str(rows[0][0]) if rows else f"<series {sid}>"
        when = ""
        if start > -_TS_LIMIT and end < _TS_LIMIT:
            when = f" ({iso_utc(start)} to {iso_utc(end)} UTC)"
        logger.warning("SQLite store %s: %s %s [%d, %d) is damaged: %s", self.path, symbol, tf.name, start, end, what)
        return DamagedChunkError(
            f"SQLite store {self.path}: stored candles of {symbol} {tf.name} in [{start}, {end}){when} are "
            f"damaged ({what}); they were not served. Drop them with quarantine_damaged() so they are "
            "refetched from Layer 1 (Store.check() names every damaged span), or restore a backup",
            symbol,
            tf.name,
            start,
            end,
        )

    def _chunk_damaged(self, key: int, tf: Timeframe, why: str) -> DamagedChunkError:
        start, end = _chunk_span(key, tf)
        return self._damaged(key >> _CID_BITS, tf, start, end, f"chunk {key} {why}")

    def _tail_damaged(self, sid: int, tf: Timeframe, lo: int, hi: int) -> DamagedChunkError:
        """The error for tail values that failed a check: finds the first damaged row by its key."""
        rows = (
            self._conn_()
            .execute("SELECT ts, v FROM tail WHERE sid = ? AND ts >= ? AND ts < ? ORDER BY ts", (sid, lo, hi))
            .fetchall()
        )
        for ts, v in rows:
            why = _tail_row_problem(int(ts), v)
            if why is not None:
                return self._damaged(sid, tf, int(ts), tf.next(int(ts)), f"tail row {why}")
        # not one row alone: name the whole live edge that was read
        start = int(rows[0][0]) if rows else lo
        end = tf.next(int(rows[-1][0])) if rows else hi
        return self._damaged(sid, tf, start, end, "tail rows do not read back as stored")

    @staticmethod
    def _sorted_tail_guard(a: np.ndarray) -> np.ndarray:
        ts = a["ts"]
        if len(a) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
            a = a[np.argsort(ts, kind="stable")]
        return a

    def _compress_old(self, budget_s: float | None) -> int:
        """Compress raw chunks whose newest candle is older than ``compress_after_days``."""
        if self.compress_after_days is None:
            return 0
        cutoff = int(self._clock() - self.compress_after_days * 86_400_000)
        conn = self._conn_()
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        done = 0
        after = (-(1 << 63), -1)  # (last_ts, key) seen last: a damaged chunk left raw is not selected again
        while True:
            with _Txn(self):
                rows = conn.execute(  # walks the partial index chunk_uncompressed (last_ts, rowid) in order
                    "SELECT key, last_ts, crc, data FROM chunk "
                    "WHERE codec = 0 AND last_ts < ?1 AND (last_ts, key) > (?2, ?3) ORDER BY last_ts, key LIMIT 64",
                    (cutoff, *after),
                ).fetchall()
                for key, last_ts, crc, data in rows:
                    after = (last_ts, key)
                    try:
                        a = _verified(CODEC_RAW, crc, data)
                    except _Damage as exc:
                        # left as it is: reads keep refusing it until quarantine_damaged() drops it
                        logger.warning("SQLite store %s: not compressing chunk %d: %s", self.path, key, exc)
                        continue
                    # stored compressed even in the rare case it does not shrink, so it is not retried;
                    # crc stays: it is the checksum of the decoded rows
                    conn.execute(
                        "UPDATE chunk SET codec = ?, data = ? WHERE key = ?",
                        (CODEC_ZLIB_DELTA_SHUFFLE, _encode(a), key),
                    )
                    done += 1
            if len(rows) < 64 or (deadline is not None and time.perf_counter() > deadline):
                return done

    # ------------------------------------------------------------------ internals: coverage
    def _coverage_sid(self, sid: int) -> np.ndarray:
        """The series' coverage; DamagedChunkError when a row fails its checksum (never served:
        a wrong bound would label never-fetched slots no_trades)."""
        rows = (
            self._conn_()
            .execute("SELECT start_ts, end_ts, crc FROM coverage WHERE sid = ? ORDER BY start_ts", (sid,))
            .fetchall()
        )
        if not rows:
            return _EMPTY_RANGES.copy()
        for a, b, crc in rows:
            if _coverage_crc(sid, a, b) != crc:
                symbol, tfname = self._conn_().execute(
                    "SELECT symbol, timeframe FROM series WHERE sid = ?", (sid,)
                ).fetchall()[0]
                raise DamagedChunkError(
                    f"SQLite store {self.path}: a coverage row of {symbol} {tfname} ([{a}, {b})) does not match "
                    "its checksum; it was not used. Drop it with quarantine_damaged() (its span becomes missing "
                    "and is refetched), or restore a backup",
                    symbol,
                    tfname,
                    int(a),
                    int(b) if b > a else int(a) + 1,
                )
        return np.array([r[:2] for r in rows], dtype=np.int64).reshape(-1, 2)

    def _damaged_coverage(self, sid: int) -> list[tuple[int, int]]:
        """Delete the series' coverage rows that fail their checksum; their spans."""
        conn = self._conn_()
        bad = [
            (int(a), int(b))
            for a, b, crc in conn.execute("SELECT start_ts, end_ts, crc FROM coverage WHERE sid = ?", (sid,)).fetchall()
            if _coverage_crc(sid, a, b) != crc
        ]
        conn.executemany("DELETE FROM coverage WHERE sid = ? AND start_ts = ?", [(sid, a) for a, _ in bad])
        return [(a, b if b > a else a + 1) for a, b in bad]

    def _change_coverage(self, sid: int, ranges: np.ndarray, *, add: bool) -> None:
        cur = self._coverage_sid(sid)
        new = _k.interval_union(cur, ranges) if add else _k.interval_subtract(cur, ranges)
        if new.shape == cur.shape and bool(np.all(new == cur)):
            return
        conn = self._conn_()
        conn.execute("DELETE FROM coverage WHERE sid = ?", (sid,))
        if len(new):
            conn.executemany(
                "INSERT INTO coverage(sid, start_ts, end_ts, crc) VALUES (?, ?, ?, ?)",
                [(sid, a, b, _coverage_crc(sid, a, b)) for a, b in new.tolist()],
            )

    def _invariant_problems(self) -> list[str]:
        conn = self._conn_()
        problems: list[str] = []
        seals = {
            sid: (sym, tfn, seal)
            for sid, sym, tfn, seal in conn.execute("SELECT sid, symbol, timeframe, seal_ts FROM series")
        }
        for key, n, first, last, codec, crc, data in conn.execute(
            "SELECT key, n, first_ts, last_ts, codec, crc, data FROM chunk"
        ):
            sid = key >> _CID_BITS
            where = f"chunk {key}"
            if sid not in seals:
                problems.append(f"{where}: belongs to no catalogued series (sid {sid})")
                continue
            sym, tfn, seal = seals[sid]
            try:
                tf = parse_timeframe(tfn)
            except MdsError as exc:
                problems.append(f"{where} of {sym} {tfn}: unknown timeframe ({exc})")
                continue
            span = _chunk_span(key, tf)
            where = f"chunk {key} of {sym} {tfn} [{span[0]}, {span[1]})"
            try:
                a = _verified(codec, crc, data)
            except _Damage as exc:
                problems.append(f"{where}: damaged, {exc} (quarantine_damaged() drops it for a refetch)")
                continue
            ts = a["ts"]
            if len(a) != n or not len(a):
                problems.append(f"{where}: holds {len(a)} rows, catalogue says {n}")
                continue
            if len(a) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
                problems.append(f"{where}: rows not sorted or not unique")
            if int(ts[0]) != first or int(ts[-1]) != last:
                problems.append(f"{where}: first/last ts {ts[0]}/{ts[-1]} differ from {first}/{last}")
            if self._key(sid, tf, int(ts[0])) != key or self._key(sid, tf, int(ts[-1])) != key:
                problems.append(f"{where}: rows outside the chunk's time span")
            if int(ts[-1]) >= seal:
                problems.append(f"{where}: rows at or after the live-edge boundary {seal}")
            if not bool(np.all(tf.aligned(ts))):
                problems.append(f"{where}: misaligned ts")
        for sid, ts, v in conn.execute("SELECT sid, ts, v FROM tail"):
            if sid not in seals:
                problems.append(f"tail row ({sid}, {ts}): belongs to no catalogued series")
                continue
            sym, tfn, seal = seals[sid]
            why = _tail_row_problem(ts, v)
            if why is not None:
                problems.append(f"tail row {sym} {tfn} {ts}: damaged, {why} (quarantine_damaged() drops it)")
            elif ts < seal:
                problems.append(f"tail row {sym} {tfn} {ts}: below the live-edge boundary {seal}")
        for sid in seals:
            sym, tfn, _ = seals[sid]
            try:
                cov = self._coverage_sid(sid)
            except DamagedChunkError as exc:
                problems.append(f"coverage of {sym} {tfn}: a row does not match its checksum ({exc.span})")
                continue
            if len(cov) and (bool(np.any(cov[:, 1] <= cov[:, 0])) or bool(np.any(cov[1:, 0] <= cov[:-1, 1]))):
                problems.append(f"coverage of {sym} {tfn}: ranges empty, unsorted, overlapping or adjacent")
            try:
                tf = parse_timeframe(tfn)
            except MdsError:
                continue
            bounds = cov[(cov != 0) & (cov != _NEG_INF) & (cov != _POS_INF)]  # 0: the start of history
            if len(bounds) and not bool(np.all(tf.aligned(bounds))):
                problems.append(f"coverage of {sym} {tfn}: a bound is not aligned to {tfn}")
        orphans = conn.execute("SELECT count(*) FROM coverage WHERE sid NOT IN (SELECT sid FROM series)").fetchall()
        if orphans[0][0]:
            problems.append(f"{orphans[0][0]} coverage rows belong to no catalogued series")
        return problems
