"""SmartRouterConnector against UpbitRouter + FakeUpbit and against a minimal in-test Layer 1."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

from mds import candles_to_upbit
from mds.errors import Layer1Error
from mds.layer1 import SmartRouterConnector, UpbitRouter
from mds.models import Config, DataType, StorageRequest
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

T0 = to_ms("2025-01-01T00:00:00Z")
DAY = 86_400_000
NOW = T0 + 4 * DAY  # the data ends here; clocks are pinned so coverage is deterministic
FAST = 0.05

BTC = generate_market("KRW-BTC", "1m", T0, NOW, seed=21)
DOGE = generate_market("KRW-DOGE", "1m", T0, NOW, liquidity="illiquid", seed=21)
SERIES = {("KRW-BTC", "1m"): BTC, ("KRW-DOGE", "1m"): DOGE}


def clock() -> int:
    return NOW


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def candles(symbols: list[str] | str, **kw: Any) -> StorageRequest:
    return StorageRequest(DataType.CANDLE, symbols, "1m", **kw)


def with_router(fn: Any, **fake_kw: Any) -> tuple[Any, FakeUpbit]:
    """Run ``fn(connector, router, fake)`` against a fresh FakeUpbit and UpbitRouter."""
    with FakeUpbit(SERIES, rate_window_s=FAST, **fake_kw) as up:

        async def go() -> Any:
            async with UpbitRouter(
                up.base_url, rate_window_s=FAST, backoff_s=0.005, max_backoff_s=0.05, timeout_s=2.0, clock=clock
            ) as r:
                return await fn(SmartRouterConnector(r, clock=clock), r, up)

        return run(go()), up


# -- against UpbitRouter -------------------------------------------------------------------------


def test_latest_1000_candles_are_paginated_into_one_ascending_array() -> None:
    async def fn(c: SmartRouterConnector, r: UpbitRouter, up: FakeUpbit) -> Any:
        ans = await c.request_data_from_layer1(candles(["KRW-BTC", "KRW-DOGE"], count=1000))
        return ans, up.request_count("/v1/candles")

    (ans, n_req), _ = with_router(fn)
    assert ans.source == "layer1_api" and ans.calls == 10 and n_req == 10
    assert np.array_equal(ans.arrays["KRW-BTC"], BTC[-1000:])
    assert np.array_equal(ans.arrays["KRW-DOGE"], DOGE[-1000:])
    assert ans.covered["KRW-BTC"] == (int(BTC["ts"][-1000]), NOW)
    assert ans.arrays["KRW-BTC"].flags.c_contiguous


def test_a_range_request_covers_exactly_the_range() -> None:
    start, end = T0 + DAY + 7 * 60_000, T0 + 2 * DAY

    async def fn(c: SmartRouterConnector, r: UpbitRouter, up: FakeUpbit) -> Any:
        return await c.request_data_from_layer1(candles("KRW-DOGE", start_time=start, end_time=end))

    ans, _ = with_router(fn)
    want = DOGE[(DOGE["ts"] >= start) & (DOGE["ts"] < end)]
    assert np.array_equal(ans.arrays["KRW-DOGE"], want)
    assert ans.covered["KRW-DOGE"] == (start, end) and ans.exhausted["KRW-DOGE"] is False


def test_n_candles_from_a_start_walk_forward() -> None:
    start = T0 + DAY + 30 * 60_000

    async def fn(c: SmartRouterConnector, r: UpbitRouter, up: FakeUpbit) -> Any:
        a = await c.request_data_from_layer1(candles("KRW-DOGE", start_time=start, count=500))
        b = await c.request_data_from_layer1(candles("KRW-BTC", start_time=NOW - 3 * 60 * 60_000))
        return a, b

    (a, b), _ = with_router(fn)
    assert np.array_equal(a.arrays["KRW-DOGE"], DOGE[DOGE["ts"] >= start][:500])
    lo, hi = a.covered["KRW-DOGE"]
    assert lo == start and hi == int(a.arrays["KRW-DOGE"]["ts"][-1]) + 60_000
    assert np.array_equal(b.arrays["KRW-BTC"], BTC[BTC["ts"] >= NOW - 3 * 60 * 60_000])
    assert b.covered["KRW-BTC"] == (NOW - 3 * 60 * 60_000, NOW)


def test_layer1_cache_answers_without_network_and_misses_cleanly() -> None:
    async def fn(c: SmartRouterConnector, r: UpbitRouter, up: FakeUpbit) -> Any:
        assert await c.get_from_layer1_cache(candles("KRW-BTC", count=100)) is None
        await c.request_data_from_layer1(candles("KRW-BTC", count=50))
        before = up.request_count()
        hit = await c.get_from_layer1_cache(candles("KRW-BTC", count=150))
        inside = await c.get_from_layer1_cache(candles("KRW-BTC", start_time=NOW - 3_600_000, end_time=NOW))
        outside = await c.get_from_layer1_cache(candles("KRW-BTC", start_time=NOW - DAY, end_time=NOW))
        forward = await c.get_from_layer1_cache(candles("KRW-BTC", start_time=NOW - DAY, count=5))
        trades = await c.get_from_layer1_cache(StorageRequest(DataType.TRADE, ["KRW-BTC"]))
        assert up.request_count() == before
        return hit, inside, outside, forward, trades

    (hit, inside, outside, forward, trades), _ = with_router(fn)
    assert hit.source == "layer1_cache" and np.array_equal(hit.arrays["KRW-BTC"], BTC[-150:])
    assert hit.covered["KRW-BTC"] == (int(BTC["ts"][-150]), NOW)
    assert np.array_equal(inside.arrays["KRW-BTC"], BTC[BTC["ts"] >= NOW - 3_600_000])
    assert inside.covered["KRW-BTC"] == (NOW - 3_600_000, NOW)
    assert outside is None and forward is None and trades is None


def test_tickers_orderbooks_and_trades_through_the_router() -> None:
    async def fn(c: SmartRouterConnector, r: UpbitRouter, up: FakeUpbit) -> Any:
        t = await c.request_data_from_layer1(StorageRequest(DataType.TICKER, ["KRW-BTC", "KRW-DOGE"]))
        cached = await c.get_from_layer1_cache(StorageRequest(DataType.TICKER, ["KRW-DOGE"]))
        ob = await c.request_data_from_layer1(StorageRequest(DataType.ORDERBOOK, ["KRW-BTC"]))
        tr = await c.request_data_from_layer1(StorageRequest(DataType.TRADE, ["KRW-BTC"], count=12))
        return t, cached, ob, tr

    (t, cached, ob, tr), _ = with_router(fn)
    assert t.arrays["KRW-BTC"]["trade_price"] == BTC["close"][-1]
    assert cached is not None and cached.source == "layer1_cache"
    assert cached.arrays["KRW-DOGE"] == t.arrays["KRW-DOGE"]
    assert ob.arrays["KRW-BTC"]["orderbook_units"]
    arr = tr.arrays["KRW-BTC"]
    assert len(arr) == 12 and (np.diff(arr["ts"]) >= 0).all()
    assert len(tr.records["KRW-BTC"]) == 12


def test_router_failures_reach_the_caller_as_layer1error_with_upbits_message() -> None:
    async def fn(c: SmartRouterConnector, r: UpbitRouter, up: FakeUpbit) -> Any:
        up.inject("blocked", message="blocked for 42 seconds")
        with pytest.raises(Layer1Error, match="42 seconds"):
            await c.request_data_from_layer1(candles("KRW-BTC", count=10))
        up.clear_faults()
        return await c.monitor_layer1_performance()

    report, _ = with_router(fn)
    assert report["failures"] == 1 and report["success_rate"] == 0.0
    assert report["layer1"]["counters"]["blocked"] == 1


def test_policy_and_monitoring_merge_the_routers_own_numbers() -> None:
    async def fn(c: SmartRouterConnector, r: UpbitRouter, up: FakeUpbit) -> Any:
        await c.request_data_from_layer1(candles("KRW-BTC", count=450))
        return await c.sync_cache_policies(), await c.monitor_layer1_performance()

    (policy, report), _ = with_router(fn)
    assert policy["layer1"]["candle_ttl_s"] == 300.0
    assert policy["candle_ttl_s"] == max(300.0, Config().memory_ttl_s)
    json.dumps(report)
    assert report["calls"] == 3 and report["success_rate"] == 1.0
    assert report["by_data_type"]["candle"]["calls"] == 3
    assert report["layer1"]["counters"]["requests"] == 3


# -- against a minimal Smart Router shape ----------------------------------------------------------


class MiniLayer1:
    """The Smart Router's shape over arrays: at most 200 candles a call, no cache, no extras."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def get_candle_data(
        self, symbols: list[str], interval: str, count: int = 200, to: Any = None, use_cache: bool = True
    ) -> dict[str, Any]:
        self.calls.append(("candle", to))
        rows: list[dict[str, Any]] = []
        for s in symbols:
            arr = SERIES[(s, interval)]
            if to is not None:
                arr = arr[arr["ts"] < to_ms(to)]
            rows += candles_to_upbit(arr[-min(count, 200) :][::-1], s, interval)
        await asyncio.sleep(0)
        return {"success": True, "data": rows, "metadata": {"source": "api"}}

    async def get_ticker_data(self, symbols: list[str], use_cache: bool = True) -> dict[str, Any]:
        return {"success": True, "data": {s: {"trade_price": 1.5} for s in symbols}, "metadata": {}}

    async def get_orderbook_data(self, symbols: list[str], use_cache: bool = True) -> dict[str, Any]:
        return {"success": True, "data": [{"market": s, "orderbook_units": []} for s in symbols], "metadata": {}}

    async def get_trades(self, symbols: list[str], count: int = 100) -> dict[str, Any]:
        rows = [
            {
                "market": s,
                "timestamp": T0 + i,
                "trade_price": 10.0 + i,
                "trade_volume": 0.5,
                "ask_bid": "BID" if i % 2 else "ASK",
                "sequential_id": 100 + i,
            }
            for s in symbols
            for i in range(count)
        ]
        return {"success": True, "data": rows[::-1], "metadata": {}}


