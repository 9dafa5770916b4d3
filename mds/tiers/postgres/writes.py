"""Writing candles into the PostgreSQL tier: upserting the live edge (``mds_tail``), folding it
into chunks when it grows, merging into stored chunks (new chunks by binary COPY), and deleting
a range.

Every function runs inside the caller's write transaction, after the series lock
(:meth:`Catalog.lock`), and reads stored rows only checked: merging damaged rows would store
them again under a fresh, matching checksum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mds import _kernels as _k
from mds._checksum import row_checksum
from mds.tiers._chunks import CHUNK_SLOTS, NEG_INF, POS_INF, ROW, chunk_key, empty, signed, tail_value, tail_values
from mds.tiers.postgres.catalog import Series
from mds.tiers.postgres.coverage import change_coverage
from mds.tiers.postgres.integrity import checked_chunk, checked_tail

#: A series' live-edge rows are folded into chunks once there would be more than this many.
TAIL_MAX = 16
#: New chunks of one write from this many on go in by binary COPY (one stream, not a statement each).
COPY_MIN_CHUNKS = 8

_SQL_TAIL_UPSERT = (
    "INSERT INTO mds_tail(sid, ts, v) VALUES (%s, %s, %s) ON CONFLICT (sid, ts) DO UPDATE SET v = EXCLUDED.v "
    "WHERE mds_tail.v IS DISTINCT FROM EXCLUDED.v RETURNING xmax = 0"
)
_SQL_TAIL_ALL = "SELECT string_agg(v, ''::bytea ORDER BY ts) FROM mds_tail WHERE sid = %s"
_SQL_CHUNK_INSERT = (
    "INSERT INTO mds_chunk(key, n, first_ts, last_ts, codec, crc, data) VALUES (%s, %s, %s, %s, 0, %s, %s)"
)
_SQL_CHUNK_UPDATE = (
    "UPDATE mds_chunk SET n = %s, first_ts = %s, last_ts = %s, codec = 0, crc = %s, data = %s WHERE key = %s"
)
_COPY_CHUNKS = "COPY mds_chunk(key, n, first_ts, last_ts, codec, crc, data) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ["int8", "int4", "int8", "int8", "int2", "int8", "bytea"]


def write_rows(conn: Any, where: str, s: Series, seal: int, arr: np.ndarray) -> tuple[int, int, int]:
    """Upsert the checked, non-empty batch ``arr``: rows below ``seal`` (the series' live-edge
    boundary) into chunks, the rest into the live edge. ``(inserted, updated, unchanged)``."""
    ts = arr["ts"]
    k = 0 if int(ts[0]) >= seal else len(arr) if int(ts[-1]) < seal else int(np.searchsorted(ts, seal))
    counts = write_chunks(conn, where, s, arr[:k]) if k else (0, 0, 0)
    if k < len(arr):
        hi = arr[k:]
        (tail_n,) = conn.execute("SELECT count(*) FROM mds_tail WHERE sid = %s", (s.sid,)).fetchone()
        more = _upsert_tail(conn, s.sid, hi) if tail_n + len(hi) <= TAIL_MAX else _fold(conn, where, s, hi, tail_n)
        counts = (counts[0] + more[0], counts[1] + more[1], counts[2] + more[2])
    return counts


def _upsert_tail(conn: Any, sid: int, hi: np.ndarray) -> tuple[int, int, int]:
    """Upsert live-edge rows whole (a damaged old value is replaced, nothing of it is read): the
    statement returns a row per inserted (true) or changed (false) candle, none per unchanged one."""
    tss = hi["ts"].tolist()
    with conn.cursor() as cur:
        if len(hi) == 1:
            flags = [r[0] for r in cur.execute(_SQL_TAIL_UPSERT, (sid, tss[0], tail_value(hi))).fetchall()]
        else:
            values = tail_values(hi)
            cur.executemany(_SQL_TAIL_UPSERT, [(sid, t, v) for t, v in zip(tss, values)], returning=True)
            flags = []
            while True:
                flags += [r[0] for r in cur.fetchall()]
                if not cur.nextset():
                    break
    ins = sum(1 for f in flags if f)
    return ins, len(flags) - ins, len(hi) - len(flags)


def _fold(conn: Any, where: str, s: Series, hi: np.ndarray, tail_n: int) -> tuple[int, int, int]:
    """Move the whole live edge plus ``hi`` into chunks, keeping only the newest candle as a row."""
    old = empty()
    if tail_n:
        data = conn.execute(_SQL_TAIL_ALL, (s.sid,)).fetchone()[0]
        if data:  # checked: a damaged row folded into a chunk would get a fresh, matching checksum
            old = np.ascontiguousarray(checked_tail(conn, where, s, bytes(data), NEG_INF, POS_INF))
    merged, ins, upd, unch = _k.merge(old, hi) if len(old) else (hi, len(hi), 0, 0)
    newest = merged[-1:]
    seal = int(newest["ts"][0])
    if len(merged) > 1:
        write_chunks(conn, where, s, np.ascontiguousarray(merged[:-1]))
    conn.execute("DELETE FROM mds_tail WHERE sid = %s", (s.sid,))
    conn.execute("INSERT INTO mds_tail(sid, ts, v) VALUES (%s, %s, %s)", (s.sid, seal, tail_value(newest)))
    conn.execute("UPDATE mds_series SET seal_ts = %s WHERE sid = %s", (seal, s.sid))
    return ins, upd, unch


def _chunk_row(key: int, part: np.ndarray) -> tuple[Any, ...]:
    part = np.ascontiguousarray(part)
    ts = part["ts"]
    crc = signed(row_checksum(part, 0, len(part)))
    return key, len(part), int(ts[0]), int(ts[-1]), crc, part.view(np.uint8).tobytes()


def write_chunks(conn: Any, where: str, s: Series, lo: np.ndarray) -> tuple[int, int, int]:
    """Upsert the sorted rows ``lo`` into the series' chunks: rows of chunks not stored yet are
    inserted (binary COPY when there are many), stored chunks are read checked, merged, rewritten."""
    ts = lo["ts"]
    cids = (ts - s.tf.origin_ms) // (s.tf.interval_ms * CHUNK_SLOTS)
    cut = (np.flatnonzero(cids[1:] != cids[:-1]) + 1).tolist()
    bounds = list(zip([0, *cut], [*cut, len(lo)]))
    keys = [chunk_key(s.sid, s.tf, int(ts[a])) for a, _ in bounds]
    stored = {
        int(k): (c, crc, d)
        for k, c, crc, d in conn.execute(
            "SELECT key, codec, crc, data FROM mds_chunk WHERE key = ANY(%s)", (keys,), binary=True
        ).fetchall()
    }
    ins = upd = unch = 0
    fresh: list[tuple[Any, ...]] = []
    changed: list[tuple[Any, ...]] = []
    for key, (a, b) in zip(keys, bounds):
        part = lo[a:b]
        if key not in stored:
            raw = lo.view(np.uint8)
            crc = signed(row_checksum(raw, a * ROW, b - a))
            fresh.append((key, b - a, int(ts[a]), int(ts[b - 1]), crc, raw[a * ROW : b * ROW].tobytes()))
            ins += b - a
            continue
        merged, i, u, c = _k.merge(checked_chunk(where, s, key, *stored[key]), part)
        ins, upd, unch = ins + i, upd + u, unch + c
        if i or u:
            k, n, first, last, crc, data = _chunk_row(key, merged)
            changed.append((n, first, last, crc, data, k))
    _insert_chunks(conn, fresh)
    if changed:
        with conn.cursor() as cur:
            cur.executemany(_SQL_CHUNK_UPDATE, changed)
    return ins, upd, unch


def _insert_chunks(conn: Any, rows: list[tuple[Any, ...]]) -> None:
    if len(rows) >= COPY_MIN_CHUNKS:
        with conn.cursor() as cur, cur.copy(_COPY_CHUNKS) as cp:
            cp.set_types(_COPY_TYPES)
            for key, n, first, last, crc, data in rows:
                cp.write_row((key, n, first, last, 0, crc, data))
    elif rows:
        with conn.cursor() as cur:
            cur.executemany(_SQL_CHUNK_INSERT, rows)


def delete_rows(conn: Any, where: str, s: Series, lo: int, hi: int) -> int:
    """Remove the series' candles with ``lo <= ts < hi`` and that span from its coverage; the
    number of candles removed."""
    k0, k1 = chunk_key(s.sid, s.tf, lo), chunk_key(s.sid, s.tf, hi - 1)
    (whole,) = conn.execute(
        "WITH d AS (DELETE FROM mds_chunk WHERE key BETWEEN %s AND %s AND first_ts >= %s AND last_ts < %s "
        "RETURNING n) SELECT coalesce(sum(n), 0) FROM d",
        (k0, k1, lo, hi),
    ).fetchone()
    removed = int(whole)
    edges = conn.execute(
        "SELECT key, codec, crc, data FROM mds_chunk WHERE key BETWEEN %s AND %s AND last_ts >= %s AND first_ts < %s",
        (k0, k1, lo, hi),
        binary=True,
    ).fetchall()
    for key, codec, crc, data in edges:
        a = checked_chunk(where, s, int(key), codec, crc, data)
        keep = a[(a["ts"] < lo) | (a["ts"] >= hi)]
        removed += len(a) - len(keep)
        if len(keep):
            k, n, first, last, c, d = _chunk_row(int(key), keep)
            conn.execute(_SQL_CHUNK_UPDATE, (n, first, last, c, d, k))
        else:
            conn.execute("DELETE FROM mds_chunk WHERE key = %s", (key,))
    (tail,) = conn.execute(
        "WITH d AS (DELETE FROM mds_tail WHERE sid = %s AND ts >= %s AND ts < %s RETURNING 1) SELECT count(*) FROM d",
        (s.sid, lo, hi),
    ).fetchone()
    change_coverage(conn, where, s.sid, s.symbol, s.tf.name, np.array([[lo, hi]], dtype=np.int64), add=False)
    return removed + int(tail)
