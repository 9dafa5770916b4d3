"""Seeded market generators for tests, benchmarks and the demo, and the kernel parametrisation.

:func:`generate_market` makes seeded, valid, realistic candle series (a liquid market and an
illiquid one with many no-trade intervals); :func:`dense_candles` makes gap-free bulk series;
:func:`kernel_params` parametrises a test over both kernel implementations.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds.errors import InvalidRequestError
from mds.symbols import validate_symbol
from mds.timeframes import MINUTE_MS, Timeframe, parse_timeframe
from mds.timeutil import to_ms

__all__ = ["dense_candles", "generate_market", "kernel_modules", "kernel_params", "krw_tick_size"]

_LIQUIDITY = {"liquid": 0.9999, "illiquid": 0.6}
_VOLATILITY = {"liquid": 0.0007, "illiquid": 0.0018}  # log-return sigma per minute
_VALUE_PER_MINUTE = {"liquid": 8e7, "illiquid": 2e5}  # quote currency traded per minute


def krw_tick_size(price: np.ndarray | float) -> np.ndarray:
    """Upbit's KRW-market price unit for each price (vectorised).

    Follows Upbit's KRW tick table (1,000 KRW at 2,000,000 and above down to 0.0001 below 1).
    """
    p = np.asarray(price, dtype=np.float64)
    conds = [
        p >= 2_000_000,
        p >= 1_000_000,
        p >= 500_000,
        p >= 100_000,
        p >= 10_000,
        p >= 1_000,
        p >= 100,
        p >= 10,
        p >= 1,
    ]
    ticks = [1000.0, 500.0, 100.0, 50.0, 10.0, 1.0, 0.1, 0.01, 0.001]
    return np.select(conds, ticks, 0.0001)


def _slots(tf: Timeframe, start: int, end: int) -> np.ndarray:
    first = tf.ceil(start)
    if tf.is_month:
        out = []
        t = first
        while t < end:
            out.append(t)
            t = tf.add(t, 1)
        return np.asarray(out, dtype=np.int64)
    return np.arange(first, end, tf.interval_ms, dtype=np.int64)


def _round_price(p: np.ndarray, quote: str) -> np.ndarray:
    if quote == "KRW":
        tick = krw_tick_size(p)
        return np.maximum(np.round(p / tick) * tick, tick)
    return np.maximum(np.round(p, 8), 1e-8)


def generate_market(
    symbol: str,
    timeframe: str | Timeframe,
    start_ms: int,
    end_ms: int,
    *,
    liquidity: str | float = "liquid",
    seed: int = 0,
    start_price: float | None = None,
    volatility: float | None = None,
) -> np.ndarray:
    """Generate a seeded, realistic candle series for ``[start_ms, end_ms)``.

    The hidden price is a geometric random walk sampled at every slot of the timeframe; a candle
    exists only when trades happened in its interval (as on Upbit, no candle for no-trade
    intervals). Prices are rounded to Upbit's KRW tick sizes (8 decimals for other quotes),
    volumes and values to 8 decimals, so the numbers look and serialise like Upbit's.

    Parameters
    ----------
    symbol : str
        Upbit market code; the quote (``KRW`` ...) picks the price rounding.
    timeframe : str or Timeframe
    start_ms, end_ms : int
        Half-open range (epoch ms); ``start_ms`` is rounded up to the timeframe grid.
    liquidity : {"liquid", "illiquid"} or float
        ``"liquid"``: a trade in 99.99 % of minutes (a few single-minute gaps a month, like
        KRW-BTC); ``"illiquid"``: 60 %, lower still between 16:00 and 22:00 UTC (the Korean
        night), like a thin altcoin. A float is the per-minute trade probability. Longer
        timeframes have a candle when any of their minutes traded.
    seed : int
        Same seed, symbol and timeframe give the same array.
    start_price : float, optional
        Default: derived from the seed and symbol (BTC-like for ``KRW-BTC``).
    volatility : float, optional
        Log-return standard deviation per minute.

    Returns
    -------
    numpy.ndarray
        CANDLE_DTYPE, ascending ``ts``, every row valid and aligned.

    Raises
    ------
    InvalidRequestError
        Bad symbol, timeframe, range or liquidity.
    """
    validate_symbol(symbol)
    tf = parse_timeframe(timeframe)
    start, end = to_ms(start_ms, name="start_ms"), to_ms(end_ms, name="end_ms")
    if end < start:
        raise InvalidRequestError("end_ms must not be before start_ms")
    if isinstance(liquidity, str):
        if liquidity not in _LIQUIDITY:
            raise InvalidRequestError(f"liquidity must be 'liquid', 'illiquid' or a probability, not {liquidity!r}")
        p_minute = _LIQUIDITY[liquidity]
        kind = liquidity
    else:
        p_minute = float(liquidity)
        if not 0.0 < p_minute <= 1.0:
            raise InvalidRequestError("liquidity as a probability must be in (0, 1]")
        kind = "liquid" if p_minute >= 0.9 else "illiquid"
    quote = symbol.split("-", 1)[0]
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(symbol.encode()), zlib.crc32(tf.name.encode())])
    )
    ts = _slots(tf, start, end)
    n = len(ts)
    if n == 0:
        return np.zeros(0, dtype=CANDLE_DTYPE)

    if tf.is_month:
        nxt = np.asarray([tf.add(int(t), 1) for t in ts], dtype=np.int64)
        minutes = (nxt - ts) / MINUTE_MS
    else:
        minutes = np.full(n, tf.interval_ms / MINUTE_MS)

    # Trade probability per slot: quieter during the Korean night (16:00-22:00 UTC).
    hour = (ts // 3_600_000) % 24
    quiet = (hour >= 16) & (hour < 22)
    p_quiet = p_minute * 0.55 if kind == "illiquid" else 1.0 - (1.0 - p_minute) * 5.0
    p = np.where(quiet, p_quiet, p_minute)
    p = np.clip(p, 1e-9, 1.0)
    p_candle = 1.0 - np.power(1.0 - p, minutes)
    traded = rng.random(n) < p_candle
    if not traded.any():
        traded[n // 2] = True

    if start_price is None:
        if symbol == "KRW-BTC":
            start_price = 50_000_000.0 * float(np.exp(rng.normal(0, 0.1)))
        elif quote == "KRW":
            start_price = float(10 ** rng.uniform(1.5, 6.0))
        elif quote == "BTC":
            start_price = float(10 ** rng.uniform(-7.0, -2.0))
        else:
            start_price = float(10 ** rng.uniform(-2.0, 4.0))
    sigma_min = volatility if volatility is not None else _VOLATILITY[kind]
    sigma = sigma_min * np.sqrt(minutes)
    log_path = np.log(start_price) + np.cumsum(rng.normal(0.0, 1.0, n) * sigma)
    fair = np.exp(log_path)

    idx = np.flatnonzero(traded)
    m = len(idx)
    close = _round_price(fair[idx], quote)
    prev_close = np.empty(m)
    prev_close[0] = _round_price(np.asarray([start_price]), quote)[0]
    prev_close[1:] = close[:-1]
    # The first trade of an interval happens close to the last trade of the previous one.
    open_ = _round_price(prev_close * np.exp(rng.normal(0.0, 0.15, m) * sigma[idx]), quote)
    body_hi = np.maximum(open_, close)
    body_lo = np.minimum(open_, close)
    high = _round_price(body_hi * np.exp(np.abs(rng.normal(0.0, 0.6, m)) * sigma[idx]), quote)
    low = _round_price(body_lo * np.exp(-np.abs(rng.normal(0.0, 0.6, m)) * sigma[idx]), quote)
    if kind == "illiquid":
        # A thin market's candle is often a single trade: open = high = low = close.
        single = rng.random(m) < 0.35
        open_ = np.where(single, close, open_)
        high = np.where(single, close, high)
        low = np.where(single, close, low)
    high = np.maximum(high, np.maximum(open_, close))
    low = np.minimum(low, np.minimum(open_, close))

    value_target = _VALUE_PER_MINUTE[kind] * minutes[idx] * rng.lognormal(0.0, 0.8, m)
    volume = np.maximum(np.round(value_target / close, 8), 1e-8)
    vwap = low + (high - low) * rng.random(m)
    value = np.round(volume * vwap, 8)

    out = np.zeros(m, dtype=CANDLE_DTYPE)
    out["ts"] = ts[idx]
    out["open"] = open_
    out["high"] = high
    out["low"] = low
    out["close"] = close
    out["volume"] = volume
    out["value"] = value
    return out


def dense_candles(n: int, start: int, step: int = 60_000, seed: int = 0) -> np.ndarray:
    """``n`` valid candles every ``step`` ms from ``start``, no gaps: a seeded random walk with
    KRW-BTC-like prices on a 1,000-won tick (for benchmarks and bulk tests; see
    :func:`generate_market` for markets with no-trade intervals)."""
    rng = np.random.default_rng(seed)
    a = np.zeros(n, CANDLE_DTYPE)
    a["ts"] = start + np.arange(n, dtype=np.int64) * step
    p = np.round(5e7 * np.exp(np.cumsum(rng.normal(0, 8e-4, n))), -3)
    a["open"] = p
    a["close"] = np.round(p * (1 + rng.normal(0, 6e-4, n)), -3)
    a["high"] = np.maximum(a["open"], a["close"]) + 1000 * rng.integers(0, 20, n)
    a["low"] = np.minimum(a["open"], a["close"]) - 1000 * rng.integers(0, 20, n)
    a["volume"] = np.round(rng.exponential(3, n), 8)
    a["value"] = a["volume"] * p
    return a


def kernel_modules() -> dict[str, Any]:
    """Both kernel implementations by name, for tests and benchmarks that compare them:
    ``"numpy"`` (the twin, always there) and ``"cython"`` (None when the core is not built)."""
    from mds import _pycore

    try:
        from mds import _core
    except ImportError:
        return {"numpy": _pycore, "cython": None}
    return {"numpy": _pycore, "cython": _core}


def kernel_params() -> list[Any]:
    """:func:`kernel_modules` as ``pytest.param`` values (ids ``numpy``, ``cython``), the compiled
    one skipped when it is not built: parametrise a test or benchmark over both kernels."""
    import pytest

    return [
        pytest.param(mod, id=name, marks=() if mod is not None else pytest.mark.skip(reason="compiled core not built"))
        for name, mod in kernel_modules().items()
    ]