def test_minimal_layer1_is_paginated_by_the_connector() -> None:
    mini = MiniLayer1()
    c = SmartRouterConnector(mini, clock=clock)
    ans = run(c.request_data_from_layer1(candles("KRW-BTC", count=1000)))
    assert np.array_equal(ans.arrays["KRW-BTC"], BTC[-1000:])
    assert len(mini.calls) == 5 and mini.calls[0][1] is None
    assert mini.calls[1][1].endswith("Z")
    assert ans.covered["KRW-BTC"] == (int(BTC["ts"][-1000]), NOW)
    rng = run(c.request_data_from_layer1(candles("KRW-DOGE", start_time=T0, end_time=T0 + DAY)))
    assert np.array_equal(rng.arrays["KRW-DOGE"], DOGE[DOGE["ts"] < T0 + DAY])
    # the walk reached the range start (DOGE's first candle is at T0): nothing to prove beyond it
    assert rng.exhausted["KRW-DOGE"] is False and rng.covered["KRW-DOGE"] == (T0, T0 + DAY)
    # a range from before the first candle: the short page is followed by one empty page, the
    # proof that history ran out
    calls = len(mini.calls)
    early = run(c.request_data_from_layer1(candles("KRW-DOGE", start_time=T0 - DAY, end_time=T0 + DAY)))
    assert np.array_equal(early.arrays["KRW-DOGE"], DOGE[DOGE["ts"] < T0 + DAY])
    assert early.exhausted["KRW-DOGE"] is True and early.covered["KRW-DOGE"] == (T0 - DAY, T0 + DAY)
    assert mini.calls[-1] == ("candle", "2025-01-01T00:00:00Z")
    assert len(mini.calls) - calls == -(-int((DOGE["ts"] < T0 + DAY).sum()) // 200) + 1


def test_minimal_layer1_realtime_answers_and_missing_extras() -> None:
    c = SmartRouterConnector(MiniLayer1(), clock=clock)
    t = run(c.request_data_from_layer1(StorageRequest(DataType.TICKER, ["KRW-BTC", "KRW-ETH"])))
    assert t.arrays == {
        "KRW-BTC": {"market": "KRW-BTC", "trade_price": 1.5},
        "KRW-ETH": {"market": "KRW-ETH", "trade_price": 1.5},
    }
    tr = run(c.request_data_from_layer1(StorageRequest(DataType.TRADE, ["KRW-BTC"], count=4)))
    assert tr.arrays["KRW-BTC"]["sequential_id"].tolist() == [100, 101, 102, 103]
    assert tr.arrays["KRW-BTC"]["side"].tolist() == [-1, 1, -1, 1]
    assert run(c.get_from_layer1_cache(candles("KRW-BTC", count=10))) is None
    policy = run(c.sync_cache_policies())
    assert policy["layer1"] is None and policy["candle_ttl_s"] == Config().memory_ttl_s
    report = run(c.monitor_layer1_performance())
    assert report["layer1"] is None and report["calls"] == 2


class BrokenLayer1(MiniLayer1):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    async def get_candle_data(
        self, symbols: list[str], interval: str, count: int = 200, to: Any = None, use_cache: bool = True
    ) -> Any:
        good = await super().get_candle_data(symbols, interval, count, to, use_cache)
        if self.mode == "success_false":
            return {"success": False, "error": "upstream said no", "metadata": {}}
        if self.mode == "raises":
            raise RuntimeError("socket exploded")
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "not_a_dict":
            return good["data"]
        if self.mode == "data_not_list":
            return {"success": True, "data": "oops", "metadata": {}}
        if self.mode == "missing_field":
            for r in good["data"]:
                del r["trade_price"]
        if self.mode == "wrong_market":
            for r in good["data"]:
                r["market"] = "KRW-XRP"
        if self.mode == "misaligned":
            good["data"][0]["candle_date_time_utc"] = "2025-01-03T10:00:30"
        return good


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("success_false", "upstream said no"),
        ("raises", "socket exploded"),
        ("slow", "timed out"),
        ("not_a_dict", "not a success/data/metadata dict"),
        ("data_not_list", "not a list"),
        ("missing_field", "trade_price"),
        ("wrong_market", "KRW-XRP"),
        ("misaligned", "aligned"),
    ],
)
def test_bad_layer1_answers_become_layer1error(mode: str, match: str) -> None:
    c = SmartRouterConnector(BrokenLayer1(mode), timeout_s=0.1, clock=clock)
    with pytest.raises(Layer1Error, match=match):
        run(c.request_data_from_layer1(candles("KRW-BTC", count=10)))
    report = run(c.monitor_layer1_performance())
    assert report["failures"] == 1 and report["success_rate"] == 0.0
    assert report["timeouts"] == (1 if mode == "slow" else 0)


