"""Memory tier and realtime cache: read/put latency and bytes per cached candle.

Targets (issue 6): latest-1000 read <= 1 us median (a view, no copy); ticker put <= 5 us and
get <= 1 us; <= 72 bytes per cached candle and >= 90% less than the list-of-dicts form. Each
mds number sits next to the naive approach measured in the same run.

    /work/venv/bin/python -m pytest benches/bench_memory.py --benchmark-columns=median,iqr,ops
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any

import numpy as np
import pytest

from mds._dtypes import CANDLE_DTYPE
from mds._kernels import IMPLEMENTATION
from mds.convert import candles_to_upbit
from mds.tiers.memory import MemoryTier
from mds.tiers.realtime import TICKER_SIMPLE, RealtimeCache
from mds.timeframes import parse_timeframe

M = 60_000
T0 = 1_700_000_040_000 // M * M
TF = parse_timeframe("1m")
NOW = 1_800_000_000_000


def _series(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.zeros(n, CANDLE_DTYPE)
    a["ts"] = T0 + np.arange(n) * M
    c = 100 + rng.standard_normal(n).cumsum()
    a["open"], a["close"], a["high"], a["low"] = c, c + 0.5, c + 1, c - 1
    a["volume"] = rng.random(n)
    a["value"] = a["volume"] * c
    return a


def _ticker() -> dict[str, Any]:
    keys = [v for k, v in TICKER_SIMPLE.items() if k not in ("ts", "msfi")]  # the two deprecated fields
    msg: dict[str, Any] = {k: 1.5 for k in keys}
    msg.update(
        type="ticker",
        code="KRW-BTC",
        change="RISE",
        ask_bid="BID",
        trade_date="20261001",
        trade_time="031500",
        trade_timestamp=NOW - 10,
        timestamp=NOW,
        stream_type="REALTIME",
    )
    return msg


@pytest.fixture(scope="module")
def tier() -> MemoryTier:
    t = MemoryTier()  # the default wall clock, as users run it
    a = _series(1000)
    t.put_range("KRW-BTC", TF, T0, T0 + 1000 * M, a)
    return t


@pytest.mark.benchmark(group="latest-1000")
def test_memory_latest_1000(benchmark, tier):
    benchmark.extra_info["kernels"] = IMPLEMENTATION
    got = benchmark(tier.latest, "KRW-BTC", TF, 1000)
    assert got is not None and len(got) == 1000 and not got.flags.writeable


@pytest.mark.benchmark(group="latest-1000")
def test_naive_list_of_dicts_latest_1000(benchmark):
    rows = candles_to_upbit(_series(1000), "KRW-BTC", "1m")
    cache = {("KRW-BTC", "1m"): rows}
    got = benchmark(lambda: cache[("KRW-BTC", "1m")][-1000:])
    assert len(got) == 1000


@pytest.mark.benchmark(group="ticker-put")
def test_ticker_put_default(benchmark):
    cache = RealtimeCache()
    msg = _ticker()
    benchmark(cache.put_ticker, msg)
    assert cache.ticker("KRW-BTC")["trade_price"] == 1.5


@pytest.mark.benchmark(group="ticker-put")
def test_ticker_put_simple(benchmark):
    cache = RealtimeCache()
    inverse = {v: k for k, v in TICKER_SIMPLE.items()}
    msg = {inverse.get(k, k): v for k, v in _ticker().items()}
    benchmark(cache.put_ticker, msg)
    assert cache.ticker("KRW-BTC")["trade_price"] == 1.5


@pytest.mark.benchmark(group="ticker-get")
def test_ticker_get(benchmark):
    cache = RealtimeCache()
    cache.put_ticker(_ticker())
    got = benchmark(cache.ticker, "KRW-BTC")
    assert got is not None and got["market"] == "KRW-BTC"


@pytest.mark.benchmark(group="ticker-get")
def test_naive_dict_get_copy(benchmark):
    cache = {"KRW-BTC": _ticker()}
    got = benchmark(lambda: cache["KRW-BTC"].copy())
    assert got["code"] == "KRW-BTC"


def _bytes_per_candle(n_series: int = 40) -> tuple[float, float]:
    arrays = [_series(1000, seed=i) for i in range(n_series)]
    bodies = [json.dumps(candles_to_upbit(a[::-1], f"KRW-C{i}", "1m")) for i, a in enumerate(arrays)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t = MemoryTier()
        for i, a in enumerate(arrays):
            t.put_range(f"KRW-C{i}", TF, T0, T0 + 1000 * M, a)
        gc.collect()
        tier_bytes = tracemalloc.get_traced_memory()[0] - base
        base = tracemalloc.get_traced_memory()[0]
        pages = [json.loads(b) for b in bodies]  # Layer 1 holds parsed REST pages
        gc.collect()
        dict_bytes = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(pages) == n_series and t.stats()["candles"] == 1000 * n_series
    return tier_bytes / (1000 * n_series), dict_bytes / (1000 * n_series)


@pytest.mark.benchmark(group="bytes-per-candle")
def test_memory_bytes_per_candle(benchmark):
    result = benchmark.pedantic(_bytes_per_candle, rounds=1, iterations=1)
    tier_b, dict_b = result
    benchmark.extra_info["tier_bytes_per_candle"] = round(tier_b, 2)
    benchmark.extra_info["dict_bytes_per_candle"] = round(dict_b, 2)
    benchmark.extra_info["saving"] = round(1 - tier_b / dict_b, 4)
    assert tier_b <= 72 and tier_b <= 0.1 * dict_b
