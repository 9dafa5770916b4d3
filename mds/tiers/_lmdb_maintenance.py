"""Walks over a whole LMDB environment, each inside one transaction: purging expired chunks,
the consistency check and the list of series held."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds.tiers._lmdb_format import (
    _KEY,
    _OFFSET,
    _SEP,
    CHUNK_PERIOD_MS,
    _chunk_header,
    _chunk_rows,
    _Corrupt,
    _cur_key,
    _items,
    _pack_chunk,
    _unpack_held,
)
from mds.tiers._lmdb_held import _contains, _covering, _set_held, _subtract

if TYPE_CHECKING:
    from mds.tiers._lmdb_env import _Env


def _purge_walk(h: _Env, txn: Any, cutoff: int, stale_before: int) -> int:
    """The write of :meth:`LmdbTier.purge_expired`: drop chunks written before ``stale_before`` or
    ending before ``cutoff`` and their held ranges, trim the chunk the window boundary cuts.
    Returns the number of chunks removed."""
    drop: dict[bytes, list[tuple[int, int]]] = {}
    cur = txn.cursor(db=h.chunks)
    removed = 0
    ok = cur.first()
    while ok:
        key = _cur_key(cur)
        prefix, p = key[:-8], _KEY.unpack_from(key, len(key) - 8)[0] - _OFFSET
        tf_name = prefix[:-1].rsplit(b"\x1f", 1)[-1].decode("ascii", "replace")
        period = CHUNK_PERIOD_MS.get(tf_name)
        try:
            written = _chunk_header(cur.value())[2]
            bad = period is None
        except _Corrupt:
            written, bad = 0, True
        if bad or written < stale_before or (period is not None and p + period <= cutoff):
            drop.setdefault(prefix, []).append((p, p + (period or 1)))
            removed += 1
            ok = cur.delete() and bool(cur.key())  # False past the last key
            continue
        if p < cutoff:  # the chunk the window boundary cuts: keep chunk rows inside held
            raw, ts, _ = _chunk_rows(cur.value(), key, h.verified)
            rows = raw[int(ts.searchsorted(cutoff)) :].view(CANDLE_DTYPE)
            if not len(rows):
                removed += 1
                ok = cur.delete() and bool(cur.key())
                continue
            val, seen = _pack_chunk(rows, written)
            cur.put(key, val)
            h.verified[key] = seen
        ok = cur.next()
    updates: list[tuple[bytes, list[int]]] = []
    for key, val in _items(txn.cursor(db=h.held)):
        try:
            flat = _unpack_held(val)
        except _Corrupt:
            updates.append((key, []))
            continue
        new = _subtract(flat, -(1 << 62), cutoff)
        for a, b in drop.get(key, ()):
            new = _subtract(new, a, b)
        if new != flat:
            updates.append((key, new))
    for key, new in updates:
        _set_held(h, txn, key, new)
    return removed


def _check_walk(h: _Env, txn: Any, cutoff: int) -> list[str]:
    """The walk of :meth:`LmdbTier.check` (rows older than ``cutoff`` need no held range)."""
    problems: list[str] = []
    helds: dict[bytes, list[int]] = {}
    for k, val in _items(txn.cursor(db=h.held)):
        try:
            helds[k] = _unpack_held(val)
        except _Corrupt as exc:
            problems.append(f"held {k!r}: {exc}")
    for k, val in _items(txn.cursor(db=h.chunks)):
        prefix, p = k[:-8], _KEY.unpack_from(k, len(k) - 8)[0] - _OFFSET
        series_name = prefix[:-1].replace(_SEP, b" ").decode("ascii", "replace")
        name = f"chunk {series_name}@{p}"
        period = CHUNK_PERIOD_MS.get(prefix[:-1].rsplit(b"\x1f", 1)[-1].decode("ascii", "replace"))
        if period is None or p % period:
            problems.append(f"{name}: key does not name a chunk period")
            continue
        try:
            _, ts, _ = _chunk_rows(val, k, {})
        except _Corrupt as exc:
            problems.append(f"{name}: {exc}")
            continue
        if len(ts) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
            problems.append(f"{name}: rows not sorted and unique")
        if ts[0] < p or ts[-1] >= p + period:
            problems.append(f"{name}: rows outside the chunk period")
        flat = helds.get(prefix, [])
        # Rows older than the retention window may stay in a chunk whose held range was
        # trimmed (purge_expired drops them); they are never served, so they are no problem.
        live = ts[ts >= cutoff]
        outside = len(live) and not _contains(flat, int(live[0]), int(live[-1]) + 1)
        if outside and not all(_covering(flat, int(t)) for t in live):
            problems.append(f"{name}: rows outside the held ranges")
    return problems


def _series_walk(h: _Env, txn: Any) -> list[tuple[str, str]]:
    """The walk of :meth:`LmdbTier.series`."""
    out = []
    for k, _ in _items(txn.cursor(db=h.held)):
        sym, _, tfname = k[:-1].decode("ascii", "replace").partition("\x1f")
        out.append((sym, tfname))
    return sorted(out)


def _clear_all(h: _Env, txn: Any) -> None:
    """The write of :meth:`LmdbTier.clear`: every chunk and held range dropped."""
    txn.drop(h.chunks, delete=False)
    txn.drop(h.held, delete=False)