def test_realtime_answers_for_other_markets_are_rejected() -> None:
    class Wrong(MiniLayer1):
        async def get_ticker_data(self, symbols: list[str], use_cache: bool = True) -> dict[str, Any]:
            return {"success": True, "data": [{"market": "KRW-XRP"}], "metadata": {}}

        async def get_orderbook_data(self, symbols: list[str], use_cache: bool = True) -> dict[str, Any]:
            return {"success": True, "data": [], "metadata": {}}

    c = SmartRouterConnector(Wrong(), clock=clock)
    with pytest.raises(Layer1Error, match="KRW-XRP"):
        run(c.request_data_from_layer1(StorageRequest(DataType.TICKER, ["KRW-BTC"])))
    with pytest.raises(Layer1Error, match="no answer"):
        run(c.request_data_from_layer1(StorageRequest(DataType.ORDERBOOK, ["KRW-BTC"])))


def test_sync_policy_keeps_the_longer_ttl_and_peek_without_dates_covers_only_its_rows() -> None:
    class Cached(MiniLayer1):
        def cache_policy(self) -> dict[str, Any]:
            return {"candle_ttl_s": 7200.0, "ticker_ttl_s": 1.0, "orderbook_ttl_s": "bad"}

        async def peek_cache(
            self, data_type: str, symbols: list[str], interval: str | None = None, count: int | None = None
        ) -> dict[str, Any] | None:
            if data_type != "candle":
                return None
            sel = BTC[-(count or 200) :][::-1]
            return {"success": True, "data": candles_to_upbit(sel, "KRW-BTC", "1m"), "metadata": {}}

    c = SmartRouterConnector(Cached(), clock=clock, config=Config(memory_ttl_s=600.0, realtime_ttl_s=30.0))
    policy = run(c.sync_cache_policies())
    assert policy["candle_ttl_s"] == 7200.0 and policy["ticker_ttl_s"] == 30.0
    assert policy["orderbook_ttl_s"] == Config().orderbook_ttl_s
    hit = run(c.get_from_layer1_cache(candles("KRW-BTC", count=100)))
    assert hit is not None and np.array_equal(hit.arrays["KRW-BTC"], BTC[-100:])
    # undated: covered up to its newest candle, which may have been forming when cached
    assert hit.covered["KRW-BTC"] == (int(BTC["ts"][-100]), int(BTC["ts"][-1]))
    assert run(c.get_from_layer1_cache(StorageRequest(DataType.TICKER, ["KRW-BTC"]))) is None


