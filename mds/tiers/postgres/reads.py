"""Reading candles from the PostgreSQL tier: a range (one statement, so one snapshot), the newest
or first ``n``, and the newest open time. Every stored row is checked before it is served.

The hot path: rows come back in binary (``bytea`` as bytes, no hex decoding), statements run
prepared, and a chunk's rows are a view of the bytes received until they are copied into the
answer. Functions that run several statements expect the caller's snapshot
(``PostgresTier._snapshot``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mds.tiers._chunks import CHUNK_SLOTS, NEG_INF, POS_INF, chunk_key, concat, empty, sorted_by_ts
from mds.tiers.postgres.catalog import SQL_STALE, Series, StaleCatalog
from mds.tiers.postgres.integrity import checked_chunk, checked_tail

_TAIL_KEY = (1 << 63) - 1  # sorts the live edge after every chunk
_STALE_KEY = -2  # the row of _SQL_RANGE saying the series id is stale
_SQL_RANGE = (
    "SELECT key, codec, crc, data FROM mds_chunk WHERE key BETWEEN %s AND %s "
    "UNION ALL "
    "SELECT %s::bigint, -1::smallint, 0::bigint, string_agg(v, ''::bytea ORDER BY ts) "
    "FROM mds_tail WHERE sid = %s AND ts >= %s AND ts < %s "
    f"UNION ALL SELECT {_STALE_KEY}::bigint, 0::smallint, 0::bigint, NULL::bytea WHERE {SQL_STALE}"
)
_SQL_TAIL_LATEST = (
    f"SELECT string_agg(v, ''::bytea ORDER BY ts DESC), {SQL_STALE} FROM "
    "(SELECT ts, v FROM mds_tail WHERE sid = %s AND ts < %s ORDER BY ts DESC LIMIT %s) t"
)
_SQL_TAIL_FROM = (
    "SELECT string_agg(v, ''::bytea ORDER BY ts) FROM "
    "(SELECT ts, v FROM mds_tail WHERE sid = %s AND ts >= %s ORDER BY ts LIMIT %s) t"
)
_SQL_CHECK = f"SELECT {SQL_STALE}"
_SQL_LAST_TS = (
    "SELECT coalesce((SELECT max(ts) FROM mds_tail WHERE sid = %s), "
    "(SELECT last_ts FROM mds_chunk WHERE key BETWEEN %s AND %s ORDER BY key DESC LIMIT 1)), "
    f"{SQL_STALE}"
)
_SQL_CHUNKS_DOWN = "SELECT key, codec, crc, data FROM mds_chunk WHERE key BETWEEN %s AND %s ORDER BY key DESC LIMIT %s"
_SQL_CHUNKS_UP = "SELECT key, codec, crc, data FROM mds_chunk WHERE key BETWEEN %s AND %s ORDER BY key LIMIT %s"


def read_range(conn: Any, where: str, s: Series, start: int, end: int) -> np.ndarray:
    """Candles of the series with ``start <= ts < end`` (``start < end``), ascending."""
    rows = conn.execute(
        _SQL_RANGE,
        (chunk_key(s.sid, s.tf, start), chunk_key(s.sid, s.tf, end - 1), _TAIL_KEY, s.sid, start, end, *s.key),
        binary=True,
    ).fetchall()
    if any(r[0] == _STALE_KEY for r in rows):  # UNION ALL promises no order
        raise StaleCatalog(s.symbol)
    if len(rows) > 2:
        rows.sort(key=lambda r: r[0])  # the server does not promise the chunks' order
    parts = [
        checked_tail(conn, where, s, data, start, end) if codec < 0 else checked_chunk(where, s, key, codec, crc, data)
        for key, codec, crc, data in rows
        if data
    ]
    if not parts:
        return empty()
    # only the first chunk can start before ``start`` and only the last end at or after ``end``
    parts[0] = parts[0][np.searchsorted(parts[0]["ts"], start) :]
    parts[-1] = parts[-1][: np.searchsorted(parts[-1]["ts"], end)]
    return concat(parts)


def _batch(need: int) -> int:
    """How many chunks to ask for when ``need`` more rows are wanted (chunks may be sparse: the
    caller asks again for the rest)."""
    return min(need // CHUNK_SLOTS + 2, 64)


def _walk(conn: Any, where: str, s: Series, lo_key: int, hi_key: int, n: int, descending: bool) -> list[np.ndarray]:
    """Checked chunks of the key range ``[lo_key, hi_key]`` in key order (or its reverse), asked
    for in batches until they hold at least ``n`` rows or the range is exhausted."""
    out: list[np.ndarray] = []
    have = 0
    while have < n and lo_key <= hi_key:
        args = (lo_key, hi_key, _batch(n - have))
        if descending:
            rows = conn.execute(_SQL_CHUNKS_DOWN, args, binary=True).fetchall()
        else:
            rows = conn.execute(_SQL_CHUNKS_UP, args, binary=True).fetchall()
        if not rows:
            break
        for key, codec, crc, blob in rows:
            out.append(checked_chunk(where, s, key, codec, crc, blob))
            have += len(out[-1])
        if descending:
            hi_key = int(rows[-1][0]) - 1
        else:
            lo_key = int(rows[-1][0]) + 1
    return out


def read_latest(conn: Any, where: str, s: Series, n: int, hi: int) -> np.ndarray:
    """The newest ``n`` (> 0) candles of the series with ``ts < hi``, ascending: the live edge's
    newest, then whole chunks downwards until ``n`` are found, cut once at the end."""
    data, stale = conn.execute(_SQL_TAIL_LATEST, (*s.key, s.sid, hi, n), binary=True).fetchone()
    if stale:
        raise StaleCatalog(s.symbol)
    tail = checked_tail(conn, where, s, data, NEG_INF, hi, descending=True) if data else empty()
    parts = [tail]
    if len(tail) < n:
        top = chunk_key(s.sid, s.tf, hi - 1)
        chunks = _walk(conn, where, s, chunk_key(s.sid, s.tf, NEG_INF), top, n - len(tail) + CHUNK_SLOTS, True)
        parts = [*chunks[::-1], tail]
    a = sorted_by_ts(concat(parts))
    a = a[: np.searchsorted(a["ts"], hi)]
    return a[max(0, len(a) - n) :].copy()


def read_from(conn: Any, where: str, s: Series, start: int, n: int) -> np.ndarray:
    """The first ``n`` (> 0) candles of the series with ``ts >= start``, ascending: whole chunks
    upwards until ``n`` are found, then the live edge, cut once at the end."""
    check_series(conn, s)
    low = chunk_key(s.sid, s.tf, start)
    parts = _walk(conn, where, s, low, chunk_key(s.sid, s.tf, POS_INF), n + CHUNK_SLOTS, False)
    a = concat(parts)
    a = a[np.searchsorted(a["ts"], start) :]
    if len(a) < n:
        data = conn.execute(_SQL_TAIL_FROM, (s.sid, start, n - len(a)), binary=True).fetchone()[0]
        if data:
            a = concat([a, checked_tail(conn, where, s, data, start, POS_INF)])
    return a[:n].copy()


def last_ts(conn: Any, s: Series) -> int | None:
    """Open time of the newest stored candle of the series, or None."""
    row = conn.execute(
        _SQL_LAST_TS, (s.sid, chunk_key(s.sid, s.tf, NEG_INF), chunk_key(s.sid, s.tf, POS_INF), *s.key)
    ).fetchone()
    if row[1]:
        raise StaleCatalog(s.symbol)
    return None if row[0] is None else int(row[0])


def check_series(conn: Any, s: Series) -> None:
    """Raise StaleCatalog when the cached id no longer names the series."""
    if conn.execute(_SQL_CHECK, s.key).fetchone()[0]:
        raise StaleCatalog(s.symbol)
