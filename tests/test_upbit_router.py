"""UpbitRouter against FakeUpbit on 127.0.0.1: pagination, pacing, retries, cache."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from mds import candles_from_upbit
from mds.errors import InvalidRequestError, Layer1Error
from mds.layer1 import UpbitRouter
from mds.layer1._transport import _Pacer, _parse_remaining
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import iso_utc, to_ms

T0 = to_ms("2025-01-01T00:00:00Z")
DAY = 86_400_000
FAST = 0.05  # rate window (s) used on both sides to keep bursts quick; same 10-per-window logic

BTC = generate_market("KRW-BTC", "1m", T0, T0 + 10 * DAY, seed=11)
DOGE = generate_market("KRW-DOGE", "1m", T0, T0 + 3 * DAY, liquidity="illiquid", seed=11)
MARKETS = {("KRW-BTC", "1m"): BTC, ("KRW-DOGE", "1m"): DOGE}


def fake(**kw: Any) -> FakeUpbit:
    kw.setdefault("rate_window_s", FAST)
    return FakeUpbit(MARKETS, **kw)


def router(up: FakeUpbit, **kw: Any) -> UpbitRouter:
    kw.setdefault("rate_window_s", FAST)
    kw.setdefault("backoff_s", 0.005)
    kw.setdefault("max_backoff_s", 0.05)
    kw.setdefault("timeout_s", 2.0)
    return UpbitRouter(up.base_url, **kw)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ts_of(rows: list[dict[str, Any]]) -> np.ndarray:
    return candles_from_upbit(rows)["ts"]


# -- pagination --------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "pages"), [(1_000, 5), (10_000, 50)])
def test_pagination_returns_count_candles_without_duplicates_or_holes(count: int, pages: int) -> None:
    async def go(up: FakeUpbit) -> dict[str, Any]:
        async with router(up) as r:
            return await r.get_candle_data(["KRW-BTC"], "1m", count=count)

    with fake() as up:
        res = run(go(up))
        assert up.request_count("/v1/candles") == pages
        tos = [rec.params.get("to") for rec in up.requests("/v1/candles")]
    ts = ts_of(res["data"])
    assert len(ts) == count and len(np.unique(ts)) == count
    assert np.array_equal(ts[::-1], BTC["ts"][-count:])  # newest first, exactly what the source holds
    assert res["metadata"]["requests"] == pages and res["metadata"]["source"] == "api"
    # next `to` = the oldest candle_date_time_utc of the previous page, sent as UTC with a Z
    assert tos[0] is None
    for i in range(1, pages):
        assert tos[i] == iso_utc(int(ts[200 * i - 1])) + "Z"
    cov = res["metadata"]["covered"]["KRW-BTC"]
    assert cov[0] == ts[-1]


def test_pagination_through_an_illiquid_market_skips_no_trade_minutes_without_extra_requests() -> None:
    start, end = T0 + DAY, T0 + 2 * DAY + 1234_000

    async def go(up: FakeUpbit) -> dict[str, Any]:
        async with router(up) as r:
            return await r.get_candle_range("KRW-DOGE", "1m", start, end)

    with fake() as up:
        res = run(go(up))
        n_req = up.request_count()
    held = DOGE["ts"][(DOGE["ts"] >= start) & (DOGE["ts"] < end)]
    assert np.array_equal(ts_of(res["data"])[::-1], held)
    assert n_req == len(held) // 200 + 1
    assert res["metadata"]["covered"] == [start, end] and res["metadata"]["exhausted"] is False


def test_only_an_empty_page_means_history_ran_out() -> None:
    """A short page is followed by one more request; only its empty answer proves the start of
    history (one extra request per walk that reaches a market's first candle)."""
    short = generate_market("KRW-ETH", "1m", T0, T0 + 300 * 60_000, seed=2)

    async def go(up: FakeUpbit) -> tuple[dict[str, Any], dict[str, Any]]:
        async with router(up) as r:
            a = await r.get_candle_data("KRW-ETH", "1m", count=1_000)
            b = await r.get_candle_range("KRW-ETH", "1m", T0 - 10 * DAY, T0 + 100 * 60_000)
            return a, b

    with FakeUpbit({("KRW-ETH", "1m"): short}, rate_window_s=FAST) as up:
        a, b = run(go(up))
        assert up.request_count() == 3 + 2  # pages of 200, 100 (short), 0 (empty); 100, 0
        tos = [rec.params.get("to") for rec in up.requests()]
    oldest = iso_utc(int(short["ts"][0])) + "Z"
    assert tos[2] == oldest and tos[4] == oldest  # the empty pages asked before the first candle
    assert len(a["data"]) == len(short) and a["metadata"]["exhausted"] == {"KRW-ETH": True}
    assert b["metadata"]["exhausted"] is True and b["metadata"]["covered"] == [T0 - 10 * DAY, T0 + 100 * 60_000]
    assert len(b["data"]) == 100


@pytest.mark.parametrize(
    "to",
    [
        "2025-01-05T12:00:00Z",
        "2025-01-05 12:00:00",
        "2025-01-05T21:00:00+09:00",
        to_ms("2025-01-05T12:00:00Z"),
        dt.datetime(2025, 1, 5, 12, 0),
        dt.datetime(2025, 1, 5, 21, 0, tzinfo=dt.timezone(dt.timedelta(hours=9))),
    ],
)
def test_to_is_read_in_each_form_as_the_same_exclusive_instant(to: Any) -> None:
    async def go(up: FakeUpbit) -> dict[str, Any]:
        async with router(up) as r:
            return await r.get_candle_data("KRW-BTC", "1m", count=450, to=to)

    with fake() as up:
        res = run(go(up))
        sent = up.requests()[0].params["to"]
    end = to_ms("2025-01-05T12:00:00Z")
    assert sent == "2025-01-05T12:00:00Z"
    assert np.array_equal(ts_of(res["data"])[::-1], BTC["ts"][BTC["ts"] < end][-450:])
    assert res["metadata"]["covered"]["KRW-BTC"][1] == end


def test_several_symbols_are_fetched_and_grouped_in_the_order_given() -> None:
    async def go(up: FakeUpbit) -> dict[str, Any]:
        async with router(up) as r:
            return await r.get_candle_data(["KRW-DOGE", "KRW-BTC"], "1m", count=300)

    with fake() as up:
        res = run(go(up))
    markets = [x["market"] for x in res["data"]]
    assert markets == ["KRW-DOGE"] * 300 + ["KRW-BTC"] * 300


# -- pacing --------------------------------------------------------------------------------------


def test_no_429_under_a_burst_of_100_concurrent_requests() -> None:
    async def go(up: FakeUpbit) -> list[dict[str, Any]]:
        async with router(up) as r:
            return await asyncio.gather(
                *(r.get_candle_data("KRW-BTC", "1m", count=5, to=T0 + DAY + i * 60_000) for i in range(100))
            )

    with fake() as up:
        res = run(go(up))
        assert up.request_count() == 100
        assert up.status_counts() == {200: 100}
    assert all(len(x["data"]) == 5 for x in res)


def test_no_429_at_the_real_one_second_window() -> None:
    async def go(up: FakeUpbit) -> float:
        async with router(up, rate_window_s=1.0) as r:
            t0 = time.monotonic()
            await asyncio.gather(*(r.get_ticker_data("KRW-BTC", use_cache=False) for _ in range(25)))
            return time.monotonic() - t0

    with fake(rate_window_s=1.0) as up:
        elapsed = run(go(up))
        assert up.status_counts() == {200: 25}
    assert elapsed >= 2.0  # 25 requests at 10 per second


def test_remaining_req_from_another_client_slows_the_router_before_a_429() -> None:
    """Another process on the same IP used most of the budget; the router reads sec= and waits."""
    stop = threading.Event()

    def neighbour(url: str) -> None:
        with httpx.Client() as c:
            while not stop.is_set():
                c.get(url + "/v1/candles/minutes/1", params={"market": "KRW-BTC"})
                time.sleep(0.25)

    async def go(up: FakeUpbit) -> None:
        async with router(up, rate_window_s=1.0) as r:
            for i in range(16):
                await r.get_candle_data("KRW-BTC", "1m", count=1, to=T0 + DAY + i * 60_000)

    with fake(rate_window_s=1.0) as up:
        # the neighbour takes 6 of the 10 slots in the first second, then 4 a second
        with httpx.Client() as c:
            for _ in range(6):
                c.get(up.base_url + "/v1/candles/minutes/1", params={"market": "KRW-BTC"})
        t = threading.Thread(target=neighbour, args=(up.base_url,), daemon=True)
        t.start()
        try:
            run(go(up))
        finally:
            stop.set()
            t.join()
        ours = [rec for rec in up.requests() if "to" in rec.params]
        assert len(ours) >= 16
        assert sum(rec.status == 429 for rec in ours) <= 1  # at most a race with the neighbour


def test_pacer_fills_its_window_when_the_server_has_counted_more() -> None:
    async def go() -> float:
        p = _Pacer(limit=10, window_s=0.2)
        await p.acquire()
        p.release(0)  # the server says: nothing left this window
        t0 = time.monotonic()
        await p.acquire()
        return time.monotonic() - t0

    assert run(go()) >= 0.15
    assert _parse_remaining("group=candles; min=600; sec=7") == 7
    assert _parse_remaining("garbage") is None and _parse_remaining(None) is None


# -- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("rate_limit", {"times": 3}),
        ("status", {"times": 2, "status": 502}),
        ("status", {"times": 1, "status": 500}),
        ("malformed_json", {"times": 2}),
        ("truncated", {"times": 2}),
        ("wrong_market", {"times": 1}),
        ("latency", {"times": 1, "seconds": 0.6}),
    ],
)
def test_transient_faults_are_retried_and_the_result_is_exact(kind: str, kw: dict[str, Any]) -> None:
    async def go(up: FakeUpbit) -> tuple[dict[str, Any], dict[str, Any]]:
        async with router(up, timeout_s=0.3) as r:
            res = await r.get_candle_data("KRW-BTC", "1m", count=600)
            return res, r.get_performance_summary()

    with fake() as up:
        up.inject(kind, path_prefix="/v1/candles", **kw)
        res, perf = run(go(up))
        assert up.request_count() == 3 + kw["times"]
    assert np.array_equal(ts_of(res["data"])[::-1], BTC["ts"][-600:])
    assert perf["counters"]["retries"] == kw["times"]