def test_an_object_without_the_smart_router_shape_is_refused() -> None:
    with pytest.raises(TypeError, match="get_candle_data"):
        SmartRouterConnector(object())


def test_a_forward_walk_past_the_newest_candle_stops_after_one_probe() -> None:
    later = NOW + 5 * DAY  # the market has been silent since NOW

    async def fn(c: SmartRouterConnector, r: UpbitRouter, up: FakeUpbit) -> Any:
        c2 = SmartRouterConnector(r, clock=lambda: later)
        ans = await c2.request_data_from_layer1(candles("KRW-BTC", start_time=NOW - 10 * 60_000, count=500))
        return ans, up.request_count()

    (ans, n_req), _ = with_router(fn)
    assert np.array_equal(ans.arrays["KRW-BTC"], BTC[-10:])
    assert ans.covered["KRW-BTC"] == (NOW - 10 * 60_000, later)
    assert n_req <= 4


def test_peek_now_answers_a_sync_peek_without_an_event_loop() -> None:
    """peek_now is get_from_layer1_cache for an ordinary peek_cache function, called in this thread."""
    from mds.layer1.connector import SmartRouterConnector
    from mds.models import DataType, StorageRequest

    rows = [
        {
            "market": "KRW-BTC",
            "candle_date_time_utc": f"2025-01-27T00:0{i}:00",
            "opening_price": 1.0,
            "high_price": 2.0,
            "low_price": 0.5,
            "trade_price": 1.5,
            "candle_acc_trade_volume": 1.0,
            "candle_acc_trade_price": 1.5,
        }
        for i in range(5, -1, -1)
    ]

    class SyncPeek:
        async def get_candle_data(self, *a, **k):  # pragma: no cover - not called
            raise AssertionError

        get_ticker_data = get_orderbook_data = get_trades = get_candle_data

        def peek_cache(self, kind, symbols, interval=None, count=None):
            return {"success": True, "data": rows[:count], "metadata": {"exhausted": {"KRW-BTC": True}}}

    conn = SmartRouterConnector(SyncPeek())
    ans = conn.peek_now(StorageRequest(DataType.CANDLE, ["KRW-BTC"], timeframe="1m", count=6))
    assert ans is not None
    assert ans.source == "layer1_cache"
    assert len(ans.arrays["KRW-BTC"]) == 6
    assert (ans.arrays["KRW-BTC"]["ts"][1:] > ans.arrays["KRW-BTC"]["ts"][:-1]).all()

    class AsyncPeek(SyncPeek):
        async def peek_cache(self, kind, symbols, interval=None, count=None):  # type: ignore[override]
            return None

    assert SmartRouterConnector(AsyncPeek()).peek_now(StorageRequest("candle", ["KRW-BTC"], "1m", count=6)) is None


