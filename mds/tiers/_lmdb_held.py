"""Held ranges: the half-open ranges of a series that the LMDB tier holds in full.

A held set is a flat sorted list ``[s0, e0, s1, e1, ...]`` (strictly increasing). The ``held``
database keeps one per series (value layout in :mod:`mds.tiers._lmdb_format`); reads go through
a per-process parse cache on the environment handle.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

from mds.tiers._lmdb_format import _MAX_HELD_BYTES, _MAX_VERIFIED, _Corrupt, _pack_held, _unpack_held

if TYPE_CHECKING:
    from mds.tiers._lmdb_env import _Env


# -- interval sets as flat sorted lists [s0, e0, s1, e1, ...] (strictly increasing) ----------------
# Held sets have a handful of ranges; plain lists beat numpy arrays at that size.


def _contains(flat: list[int], start: int, end: int) -> bool:
    i = bisect.bisect_right(flat, start)
    return bool(i & 1) and end <= flat[i]


def _union(flat: list[int], start: int, end: int) -> list[int]:
    if start >= end:
        return flat
    lo = bisect.bisect_left(flat, start)  # ranges ending before start stay (adjacent ones merge)
    hi = bisect.bisect_right(flat, end)
    if lo & 1:
        start = flat[lo - 1]
        lo -= 1
    if hi & 1:
        end = flat[hi]
        hi += 1
    return [*flat[:lo], start, end, *flat[hi:]]


def _subtract(flat: list[int], start: int, end: int) -> list[int]:
    if start >= end:
        return flat
    out: list[int] = []
    for i in range(0, len(flat), 2):
        a, b = flat[i], flat[i + 1]
        if b <= start or a >= end:
            out += (a, b)
            continue
        if a < start:
            out += (a, start)
        if b > end:
            out += (end, b)
    return out


def _intersect(flat: list[int], start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for i in range(0, len(flat), 2):
        a, b = max(flat[i], start), min(flat[i + 1], end)
        if a < b:
            out.append((a, b))
    return out


def _covering(flat: list[int], t: int) -> tuple[int, int] | None:
    """The held range ``[a, b)`` with ``a <= t < b``."""
    i = bisect.bisect_right(flat, t)
    return (flat[i - 1], flat[i]) if i & 1 else None


# -- the held record of a series inside a transaction --------------------------------------------


def _held_parsed(h: _Env, prefix: bytes, hv: Any) -> list[int]:
    """``_unpack_held`` with a per-process cache keyed by the value's bytes (callers never mutate)."""
    if len(hv) > _MAX_HELD_BYTES:
        raise _Corrupt("held ranges value too large")
    hit = h.held_cache.get(prefix)
    if hit is not None and hv == hit[0]:  # compares the bytes in place (no copy)
        return hit[1]
    raw = bytes(hv)
    flat = _unpack_held(raw)
    if len(h.held_cache) >= _MAX_VERIFIED:
        h.held_cache.clear()
    h.held_cache[prefix] = (raw, flat)
    return flat


def _held_of(h: _Env, txn: Any, prefix: bytes) -> list[int]:
    hv = txn.get(prefix, db=h.held)
    return [] if hv is None else _held_parsed(h, prefix, hv)


def _set_held(h: _Env, txn: Any, prefix: bytes, flat: list[int]) -> None:
    """Store a series' held ranges; an empty set removes the entry."""
    if flat:
        txn.put(prefix, _pack_held(flat), db=h.held)
    else:
        txn.delete(prefix, db=h.held)
