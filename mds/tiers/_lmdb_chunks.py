"""A series' chunks inside one LMDB transaction: the read walks behind ``get_range`` and
``get_latest``, and the writes of a range (put, delete, refresh of stale periods), all built on
replacing the range's chunks (:func:`_replace`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds._kernels import walk_chunks
from mds.tiers._lmdb_format import (
    _KEY,
    _OFFSET,
    _chunk_header,
    _chunk_rows,
    _chunk_view,
    _cur_key,
    _pack_chunk,
    _pack_held,
)
from mds.tiers._lmdb_held import _contains, _covering, _held_of, _held_parsed, _set_held, _subtract, _union

if TYPE_CHECKING:
    from mds.tiers._lmdb_env import _Env


def _range_in(
    h: _Env, txn: Any, prefix: bytes, period: int, step: int, start: int, end: int, stale_before: int
) -> np.ndarray | list[int] | None:
    """The read walk of :meth:`LmdbTier.get_range` (see :func:`walk_chunks` for the result)."""
    hv = txn.get(prefix, None, h.held)  # db=h.held (positional: no keyword dict)
    if hv is None or not _contains(_held_parsed(h, prefix, hv), start, end):
        return None
    return walk_chunks(
        txn.cursor(h.chunks), prefix, period, start, end, -1, step, stale_before, h.verified, _chunk_view
    )


def _latest_in(
    h: _Env, txn: Any, prefix: bytes, period: int, step: int, n: int, end: int, cutoff: int, stale_before: int
) -> np.ndarray | list[int] | None:
    """The read walk of :meth:`LmdbTier.get_latest` (see :func:`walk_chunks` for the result)."""
    hv = txn.get(prefix, db=h.held)
    if hv is None:
        return None
    rng = _covering(_held_parsed(h, prefix, hv), end - 1)
    if rng is None:
        return None
    lower = max(rng[0], cutoff)
    if lower >= end:
        return None
    return walk_chunks(
        txn.cursor(db=h.chunks), prefix, period, lower, end, n, step, stale_before, h.verified, _chunk_view
    )


def _put_chunk(h: _Env, txn: Any, key: bytes, rows: np.ndarray, written_at: int) -> None:
    val, seen = _pack_chunk(rows, written_at)
    txn.put(key, val, db=h.chunks)
    h.verified[key] = seen  # harmless if the txn aborts: the stored header then differs


def _replace(h: _Env, txn: Any, prefix: bytes, period: int, start: int, end: int, rows: np.ndarray, now: int) -> int:
    """Make ``rows`` (sorted, inside ``[start, end)``) the chunks' content in that range.

    Rows of boundary chunks outside the range stay; such a chunk keeps the older of the two
    written-at times, so staleness is never understated. Returns the number of rows removed.
    """
    removed = 0
    # Existing chunks overlapping the range: the interior ones are simply replaced or deleted.
    cur = txn.cursor(db=h.chunks)
    existing: list[int] = []
    stop = prefix + _KEY.pack(end + _OFFSET) if end < (1 << 62) else prefix + b"\xff" * 8
    lo = start - start % period if start > -(1 << 62) else -(1 << 62)
    if cur.set_range(prefix + _KEY.pack(max(lo, -_OFFSET) + _OFFSET)):
        while True:
            key = _cur_key(cur)
            if key >= stop:
                break
            existing.append(_KEY.unpack_from(key, len(prefix))[0] - _OFFSET)
            if not cur.next():
                break
    # New rows grouped by period.
    groups: dict[int, np.ndarray] = {}
    if len(rows):
        ts = rows["ts"]
        first = int(ts[0]) - int(ts[0]) % period
        edges = np.arange(first, int(ts[-1]) + period, period, dtype=np.int64)
        cuts = ts.searchsorted(edges).tolist()  # O(chunks log rows), not a pass over every row
        cuts.append(len(rows))
        for i, p in enumerate(edges.tolist()):
            if cuts[i + 1] > cuts[i]:
                groups[p] = rows[cuts[i] : cuts[i + 1]]
    for p in existing:
        key = prefix + _KEY.pack(p + _OFFSET)
        new = groups.pop(p, None)
        val = txn.get(key, db=h.chunks)
        if p >= start and p + period <= end:
            removed += _chunk_header(val)[1]
            if new is not None:
                _put_chunk(h, txn, key, new, now)
            else:
                txn.delete(key, db=h.chunks)
            continue
        raw, ots, written = _chunk_rows(val, key, h.verified)
        old, n = raw.view(CANDLE_DTYPE), len(raw)
        i0, i1 = int(ots.searchsorted(start)), int(ots.searchsorted(end))
        removed += i1 - i0
        pieces = [old[:i0], new, old[i1:]] if new is not None else [old[:i0], old[i1:]]
        merged = np.concatenate(pieces)
        kept = i0 + (n - i1)
        if len(merged) == 0:
            txn.delete(key, db=h.chunks)
        else:
            _put_chunk(h, txn, key, merged, min(written, now) if kept else now)
    for p, new in groups.items():
        _put_chunk(h, txn, prefix + _KEY.pack(p + _OFFSET), new, now)
    return removed


def _put_periods(h: _Env, txn: Any, prefix: bytes, fresh: dict[int, np.ndarray], now: int) -> None:
    """Make ``fresh[p]`` the chunk of period ``p`` (none when empty), written at ``now``."""
    for p, rows in fresh.items():
        key = prefix + _KEY.pack(p + _OFFSET)
        if len(rows):
            _put_chunk(h, txn, key, rows, now)
        else:
            txn.delete(key, db=h.chunks)


def _store_range(
    h: _Env, txn: Any, prefix: bytes, period: int, start: int, end: int, rows: np.ndarray, now: int, cutoff: int
) -> None:
    """The write of :meth:`LmdbTier.put_range`: ``rows`` become the chunks' content in
    ``[start, end)``, which is then held (held ranges older than ``cutoff`` are dropped)."""
    _replace(h, txn, prefix, period, start, end, rows, now)
    flat = _held_of(h, txn, prefix)
    flat = _subtract(_union(flat, start, end), -(1 << 62), cutoff)
    txn.put(prefix, _pack_held(flat), db=h.held)


def _delete_range(h: _Env, txn: Any, prefix: bytes, period: int, lo: int, hi: int, now: int) -> int:
    """The write of :meth:`LmdbTier.delete`: no rows and no held range left in ``[lo, hi)``.
    Returns the number of rows removed."""
    removed = _replace(h, txn, prefix, period, lo, hi, np.empty(0, CANDLE_DTYPE), now)
    _set_held(h, txn, prefix, _subtract(_held_of(h, txn, prefix), lo, hi))
    return removed