# -- issue 14: lying Layer 1s ---------------------------------------------------------------------


def test_a_cancellation_of_the_caller_propagates_and_cancels_the_layer1_call() -> None:
    """Our own cancellation stays a CancelledError (it is not the Layer 1's fault) and reaches the
    Layer 1's coroutine; a CancelledError the Layer 1 raises by itself is a Layer1Error."""

    async def go() -> list[str]:
        entered, gone = asyncio.Event(), asyncio.Event()
        seen: list[str] = []

        class Slow(MiniLayer1):
            async def get_candle_data(self, *a: Any, **k: Any) -> dict[str, Any]:
                entered.set()
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    seen.append("cancelled")
                    gone.set()
                    raise
                raise AssertionError("not cancelled")

        c = SmartRouterConnector(Slow(), timeout_s=30, clock=clock)
        task = asyncio.ensure_future(c.request_data_from_layer1(candles("KRW-BTC", count=10)))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gone.wait()
        return seen

    assert run(go()) == ["cancelled"]


@pytest.mark.parametrize("how", ["raise_cancelled", "cancel_own_task", "system_exit", "keyboard_interrupt"])
def test_a_layer1_aborting_its_own_call_is_a_layer1error(how: str) -> None:
    class Aborts(MiniLayer1):
        async def get_candle_data(self, *a: Any, **k: Any) -> dict[str, Any]:
            good = await super().get_candle_data(*a, **k)
            if how == "raise_cancelled":
                raise asyncio.CancelledError
            if how == "cancel_own_task":
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
                return good
            raise SystemExit(3) if how == "system_exit" else KeyboardInterrupt()

    c = SmartRouterConnector(Aborts(), clock=clock)

    async def go() -> Any:
        with pytest.raises(Layer1Error, match="get_candle_data"):
            await c.request_data_from_layer1(candles("KRW-BTC", count=10))
        return await c.monitor_layer1_performance()

    report = run(go())
    assert report["failures"] == 1


