"""Layer 1's cache first for every kind of read (issue 18, DESIGN.md section 5).

A real FakeUpbit on 127.0.0.1 and a real UpbitRouter over it; "a Layer 1 whose cache holds the
answer" is a router that answered the same question for another user a moment ago. Every test
counts the requests FakeUpbit served while the store read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds
from mds import Config, DataType, StorageRequest
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, MarketClock, generate_market
from mds.timeutil import to_ms

T0 = to_ms("2025-01-06T00:00:00Z")
MIN = 60_000
DAY = 86_400_000
SYMS = ["KRW-BTC", "KRW-ETH"]


@pytest.fixture
def clock() -> MarketClock:
    return MarketClock(T0 + DAY + 30_000)


@pytest.fixture
def markets() -> dict[tuple[str, str], np.ndarray]:
    out = {
        (s, "1m"): generate_market(s, "1m", T0, T0 + 2 * DAY, liquidity="liquid", seed=i + 1)
        for i, s in enumerate(SYMS)
    }
    for s in SYMS:  # Upbit serves every timeframe; FakeUpbit only what it holds
        out[(s, "1h")] = mds.resample(out[(s, "1m")], "1m", "1h")
    return out


@pytest.fixture
def fake(markets: dict[tuple[str, str], np.ndarray], clock: MarketClock) -> Iterator[FakeUpbit]:
    with FakeUpbit(markets, clock=clock, rate_limit=None) as up:
        yield up


def make_router(fake: FakeUpbit, clock: MarketClock, cls: type[UpbitRouter] = UpbitRouter, **kw: Any) -> UpbitRouter:
    return cls(fake.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock, **kw)


def warm(store: mds.Store, r: UpbitRouter) -> None:
    """Another user of the same Layer 1 asks it everything: its cache holds the answers now."""
    run = store._fetcher.run  # the store's own Layer 1 thread: the router's client lives there
    run(r.get_candle_data(SYMS, "1m", count=200))
    run(r.get_ticker_data(SYMS))
    run(r.get_orderbook_data(SYMS))
    run(r.get_trades(SYMS, count=100))


def get(store: mds.Store, dt: str, **kw: Any) -> mds.StorageResponse:
    resp = asyncio.run(store.get(StorageRequest(dt, SYMS, **kw)))
    assert resp.success, resp.error
    return resp


def expected(markets: dict[tuple[str, str], np.ndarray], sym: str, s: int, e: int) -> np.ndarray:
    a = markets[(sym, "1m")]
    return a[(a["ts"] >= s) & (a["ts"] < e)]


@pytest.fixture
def warmed(tmp_path: Path, fake: FakeUpbit, clock: MarketClock) -> Iterator[tuple[mds.Store, UpbitRouter]]:
    r = make_router(fake, clock)
    with mds.open(tmp_path / "s", layer1=r, clock=clock) as st:
        warm(st, r)
        fake.reset_log()
        yield st, r


def test_every_kind_of_read_is_answered_by_layer1_cache_without_a_request(warmed, fake, markets, clock) -> None:
    store, r = warmed
    last = clock() // MIN * MIN
    latest = get(store, "candle", timeframe="1m", count=150)
    assert latest.metadata.source == "layer1_cache"
    for s in SYMS:
        assert np.array_equal(latest.arrays[s], expected(markets, s, 0, last)[-150:])
    rng = get(store, "candle", timeframe="1m", start_time=last - 120 * MIN, end_time=last - 20 * MIN)
    assert rng.metadata.source == "layer1_cache"
    for s in SYMS:
        assert np.array_equal(rng.arrays[s], expected(markets, s, last - 120 * MIN, last - 20 * MIN))
    tick = get(store, "ticker")
    assert tick.metadata.source == "layer1_cache"
    assert {s: tick.arrays[s]["market"] for s in SYMS} == {s: s for s in SYMS}
    book = get(store, "orderbook")
    assert book.metadata.source == "layer1_cache"
    assert all(book.arrays[s]["orderbook_units"] for s in SYMS)
    trades = get(store, "trade", count=50)
    assert trades.metadata.source == "layer1_cache"
    for s in SYMS:  # FakeUpbit holds fewer than 50 trades a market: the router's answer was all of them
        held = r.peek_cache("trade", [s], count=500)["data"]
        assert trades.arrays[s]["sequential_id"].tolist() == sorted(t["sequential_id"] for t in held)[-50:]
    # the sync API: latest-N and ranges
    assert np.array_equal(store.candles("KRW-BTC", "1m", count=10), expected(markets, "KRW-BTC", 0, last)[-10:])
    got = store.candles("KRW-ETH", "1m", start=last - 30 * MIN, end=last)
    assert np.array_equal(got, expected(markets, "KRW-ETH", last - 30 * MIN, last))
    assert fake.request_count() == 0
    hits = store.stats()["hits"]
    assert hits["layer1_cache"] >= 7 and hits["layer1_api"] == 0


def test_answers_from_the_cache_are_the_routers_answers(warmed, fake) -> None:
    store, r = warmed
    mine = get(store, "trade", count=100).arrays["KRW-BTC"]
    theirs = store._fetcher.run(r.get_trades(["KRW-BTC"], count=100))["data"]  # the network, as Upbit has it
    assert sorted(mine["sequential_id"].tolist()) == sorted(t["sequential_id"] for t in theirs)
    assert (
        get(store, "ticker").arrays["KRW-BTC"]["trade_price"]
        == r.peek_cache("ticker", ["KRW-BTC"])["data"][0]["trade_price"]
    )


def test_repeated_answer_keeps_its_conversion_until_the_entry_changes(warmed, fake, markets, clock) -> None:
    store, r = warmed
    a = store.candles("KRW-BTC", "1m", count=100)
    b = store.candles("KRW-BTC", "1m", count=100)
    assert b is a  # the same entry: the conversion was kept, not redone
    assert not b.flags.writeable
    # the Layer 1 refetches (another user's call after the next minute closed): a new entry
    clock.advance(MIN)
    r.clear_cache()
    store._fetcher.run(r.get_candle_data(["KRW-BTC"], "1m", count=200))
    c = store.candles("KRW-BTC", "1m", count=100)
    assert c is not a
    last = clock() // MIN * MIN
    assert np.array_equal(c, expected(markets, "KRW-BTC", 0, last)[-100:])
    assert store.stats()["hits"]["layer1_cache"] == 3
    assert fake.request_count("/v1/candles") == 1  # the router's own refetch, not the store's


def test_a_new_minute_makes_the_cached_answer_stale(warmed, fake, markets, clock) -> None:
    store, _ = warmed
    store.candles("KRW-BTC", "1m", count=100)
    clock.advance(MIN)  # the cache's newest closed candle is one interval behind now
    got = store.candles("KRW-BTC", "1m", count=100)
    last = clock() // MIN * MIN
    assert np.array_equal(got, expected(markets, "KRW-BTC", 0, last)[-100:])
    assert fake.request_count("/v1/candles") >= 1  # fetched by the store, not served stale
    assert store.stats()["hits"]["layer1_api"] == 1


def test_range_beyond_the_cache_goes_on_to_the_api(warmed, fake, markets, clock) -> None:
    store, _ = warmed
    last = clock() // MIN * MIN
    s = last - 500 * MIN  # the cache holds the latest 200
    got = store.candles("KRW-BTC", "1m", start=s, end=last)
    assert np.array_equal(got, expected(markets, "KRW-BTC", s, last))
    assert fake.request_count("/v1/candles") >= 1
    assert store.stats()["hits"]["layer1_cache"] == 0


def test_storage_first_never_peeks(tmp_path, fake, clock) -> None:
    r = make_router(fake, clock)
    with mds.open(tmp_path / "s", layer1=r, config=Config(lookup="storage_first"), clock=clock) as st:
        warm(st, r)
        fake.reset_log()
        assert get(st, "ticker").metadata.source == "layer1_api"  # the realtime cache is empty
        assert fake.request_count("/v1/ticker") == 1
        assert st.stats()["hits"]["layer1_cache"] == 0


class _Stale(UpbitRouter):
    """A Layer 1 whose cache dates every answer older than its own candle TTL."""

    def peek_cache(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        ans = super().peek_cache(*args, **kwargs)
        if ans is not None:
            ans["metadata"]["fetched_at"] -= int(self.candle_ttl_s * 1000) + 1
        return ans


def test_an_answer_older_than_the_layer1_ttl_is_not_trusted(tmp_path, fake, clock) -> None:
    r = make_router(fake, clock, _Stale, ticker_ttl_s=300.0, candle_ttl_s=300.0)
    with mds.open(tmp_path / "s", layer1=r, clock=clock) as st:
        warm(st, r)
        fake.reset_log()
        assert get(st, "ticker").metadata.source == "layer1_api"
        st.candles("KRW-BTC", "1m", count=10)
        assert st.stats()["hits"]["layer1_cache"] == 0
        assert fake.request_count("/v1/ticker") == 1 and fake.request_count("/v1/candles") >= 1


class _AsyncPeek(UpbitRouter):
    """A Layer 1 whose peek_cache and cache_policy are coroutines."""

    async def peek_cache(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:  # type: ignore[override]
        return super().peek_cache(*args, **kwargs)

    async def cache_policy(self) -> dict[str, Any]:  # type: ignore[override]
        return super().cache_policy()


def test_async_peek_cache_answers_every_kind_too(tmp_path, fake, markets, clock) -> None:
    r = make_router(fake, clock, _AsyncPeek)
    with mds.open(tmp_path / "s", layer1=r, clock=clock) as st:
        warm(st, r)
        fake.reset_log()
        for dt, kw in (("ticker", {}), ("orderbook", {}), ("trade", {"count": 20})):
            assert get(st, dt, **kw).metadata.source == "layer1_cache", dt
        assert get(st, "candle", timeframe="1m", count=20).metadata.source == "layer1_cache"
        last = clock() // MIN * MIN
        got = st.candles("KRW-BTC", "1m", count=20)
        assert np.array_equal(got, expected(markets, "KRW-BTC", 0, last)[-20:])
        assert fake.request_count() == 0
        assert st.stats()["layer1"]["policy"]["layer1"]["candle_cache_count"] == 200


def test_policy_is_settled_at_open_applied_and_shown(tmp_path, fake, clock) -> None:
    r = make_router(fake, clock, ticker_ttl_s=7.0, candle_ttl_s=120.0)
    cfg = Config(realtime_ttl_s=2.0, orderbook_ttl_s=3.0)
    with mds.open(tmp_path / "s", layer1=r, config=cfg, clock=clock) as st:
        pol = st.stats()["layer1"]["policy"]
        assert pol["layer1"]["ticker_ttl_s"] == 7.0 and pol["layer1"]["candle_ttl_s"] == 120.0
        assert pol["ticker_ttl_s"] == 7.0  # never shorter-lived than Layer 1's copy
        assert pol["orderbook_ttl_s"] == 5.0  # the router's default, above the store's 3 s
        assert pol["lookup"] == "layer1_first"
        # applied: the realtime cache keeps a ticker as long as the settled TTL
        ticker = st._fetcher.run(r.get_ticker_data(["KRW-BTC"]))["data"][0]
        st.put_ticker({**ticker, "timestamp": clock()})
        clock.advance(6_000)
        assert st.ticker("KRW-BTC") is not None  # the store's own 2 s would have dropped it
        clock.advance(2_000)
        assert st.ticker("KRW-BTC") is None


def test_a_policy_change_the_layer1_announces_is_settled_again(tmp_path, fake, clock) -> None:
    r = make_router(fake, clock, ticker_ttl_s=5.0)
    with mds.open(tmp_path / "s", layer1=r, config=Config(realtime_ttl_s=1.0), clock=clock) as st:
        assert st.stats()["layer1"]["policy"]["ticker_ttl_s"] == 5.0
        r.ticker_ttl_s = 9.0  # the router's policy version moves; its answers say so
        get(st, "candle", timeframe="1m", count=5)  # any call through the store
        assert st.stats()["layer1"]["policy"]["ticker_ttl_s"] == 9.0


class _NoPolicy(UpbitRouter):
    def cache_policy(self) -> dict[str, Any]:
        raise RuntimeError("policy service down")


def test_a_layer1_that_cannot_tell_its_policy_still_opens(tmp_path, fake, clock, caplog) -> None:
    r = make_router(fake, clock, _NoPolicy)
    with mds.open(tmp_path / "s", layer1=r, clock=clock) as st:
        pol = st.stats()["layer1"]["policy"]
        assert "policy service down" in pol["error"]
        warm(st, r)
        fake.reset_log()
        assert get(st, "ticker").metadata.source == "layer1_cache"
    assert any("cache policy" in rec.getMessage() for rec in caplog.records)


def test_peek_of_trades_since_a_time_is_not_answered_from_the_cache(warmed, fake, clock) -> None:
    store, _ = warmed
    resp = asyncio.run(store.get(StorageRequest(DataType.TRADE, SYMS, start_time=clock() - 60_000)))
    assert resp.success
    assert resp.metadata.source == "layer1_api"  # the cache holds only the latest: it cannot prove "since"


def test_async_get_of_a_derived_timeframe_is_resampled_not_peeked(warmed, fake, clock) -> None:
    store, _ = warmed
    closed = clock() // (2 * 3_600_000) * (2 * 3_600_000)  # end of the last closed 2h interval
    resp = get(store, "candle", timeframe="2h", count=3)
    assert resp.metadata.source != "layer1_cache"  # Layer 1 holds no 2h candles
    for s in SYMS:
        assert np.array_equal(resp.arrays[s], store.candles(s, "2h", count=3))
        hours = fake.candles(s, "1h")
        assert np.array_equal(resp.arrays[s], mds.resample(hours[hours["ts"] < closed], "1h", "2h")[-3:])


def test_answers_from_the_cache_share_nothing_with_it(warmed) -> None:
    store, r = warmed
    first = get(store, "orderbook").arrays["KRW-BTC"]
    top = dict(first["orderbook_units"][0])
    first["orderbook_units"][0]["ask_price"] = 1.0  # a caller edits its answer ...
    first["orderbook_units"].pop()
    first["market"] = "KRW-XRP"
    again = get(store, "orderbook").arrays["KRW-BTC"]  # ... and nobody else sees it
    assert again["orderbook_units"][0] == top and again["market"] == "KRW-BTC"
    assert len(again["orderbook_units"]) == len(r.peek_cache("orderbook", ["KRW-BTC"])["data"][0]["orderbook_units"])
    assert r.peek_cache("orderbook", ["KRW-BTC"])["data"][0]["orderbook_units"][0]["ask_price"] == top["ask_price"]


class _Broken(UpbitRouter):
    """A Layer 1 whose cache holds tickers without a timestamp and orderbooks with a NaN price."""

    def peek_cache(self, kind: Any, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        ans = super().peek_cache(kind, *args, **kwargs)
        if ans is None or kind not in ("ticker", "orderbook"):
            return ans
        rows = [dict(d) for d in ans["data"]]
        for d in rows:
            if kind == "ticker":
                del d["timestamp"]
            else:
                d["orderbook_units"] = [{**d["orderbook_units"][0], "ask_price": float("nan")}]
        return {**ans, "data": rows}


def test_an_unusable_cached_ticker_or_orderbook_is_asked_of_the_api(tmp_path, fake, clock) -> None:
    r = make_router(fake, clock, _Broken)
    with mds.open(tmp_path / "s", layer1=r, clock=clock) as st:
        warm(st, r)
        fake.reset_log()
        tick, book = get(st, "ticker"), get(st, "orderbook")
        assert tick.metadata.source == book.metadata.source == "layer1_api"
        assert all(isinstance(tick.arrays[s]["timestamp"], int) for s in SYMS)
        assert all(np.isfinite(u["ask_price"]) for s in SYMS for u in book.arrays[s]["orderbook_units"])
        assert fake.request_count("/v1/ticker") == 1 and fake.request_count("/v1/orderbook") == 1


def test_latest_n_before_an_end_in_the_past_comes_from_the_cache(warmed, fake, markets, clock) -> None:
    store, _ = warmed
    last = clock() // MIN * MIN
    end = last - 10 * MIN
    resp = get(store, "candle", timeframe="1m", count=20, end_time=end)
    assert resp.metadata.source == "layer1_cache"
    got = store.candles("KRW-ETH", "1m", count=20, end=end)
    for s in SYMS:
        assert np.array_equal(resp.arrays[s], expected(markets, s, 0, end)[-20:])
    assert np.array_equal(got, expected(markets, "KRW-ETH", 0, end)[-20:])
    assert fake.request_count() == 0


def test_a_policy_change_seen_in_a_peek_is_settled_without_an_api_call(warmed, fake) -> None:
    store, r = warmed
    assert store.stats()["layer1"]["policy"]["layer1"]["candle_ttl_s"] == 300.0
    r.candle_ttl_s = 600.0  # the router's policy moves on; its cache answers carry the new version
    store.candles("KRW-BTC", "1m", count=10)
    get(store, "ticker")
    assert store.stats()["layer1"]["policy"]["layer1"]["candle_ttl_s"] == 600.0
    assert fake.request_count() == 0
