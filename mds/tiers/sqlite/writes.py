"""Writing candles into the SQLite tier: upserting the live edge as tail rows, folding it into
chunks when it grows, merging into stored chunks, and deleting a range (a batch is checked by
:func:`mds.tiers._chunks.check_batch`, re-exported here).

Every function runs inside the caller's write transaction and reads stored rows only checked:
merging damaged rows would store them again under a fresh, matching checksum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mds import _kernels as _k
from mds._checksum import row_checksum
from mds.tiers.sqlite.catalog import Catalog
from mds.tiers.sqlite.codec import (
    CHUNK_SLOTS,
    NEG_INF,
    POS_INF,
    ROW,
    _row_ok as _row_ok,
    check_batch as check_batch,
    chunk_key,
    empty,
    signed,
    tail_value,
    tail_values,
)
from mds.tiers.sqlite.coverage import change_coverage
from mds.tiers.sqlite.integrity import chunk_checked, tail_checked
from mds.timeframes import Timeframe

#: A series' live-edge rows are folded into chunks once there are more than this many.
TAIL_MAX = 16

SQL_TAIL_RANGE = (
    "SELECT CAST(group_concat(v, x'') AS BLOB) FROM "
    "(SELECT v FROM tail WHERE sid = ? AND ts >= ? AND ts < ? ORDER BY ts)"
)


def write_batch(
    conn: Any, path: str, catalog: Catalog, symbol: str, tf: Timeframe, arr: np.ndarray, cov: np.ndarray | None
) -> tuple[int, int, int]:
    """Upsert the checked batch ``arr`` of a series (created if new) and add the normalized ranges
    ``cov`` to its coverage; ``(inserted, updated, unchanged)``."""
    sid = catalog.sid_for_write(conn, symbol, tf)
    counts = write_rows(conn, path, sid, tf, arr, catalog.seal_state(conn, sid)) if len(arr) else (0, 0, 0)
    if cov is not None and len(cov):
        change_coverage(conn, path, sid, cov, add=True)
    return counts


def write_rows(conn: Any, path: str, sid: int, tf: Timeframe, arr: np.ndarray, st: list[int]) -> tuple[int, int, int]:
    """Upsert the checked, non-empty batch ``arr``: rows below the series' ``seal_ts`` into
    chunks, the rest into the live edge. ``st`` is the series' seal state (updated in place).
    Returns ``(inserted, updated, unchanged)``."""
    seal, tail_n, _ = st
    if int(arr["ts"][0]) >= seal:
        k = 0
    elif int(arr["ts"][-1]) < seal:
        k = len(arr)
    else:
        k = int(np.searchsorted(arr["ts"], seal))
    ins = upd = unch = 0
    if k:
        ins, upd, unch = _write_chunks(conn, path, sid, tf, arr[:k])
    if k == len(arr):
        return ins, upd, unch
    hi = arr[k:]
    if len(hi) == 1 and tail_n < TAIL_MAX:
        a, b, c = _upsert_tail_one(conn, sid, hi, st)
    elif tail_n + len(hi) <= TAIL_MAX:
        a, b, c = _upsert_tail_many(conn, path, sid, tf, hi, st)
    else:
        a, b, c = _fold(conn, path, sid, tf, hi, st)
    return ins + a, upd + b, unch + c


def _upsert_tail_one(conn: Any, sid: int, row: np.ndarray, st: list[int]) -> tuple[int, int, int]:
    ts = int(row["ts"][0])
    blob = tail_value(row)
    if ts > st[2]:  # newer than every tail row: certainly new (the common live-edge case)
        conn.execute("INSERT INTO tail(sid, ts, v) VALUES (?, ?, ?)", (sid, ts, blob))
        st[1] += 1
        st[2] = ts
        return 1, 0, 0
    old = conn.execute("SELECT v FROM tail WHERE sid = ? AND ts = ?", (sid, ts)).fetchall()
    if not old:
        conn.execute("INSERT INTO tail(sid, ts, v) VALUES (?, ?, ?)", (sid, ts, blob))
        st[1] += 1
        return 1, 0, 0
    if old[0][0] == blob:
        return 0, 0, 1
    # A damaged old value is simply replaced by the new candle (nothing of it is read).
    conn.execute("UPDATE tail SET v = ? WHERE sid = ? AND ts = ?", (blob, sid, ts))
    return 0, 1, 0


def _upsert_tail_many(
    conn: Any, path: str, sid: int, tf: Timeframe, hi: np.ndarray, st: list[int]
) -> tuple[int, int, int]:
    ts = hi["ts"]
    data = conn.execute(SQL_TAIL_RANGE, (sid, int(ts[0]), int(ts[-1]) + 1)).fetchall()[0][0]
    n = len(hi)
    if data:
        old = np.ascontiguousarray(tail_checked(conn, path, data, sid, tf, int(ts[0]), int(ts[-1]) + 1))
        pos = np.searchsorted(old["ts"], ts)
        pos_c = np.minimum(pos, len(old) - 1)
        found = old["ts"][pos_c] == ts
        same = found & np.all(old.view(np.int64).reshape(-1, 7)[pos_c] == hi.view(np.int64).reshape(-1, 7), axis=1)
        write = np.flatnonzero(~same)
        ins = int(n - found.sum())
        unch = int(same.sum())
        upd = n - ins - unch
    else:
        write = np.arange(n)
        ins, upd, unch = n, 0, 0
    if len(write):
        values = tail_values(hi)
        tss = ts.tolist()
        conn.executemany(
            "INSERT OR REPLACE INTO tail(sid, ts, v) VALUES (?, ?, ?)",
            [(sid, tss[i], values[i]) for i in write.tolist()],
        )
    st[1] += ins
    st[2] = max(st[2], int(ts[-1]))
    return ins, upd, unch


def _fold(conn: Any, path: str, sid: int, tf: Timeframe, hi: np.ndarray, st: list[int]) -> tuple[int, int, int]:
    """Move the whole live edge plus ``hi`` into chunks, keeping only the newest candle as a row."""
    if st[1]:
        # checked: a damaged row folded into a chunk would get a fresh, matching checksum
        data = conn.execute(SQL_TAIL_RANGE, (sid, NEG_INF, POS_INF)).fetchall()[0][0]
        old = np.ascontiguousarray(tail_checked(conn, path, data, sid, tf, NEG_INF, POS_INF)) if data else empty()
    else:
        old = empty()
    if len(old):
        merged, ins, upd, unch = _k.merge(old, hi)
    else:
        merged, ins, upd, unch = hi, len(hi), 0, 0
    newest = merged[-1:]
    new_seal = int(newest["ts"][0])
    if len(merged) > 1:
        _write_chunks(conn, path, sid, tf, merged[:-1])
    conn.execute("DELETE FROM tail WHERE sid = ?", (sid,))
    conn.execute("INSERT INTO tail(sid, ts, v) VALUES (?, ?, ?)", (sid, new_seal, tail_value(newest)))
    conn.execute("UPDATE series SET seal_ts = ? WHERE sid = ?", (new_seal, sid))
    st[0], st[1], st[2] = new_seal, 1, new_seal
    return ins, upd, unch


def _write_chunks(conn: Any, path: str, sid: int, tf: Timeframe, lo: np.ndarray) -> tuple[int, int, int]:
    span = tf.interval_ms * CHUNK_SLOTS
    ts = lo["ts"]
    n = len(lo)
    if int(ts[0] - tf.origin_ms) // span == int(ts[-1] - tf.origin_ms) // span:
        starts, ends = [0], [n]
    else:
        cids = (ts - tf.origin_ms) // span
        cut = (np.flatnonzero(cids[1:] != cids[:-1]) + 1).tolist()
        starts, ends = [0, *cut], [*cut, n]
    k_first = chunk_key(sid, tf, int(ts[0]))
    k_last = chunk_key(sid, tf, int(ts[-1]))
    existing = {r[0] for r in conn.execute("SELECT key FROM chunk WHERE key BETWEEN ? AND ?", (k_first, k_last))}
    ins = upd = unch = 0
    new_rows = []
    raw = lo.view(np.uint8)
    for s, e in zip(starts, ends):
        key = chunk_key(sid, tf, int(ts[s]))
        part = lo[s:e]
        if key in existing:
            merged, a, b, c = _k.merge(_load_chunk(conn, path, key, tf), part)
            ins, upd, unch = ins + a, upd + b, unch + c
            if a or b:
                _put_chunk(conn, key, merged, exists=True)
        else:
            crc = signed(row_checksum(raw, s * ROW, e - s))
            new_rows.append((key, e - s, int(ts[s]), int(ts[e - 1]), crc, raw[s * ROW : e * ROW]))
            ins += e - s
    if new_rows:
        conn.executemany(
            "INSERT INTO chunk(key, n, first_ts, last_ts, codec, crc, data) VALUES (?, ?, ?, ?, 0, ?, ?)",
            new_rows,
        )
    return ins, upd, unch


def _load_chunk(conn: Any, path: str, key: int, tf: Timeframe) -> np.ndarray:
    """A chunk's rows for a read-modify-write, checked."""
    codec, crc, data = conn.execute("SELECT codec, crc, data FROM chunk WHERE key = ?", (key,)).fetchall()[0]
    return chunk_checked(conn, path, key, tf, codec, crc, data)


