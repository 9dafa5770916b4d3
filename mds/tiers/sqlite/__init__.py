"""The durable tier: full candle history and coverage in one SQLite file, through apsw.

Layout (schema version 4; the measurements behind it are in docs/ARCHITECTURE.md, "SQLite tier"):

- ``series``: the catalog. One row per ``(symbol, timeframe)`` with an integer ``sid`` that never
  changes (rows are kept when a series is deleted) and ``seal_ts``, the live-edge boundary.
- ``chunk``: sealed history. Candles with ``ts < seal_ts`` live in chunks of up to
  :data:`CHUNK_SLOTS` grid slots, stored as the raw CANDLE_DTYPE bytes (codec 0) or, once older
  than ``compress_after_days``, an int64 delta of every word + bit shuffle + LZ4HC in a c-blosc
  1.x chunk with a CRC-32 (codec 2; schema 3's delta + byte shuffle + zlib, codec 1, is still
  read, and upkeep recompresses it to codec 2: see :mod:`mds.tiers._chunks`). A partial index
  finds the chunks upkeep compresses (``codec < 2``), oldest first. The rowid packs
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

Modules, each importing only those listed before it:

- ``codec``: chunk keys and spans, the chunk codec, tail values, checksum checks (no SQL).
- ``connection``: opening the apsw connection, pragmas, read snapshots, apsw errors translated.
- ``catalog``: ``(symbol, timeframe)`` to ``sid``, the writer's live-edge state, the series list.
- ``coverage``: coverage rows with their checksums: read, add, subtract, drop damaged ones.
- ``integrity``: naming damaged rows, quarantining them, the full self-check.
- ``writes``: batch checks, upserting tail rows and chunks, folding the live edge, deleting.
- ``reads``: ranges, newest/first ``n``, the newest open time, gaps (the hot path).
- ``schema``: the DDL of every version, creating a file, migrating versions 1 to 3.
- ``upkeep``: compression, the scheduled step, ``maintain()``, the file's figures.
- ``store``: :class:`SqliteStore`, the facade: the connection's transactions and the public calls.
"""

from mds.tiers.durable import DamagedChunkError
from mds.tiers.sqlite.codec import CHUNK_SLOTS
from mds.tiers.sqlite.schema import SCHEMA_VERSION
from mds.tiers.sqlite.store import SqliteStore
from mds.tiers.sqlite.writes import TAIL_MAX

__all__ = ["CHUNK_SLOTS", "SCHEMA_VERSION", "TAIL_MAX", "DamagedChunkError", "SqliteStore"]
