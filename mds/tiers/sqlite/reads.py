"""Reading candles from the SQLite tier: a range, the newest or first ``n``, the newest open
time, and the gaps of a range. Every stored row is checked before it is served.

The hot path: each function is one call from ``SqliteStore``, and the loops over chunks call
nothing but the checksum check. Functions that run several statements expect the caller's read
transaction (``SqliteStore._snapshot``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from mds import _kernels as _k
from mds.tiers.sqlite.codec import NEG_INF, POS_INF, chunk_key, concat, sorted_by_ts
from mds.tiers.sqlite.coverage import read_coverage
from mds.tiers.sqlite.integrity import chunk_checked, tail_checked
from mds.timeframes import Timeframe

_SQL_RANGE = (
    "SELECT codec, crc, key, data FROM chunk WHERE key BETWEEN ?1 AND ?2 "
    "UNION ALL "
    "SELECT -1, 0, 0, CAST(group_concat(v, x'') AS BLOB) FROM "
    "(SELECT v FROM tail WHERE sid = ?3 AND ts >= ?4 AND ts < ?5 ORDER BY ts)"
)
_SQL_TAIL_LATEST = (
    "SELECT CAST(group_concat(v, x'') AS BLOB) FROM "
    "(SELECT v FROM tail WHERE sid = ? AND ts < ? ORDER BY ts DESC LIMIT ?)"
)
_SQL_TAIL_FROM = (
    "SELECT CAST(group_concat(v, x'') AS BLOB) FROM (SELECT v FROM tail WHERE sid = ? AND ts >= ? ORDER BY ts LIMIT ?)"
)


def read_range(conn: Any, path: str, sid: int, tf: Timeframe, start: int, end: int) -> np.ndarray:
    """Candles of series ``sid`` with ``start <= ts < end`` (``start < end``), ascending; one
    statement, so one consistent snapshot."""
    parts: list[np.ndarray] = []
    args = (chunk_key(sid, tf, start), chunk_key(sid, tf, end - 1), sid, start, end)
    cur = conn.execute(_SQL_RANGE, args)
    try:
        for codec, crc, key, data in cur:
            if codec < 0:
                if data:
                    parts.append(tail_checked(conn, path, data, sid, tf, start, end))
                continue
            a = chunk_checked(conn, path, key, tf, codec, crc, data)
            ts = a["ts"]
            if ts[0] < start or ts[-1] >= end:
                i, j = np.searchsorted(ts, (start, end))
                a = a[i:j]
            if len(a):
                parts.append(a)
    finally:
        cur.close()  # an error leaves the loop early: end the read now, not when collected
    return concat(parts)


def read_latest(conn: Any, path: str, sid: int, tf: Timeframe, n: int, hi: int) -> np.ndarray:
    """The newest ``n`` (> 0) candles of series ``sid`` with ``ts < hi``, ascending."""
    data = conn.execute(_SQL_TAIL_LATEST, (sid, hi, n)).fetchall()[0][0]
    parts: list[np.ndarray] = []
    have = 0
    if data:
        t = tail_checked(conn, path, data, sid, tf, NEG_INF, hi, descending=True)
        parts.append(t)
        have = len(t)
    if have < n:
        cur = conn.execute(
            "SELECT codec, crc, key, data FROM chunk WHERE key BETWEEN ? AND ? ORDER BY key DESC",
            (chunk_key(sid, tf, NEG_INF), chunk_key(sid, tf, hi - 1)),
        )
        try:
            for codec, crc, key, blob in cur:
                a = chunk_checked(conn, path, key, tf, codec, crc, blob)
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
    return sorted_by_ts(concat(parts))


def read_from(conn: Any, path: str, sid: int, tf: Timeframe, start: int, n: int) -> np.ndarray:
    """The first ``n`` (> 0) candles of series ``sid`` with ``ts >= start``, ascending."""
    parts: list[np.ndarray] = []
    have = 0
    cur = conn.execute(
        "SELECT codec, crc, key, data FROM chunk WHERE key BETWEEN ? AND ?",
        (chunk_key(sid, tf, start), chunk_key(sid, tf, POS_INF)),
    )
    try:
        for codec, crc, key, blob in cur:
            a = chunk_checked(conn, path, key, tf, codec, crc, blob)
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
            parts.append(tail_checked(conn, path, data, sid, tf, start, POS_INF))
    return concat(parts)


def last_ts(conn: Any, sid: int, tf: Timeframe) -> int | None:
    """Open time of the newest stored candle of series ``sid``, or None."""
    row = conn.execute(
        "SELECT coalesce((SELECT max(ts) FROM tail WHERE sid = ?1), "
        "(SELECT last_ts FROM chunk WHERE key BETWEEN ?2 AND ?3 ORDER BY key DESC LIMIT 1))",
        (sid, chunk_key(sid, tf, NEG_INF), chunk_key(sid, tf, POS_INF)),
    ).fetchall()
    return None if row[0][0] is None else int(row[0][0])


def gaps(
    conn: Any, path: str, sid: int, tf: Timeframe, start: int | None, end: int | None
) -> list[tuple[int, int, Literal["missing", "no_trades"]]]:
    """Absent candles of series ``sid`` in ``[start, end)`` with their kind (see
    ``SqliteStore.gaps``); a range left None spans the series' coverage and data."""
    cov = read_coverage(conn, path, sid)
    if start is None or end is None:
        first = read_from(conn, path, sid, tf, NEG_INF, 1)
        last = last_ts(conn, sid, tf)
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
    data = read_range(conn, path, sid, tf, start, end)
    holes = _k.find_gaps(data["ts"], *tf.kernel_args, start, end)
    missing = _k.interval_subtract(holes, cov)
    no_trades = _k.interval_subtract(holes, missing)
    out: list[tuple[int, int, Literal["missing", "no_trades"]]] = [(int(a), int(b), "missing") for a, b in missing]
    out += [(int(a), int(b), "no_trades") for a, b in no_trades]
    out.sort()
    return out