def test_policy_and_summary_raising_base_exceptions_are_typed() -> None:
    class Exits(MiniLayer1):
        def cache_policy(self) -> dict[str, Any]:
            raise SystemExit(1)

        async def get_performance_summary(self) -> dict[str, Any]:
            raise asyncio.CancelledError

    c = SmartRouterConnector(Exits(), clock=clock)
    with pytest.raises(Layer1Error, match="SystemExit"):
        run(c.sync_cache_policies())
    assert "CancelledError" in run(c.monitor_layer1_performance())["layer1"]["error"]


def test_peek_answers_resolve_duplicates_last_wins_and_claim_exhaustion_only_with_true() -> None:
    rows = candles_to_upbit(BTC[-5:][::-1], "KRW-BTC", "1m")
    dup = {**rows[2], "candle_acc_trade_volume": 777.0}
    meta: dict[str, Any] = {}

    class Peek(MiniLayer1):
        def peek_cache(self, kind: str, symbols: list[str], interval: Any = None, count: Any = None) -> Any:
            return {"success": True, "data": [*rows, dup], "metadata": meta}

    c = SmartRouterConnector(Peek(), clock=clock)
    ans = c.peek_now(candles("KRW-BTC", count=5))
    assert ans is not None
    arr = ans.arrays["KRW-BTC"]
    assert arr["ts"].tolist() == BTC["ts"][-5:].tolist()
    assert float(arr["volume"][2]) == 777.0  # the duplicate delivered later wins
    # 5 rows asked 10: an undated cache answers only when it says, with True, that history ran out
    assert c.peek_now(candles("KRW-BTC", count=10)) is None
    meta["exhausted"] = {"KRW-BTC": "false"}
    assert c.peek_now(candles("KRW-BTC", count=10)) is None
    meta["exhausted"] = {"KRW-BTC": True}
    got = c.peek_now(candles("KRW-BTC", count=10))
    assert got is not None and got.exhausted == {"KRW-BTC": True}


def test_trades_with_duplicate_ids_keep_the_later_row() -> None:
    class Dups(MiniLayer1):
        async def get_trades(self, symbols: list[str], count: int = 100) -> dict[str, Any]:
            good = await super().get_trades(symbols, count)
            rows = good["data"]
            good["data"] = [*rows, {**rows[1], "trade_price": 99.0}]  # sequential_id 102 again
            return good

    c = SmartRouterConnector(Dups(), clock=clock)
    ans = run(c.request_data_from_layer1(StorageRequest(DataType.TRADE, ["KRW-BTC"], count=4)))
    arr = ans.arrays["KRW-BTC"]
    assert arr["sequential_id"].tolist() == [100, 101, 102, 103]
    assert arr["price"].tolist() == [10.0, 11.0, 99.0, 13.0]


def test_paging_reads_a_short_page_as_no_proof_also_when_bounded_by_start() -> None:
    """Pages asked for fewer than 200 slots (``[start, to)`` is short) that come back short go on;
    only an empty page proves that nothing older exists."""
    from mds.layer1._paging import paginate_candles
    from mds.timeframes import parse_timeframe

    m = 60_000
    src = BTC[:10]  # every minute of [T0, T0 + 10 min)
    calls: list[tuple[int, int | None]] = []

    async def capped_at_2(n: int, to: int | None) -> list[dict[str, Any]]:
        calls.append((n, to))
        arr = src if to is None else src[src["ts"] < to]
        return candles_to_upbit(arr[len(arr) - min(n, 2, len(arr)) :][::-1], "KRW-BTC", "1m")

    tf = parse_timeframe("1m")
    pages = run(paginate_candles(capped_at_2, tf, "KRW-BTC", start=T0 + 3 * m, end=T0 + 8 * m))
    assert pages.ts.tolist() == [T0 + k * m for k in (7, 6, 5, 4, 3)]
    assert pages.covered_from == T0 + 3 * m and not pages.exhausted
    assert calls == [(5, T0 + 8 * m), (3, T0 + 6 * m), (1, T0 + 4 * m)]
    calls.clear()
    pages = run(paginate_candles(capped_at_2, tf, "KRW-BTC", start=T0 - 5 * m, end=T0 + 2 * m))
    assert pages.ts.tolist() == [T0 + m, T0] and pages.exhausted and pages.covered_from == T0 - 5 * m
    assert calls == [(7, T0 + 2 * m), (5, T0)]  # the second, empty page is the proof
    calls.clear()
    pages = run(paginate_candles(capped_at_2, tf, "KRW-BTC", count=5))
    assert len(pages.ts) == 5 and pages.covered_from == T0 + 5 * m and not pages.exhausted
    assert [n for n, _ in calls] == [5, 3, 1]
