"""The durable tier on PostgreSQL: one candle history shared by many hosts (DESIGN.md section 7).

The layout is the SQLite tier's (:mod:`mds.tiers.sqlite`), chosen by measurement (see
docs/ARCHITECTURE.md, "PostgreSQL tier"), in tables named ``mds_*``:

- ``mds_series``: the catalog, one row per ``(symbol, timeframe)`` with a ``sid`` that never
  changes and ``seal_ts``, the live-edge boundary. Its row is the series' write lock.
- ``mds_chunk``: sealed history, chunks of up to :data:`~mds.tiers._chunks.CHUNK_SLOTS` grid slots
  keyed by ``(sid << 36) + chunk number``, the raw CANDLE_DTYPE bytes (codec 0) or, once older
  than ``compress_after_days``, an int64 delta of every word + bit shuffle + LZ4HC in a c-blosc
  1.x chunk with a CRC-32 (codec 2; schema 1's codec 1, delta + shuffle + zlib, is still read
  and recompressed by upkeep), with
  ``crc`` the :func:`~mds._checksum.row_checksum` of the decoded rows. ``data`` is stored
  EXTERNAL (out of line, never compressed by the server: codec 2 does that better).
- ``mds_tail``: the live edge, one row per ``(sid, ts)`` holding the candle and its checksum;
  folded into chunks past :data:`TAIL_MAX` rows.
- ``mds_coverage``: half-open covered ranges per series, merged, each with its checksum.
- ``mds_meta``: ``schema_version`` (2; a database at 1 is migrated by the first writer, a newer
  one is refused) and ``commit_seq``.
- ``mds_acks``: the ledger of acknowledged commits, one row per store directory (``origin``)
  holding the ``commit_seq`` of its latest commit, moved by the commit itself; a directory
  compares it with its own record to find commits the server lost
  (:class:`mds.store.changes.SharedAcks`). Added to schema 2 by the first writer of this version.

Modules, each importing only those listed before it:

- ``connection``: connecting (bounded timeout, session settings), psycopg errors translated.
- ``deadline``: the client's bound on a call when the server stops answering.
- ``schema``: the DDL, created or migrated idempotently under an advisory lock.
- ``catalog``: series ids, the per-series write lock, the series list.
- ``coverage``: coverage rows with their checksums.
- ``integrity``: naming damaged rows, quarantining them, the self-check.
- ``writes``: live-edge upserts, folding, chunk merges (binary COPY for new chunks), deleting.
- ``reads``: ranges, newest/first ``n``, the newest open time (binary results, prepared).
- ``upkeep``: compression, VACUUM/ANALYZE, the server's figures.
- ``feed``: the change feed (NOTIFY payloads, the listener thread).
- ``pool``: read-only tiers of their own connections, for reads off the Store's lock.
- ``tier``: :class:`PostgresTier`, the facade.
"""

from mds.tiers.durable import DamagedChunkError
from mds.tiers.postgres.schema import SCHEMA_VERSION
from mds.tiers.postgres.tier import PostgresTier
from mds.tiers.postgres.writes import TAIL_MAX

__all__ = ["SCHEMA_VERSION", "TAIL_MAX", "DamagedChunkError", "PostgresTier"]
