"""Reads of derived timeframes (``2h``, ``6h``, ``12h``, ``3d`` ...): resampled from a native series.

A derived timeframe has no REST path and is never stored. ``store.candles(symbol, "2h", ...)``
picks one native source series whose grid nests into it (:meth:`Timeframe.sources`):

1. the finest source whose coverage holds the whole range (no fetch, the most exact);
2. else, with a Layer 1, the source that needs the fewest candles fetched (ties: the coarser,
   fewer requests), read through the normal read, which fetches and stores what it lacks;
3. else (storage only) the source with the least ``missing`` time in the range.

The source rows are resampled (:func:`mds.resampling.resample_sorted`), and a derived candle is
served only when every source slot of its interval is known: stored, or a ``no_trades`` slot
inside coverage. A derived interval that touches a ``missing`` source slot yields no candle (a
candle built from part of its interval would be a wrong candle, not a short answer).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mds import _kernels as K
from mds._dtypes import EMPTY_CANDLES, read_only
from mds.errors import InvalidRequestError
from mds.resampling import resample_sorted
from mds.store.metrics import slowest
from mds.store.reads import Answer, Reader, time_range
from mds.timeframes import Timeframe

logger = logging.getLogger(__name__)

__all__ = ["labelled_range", "overlapping", "read"]

_NO_RANGES = np.zeros((0, 2), dtype=np.int64)


def read(reader: Reader, sym: str, tf: Timeframe, count: Any, start: Any, end: Any, include_partial: bool) -> Answer:
    """``Store.candles`` for a derived ``tf`` (arguments as there; call under the store lock)."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0):
        raise InvalidRequestError(f"count must be a positive int, not {count!r}")
    s, e = time_range(start, end)
    if count is None and s is None:
        raise InvalidRequestError("give count (latest N) or start (a range)")
    now = int(reader.clock())
    last_end = tf.floor(now)  # open time of the forming derived interval
    if count is not None and s is None:
        hi = last_end if e is None else min(tf.ceil(e), last_end)
        arr, source = _latest(reader, sym, tf, int(count), hi)
    elif count is not None and e is None:
        assert s is not None
        lo, width, source = tf.ceil(s), int(count), "storage_memory"
        while True:  # a window of N intervals, doubled while no-trade intervals leave it short
            hi = min(last_end, tf.add(lo, width))
            arr, src, _ = labelled_range(reader, sym, tf, lo, max(lo, hi))
            source = slowest(source, src)
            if len(arr) >= count or hi >= last_end:
                break
            width *= 2
        arr = arr[: int(count)]
    else:
        assert s is not None
        lo = tf.ceil(s)
        hi = last_end if e is None else min(tf.ceil(e), last_end)
        arr, source, _ = labelled_range(reader, sym, tf, lo, max(lo, hi))
        if count is not None:
            arr = arr[: int(count)]
    if include_partial and (e is None or e > last_end) and (not len(arr) or int(arr["ts"][-1]) < last_end):
        part, psource = _forming(reader, sym, tf, last_end, now)
        if len(part):
            arr = np.concatenate([arr, part])
            source = slowest(source, psource)
    return read_only(arr), source


def labelled_range(reader: Reader, sym: str, tf: Timeframe, lo: int, hi: int) -> tuple[np.ndarray, str, np.ndarray]:
    """Derived candles opening in ``[lo, hi)`` (both aligned to ``tf``) with the source that
    answered and the ``missing`` source ranges (int64[k, 2]) inside ``[lo, hi)``: a derived slot
    overlapping one of them is unknown, not a no-trade interval."""
    if hi <= lo:
        return EMPTY_CANDLES, "storage_memory", _NO_RANGES
    src = _choose(reader, sym, tf, lo, hi)
    rows, source = reader.read(sym, src, None, lo, hi, False, allow_layer1=True)
    out, missing = _resampled(reader, sym, src, tf, rows, lo, hi)
    return out, source, missing


