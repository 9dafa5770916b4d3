"""The SQLite tier's on-disk schema: the DDL of every version (the layout is described in
:mod:`mds.tiers.sqlite`), opening a file, creating the schema in a new one, and migrating
versions 1, 2 and 3 to 4.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from typing import Any

import apsw
import numpy as np

from mds import _kernels as _k
from mds._checksum import row_checksum
from mds._dtypes import CANDLE_DTYPE
from mds.errors import StorageUnavailableError
from mds.tiers.sqlite.catalog import Catalog
from mds.tiers.sqlite.codec import ROW, Damage, decode, signed
from mds.tiers.sqlite.connection import close_quietly, connect, pragma_int, rollback_quietly, translate
from mds.tiers.sqlite.coverage import change_coverage, coverage_crc
from mds.tiers.sqlite.writes import write_rows
from mds.timeframes import parse_timeframe

logger = logging.getLogger(__name__)

#: On-disk schema version (``PRAGMA user_version``). 1 was a row-per-candle table keyed by text;
#: 2 had chunks and tail rows without checksums; 3 had no chunk codec but 0 and 1. Version 4 may
#: hold codec-2 chunks, which an mds of version 3 would call damaged: it refuses the file instead.
SCHEMA_VERSION = 4
#: The oldest version read as it is by a reader that may not migrate (``readonly``): a version-3
#: file is a version-4 file without codec-2 chunks.
_READABLE_FROM = 3

_FIELDS: tuple[str, ...] = tuple(CANDLE_DTYPE.names or ())

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

# Tables that versions 2 to 4 share.
_SERIES = """
CREATE TABLE series(
    sid INTEGER PRIMARY KEY,
    symbol TEXT NOT NULL,
    timeframe TEXT NOT NULL,
    seal_ts INTEGER NOT NULL,
    UNIQUE (symbol, timeframe));
"""
_META = """
CREATE TABLE meta(k TEXT PRIMARY KEY, v) WITHOUT ROWID;
"""

# Version 2 (no checksums): what _migrate_v2 starts from; tests build version-2 files with it.
_SCHEMA_V2 = (
    _SERIES
    + """
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
"""
    + _META
)

# Version 3: checksums. Kept in pieces so the v2 -> v3 migration rebuilds ``chunk`` with the same
# DDL as a new file (``crc`` before ``data``: read without walking the blob's overflow pages).
_CHUNK_TABLE = """
CREATE TABLE chunk(
    key INTEGER PRIMARY KEY,      -- (sid << 36) + chunk number + 2**35
    n INTEGER NOT NULL,
    first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    crc INTEGER NOT NULL,         -- row_checksum of the decoded rows, as a signed 64-bit integer
    data BLOB NOT NULL);
"""
_SCHEMA_V3_CHUNK_INDEX = """
CREATE INDEX chunk_uncompressed ON chunk(last_ts) WHERE codec = 0;
"""
_SCHEMA_V3_CHUNK = _CHUNK_TABLE + _SCHEMA_V3_CHUNK_INDEX  # what the v2 -> v3 migration creates
# Version 4: the chunks that upkeep compresses are the raw ones and those of codec 1, which it
# recompresses to codec 2 (CODEC_COMPRESSED); one partial index finds both, oldest first.
_SCHEMA_V4_CHUNK_INDEX = """
CREATE INDEX chunk_to_compress ON chunk(last_ts) WHERE codec < 2;
"""
_SCHEMA_V3_COVERAGE = """
CREATE TABLE coverage(
    sid INTEGER NOT NULL,
    start_ts INTEGER NOT NULL,
    end_ts INTEGER NOT NULL,
    crc INTEGER NOT NULL,          -- _coverage_crc(sid, start_ts, end_ts)
    PRIMARY KEY (sid, start_ts)) WITHOUT ROWID;
"""
_SCHEMA_V4 = (
    _SERIES
    + _CHUNK_TABLE
    + _SCHEMA_V4_CHUNK_INDEX
    + """
