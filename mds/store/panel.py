"""``store.panel()``: several markets on one time grid, for vectorised backtests (DESIGN.md 9).

Each market is read through the store's normal read (so a Layer 1 fills what is not covered)
and placed on the full grid of ``[start, end)`` by index arithmetic. A slot without a candle is
either a no-trade interval (inside coverage) or unknown (``missing``: never fetched, not yet
closed, or beyond the store's clock): unknown slots are always NaN; no-trade slots are NaN, or
with ``fill="ffill"`` the last close carried forward (volume and value 0: nothing traded). A
carry never crosses an unknown slot or reaches back before a market's first candle, so a
market listed mid-range is NaN until it trades.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mds.errors import InvalidRequestError
from mds.frames import FIELDS
from mds.store.derived import labelled_range, overlapping
from mds.store.reads import time_range
from mds.timeframes import Timeframe, parse_timeframe

if TYPE_CHECKING:
    from mds.store import Store

__all__ = ["FILLS", "build"]

FILLS = ("nan", "ffill")
_PRICES = ("open", "high", "low", "close")


def build(
    store: Store, symbols: Any, timeframe: str | Timeframe, start: Any, end: Any, field: str, fill: str
) -> tuple[np.ndarray, np.ndarray]:
    """``Store.panel`` (arguments as there): ``(ts int64[n], values float64[n, k])``."""
    tf = parse_timeframe(timeframe, derived=True)
    if start is None or end is None:
        raise InvalidRequestError("panel needs both start and end")
    s, e = time_range(start, end)
    assert s is not None and e is not None
    if field not in FIELDS:
        raise InvalidRequestError(f"field must be one of {', '.join(FIELDS)}, not {field!r}")
    if fill not in FILLS:
        raise InvalidRequestError(f"fill must be one of {', '.join(FILLS)}, not {fill!r}")
    if isinstance(symbols, str) or not hasattr(symbols, "__iter__"):
        raise InvalidRequestError("symbols must be a list of market codes")
    syms = [store._sym(x) for x in symbols]
    if len(set(syms)) != len(syms):
        raise InvalidRequestError("symbols must not repeat")
    grid = tf.grid(s, e)
    n = len(grid)
    values = np.full((n, len(syms)), np.nan)
    if not n:
        return grid, values
    ends = np.empty_like(grid)
    ends[:-1] = grid[1:]
    ends[-1] = tf.add(int(grid[-1]), 1)
    lo, hi = int(grid[0]), int(ends[-1])
    for j, sym in enumerate(syms):
        rows, missing = _series(store, sym, tf, lo, hi)
        rows = rows[(rows["ts"] >= lo) & (rows["ts"] < hi)]
        at = np.searchsorted(grid, rows["ts"])
        column = values[:, j]
        column[at] = rows[field]
        if fill == "ffill":
            _carry(column, at, rows["close"], overlapping(grid, ends, missing), field)
    return grid, values


def _series(store: Store, sym: str, tf: Timeframe, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """A market's candles in ``[lo, hi)`` and its unknown (``missing``) ranges there."""
    if tf.derived:
        with store._lock:
            rows, _, missing = labelled_range(store._reader, sym, tf, lo, min(hi, tf.floor(int(store._clock()))))
        closed = tf.floor(int(store._clock()))
        if closed < hi:  # intervals not closed yet are unknown
            tail = np.array([[max(lo, closed), hi]], dtype=np.int64)
            missing = np.concatenate([missing, tail]) if len(missing) else tail
        return rows, missing
    with store._lock:  # the rows and the gaps of one moment: a write between would make unread slots no-trade
        rows = store.candles(sym, tf, start=lo, end=hi)
        gaps = [(g.start, g.end) for g in store.gaps(sym, tf, start=lo, end=hi) if g.kind == "missing"]
    return rows, np.array(gaps, dtype=np.int64).reshape(-1, 2)


def _carry(column: np.ndarray, at: np.ndarray, close: np.ndarray, unknown: np.ndarray, field: str) -> None:
    """Fill the no-trade slots of ``column`` in place: the last close before them (prices) or 0
    (volume, value), never across an unknown slot nor before the first candle."""
    n = len(column)
    last = np.full(n, np.nan)
    last[at] = close
    known = np.zeros(n, dtype=bool)
    known[at] = True
    known |= unknown  # an unknown slot resets the carry: its NaN is what follows it
    src = np.where(known, np.arange(n), -1)
    np.maximum.accumulate(src, out=src)
    carried = np.where(src >= 0, last[np.maximum(src, 0)], np.nan)
    no_trade = ~known & (src >= 0) & ~np.isnan(carried)
    if field in _PRICES:
        column[no_trade] = carried[no_trade]
    else:
        column[no_trade] = 0.0