@pytest.mark.parametrize("kind", ["duplicate_rows", "unordered_rows"])
def test_duplicated_or_unordered_pages_are_normalised(kind: str) -> None:
    async def go(up: FakeUpbit) -> dict[str, Any]:
        async with router(up) as r:
            return await r.get_candle_data("KRW-BTC", "1m", count=1_000)

    with fake() as up:
        up.inject(kind)
        res = run(go(up))
        assert up.request_count() == 5
    ts = ts_of(res["data"])
    assert np.array_equal(ts[::-1], BTC["ts"][-1000:])


def test_418_raises_layer1error_with_the_block_message_without_retrying() -> None:
    async def go(up: FakeUpbit) -> None:
        async with router(up) as r:
            await r.get_candle_data("KRW-BTC", "1m", count=10)

    with fake() as up:
        up.inject("blocked", message="IP blocked for 600 seconds")
        with pytest.raises(Layer1Error, match=r"418.*600 seconds"):
            run(go(up))
        assert up.request_count() == 1


@pytest.mark.parametrize(
    ("kind", "kw", "match"),
    [
        ("status", {"status": 503}, "HTTP 503"),
        ("rate_limit", {}, "429"),
        ("latency", {"seconds": 0.5}, "timeout"),
        ("malformed_json", {}, "malformed JSON"),
        ("wrong_market", {}, "KRW-XRP"),
        ("truncated", {}, "transport error"),
    ],
)
def test_persistent_faults_end_in_layer1error_after_bounded_retries(kind: str, kw: dict[str, Any], match: str) -> None:
    async def go(up: FakeUpbit) -> None:
        async with router(up, max_retries=2, timeout_s=0.2) as r:
            await r.get_candle_data("KRW-BTC", "1m", count=10)

    with fake() as up:
        up.inject(kind, **kw)
        with pytest.raises(Layer1Error, match=match):
            run(go(up))
        assert up.request_count() == 3