CREATE TABLE tail(
    sid INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    v BLOB NOT NULL,               -- one CANDLE_DTYPE row (56 bytes), then its row_checksum (<u8)
    PRIMARY KEY (sid, ts)) WITHOUT ROWID;
"""
    + _SCHEMA_V3_COVERAGE
    + _META
    + """
INSERT INTO meta(k, v) VALUES ('commit_seq', 0);
"""
)
#: One statement per committed data-changing transaction (see ``SqliteStore.commit_seq``).
SQL_BUMP_SEQ = "INSERT INTO meta(k, v) VALUES ('commit_seq', 1) ON CONFLICT(k) DO UPDATE SET v = v + 1 RETURNING v"


def open_database(
    path: str, catalog: Catalog, *, readonly: bool, durable: bool, busy_timeout_ms: int, vfs: str | None
) -> tuple[Any, int]:
    """Connect to ``path`` (see :func:`~mds.tiers.sqlite.connection.connect`) and bring its schema to
    :data:`SCHEMA_VERSION` (:func:`open_schema`); the connection and its ``data_version``.

    On failure the connection is closed; apsw errors are raised as StorageUnavailableError.
    """
    conn = None
    try:
        conn = connect(path, readonly=readonly, durable=durable, busy_timeout_ms=busy_timeout_ms, vfs=vfs)
        open_schema(conn, path, readonly, catalog)
        return conn, pragma_int(conn, "data_version")
    except BaseException as exc:
        if conn is not None:
            close_quietly(conn, path)
        if isinstance(exc, apsw.Error):
            raise translate(exc, path) from exc
        raise


def open_schema(conn: Any, path: str, readonly: bool, catalog: Catalog) -> None:
    """Check the file's schema version; create the schema in a new file, or migrate an older one
    (one write transaction; a migration that rewrites rows, from version 1 or 2, counts as one
    commit of ``commit_seq``).

    Raises StorageUnavailableError for a newer version, a file with tables but no version, or a
    version older than 3 opened ``readonly`` (a version-3 file is read as it is). On failure
    nothing changed and ``catalog`` is cleared.
    """
    version = pragma_int(conn, "user_version")
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StorageUnavailableError(
            f"SQLite store {path} has schema version {version}, newer than this mds ({SCHEMA_VERSION}): upgrade mds"
        )
    if readonly and version >= _READABLE_FROM:
        return
    if readonly:
        raise StorageUnavailableError(
            f"SQLite store {path} has schema version {version} and needs a migration: open it once with a writer"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = pragma_int(conn, "user_version")  # another process may have won the race
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'table'").fetchall()[0][0]
            if tables:
                raise StorageUnavailableError(
                    f"SQLite store {path} holds tables but no mds schema version: not an mds database"
                )
            conn.execute(_SCHEMA_V4)
        elif version == 1:
            _migrate_v1(conn, path, catalog)
        elif version in (2, 3):
            if version == 2:
                _migrate_v2(conn, path)
            _migrate_v3(conn, path)
        if version < SCHEMA_VERSION:
            if 0 < version < 3:
                conn.execute(SQL_BUMP_SEQ).fetchall()  # a migration that rewrites the data: one commit
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn, path)
        catalog.clear()
        raise


def _migrate_v1(conn: Any, path: str, catalog: Catalog) -> None:
    """v1 (row per candle keyed by text) -> v4 (catalog, chunks, tail), inside the open transaction."""
    logger.info("SQLite store %s: migrating schema 1 -> %d", path, SCHEMA_VERSION)
    conn.execute("ALTER TABLE candles RENAME TO v1_candles; ALTER TABLE coverage RENAME TO v1_coverage;")
    conn.execute(_SCHEMA_V4)
    pairs = conn.execute(
        "SELECT DISTINCT symbol, timeframe FROM v1_candles UNION SELECT DISTINCT symbol, timeframe FROM v1_coverage"
    ).fetchall()
    for symbol, tfname in pairs:
        tf = parse_timeframe(tfname)
        sid = catalog.sid_for_write(conn, symbol, tf)
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
            write_rows(conn, path, sid, tf, out, catalog.seal_state(conn, sid))
        cov = conn.execute(
            "SELECT start_ts, end_ts FROM v1_coverage WHERE symbol = ? AND timeframe = ?", (symbol, tfname)
        ).fetchall()
        if cov:
            change_coverage(conn, path, sid, _k.interval_normalize(np.array(cov, dtype=np.int64)), add=True)
    conn.execute("DROP TABLE v1_candles; DROP TABLE v1_coverage;")


def _migrate_v2(conn: Any, path: str) -> None:
    """v2 -> v3 (checksums), inside the open transaction.

    ``chunk`` is rebuilt with a ``crc`` column (an UPDATE would rewrite every row as well) and
    every tail value gets its checksum appended. The checksums are those of the rows as they
    are now: damage that happened before this migration cannot be told from data. A chunk that
    does not decode keeps a checksum of 0, so it stays refused as damaged.
    """
    logger.info("SQLite store %s: migrating schema 2 -> 3 (checksums)", path)
    conn.execute("DROP INDEX chunk_uncompressed; ALTER TABLE chunk RENAME TO v2_chunk;")
    conn.execute(_SCHEMA_V3_CHUNK)

    def chunks() -> Iterator[tuple[Any, ...]]:
        for key, n, first, last, codec, data in conn.execute(
            "SELECT key, n, first_ts, last_ts, codec, data FROM v2_chunk"
        ):
            try:
                a = decode(codec, data)
                crc = signed(row_checksum(a, 0, len(a))) if len(a) else 0
            except (Damage, zlib.error, ValueError) as exc:
                logger.warning("SQLite store %s: v2 chunk %d does not decode (%s); kept as damaged", path, key, exc)
                crc = 0
            yield key, n, first, last, codec, crc, data

    # a second connection-level cursor reads v2_chunk while executemany inserts into chunk
    conn.executemany(
        "INSERT INTO chunk(key, n, first_ts, last_ts, codec, crc, data) VALUES (?, ?, ?, ?, ?, ?, ?)", chunks()
    )
    conn.execute("DROP TABLE v2_chunk")
    fixed = []
    for sid, ts, v in conn.execute("SELECT sid, ts, v FROM tail").fetchall():
        if isinstance(v, bytes) and len(v) == ROW:
            fixed.append((v + row_checksum(v, 0, 1).to_bytes(8, "little"), sid, ts))
        else:  # malformed already: left as it is, refused as damaged
            logger.warning("SQLite store %s: v2 tail row (%d, %d) is malformed; kept as damaged", path, sid, ts)
    conn.executemany("UPDATE tail SET v = ? WHERE sid = ? AND ts = ?", fixed)
    conn.execute("ALTER TABLE coverage RENAME TO v2_coverage")
    conn.execute(_SCHEMA_V3_COVERAGE)
    conn.executemany(
        "INSERT INTO coverage(sid, start_ts, end_ts, crc) VALUES (?, ?, ?, ?)",
        [
            (sid, a, b, coverage_crc(sid, a, b))
            for sid, a, b in conn.execute("SELECT sid, start_ts, end_ts FROM v2_coverage").fetchall()
        ],
    )
    conn.execute("DROP TABLE v2_coverage")
    conn.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('commit_seq', 0)")


def _migrate_v3(conn: Any, path: str) -> None:
    """v3 -> v4 (codec 2), inside the open transaction: the compression index alone changes.

    No chunk is rewritten here: recompressing codec-1 chunks costs about 0.6 ms each (years of
    1m history are thousands of chunks a market), too long for the write lock a migration holds
    while the file is opened. Upkeep recompresses them instead, oldest first, within its time
    budget (all of them in ``maintain()``); codec 1 stays readable meanwhile.
    """
    logger.info("SQLite store %s: migrating schema 3 -> 4 (codec 2 for old chunks)", path)
    conn.execute("DROP INDEX chunk_uncompressed")
    conn.execute(_SCHEMA_V4_CHUNK_INDEX)
