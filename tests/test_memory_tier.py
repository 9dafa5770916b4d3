"""Memory tier: held windows, views, partial candle, LRU and TTL bounds, bytes per candle."""

from __future__ import annotations

import gc
import json
import tracemalloc

import numpy as np
import pytest

from mds._dtypes import CANDLE_DTYPE
from mds.convert import candles_to_upbit
from mds.errors import InvalidRequestError
from mds.tiers.memory import MemoryTier
from mds.timeframes import parse_timeframe

M = 60_000
T0 = 1_700_000_040_000 // M * M
TF = parse_timeframe("1m")


class Clock:
    def __init__(self, now: int = 1_800_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def series(n: int, t0: int = T0, *, seed: int = 0, drop: tuple[int, ...] = ()) -> np.ndarray:
    """``n`` valid 1m candles from ``t0``; the slots in ``drop`` have no trades (no candle)."""
    rng = np.random.default_rng(seed)
    a = np.zeros(n, CANDLE_DTYPE)
    a["ts"] = t0 + np.arange(n) * M
    c = 100 + rng.standard_normal(n).cumsum()
    a["open"], a["close"] = c, c + 0.5
    a["high"], a["low"] = c + 1, c - 1
    a["volume"] = rng.random(n)
    a["value"] = a["volume"] * c
    return np.delete(a, list(drop)) if drop else a


def put(tier: MemoryTier, a: np.ndarray, start: int, end: int, symbol: str = "KRW-BTC") -> bool:
    rows = a[(a["ts"] >= start) & (a["ts"] < end)]
    return tier.put_range(symbol, TF, start, end, rows)


def test_latest_is_a_readonly_view_without_copy():
    tier = MemoryTier(clock=Clock())
    a = series(1000)
    assert put(tier, a, T0, T0 + 1000 * M)
    got = tier.latest("KRW-BTC", "1m", 1000)
    assert got is not None
    assert np.array_equal(got, a)
    assert not got.flags.writeable
    again = tier.latest("KRW-BTC", TF, 10)
    assert again is not None
    assert np.shares_memory(got, again)  # both views of the same rows: no copy
    with pytest.raises(ValueError, match="read-only"):
        got["close"][0] = 1.0


def test_latest_respects_end_and_the_held_window():
    tier = MemoryTier(clock=Clock())
    a = series(100)
    put(tier, a, T0, T0 + 100 * M)
    assert np.array_equal(tier.latest("KRW-BTC", TF, 5, end=T0 + 50 * M), a[45:50])
    assert np.array_equal(tier.latest("KRW-BTC", TF, 5, end=T0 + 100 * M), a[95:])
    # A window ending before the asked end is stale for that read: miss, let the store look further.
    assert tier.latest("KRW-BTC", TF, 5, end=T0 + 101 * M) is None
    # More than the window proves: older candles may exist before the window.
    assert tier.latest("KRW-BTC", TF, 101) is None
    assert tier.latest("KRW-BTC", TF, 11, end=T0 + 10 * M) is None
    assert tier.latest("KRW-ETH", TF, 1) is None
    assert tier.latest("KRW-BTC", "5m", 1) is None
    assert len(tier.latest("KRW-BTC", TF, 0)) == 0


def test_range_answers_inside_the_window_including_no_trade_slots():
    tier = MemoryTier(clock=Clock())
    a = series(60, drop=(10, 11, 12))  # three minutes without trades
    put(tier, a, T0, T0 + 60 * M)
    empty = tier.range("KRW-BTC", TF, T0 + 10 * M, T0 + 13 * M)
    assert empty is not None and len(empty) == 0  # held, and known to have no candles
    got = tier.range("KRW-BTC", TF, T0 + 5 * M, T0 + 20 * M)
    assert np.array_equal(got, a[(a["ts"] >= T0 + 5 * M) & (a["ts"] < T0 + 20 * M)])
    assert tier.range("KRW-BTC", TF, T0 - M, T0 + 5 * M) is None
    assert tier.range("KRW-BTC", TF, T0 + 50 * M, T0 + 61 * M) is None


def test_touching_range_extends_disjoint_newer_replaces_older_is_ignored():
    tier = MemoryTier(clock=Clock())
    a = series(300)
    put(tier, a, T0 + 100 * M, T0 + 200 * M)
    put(tier, a, T0 + 200 * M, T0 + 220 * M)  # touches the end
    put(tier, a, T0 + 90 * M, T0 + 105 * M)  # overlaps the start
    assert tier.held("KRW-BTC", TF) == (T0 + 90 * M, T0 + 220 * M)
    assert np.array_equal(tier.range("KRW-BTC", TF, T0 + 90 * M, T0 + 220 * M), a[90:220])
    assert not put(tier, a, T0, T0 + 80 * M)  # older and disjoint: ignored
    assert tier.held("KRW-BTC", TF) == (T0 + 90 * M, T0 + 220 * M)
    assert put(tier, a, T0 + 250 * M, T0 + 260 * M)  # newer and disjoint: replaces
    assert tier.held("KRW-BTC", TF) == (T0 + 250 * M, T0 + 260 * M)
    assert np.array_equal(tier.latest("KRW-BTC", TF, 10), a[250:260])
    assert tier.stats()["candles"] == 10


def test_overlapping_range_removes_candles_it_does_not_contain():
    tier = MemoryTier(clock=Clock())
    a = series(50)
    put(tier, a, T0, T0 + 50 * M)
    fixed = np.delete(a, [20, 21])  # e.g. a bad import deleted from the store
    put(tier, fixed, T0 + 15 * M, T0 + 30 * M)
    assert tier.held("KRW-BTC", TF) == (T0, T0 + 50 * M)
    assert np.array_equal(tier.range("KRW-BTC", TF, T0, T0 + 50 * M), fixed)


def test_overlapping_range_updates_changed_rows():
    tier = MemoryTier(clock=Clock())
    a = series(50)
    put(tier, a, T0, T0 + 50 * M)
    b = a.copy()
    b["close"][40:] += 0.25
    b["high"][40:] += 0.25
    put(tier, b, T0 + 40 * M, T0 + 50 * M)
    assert np.array_equal(tier.latest("KRW-BTC", TF, 50), b)


def test_capacity_trims_oldest_and_moves_held_start_up():
    tier = MemoryTier(capacity=100, clock=Clock())
    a = series(400)
    put(tier, a, T0, T0 + 150 * M)
    assert tier.held("KRW-BTC", TF) == (T0 + 50 * M, T0 + 150 * M)
    for i in range(150, 400, 7):  # live updates, a few candles at a time
        put(tier, a, T0 + i * M, T0 + min(i + 7, 400) * M)
    assert tier.held("KRW-BTC", TF) == (T0 + 300 * M, T0 + 400 * M)
    assert np.array_equal(tier.latest("KRW-BTC", TF, 100), a[300:])
    assert tier.latest("KRW-BTC", TF, 101) is None
    # Extending backwards while full keeps the newest rows: the window does not grow.
    put(tier, a, T0 + 250 * M, T0 + 300 * M)
    assert tier.held("KRW-BTC", TF) == (T0 + 300 * M, T0 + 400 * M)


def test_window_start_stays_put_when_its_first_slots_had_no_trades():
    tier = MemoryTier(capacity=100, clock=Clock())
    a = series(50, drop=(0, 1, 2))
    put(tier, a, T0, T0 + 50 * M)
    assert tier.held("KRW-BTC", TF) == (T0, T0 + 50 * M)
    assert len(tier.range("KRW-BTC", TF, T0, T0 + 3 * M)) == 0


def test_random_ranges_agree_with_a_reference_series():
    """Seeded random put_range sequences: whatever the tier answers equals the true series."""
    rng = np.random.default_rng(42)
    truth = series(2000, drop=tuple(sorted(rng.choice(2000, 300, replace=False).tolist())))
    for trial in range(30):
        tier = MemoryTier(capacity=int(rng.integers(5, 200)), clock=Clock())
        for _ in range(25):
            s = int(rng.integers(0, 1990))
            e = s + int(rng.integers(1, 300))
            put(tier, truth, T0 + s * M, T0 + e * M)
            held = tier.held("KRW-BTC", TF)
            assert held is not None
            hs, he = held
            want = truth[(truth["ts"] >= hs) & (truth["ts"] < he)]
            assert len(want) <= tier.capacity, trial
            assert np.array_equal(tier.range("KRW-BTC", TF, hs, he), want), trial
            n = int(rng.integers(0, 50))
            got = tier.latest("KRW-BTC", TF, n)
            if n <= len(want):
                assert np.array_equal(got, want[len(want) - n :]), trial
            else:
                assert got is None
            cut = int(rng.integers(hs, he + 1))
            got = tier.latest("KRW-BTC", TF, n, end=cut)
            below = want[want["ts"] < cut]
            if got is not None:
                assert np.array_equal(got, below[len(below) - n :]), trial
            else:
                assert len(below) < n


def test_views_never_change_after_later_writes():
    tier = MemoryTier(capacity=50, clock=Clock())
    a = series(200)
    put(tier, a, T0, T0 + 50 * M)
    view = tier.latest("KRW-BTC", TF, 50)
    window = tier.range("KRW-BTC", TF, T0 + 10 * M, T0 + 20 * M)
    before, before_w = view.copy(), window.copy()
    b = a.copy()
    b["close"][:50] += 0.1
    b["high"][:50] += 0.1
    put(tier, b, T0, T0 + 50 * M)  # corrections of rows the views hold
    put(tier, a, T0 + 50 * M, T0 + 200 * M)  # appends past capacity
    put(tier, a, T0 + 500 * M, T0 + 501 * M)  # replace
    tier.invalidate("KRW-BTC", TF)
    assert np.array_equal(view, before)
    assert np.array_equal(window, before_w)


def test_partial_is_kept_apart_replaced_and_dropped_once_closed():
    tier = MemoryTier(clock=Clock())
    a = series(11)
    put(tier, a, T0, T0 + 10 * M)
    tier.set_partial("KRW-BTC", TF, a[10])
    p = tier.partial("KRW-BTC", TF)
    assert p is not None and p.shape == (1,) and not p.flags.writeable
    assert p[0] == a[10]
    moved = a[10:11].copy()
    moved["close"] += 0.5
    moved["high"] += 0.5
    tier.set_partial("KRW-BTC", TF, moved)
    assert tier.partial("KRW-BTC", TF)[0] == moved[0]
    assert p[0] == a[10]  # the earlier array did not change
    assert len(tier.latest("KRW-BTC", TF, 10)) == 10  # closed rows only
    assert tier.stats()["partials"] == 1
    put(tier, a, T0 + 10 * M, T0 + 11 * M)  # the candle closed
    assert tier.partial("KRW-BTC", TF) is None
    with pytest.raises(InvalidRequestError):
        tier.set_partial("KRW-BTC", TF, a[:2])
    with pytest.raises(InvalidRequestError):
        tier.set_partial("KRW-BTC", TF, (1, 2.0))


def test_partial_alone_holds_no_window():
    tier = MemoryTier(clock=Clock())
    a = series(1)
    tier.set_partial("KRW-BTC", TF, a[0])
    assert tier.held("KRW-BTC", TF) is None
    assert tier.latest("KRW-BTC", TF, 1) is None
    assert tier.partial("KRW-BTC", TF)[0] == a[0]


def test_lru_evicts_least_recently_read_series_within_the_byte_budget():
    probe = MemoryTier(clock=Clock())
    put(probe, series(100), T0, T0 + 100 * M)
    per_series = probe.stats()["bytes"]
    tier = MemoryTier(max_bytes=3 * per_series, clock=Clock())
    a = series(100)
    for sym in ("KRW-A", "KRW-B", "KRW-C"):
        put(tier, a, T0, T0 + 100 * M, sym)
    assert tier.latest("KRW-A", TF, 1) is not None  # A is now the most recently read
    put(tier, a, T0, T0 + 100 * M, "KRW-D")
    assert tier.held("KRW-B", TF) is None
    assert {s for s in ("KRW-A", "KRW-C", "KRW-D") if tier.held(s, TF)} == {"KRW-A", "KRW-C", "KRW-D"}
    st = tier.stats()
    assert st["series"] == 3 and st["bytes"] <= tier.max_bytes and st["evicted_lru"] == 1


def test_series_not_read_within_ttl_is_dropped():
    clock = Clock()
    tier = MemoryTier(ttl_ms=60_000, clock=clock)
    a = series(10)
    put(tier, a, T0, T0 + 10 * M, "KRW-A")
    put(tier, a, T0, T0 + 10 * M, "KRW-B")
    clock.now += 40_000
    assert tier.latest("KRW-A", TF, 5) is not None  # read: its TTL starts again
    put(tier, a, T0, T0 + 10 * M, "KRW-B")  # a write is not a read
    clock.now += 30_000
    assert tier.held("KRW-B", TF) is None
    assert tier.latest("KRW-A", TF, 5) is not None
    clock.now += 60_001
    assert tier.latest("KRW-A", TF, 5) is None
    st = tier.stats()
    assert st["series"] == 0 and st["bytes"] == 0 and st["evicted_ttl"] == 2


def test_invalidate_clear_and_stats():
    tier = MemoryTier(clock=Clock())
    a = series(20)
    put(tier, a, T0, T0 + 20 * M, "KRW-A")
    put(tier, a, T0, T0 + 20 * M, "KRW-B")
    assert ("KRW-A", "1m") in tier and len(tier) == 2
    tier.invalidate("KRW-A", TF)
    tier.invalidate("KRW-A", TF)  # twice is fine
    assert tier.held("KRW-A", TF) is None
    st = tier.stats()
    assert st["series"] == 1 and st["candles"] == 20 and st["bytes"] > 0
    json.dumps(st)
    tier.clear()
    assert tier.stats()["series"] == 0 and tier.stats()["bytes"] == 0


def test_bad_put_range_is_rejected():
    tier = MemoryTier(clock=Clock())
    a = series(10)
    with pytest.raises(InvalidRequestError):
        tier.put_range("KRW-BTC", TF, T0 + M, T0 + 5 * M, a)  # rows outside the range
    with pytest.raises(InvalidRequestError):
        tier.put_range("KRW-BTC", TF, T0, T0, a[:0])
    with pytest.raises(InvalidRequestError):
        tier.put_range("KRW-BTC", TF, T0, T0 + 10 * M, a["ts"])
    with pytest.raises(InvalidRequestError):
        MemoryTier(capacity=0)
    assert tier.stats()["series"] == 0


def _bytes_per_candle(n_series: int = 40) -> tuple[float, float]:
    """Traced bytes per candle: the tier vs the same candles as Upbit dicts parsed from JSON."""
    arrays = [series(1000, seed=i) for i in range(n_series)]
    bodies = [json.dumps(candles_to_upbit(a[::-1], f"KRW-C{i}", "1m")) for i, a in enumerate(arrays)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tier = MemoryTier()
        for i, a in enumerate(arrays):
            tier.put_range(f"KRW-C{i}", TF, int(a["ts"][0]), int(a["ts"][-1]) + M, a)
        gc.collect()
        tier_bytes = tracemalloc.get_traced_memory()[0] - base
        base = tracemalloc.get_traced_memory()[0]
        pages = [json.loads(b) for b in bodies]  # what Layer 1 holds: the parsed REST pages
        gc.collect()
        dict_bytes = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert tier.stats()["candles"] == 1000 * n_series and len(pages) == n_series
    total = 1000 * n_series
    return tier_bytes / total, dict_bytes / total


def test_bytes_per_candle_vs_list_of_upbit_dicts():
    tier_b, dict_b = _bytes_per_candle()
    assert tier_b <= 72, tier_b
    assert tier_b <= 0.1 * dict_b, (tier_b, dict_b)


def test_timeframe_aliases_name_one_series():
    tier = MemoryTier(clock=Clock())
    a = series(10, t0=T0 // 3_600_000 * 3_600_000)
    a["ts"] = a["ts"][0] + np.arange(10) * 3_600_000
    tier.put_range("KRW-BTC", "60m", int(a["ts"][0]), int(a["ts"][-1]) + 3_600_000, a)
    assert np.array_equal(tier.latest("KRW-BTC", parse_timeframe("1h"), 10), a)
    assert np.array_equal(tier.latest("KRW-BTC", "1h", 10), a)
    assert len(tier) == 1