def _put_chunk(conn: Any, key: int, arr: np.ndarray, *, exists: bool) -> None:
    if not len(arr):
        conn.execute("DELETE FROM chunk WHERE key = ?", (key,))
        return
    arr = np.ascontiguousarray(arr)
    crc = signed(row_checksum(arr, 0, len(arr)))
    args = (len(arr), int(arr["ts"][0]), int(arr["ts"][-1]), crc, arr.view(np.uint8), key)
    if exists:
        conn.execute(
            "UPDATE chunk SET n = ?, first_ts = ?, last_ts = ?, codec = 0, crc = ?, data = ? WHERE key = ?", args
        )
    else:
        conn.execute(
            "INSERT INTO chunk(n, first_ts, last_ts, codec, crc, data, key) VALUES (?, ?, ?, 0, ?, ?, ?)", args
        )


def delete_rows(conn: Any, path: str, sid: int, tf: Timeframe, lo: int, hi: int) -> int:
    """Remove the series' candles with ``lo <= ts < hi`` and that span from its coverage; the
    number of candles removed."""
    removed = 0
    rows = conn.execute(
        "SELECT key, n, first_ts, last_ts FROM chunk WHERE key BETWEEN ? AND ?",
        (chunk_key(sid, tf, lo), chunk_key(sid, tf, hi - 1)),
    ).fetchall()
    for key, n, first, last in rows:
        if last < lo or first >= hi:
            continue
        if first >= lo and last < hi:
            conn.execute("DELETE FROM chunk WHERE key = ?", (key,))
            removed += n
            continue
        arr = _load_chunk(conn, path, key, tf)
        ts = arr["ts"]
        keep = arr[(ts < lo) | (ts >= hi)]
        removed += len(arr) - len(keep)
        _put_chunk(conn, key, keep, exists=True)
    removed += conn.execute("SELECT count(*) FROM tail WHERE sid = ? AND ts >= ? AND ts < ?", (sid, lo, hi)).fetchall()[
        0
    ][0]
    conn.execute("DELETE FROM tail WHERE sid = ? AND ts >= ? AND ts < ?", (sid, lo, hi))
    change_coverage(conn, path, sid, np.array([[lo, hi]], dtype=np.int64), add=False)
    return int(removed)
