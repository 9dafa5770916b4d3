"""Upkeep of the PostgreSQL tier's tables: compressing old chunks (the SQLite tier's codec 2;
codec-1 chunks of schema 1 are recompressed to it),
the bounded scheduled step, ``maintain()`` (server-side VACUUM and ANALYZE), and the figures
the server reports (sizes, dead-tuple share, counts).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg

from mds.tiers._chunks import CODEC_COMPRESSED, CODEC_RAW, Damage, encode, verified
from mds.tiers.postgres.connection import rollback_quietly
from mds.tiers.postgres.schema import TABLES, stored_version

logger = logging.getLogger(__name__)

_COMPRESS_BATCH = 64  # chunks compressed per transaction
_SQL_VACUUM = "VACUUM (ANALYZE) mds_meta, mds_series, mds_chunk, mds_tail, mds_coverage, mds_acks"  # TABLES, ledger
_SQL_ANALYZE = "ANALYZE mds_meta, mds_series, mds_chunk, mds_tail, mds_coverage"

_SQL_DEAD = (
    "SELECT coalesce(sum(n_dead_tup), 0), coalesce(sum(n_live_tup), 0), "
    "bool_and(coalesce(last_analyze, last_autoanalyze) IS NOT NULL) "
    "FROM pg_stat_user_tables WHERE relid = ANY(%s::regclass[])"
)


def _flush_stats(conn: Any) -> None:
    """Make this session's pending table statistics visible (PostgreSQL 15+, best effort)."""
    try:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
    except psycopg.Error:
        pass


def fragmentation(conn: Any) -> tuple[float, bool]:
    """The dead-tuple share of the tier's tables, 0.0 to 1.0, as the server's statistics report
    it (they trail commits by up to a second), and whether every table was ever analyzed."""
    dead, live, analyzed = conn.execute(_SQL_DEAD, (list(TABLES),)).fetchone()
    total = int(dead) + int(live)
    return (int(dead) / total if total else 0.0), bool(analyzed)


def compress_old(conn: Any, where: str, cutoff_ms: int, deadline: float | None) -> int:
    """Compress chunks whose newest candle is older than ``cutoff_ms`` and that are raw or in an
    older codec (schema 1's codec 1) to :data:`CODEC_COMPRESSED`, oldest first, 64 per
    transaction, until none is left or ``deadline`` (perf_counter) passed; how many were
    (re)compressed.

    Needs no series lock: each update applies only if the chunk still holds the rows it read
    (same codec and checksum), so a writer's concurrent rewrite wins.
    """
    done = 0
    after = (-(1 << 63), -1)
    while True:
        conn.execute("BEGIN")
        try:
            rows = conn.execute(
                # the partial index mds_chunk_to_compress; 2 is CODEC_COMPRESSED, a literal so
                # that the planner can match the index's WHERE
                "SELECT key, last_ts, codec, crc, data FROM mds_chunk WHERE codec < 2 AND last_ts < %s "
                "AND (last_ts, key) > (%s, %s) ORDER BY last_ts, key LIMIT %s",
                (cutoff_ms, *after, _COMPRESS_BATCH),
                binary=True,
            ).fetchall()
            updates = []
            for key, last, codec, crc, data in rows:
                after = (int(last), int(key))
                try:
                    a = verified(codec, crc, data)
                except Damage as exc:  # left as it is: reads refuse it until quarantine_damaged()
                    logger.warning("PostgreSQL tier %s: not compressing chunk %d: %s", where, key, exc)
                    continue
                updates.append((CODEC_COMPRESSED, encode(a), key, codec, crc))
            if updates:
                with conn.cursor() as cur:
                    cur.executemany(
                        "UPDATE mds_chunk SET codec = %s, data = %s WHERE key = %s AND codec = %s AND crc = %s", updates
                    )
            conn.execute("COMMIT")
        except BaseException:
            rollback_quietly(conn, where)
            raise
        done += len(updates)
        if len(rows) < _COMPRESS_BATCH or (deadline is not None and time.perf_counter() > deadline):
            return done


def maintain(conn: Any, where: str, cutoff_ms: int | None, vacuum_threshold: float, force: bool) -> dict[str, Any]:
    """The work of ``PostgresTier.maintain`` (outside any transaction): its report."""
    t0 = time.perf_counter()
    _flush_stats(conn)
    before, ever_analyzed = fragmentation(conn)
    size_before = size_bytes(conn)
    compressed = 0 if cutoff_ms is None else compress_old(conn, where, cutoff_ms, None)
    vacuumed = force or before > vacuum_threshold
    analyzed = vacuumed or not ever_analyzed
    if vacuumed:
        conn.execute(_SQL_VACUUM)
    elif analyzed:
        conn.execute(_SQL_ANALYZE)
    _flush_stats(conn)
    after, _ = fragmentation(conn)
    report = {
        "fragmentation_before": before,
        "fragmentation_after": after,
        "vacuumed": vacuumed,
        "analyzed": analyzed,
        "compressed_chunks": compressed,
        "size_before": size_before,
        "size_after": size_bytes(conn),
        "problems": [],
        "seconds": time.perf_counter() - t0,
    }
    logger.info(
        "PostgreSQL tier %s maintained: dead share %.3f -> %.3f, vacuumed=%s, %d chunks compressed",
        where,
        before,
        after,
        vacuumed,
        compressed,
    )
    return report


def size_bytes(conn: Any) -> int:
    """Bytes the tier's tables take on the server (with indexes and TOAST)."""
    (n,) = conn.execute(
        "SELECT coalesce(sum(pg_total_relation_size(c)), 0) FROM unnest(%s::regclass[]) AS c", (list(TABLES),)
    ).fetchone()
    return int(n)


def stats(conn: Any, where: str) -> dict[str, Any]:
    """The figures of ``PostgresTier.stats`` (counts in one statement)."""
    series, raw, packed, older, tail = conn.execute(
        "SELECT (SELECT count(*) FROM mds_series), c.raw, c.packed, c.older, (SELECT count(*) FROM mds_tail) "
        "FROM (SELECT count(*) FILTER (WHERE codec = %s) AS raw, count(*) FILTER (WHERE codec <> %s) AS packed, "
        "count(*) FILTER (WHERE codec NOT IN (%s, %s)) AS older FROM mds_chunk) AS c",
        (CODEC_RAW, CODEC_RAW, CODEC_RAW, CODEC_COMPRESSED),
    ).fetchone()
    return {
        "url": where,
        "backend": "postgresql",
        "server_version": conn.info.server_version,
        "schema_version": stored_version(conn),  # 1 for a version-1 database read by a readonly tier
        "size_bytes": size_bytes(conn),
        "fragmentation": fragmentation(conn)[0],
        "series": int(series),
        "chunks_raw": int(raw),
        "chunks_compressed": int(packed),  # in any compressed codec
        "chunks_older_codec": int(older),
        "tail_rows": int(tail),
    }