def test_client_errors_fail_at_once() -> None:
    async def go(up: FakeUpbit) -> None:
        async with router(up) as r:
            await r.get_candle_data("KRW-NOPE", "1m", count=10)

    with fake() as up:
        with pytest.raises(Layer1Error, match=r"404.*Code not found"):
            run(go(up))
        assert up.request_count() == 1
    with pytest.raises(InvalidRequestError):
        run(UpbitRouter().get_candle_data("krw-btc", "1m"))
    with pytest.raises(InvalidRequestError):
        run(UpbitRouter().get_candle_data("KRW-BTC", "2m"))


# -- cache --------------------------------------------------------------------------------------------


def test_latest_candles_are_cached_and_peekable_until_the_ttl() -> None:
    async def go(up: FakeUpbit) -> None:
        async with router(up, candle_ttl_s=1.0) as r:  # the hits below come well within it
            assert r.peek_cache("candle", ["KRW-BTC"], "1m", 100) is None
            first = await r.get_candle_data("KRW-BTC", "1m", count=100)
            assert first["metadata"]["cache_hit"] is False
            second = await r.get_candle_data("KRW-BTC", "1m", count=150)
            assert second["metadata"]["source"] == "cache" and len(second["data"]) == 150
            assert up.request_count() == 1  # the first call fetched the whole page of 200
            peek = r.peek_cache("candle", "KRW-BTC", "1m", count=200)
            assert peek is not None and peek["data"] == second["data"] + peek["data"][150:]
            assert r.peek_cache("candle", "KRW-BTC", "1m", count=201) is None
            await r.get_candle_data("KRW-BTC", "1m", count=100, use_cache=False)
            assert up.request_count() == 2
            await asyncio.sleep(1.05)
            assert r.peek_cache("candle", "KRW-BTC", "1m", 100) is None
            await r.get_candle_data("KRW-BTC", "1m", count=100)
            assert up.request_count() == 3
            assert r.cache_policy()["candle_ttl_s"] == 1.0

    with fake() as up:
        run(go(up))