def overlapping(opens: np.ndarray, ends: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Bool mask: which intervals ``[opens[i], ends[i])`` overlap any of the sorted, disjoint
    half-open ``ranges`` (int64[k, 2])."""
    if not len(ranges) or not len(opens):
        return np.zeros(len(opens), dtype=bool)
    # the last range starting before an interval's end is the only one that can reach into it
    i = np.searchsorted(ranges[:, 0], ends, side="left") - 1
    hit = i >= 0
    hit[hit] = ranges[i[hit], 1] > opens[hit]
    return hit


# ---------------------------------------------------------------------------------------------
def _resampled(
    reader: Reader, sym: str, src: Timeframe, tf: Timeframe, rows: np.ndarray, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` (``src`` candles in ``[lo, hi)``) resampled into ``tf``, keeping only candles
    whose interval has no ``missing`` source slot; and those missing ranges."""
    reader.coverage.sync(sym, src)
    cov = reader.coverage.of(sym, src)
    holes = K.find_gaps(rows["ts"], *src.kernel_args, lo, hi)
    missing = K.interval_subtract(holes, cov) if len(holes) else _NO_RANGES
    out = resample_sorted(rows, tf)
    if len(missing) and len(out):
        opens = out["ts"]
        bad = overlapping(opens, opens + tf.interval_ms, missing)
        if bad.any():
            logger.debug("%s %s: %d candles left out (%s source missing)", sym, tf.name, int(bad.sum()), src.name)
            out = out[~bad]
    return out, missing


def _choose(reader: Reader, sym: str, tf: Timeframe, lo: int, hi: int) -> Timeframe:
    """The native source series to resample ``[lo, hi)`` from (see the module docstring)."""
    candidates = tf.sources()
    uncovered: list[tuple[Timeframe, np.ndarray]] = []
    want = np.array([[lo, hi]], dtype=np.int64)
    for src in candidates:  # finest first
        reader.coverage.sync(sym, src)
        cov = reader.coverage.of(sym, src)
        if K.interval_contains(cov, lo, hi):
            return src
        uncovered.append((src, K.interval_subtract(want, cov)))
    if reader.fetcher is not None:
        # the fewest source candles to fetch (200 a request); ties go to the coarser series
        def to_fetch(item: tuple[Timeframe, np.ndarray]) -> int:
            src, gaps = item
            return sum(src.count(int(a), int(b)) for a, b in gaps.tolist())

        return min(reversed(uncovered), key=to_fetch)[0]
    best, best_missing = candidates[0], None
    for src in candidates:
        rows, _ = reader.read(sym, src, None, lo, hi, False, allow_layer1=False)
        if not len(rows):
            continue
        _, missing = _resampled(reader, sym, src, tf, rows, lo, hi)
        span = int((missing[:, 1] - missing[:, 0]).sum()) if len(missing) else 0
        if best_missing is None or span < best_missing:
            best, best_missing = src, span
    return best


def _latest(reader: Reader, sym: str, tf: Timeframe, n: int, hi: int) -> Answer:
    """The latest ``n`` derived candles opening before ``hi``: the latest source candles (the
    normal latest-N read, which fetches back as far as it must), doubled while short."""
    src = _choose(reader, sym, tf, tf.add(hi, -n), hi)
    ratio = tf.interval_ms // src.interval_ms
    k = (n + 1) * ratio
    source = "storage_memory"
    while True:
        rows, got = reader.read(sym, src, k, None, hi, False, allow_layer1=True)
        source = slowest(source, got)
        lo = tf.floor(int(rows["ts"][0])) if len(rows) else hi
        out, _ = _resampled(reader, sym, src, tf, rows, lo, hi)
        if len(out) >= n or len(rows) < k:
            return out[-n:], source
        k *= 2


def _forming(reader: Reader, sym: str, tf: Timeframe, opens: int, now: int) -> Answer:
    """The derived candle still forming (open ``opens``), from the source's closed candles in
    it and the source's own forming candle; empty when it cannot be proved."""
    hi = tf.add(opens, 1)
    src = _choose(reader, sym, tf, opens, min(hi, now))
    closed_end = src.floor(now)
    rows, source = reader.read(sym, src, None, opens, None, True, allow_layer1=True)
    rows = rows[rows["ts"] >= opens]
    _, missing = _resampled(reader, sym, src, tf, rows[rows["ts"] < closed_end], opens, closed_end)
    if len(missing) or not len(rows):
        return EMPTY_CANDLES, source
    return resample_sorted(rows, tf), source
