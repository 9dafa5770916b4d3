"""The SQLite tier's coverage rows: half-open covered ranges per series, kept merged, each with a
checksum bound to its series; reading them (damaged rows are never used), adding and subtracting
ranges, and dropping damaged rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mds import _kernels as _k
from mds.tiers._chunks import EMPTY_RANGES, coverage_crc
from mds.tiers.durable import DamagedChunkError


def read_coverage(conn: Any, path: str, sid: int) -> np.ndarray:
    """The series' coverage; DamagedChunkError when a row fails its checksum (never served:
    a wrong bound would label never-fetched slots no_trades)."""
    rows = conn.execute("SELECT start_ts, end_ts, crc FROM coverage WHERE sid = ? ORDER BY start_ts", (sid,)).fetchall()
    if not rows:
        return EMPTY_RANGES.copy()
    for a, b, crc in rows:
        if coverage_crc(sid, a, b) != crc:
            symbol, tfname = conn.execute("SELECT symbol, timeframe FROM series WHERE sid = ?", (sid,)).fetchall()[0]
            raise DamagedChunkError(
                f"SQLite store {path}: a coverage row of {symbol} {tfname} ([{a}, {b})) does not match "
                "its checksum; it was not used. Drop it with quarantine_damaged() (its span becomes missing "
                "and is refetched), or restore a backup",
                symbol,
                tfname,
                int(a),
                int(b) if b > a else int(a) + 1,
            )
    return np.array([r[:2] for r in rows], dtype=np.int64).reshape(-1, 2)


def change_coverage(conn: Any, path: str, sid: int, ranges: np.ndarray, *, add: bool) -> None:
    """Add (or subtract) normalized ``ranges`` to the series' coverage; rewrites it if it changed."""
    cur = read_coverage(conn, path, sid)
    new = _k.interval_union(cur, ranges) if add else _k.interval_subtract(cur, ranges)
    if new.shape == cur.shape and bool(np.all(new == cur)):
        return
    conn.execute("DELETE FROM coverage WHERE sid = ?", (sid,))
    if len(new):
        conn.executemany(
            "INSERT INTO coverage(sid, start_ts, end_ts, crc) VALUES (?, ?, ?, ?)",
            [(sid, a, b, coverage_crc(sid, a, b)) for a, b in new.tolist()],
        )


def drop_damaged_coverage(conn: Any, sid: int) -> list[tuple[int, int]]:
    """Delete the series' coverage rows that fail their checksum; their spans."""
    bad = [
        (int(a), int(b))
        for a, b, crc in conn.execute("SELECT start_ts, end_ts, crc FROM coverage WHERE sid = ?", (sid,)).fetchall()
        if coverage_crc(sid, a, b) != crc
    ]
    conn.executemany("DELETE FROM coverage WHERE sid = ? AND start_ts = ?", [(sid, a) for a, _ in bad])
    return [(a, b if b > a else a + 1) for a, b in bad]
