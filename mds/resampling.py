"""Coarser candles from finer ones, with Upbit's semantics (DESIGN.md section 9).

A target candle opens at its interval's open time (days at 00:00 UTC, weeks on Monday, months on
the 1st) and takes the first open, the highest high, the lowest low, the last close and the
summed volume and value of the source candles inside it. An interval without a source candle
yields no candle, as Upbit emits none for an interval without trades.

One pass of numpy: the group starts are where the floored open time changes, and every field is
one ``reduceat`` (or one fancy index) over the strided field of the 56-byte records.
"""

from __future__ import annotations

import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds.errors import InvalidRequestError
from mds.timeframes import Timeframe, parse_timeframe

__all__ = ["resample"]


def resample(candles: np.ndarray, source: str | Timeframe, target: str | Timeframe) -> np.ndarray:
    """Resample candles of timeframe ``source`` into the coarser timeframe ``target``.

    Parameters
    ----------
    candles
        CANDLE_DTYPE array of ``source`` candles, ascending ``ts`` without duplicates (as every
        read returns them); read-only arrays are fine.
    source, target
        Timeframes (names, aliases or :class:`~mds.Timeframe`); derived ones such as ``"2h"``,
        ``"6h"``, ``"12h"`` and ``"3d"`` are accepted. ``target`` must be a whole multiple of
        ``source`` on the same grid: ``"1m"`` to ``"2h"``, ``"1d"`` to ``"1w"`` or ``"1M"``,
        ``"4h"`` to ``"12h"`` (not ``"1w"`` to ``"1M"``, nor ``"3m"`` to ``"5m"``).

    Returns
    -------
    numpy.ndarray
        A new CANDLE_DTYPE array, ascending ``ts``: one candle per ``target`` interval that holds
        at least one source candle. ``source == target`` returns a copy.

    Raises
    ------
    InvalidRequestError
        ``target`` is not a whole multiple of ``source``; ``candles`` is not a CANDLE_DTYPE
        array, is not strictly ascending, or holds a candle not aligned to ``source``.
    """
    src = parse_timeframe(source, derived=True)
    tgt = parse_timeframe(target, derived=True)
    if not src.divides(tgt):
        raise InvalidRequestError(f"cannot resample {src.name} into {tgt.name}: not a whole multiple of {src.name}")
    if not isinstance(candles, np.ndarray) or candles.dtype != CANDLE_DTYPE or candles.ndim != 1:
        raise InvalidRequestError("candles must be a one-dimensional mds.CANDLE_DTYPE array")
    ts = candles["ts"]
    if len(ts) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
        raise InvalidRequestError("candles must be in strictly ascending ts order (as reads return them)")
    if len(ts) and not bool(src.aligned(ts).all()):
        raise InvalidRequestError(f"candles hold open times not aligned to {src.name}")
    return resample_sorted(candles, tgt)


def resample_sorted(candles: np.ndarray, target: Timeframe) -> np.ndarray:
    """:func:`resample` without the checks: ``candles`` sorted, unique and on a grid that nests
    into ``target`` (the store's own reads)."""
    n = len(candles)
    if n == 0:
        return np.zeros(0, dtype=CANDLE_DTYPE)
    keys = target.floor_many(candles["ts"])
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(keys[1:], keys[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    out = np.empty(len(starts), dtype=CANDLE_DTYPE)
    out["ts"] = keys[starts]
    out["open"] = candles["open"][starts]
    last = np.empty_like(starts)
    last[:-1] = starts[1:] - 1
    last[-1] = n - 1
    out["close"] = candles["close"][last]
    out["high"] = np.maximum.reduceat(candles["high"], starts)
    out["low"] = np.minimum.reduceat(candles["low"], starts)
    out["volume"] = np.add.reduceat(candles["volume"], starts)
    out["value"] = np.add.reduceat(candles["value"], starts)
    return out
