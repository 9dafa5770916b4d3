"""The PostgreSQL tier's coverage rows (``mds_coverage``): half-open covered ranges per series,
kept merged, each with the checksum the SQLite tier uses (bound to its series); reading them
checked, adding or subtracting ranges, dropping damaged rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mds import _kernels as _k
from mds.tiers._chunks import EMPTY_RANGES, coverage_crc
from mds.tiers.durable import DamagedChunkError
from mds.tiers.postgres.catalog import SQL_STALE, StaleCatalog

_SQL_ROWS = "SELECT start_ts, end_ts, crc FROM mds_coverage WHERE sid = %s"
#: The rows, and a row of NULLs (sorted last) when the cached sid names another series now.
_SQL_READ = f"{_SQL_ROWS} UNION ALL SELECT NULL, NULL, NULL WHERE {SQL_STALE} ORDER BY 1"


def _bad_rows(sid: int, rows: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b, crc in rows if coverage_crc(sid, a, b) != crc]


def read_coverage(conn: Any, where: str, sid: int, symbol: str, tfname: str) -> np.ndarray:
    """The series' coverage, ``(k, 2)`` int64; DamagedChunkError when a row fails its checksum
    (a wrong bound would label never-fetched slots no_trades)."""
    rows = conn.execute(_SQL_READ, (sid, sid, symbol, tfname)).fetchall()
    if rows and rows[-1][0] is None:  # NULL sorts last
        raise StaleCatalog(symbol)
    if not rows:
        return EMPTY_RANGES.copy()
    bad = _bad_rows(sid, rows)
    if bad:
        a, b = bad[0]
        raise DamagedChunkError(
            f"PostgreSQL tier {where}: a coverage row of {symbol} {tfname} ([{a}, {b})) does not match its "
            "checksum; it was not used. Drop it with quarantine_damaged() (its span becomes missing and is refetched)",
            symbol,
            tfname,
            a,
            b if b > a else a + 1,
        )
    return np.array([r[:2] for r in rows], dtype=np.int64).reshape(-1, 2)


def change_coverage(conn: Any, where: str, sid: int, symbol: str, tfname: str, ranges: np.ndarray, add: bool) -> None:
    """Merge (``add``) or subtract normalized ``ranges``; the rows are rewritten only if changed."""
    old = read_coverage(conn, where, sid, symbol, tfname)
    new = _k.interval_union(old, ranges) if add else _k.interval_subtract(old, ranges)
    if old.shape == new.shape and np.array_equal(old, new):
        return
    conn.execute("DELETE FROM mds_coverage WHERE sid = %s", (sid,))
    if len(new):
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO mds_coverage(sid, start_ts, end_ts, crc) VALUES (%s, %s, %s, %s)",
                [(sid, a, b, coverage_crc(sid, a, b)) for a, b in new.tolist()],
            )


def drop_damaged_coverage(conn: Any, sid: int) -> list[tuple[int, int]]:
    """Delete the series' coverage rows that fail their checksum; their spans (never empty)."""
    bad = _bad_rows(sid, conn.execute(_SQL_ROWS, (sid,)).fetchall())
    if bad:
        conn.execute("DELETE FROM mds_coverage WHERE sid = %s AND start_ts = ANY(%s)", (sid, [a for a, _ in bad]))
    return [(a, b if b > a else a + 1) for a, b in bad]
