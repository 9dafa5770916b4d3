"""Upkeep of the SQLite tier's file: compressing old chunks (raw ones, and codec-1 ones to codec
2), the bounded step a writer runs after commits, ``maintain()`` (VACUUM, ANALYZE, REINDEX,
checkpoint), and the file's figures (size, fragmentation, counts).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from typing import Any, Protocol

import apsw
import numpy as np

from mds.errors import MdsError
from mds.tiers.sqlite.codec import CODEC_COMPRESSED, CODEC_RAW, Damage, encode, verified
from mds.tiers.sqlite.connection import Snapshot, pragma_int
from mds.tiers.sqlite.integrity import sqlite_problems

logger = logging.getLogger(__name__)

_COMPRESS_BUDGET_S = 0.05  # time one scheduled maintenance run may spend compressing
_INCREMENTAL_VACUUM_PAGES = 4096  # pages one scheduled run may hand back to the file system

Transaction = Callable[[], AbstractContextManager[Any]]


class Settings(Protocol):
    """The upkeep settings. Their one home is the store (``SqliteStore``'s attributes, assignable
    at any time): every call here reads them from it at each use."""

    vacuum_threshold: float
    maintenance_interval_s: float | None
    compress_after_days: float | None


class Upkeep:
    """When and how one SQLite file is maintained: when the next scheduled step is due, and the
    work. The store passes its connection, its ``transaction`` and its :class:`Settings` to each
    call (compression commits in batches of 64 chunks), and calls :meth:`reschedule` once its
    file is open.
    """

    __slots__ = ("_clock", "_next_s", "path")

    def __init__(self, path: str, clock: Callable[[], int]) -> None:
        self.path = path
        self._clock = clock
        self._next_s = 0.0

    def _now_s(self) -> float:
        return self._clock() / 1000.0

    def reschedule(self, settings: Settings) -> None:
        """The next scheduled step is due ``maintenance_interval_s`` from now."""
        self._next_s = self._now_s() + (settings.maintenance_interval_s or 0.0)

    def run_due(self, conn: Any, transaction: Transaction, settings: Settings) -> bool:
        """Run the bounded scheduled step if ``maintenance_interval_s`` has passed since the last
        (outside a transaction); whether it ran. A failed step is logged and retried next time."""
        if settings.maintenance_interval_s is None:
            return False
        now = self._now_s()
        if now < self._next_s:
            return False
        self._next_s = now + settings.maintenance_interval_s
        try:
            self._scheduled_step(conn, transaction, settings)
        except (apsw.Error, MdsError) as exc:
            logger.warning("SQLite store %s: scheduled maintenance failed (will retry): %s", self.path, exc)
        return True

    def _scheduled_step(self, conn: Any, transaction: Transaction, settings: Settings) -> None:
        """Bounded work after a commit: compress some old chunks, hand free pages back, optimize."""
        n = self._compress_old(conn, transaction, settings.compress_after_days, budget_s=_COMPRESS_BUDGET_S)
        frag = fragmentation(conn)
        if frag > settings.vacuum_threshold:
            if pragma_int(conn, "auto_vacuum") == 2:
                # frees one page per step: the statement must be run to its end, not just started
                conn.execute(f"PRAGMA incremental_vacuum({_INCREMENTAL_VACUUM_PAGES})").fetchall()
            else:
                logger.info("SQLite store %s: fragmentation %.3f; call maintain() to VACUUM", self.path, frag)
        _optimize(conn)
        logger.debug("SQLite store %s: scheduled maintenance compressed %d chunks", self.path, n)

    def maintain(self, conn: Any, transaction: Transaction, settings: Settings, force: bool) -> dict[str, Any]:
        """The work of ``SqliteStore.maintain`` (outside any transaction): its report."""
        path = self.path
        t0 = time.perf_counter()
        report: dict[str, Any] = {
            "fragmentation_before": fragmentation(conn),
            "page_fragmentation_before": page_fragmentation(conn),
            "size_before": size_bytes(path),
        }
        report["compressed_chunks"] = self._compress_old(conn, transaction, settings.compress_after_days, budget_s=None)
        problems = sqlite_problems(conn, full=force)
        reindexed = False
        if any("index" in p for p in problems):
            logger.warning("SQLite store %s: index problems, running REINDEX: %s", path, problems[:3])
            conn.execute("REINDEX")
            reindexed = True
            problems = sqlite_problems(conn, full=True)
        frag = fragmentation(conn)
        vacuumed = False
        if force or frag > settings.vacuum_threshold:
            _checkpoint(conn, path)
            conn.execute("VACUUM")
            vacuumed = True
        if force or vacuumed or not _has_stats(conn):
            conn.execute("ANALYZE")
            analyzed = True
        else:
            analyzed = _optimize(conn)
        _checkpoint(conn, path)
        conn.execute("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)", ("last_maintenance_ms", int(self._clock())))
        report.update(
            fragmentation_after=fragmentation(conn),
            page_fragmentation_after=page_fragmentation(conn),
            size_after=size_bytes(path),
            vacuumed=vacuumed,
            analyzed=analyzed,
            reindexed=reindexed,
            problems=problems,
            seconds=time.perf_counter() - t0,
        )
        self.reschedule(settings)
        logger.info(
            "SQLite store %s maintained: fragmentation %.3f -> %.3f, vacuumed=%s, %d chunks compressed",
            path,
            report["fragmentation_before"],
            report["fragmentation_after"],
            vacuumed,
            report["compressed_chunks"],
        )
        return report

    def _compress_old(
        self, conn: Any, transaction: Transaction, compress_after_days: float | None, budget_s: float | None
    ) -> int:
        """Compress chunks whose newest candle is older than ``compress_after_days`` (None: none)
        and that are raw or in an older codec (schema 3's codec 1), to :data:`CODEC_COMPRESSED`,
        oldest first, 64 per transaction, until none is left or ``budget_s`` has passed; how many
        were (re)compressed."""
        if compress_after_days is None:
            return 0
        cutoff = int(self._clock() - compress_after_days * 86_400_000)
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        done = 0
        after = (-(1 << 63), -1)  # (last_ts, key) seen last: a damaged chunk left raw is not selected again
        while True:
            with transaction():
                # walks the partial index chunk_to_compress (last_ts, rowid) in order; 2 is
                # CODEC_COMPRESSED, a literal so that the planner can match the index's WHERE
                rows = conn.execute(
                    "SELECT key, last_ts, codec, crc, data FROM chunk "
                    "WHERE codec < 2 AND last_ts < ?1 AND (last_ts, key) > (?2, ?3) ORDER BY last_ts, key LIMIT 64",
                    (cutoff, *after),
                ).fetchall()
                for key, last_ts, codec, crc, data in rows:
                    after = (last_ts, key)
                    try:
                        a = verified(codec, crc, data)
                    except Damage as exc:
                        # left as it is: reads keep refusing it until quarantine_damaged() drops it
                        logger.warning("SQLite store %s: not compressing chunk %d: %s", self.path, key, exc)
                        continue
                    # stored compressed even in the rare case it does not shrink, so it is not retried;
                    # crc stays: it is the checksum of the decoded rows
                    conn.execute(
                        "UPDATE chunk SET codec = ?, data = ? WHERE key = ?",
                        (CODEC_COMPRESSED, encode(a), key),
                    )
                    done += 1
            if len(rows) < 64 or (deadline is not None and time.perf_counter() > deadline):
                return done


def _optimize(conn: Any) -> bool:
    """``PRAGMA optimize``; returns whether it recomputed statistics (ran an ANALYZE).

    SQLite does not report what optimize did, so its debug form (mask bit 0x01 added to the
    default 0xfffe) first lists the ANALYZE statements it would run, on this connection, now.
    """
    planned = conn.execute("PRAGMA optimize(0xffff)").fetchall()
    conn.execute("PRAGMA optimize").fetchall()
    return bool(planned)


def _checkpoint(conn: Any, path: str) -> None:
    """``PRAGMA wal_checkpoint(TRUNCATE)``, stepped to its end (it returns a row)."""
    busy, log, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
    if busy:
        logger.info("SQLite store %s: WAL checkpoint incomplete (%s of %s frames): readers hold it", path, done, log)


def _has_stats(conn: Any) -> bool:
    return bool(conn.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'sqlite_stat1'").fetchall()[0][0])


# ---------------------------------------------------------------------------- figures
def size_bytes(path: str) -> int:
    """Bytes on disk: the database file plus its WAL."""
    total = 0
    for p in (path, path + "-wal"):
        with suppress(OSError):
            total += os.path.getsize(p)
    return total


def fragmentation(conn: Any) -> float:
    """Share of the file's pages that are free (0.0 to 1.0); cheap (two pragmas)."""
    pages = pragma_int(conn, "page_count")
    return pragma_int(conn, "freelist_count") / pages if pages else 0.0


def page_fragmentation(conn: Any, max_pages: int = 1 << 18) -> float | None:
    """Share of B-tree pages not stored right after their predecessor in key order (see
    ``SqliteStore.page_fragmentation``); None when too large or dbstat is unavailable."""
    try:
        if pragma_int(conn, "page_count") > max_pages:
            return None
        rows = conn.execute("SELECT name, pageno FROM dbstat WHERE pagetype != 'overflow'").fetchall()
    except apsw.SQLError:
        return None
    if len(rows) < 2:
        return 0.0
    names = np.array([hash(r[0]) for r in rows])
    pages = np.array([r[1] for r in rows], dtype=np.int64)
    same = names[1:] == names[:-1]
    jumps = same & (np.diff(pages) != 1)
    return float(jumps.sum()) / max(int(same.sum()), 1)


def stats(conn: Any, path: str, in_txn: bool) -> dict[str, Any]:
    """The figures of ``SqliteStore.stats`` but ``readonly`` (the counts read in one snapshot)."""
    with Snapshot(conn, in_txn):
        series = conn.execute("SELECT count(*) FROM series").fetchall()[0][0]
        chunks = dict(conn.execute("SELECT codec, count(*) FROM chunk GROUP BY codec").fetchall())
        tail = conn.execute("SELECT count(*) FROM tail").fetchall()[0][0]
        version = pragma_int(conn, "user_version")  # 3 for a version-3 file opened readonly
    raw = int(chunks.pop(CODEC_RAW, 0))
    return {
        "path": path,
        "schema_version": version,
        "size_bytes": size_bytes(path),
        "fragmentation": fragmentation(conn),
        "series": int(series),
        "chunks_raw": raw,
        "chunks_compressed": int(sum(chunks.values())),  # in any compressed codec
        "chunks_older_codec": int(sum(v for k, v in chunks.items() if k != CODEC_COMPRESSED)),
        "tail_rows": int(tail),
    }