def test_tickers_and_orderbooks_are_cached_for_seconds() -> None:
    async def go(up: FakeUpbit) -> None:
        async with router(up, ticker_ttl_s=1.0) as r:  # the hits below come well within it
            a = await r.get_ticker_data(["KRW-BTC", "KRW-DOGE"])
            b = await r.get_ticker_data(["KRW-DOGE"])
            assert b["metadata"]["cache_hit"] and b["data"] == a["data"][1:]
            assert r.peek_cache("ticker", ["KRW-BTC"])["data"] == a["data"][:1]  # type: ignore[index]
            ob = await r.get_orderbook_data("KRW-BTC")
            assert ob["data"][0]["market"] == "KRW-BTC" and ob["data"][0]["orderbook_units"]
            assert r.peek_cache("orderbook", "KRW-BTC") is not None
            trades = await r.get_trades(["KRW-BTC", "KRW-DOGE"], count=7)
            assert [t["market"] for t in trades["data"]] == ["KRW-BTC"] * 7 + ["KRW-DOGE"] * 7
            await asyncio.sleep(1.05)
            assert r.peek_cache("ticker", ["KRW-BTC"]) is None

    with fake() as up:
        run(go(up))
        assert up.request_count("/v1/ticker") == 1
        assert up.request_count("/v1/orderbook") == 1
        assert up.request_count("/v1/trades") == 2


# -- simulated clock ------------------------------------------------------------------------------------


def test_a_simulated_clock_moves_the_market_and_coverage_forward() -> None:
    now = [T0 + 2 * DAY + 30_000]

    def clock() -> int:
        return now[0]

    async def go(up: FakeUpbit) -> None:
        async with router(up, clock=clock, candle_ttl_s=0) as r:
            a = await r.get_candle_data("KRW-BTC", "1m", count=10)
            assert a["data"][0]["candle_date_time_utc"] == iso_utc(T0 + 2 * DAY)  # forming
            assert a["metadata"]["covered"]["KRW-BTC"] == [T0 + 2 * DAY - 9 * 60_000, T0 + 2 * DAY]
            now[0] += 5 * 60_000
            b = await r.get_candle_data("KRW-BTC", "1m", count=10)
            assert b["data"][0]["candle_date_time_utc"] == iso_utc(T0 + 2 * DAY + 5 * 60_000)
            assert b["metadata"]["covered"]["KRW-BTC"][1] == T0 + 2 * DAY + 5 * 60_000
            rng = await r.get_candle_range("KRW-BTC", "1m", T0 + DAY, T0 + 3 * DAY)
            assert rng["metadata"]["covered"] == [T0 + DAY, T0 + 2 * DAY + 5 * 60_000]

    with fake(clock=clock) as up:
        run(go(up))


def test_performance_summary_is_json_serialisable() -> None:
    import json

    async def go(up: FakeUpbit) -> dict[str, Any]:
        async with router(up) as r:
            await r.get_candle_data("KRW-BTC", "1m", count=400)
            await r.get_ticker_data("KRW-BTC")
            return r.get_performance_summary()

    with fake() as up:
        up.inject("status", times=1)
        perf = run(go(up))
    json.dumps(perf)
    assert perf["counters"]["requests"] == 4 and perf["counters"]["server_errors"] == 1
    assert perf["groups"]["candles"]["p50_ms"] > 0


def test_trades_with_a_repeated_sequential_id_keep_the_row_delivered_later() -> None:
    rows = [
        {"market": "KRW-BTC", "timestamp": T0 + 3, "trade_price": 3.0, "sequential_id": 3},
        {"market": "KRW-BTC", "timestamp": T0 + 2, "trade_price": 2.0, "sequential_id": 2},
        {"market": "KRW-BTC", "timestamp": T0 + 1, "trade_price": 1.0, "sequential_id": 1},
        {"market": "KRW-BTC", "timestamp": T0 + 2, "trade_price": 22.0, "sequential_id": 2},
    ]

    async def go() -> dict[str, Any]:
        r = UpbitRouter("http://127.0.0.1:9")

        async def fake_get(path: str, params: dict[str, Any], validate: Any = None) -> tuple[Any, int]:
            validate(rows)
            return list(rows), 1

        r._get = fake_get  # type: ignore[method-assign]
        return await r.get_trades("KRW-BTC", count=4)

    res = run(go())
    assert [(t["sequential_id"], t["trade_price"]) for t in res["data"]] == [(3, 3.0), (2, 22.0), (1, 1.0)]
