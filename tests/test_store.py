"""The Store against real tiers (SQLite file, LMDB environment) and FakeUpbit on loopback."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds
from mds import CANDLE_DTYPE, Config, DataType, StorageRequest
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

T0 = to_ms("2025-01-06T00:00:00Z")
MIN = 60_000
DAY = 86_400_000


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 2 * DAY + 30_000)


@pytest.fixture
def markets() -> dict[tuple[str, str], np.ndarray]:
    end = T0 + 3 * DAY
    return {
        ("KRW-BTC", "1m"): generate_market("KRW-BTC", "1m", T0, end, liquidity="liquid", seed=1),
        ("KRW-CBK", "1m"): generate_market("KRW-CBK", "1m", T0, end, liquidity="illiquid", seed=2),
    }


@pytest.fixture
def fake(markets: dict[tuple[str, str], np.ndarray], clock: Clock) -> Iterator[FakeUpbit]:
    with FakeUpbit(markets, clock=clock, rate_limit=None) as up:
        yield up


def router(fake: FakeUpbit, clock: Clock) -> UpbitRouter:
    return UpbitRouter(fake.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)


@pytest.fixture
def store(tmp_path: Path, fake: FakeUpbit, clock: Clock) -> Iterator[mds.Store]:
    st = mds.open(tmp_path / "s", layer1=router(fake, clock), config=Config(lookup="storage_first"), clock=clock)
    yield st
    assert st.check().ok, st.check().problems
    st.close()


def candles(n: int, start: int = T0, step: int = MIN, price: float = 100.0) -> np.ndarray:
    a = np.zeros(n, CANDLE_DTYPE)
    a["ts"] = start + step * np.arange(n)
    a["open"] = a["close"] = price
    a["high"] = price + 1
    a["low"] = price - 1
    a["volume"] = 1.0
    a["value"] = price
    return a


def expected(markets: dict, sym: str, start: int, end: int) -> np.ndarray:
    a = markets[(sym, "1m")]
    return a[(a["ts"] >= start) & (a["ts"] < end)]


# --- reads through Layer 1 ------------------------------------------------------------------
@pytest.mark.parametrize("sym", ["KRW-BTC", "KRW-CBK"])
def test_second_identical_read_never_calls_layer1(store, fake, markets, clock, sym) -> None:
    last_end = clock() // MIN * MIN
    first = store.candles(sym, "1m", count=500)
    calls = fake.request_count("/v1/candles")
    assert calls >= 1
    again = store.candles(sym, "1m", count=500)
    assert fake.request_count("/v1/candles") == calls
    assert np.array_equal(first, again)
    want = expected(markets, sym, 0, last_end)[-500:]
    assert np.array_equal(first, want)
    assert not first.flags.writeable


def test_illiquid_range_read_is_covered_once(store, fake, markets) -> None:
    s, e = T0 + 3600_000, T0 + 9 * 3600_000
    got = store.candles("KRW-CBK", "1m", start=s, end=e)
    assert np.array_equal(got, expected(markets, "KRW-CBK", s, e))
    calls = fake.request_count()
    inner = store.candles("KRW-CBK", "1m", start=s + MIN, end=e - MIN)
    assert np.array_equal(inner, got[(got["ts"] >= s + MIN) & (got["ts"] < e - MIN)])
    assert fake.request_count() == calls
    kinds = {g.kind for g in store.gaps("KRW-CBK", "1m", start=s, end=e)}
    assert kinds == {"no_trades"}  # every hole inside the fetched range is a no-trade minute


def test_new_minute_fetches_only_the_tail(store, fake, markets, clock) -> None:
    store.candles("KRW-BTC", "1m", count=1000)
    before = len(fake.requests("/v1/candles"))
    clock.t += 3 * MIN
    got = store.candles("KRW-BTC", "1m", count=1000)
    reqs = fake.requests("/v1/candles")[before:]
    assert len(reqs) == 1
    assert np.array_equal(got, expected(markets, "KRW-BTC", 0, clock() // MIN * MIN)[-1000:])


def test_range_read_requests_only_uncovered_parts(store, fake) -> None:
    store.candles("KRW-BTC", "1m", start=T0 + 600 * MIN, end=T0 + 700 * MIN)
    n = fake.request_count()
    store.candles("KRW-BTC", "1m", start=T0 + 500 * MIN, end=T0 + 800 * MIN)
    assert store.coverage("KRW-BTC", "1m") == [(T0 + 500 * MIN, T0 + 800 * MIN)]
    assert fake.request_count() - n == 2  # [500, 600) and [700, 800)


def test_sources_in_turn(tmp_path, fake, markets, clock) -> None:
    path = tmp_path / "s"
    req = StorageRequest(DataType.CANDLE, ["KRW-BTC"], timeframe="1m", count=100)
    seen = []
    with mds.open(path, layer1=router(fake, clock), config=Config(lookup="storage_first"), clock=clock) as st:
        first = asyncio.run(st.get(req))  # nothing stored: Layer 1's API
        seen.append(first.metadata.source)
        assert first.metadata.layer1_calls >= 1
        assert not first.metadata.cache_hit
        second = asyncio.run(st.get(req))  # memory
        seen.append(second.metadata.source)
        assert second.metadata.layer1_calls == 0
        assert second.metadata.cache_hit
    with mds.open(path, layer1=router(fake, clock), config=Config(lookup="storage_first"), clock=clock) as st:
        seen.append(asyncio.run(st.get(req)).metadata.source)  # cold memory, LMDB holds it
    cfg = Config(lookup="storage_first", tiers=("memory", "sqlite"))
    with mds.open(path, layer1=router(fake, clock), config=cfg, clock=clock) as st:
        seen.append(asyncio.run(st.get(req)).metadata.source)  # no disk tier: SQLite
    r = router(fake, clock)
    with mds.open(tmp_path / "t", layer1=r, clock=clock) as st:  # layer1_first
        # another user of the same Layer 1 asked for the latest candles: its cache holds them now
        st._fetcher.run(r.get_candle_data(["KRW-BTC"], "1m", count=200))
        resp = asyncio.run(st.get(req))
        seen.append(resp.metadata.source)
        assert len(resp.arrays["KRW-BTC"]) == 100
    assert seen == ["layer1_api", "storage_memory", "storage_disk", "sqlite_db", "layer1_cache"]


def test_async_get_many_symbols_and_lazy_data(store) -> None:
    resp = asyncio.run(store.get(StorageRequest("candle", ["KRW-BTC", "KRW-CBK"], timeframe="1m", count=50)))
    assert resp.success
    assert set(resp.arrays) == {"KRW-BTC", "KRW-CBK"}
    assert resp.metadata.data_count == 100
    assert resp._data is None  # nothing converted until asked
    rows = resp.data
    assert len(rows) == 100
    assert rows[0]["market"] == "KRW-BTC"
    assert rows[0]["candle_date_time_utc"].count(":") == 2


def test_async_errors_become_success_false(store) -> None:
    resp = asyncio.run(store.get("not a request"))  # type: ignore[arg-type]
    assert not resp.success
    assert "InvalidRequestError" in (resp.error or "")


def test_partial_candle_served_only_when_asked_and_never_stored(store, clock) -> None:
    closed = store.candles("KRW-BTC", "1m", count=10)
    with_partial = store.candles("KRW-BTC", "1m", count=10, include_partial=True)
    forming = clock() // MIN * MIN
    assert closed["ts"][-1] == forming - MIN
    assert with_partial["ts"][-1] == forming
    assert np.array_equal(with_partial[:-1], closed)
    db = store._health.states["sqlite"].obj
    assert db.last_ts("KRW-BTC", mds.parse_timeframe("1m")) == forming - MIN


def test_layer1_down_reads_from_storage_and_refuses_uncovered(store, fake) -> None:
    have = store.candles("KRW-BTC", "1m", count=100)
    fake.inject("status", status=503)
    assert np.array_equal(store.candles("KRW-BTC", "1m", count=100), have)
    with pytest.raises(mds.Layer1Error):
        store.candles("KRW-BTC", "1m", start=T0, end=T0 + 60 * MIN)
    resp = asyncio.run(
        store.get(StorageRequest("candle", ["KRW-BTC"], timeframe="1m", start_time=T0, end_time=T0 + 60 * MIN))
    )
    assert not resp.success
    assert resp.error
    assert store.coverage("KRW-BTC", "1m")[0][0] > T0  # nothing recorded for the failed range


def test_storage_down_passes_through_to_layer1(tmp_path, fake, markets, clock) -> None:
    path = tmp_path / "s"
    st = mds.open(
        path, layer1=router(fake, clock), config=Config(lookup="storage_first", tiers=("sqlite",)), clock=clock
    )
    db = st._health.states["sqlite"].obj
    db.close()  # the SQLite tier becomes unusable under the store
    got = st.candles("KRW-BTC", "1m", start=T0, end=T0 + 30 * MIN)
    assert np.array_equal(got, expected(markets, "KRW-BTC", T0, T0 + 30 * MIN))
    stats = st.stats()
    assert "sqlite" in stats["degraded"]
    json.dumps(stats)
    st.close()


def test_stats_count_every_memory_hit_and_its_latency(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st:
        a = candles(300)
        st.write_candles("KRW-BTC", "1m", a, complete=(T0, T0 + 300 * MIN))
        st.candles("KRW-BTC", "1m", count=100)  # the memory tier holds the window after this
        before = st.stats()
        for _ in range(25):
            assert np.array_equal(st.candles("KRW-BTC", "1m", count=100), a[-100:])
        after = st.stats()
        assert after["requests"] == before["requests"] + 25
        assert after["hits"]["storage_memory"] == before["hits"]["storage_memory"] + 25
        for ring in ("storage_memory", "api.candles"):
            got, was = after["latency"][ring], before["latency"].get(ring, {"count": 0})
            assert got["count"] == was["count"] + 25 and 0 < got["p50_ms"] <= got["p99_ms"]
        assert after["hit_rate"] == 1.0
        json.dumps(after)


# --- writes ----------------------------------------------------------------------------------
def test_write_then_read_storage_only(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st:
        a = candles(300)
        res = st.write_candles("KRW-BTC", "1m", a[::-1], complete=(T0, T0 + 300 * MIN))
        assert res == mds.WriteResult(300, 0, 0)
        res = st.write_candles("KRW-BTC", "1m", a[:10])
        assert res == mds.WriteResult(0, 0, 10)
        b = a[:5].copy()
        b["close"] = b["high"]
        assert st.write_candles("KRW-BTC", "1m", b) == mds.WriteResult(0, 5, 0)
        latest = st.candles("KRW-BTC", "1m", count=100)
        assert np.array_equal(latest, a[-100:])
        assert len(st.candles("KRW-BTC", "1m", start=T0, end=T0 + 10 * MIN)) == 10
        assert st.coverage("KRW-BTC", "1m") == [(T0, T0 + 300 * MIN)]
        assert st.check().ok


def test_rejected_batch_changes_nothing_in_any_tier(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", candles(100), complete=(T0, T0 + 100 * MIN))
        before = (st.candles("KRW-BTC", "1m", count=100).copy(), st.coverage("KRW-BTC", "1m"))
        bad = candles(50, start=T0 + 100 * MIN)
        bad["low"][25] = bad["open"][25] + 5  # low above the body
        with pytest.raises(mds.InvalidCandleError) as info:
            st.write_candles("KRW-BTC", "1m", bad, complete=(T0 + 100 * MIN, T0 + 150 * MIN))
        assert info.value.rows == [25]
        assert np.array_equal(st.candles("KRW-BTC", "1m", count=100), before[0])
        assert st.coverage("KRW-BTC", "1m") == before[1]
        assert len(st.candles("KRW-BTC", "1m", start=T0 + 100 * MIN, end=T0 + 150 * MIN)) == 0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 3), CANDLE_DTYPE),
        np.zeros(3, dtype=[("ts", "<i8"), ("close", "<f8")]),
        "KRW-BTC",
        [{"candle_date_time_utc": "2025-01-06T00:00:00"}],
    ],
)
def test_wrong_shapes_and_types_are_typed_errors(tmp_path, clock, bad: Any) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st, pytest.raises(mds.InvalidCandleError):
        st.write_candles("KRW-BTC", "1m", bad)


def test_future_candle_is_invalid(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st, pytest.raises(mds.InvalidCandleError):
        st.write_candles("KRW-BTC", "1m", candles(1, start=(clock() // MIN + 1) * MIN))


def test_batch_is_all_or_nothing(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st:

        def failing_batch() -> None:
            with st.batch():
                st.write_candles("KRW-BTC", "1m", candles(10))
                st.write_candles("KRW-ETH", "1m", candles(10))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            failing_batch()
        assert len(st.candles("KRW-BTC", "1m", start=T0, end=T0 + DAY)) == 0
        assert len(st.candles("KRW-ETH", "1m", count=10)) == 0
        with st.batch():
            st.write_candles("KRW-BTC", "1m", candles(10))
            st.write_candles("KRW-ETH", "1m", candles(10))
        assert len(st.candles("KRW-ETH", "1m", count=10)) == 10
        assert st.check().ok


def test_delete_shrinks_coverage(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", candles(100), complete=(T0, T0 + 100 * MIN))
        assert st.delete("KRW-BTC", "1m", start=T0 + 10 * MIN, end=T0 + 20 * MIN) == 10
        assert st.coverage("KRW-BTC", "1m") == [(T0, T0 + 10 * MIN), (T0 + 20 * MIN, T0 + 100 * MIN)]
        gaps = st.gaps("KRW-BTC", "1m")
        assert [(g.start, g.end, g.kind) for g in gaps] == [(T0 + 10 * MIN, T0 + 20 * MIN, "missing")]
        assert len(st.candles("KRW-BTC", "1m", count=1000)) == 90
        assert st.check().ok


def test_gaps_tell_no_trades_from_missing(tmp_path, clock) -> None:
    a = candles(60)
    a = a[(np.arange(60) % 10) != 3]  # a no-trade minute every 10 minutes
    with mds.open(tmp_path / "s", clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", a[:30], complete=(T0, T0 + 30 * MIN))
        st.write_candles("KRW-BTC", "1m", a[30:])  # not marked complete
        kinds = [(g.start, g.kind) for g in st.gaps("KRW-BTC", "1m")]
        assert kinds == [
            (T0 + 3 * MIN, "no_trades"),
            (T0 + 13 * MIN, "no_trades"),
            (T0 + 23 * MIN, "no_trades"),
            (T0 + 33 * MIN, "missing"),
            (T0 + 43 * MIN, "missing"),
            (T0 + 53 * MIN, "missing"),
        ]


def test_memory_only_store_keeps_newest_candles(tmp_path, clock) -> None:
    cfg = Config(tiers=("memory",), memory_candles=100)
    with mds.open(tmp_path / "mem", config=cfg, clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", candles(300))
        got = st.candles("KRW-BTC", "1m", count=100)
        assert np.array_equal(got, candles(300)[-100:])
    assert not (tmp_path / "mem").exists()  # nothing persists


def test_sqlite_only_store(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", config=Config(tiers=("sqlite",)), clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", candles(300))
        assert len(st.candles("KRW-BTC", "1m", count=1000)) == 300
    assert not (tmp_path / "s" / "lmdb").exists()


def test_bad_requests_are_typed(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st:
        for kwargs in ({"count": 0}, {"count": -1}, {"start": T0 + MIN, "end": T0}, {}, {"start": "yesterday"}):
            with pytest.raises(mds.InvalidRequestError):
                st.candles("KRW-BTC", "1m", **kwargs)
        with pytest.raises(mds.InvalidRequestError):
            st.candles("KRW-BTC'; DROP TABLE x;--", "1m", count=1)
        with pytest.raises(mds.InvalidRequestError):
            st.candles("KRW-BTC", "2m", count=1)


@pytest.mark.skipif(
    sys.platform == "win32", reason="no POSIX modes on Windows: os.stat reports 0o777 for every directory"
)
def test_store_directory_is_private(tmp_path, clock) -> None:
    with mds.open(tmp_path / "s", clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", candles(10))
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700


def test_realtime_through_the_store(store) -> None:
    tick = {
        "ty": "ticker",
        "cd": "KRW-BTC",
        "tp": 100.0,
        "op": 99.0,
        "hp": 101.0,
        "lp": 98.0,
        "pcp": 99.5,
        "c": "RISE",
        "cp": 0.5,
        "scp": 0.5,
        "cr": 0.005,
        "scr": 0.005,
        "tv": 1.0,
        "atv": 10.0,
        "atv24h": 20.0,
        "atp": 1000.0,
        "atp24h": 2000.0,
        "tdt": "20250106",
        "ttm": "000000",
        "ttms": T0,
        "ab": "BID",
        "aav": 5.0,
        "abv": 5.0,
        "h52wp": 200.0,
        "h52wdt": "2024-12-01",
        "l52wp": 50.0,
        "l52wdt": "2024-03-01",
        "ms": "ACTIVE",
        "its": False,
        "dd": None,
        "mw": "NONE",
        "tms": T0 + 1,
        "st": "REALTIME",
    }
    store.put_ticker(tick)
    assert store.ticker("KRW-BTC")["trade_price"] == 100.0
    resp = asyncio.run(store.get(StorageRequest("ticker", ["KRW-BTC"])))
    assert resp.success
    assert resp.metadata.source == "storage_memory"
    resp = asyncio.run(store.get(StorageRequest("ticker", ["KRW-CBK"])))  # not cached: Layer 1
    assert resp.success
    assert resp.metadata.source == "layer1_api"
    assert resp.arrays["KRW-CBK"]["market"] == "KRW-CBK"


# --- several processes -------------------------------------------------------------------------
def _writer(path: str, t: int) -> None:
    with mds.open(path, clock=lambda: t) as st:
        st.write_candles("KRW-BTC", "1m", candles(200, start=T0 + 100 * MIN), complete=(T0 + 100 * MIN, T0 + 300 * MIN))


def test_reader_process_sees_writer_without_waiting_for_ttl(tmp_path, clock) -> None:
    path = tmp_path / "s"
    with mds.open(path, clock=clock) as reader:
        reader.write_candles("KRW-BTC", "1m", candles(100), complete=(T0, T0 + 100 * MIN))
        assert len(reader.candles("KRW-BTC", "1m", count=1000)) == 100  # memory now holds 100
        p = mp.get_context("spawn").Process(target=_writer, args=(str(path), clock()))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        got = reader.candles("KRW-BTC", "1m", count=1000)
        assert len(got) == 300
        assert got["ts"][-1] == T0 + 299 * MIN
        assert reader.check().ok


def test_disk_tier_is_cleared_after_writes_it_missed(tmp_path, clock) -> None:
    path = tmp_path / "s"
    with mds.open(path, clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", candles(100), complete=(T0, T0 + 100 * MIN))
    changed = candles(100, price=200.0)
    with mds.open(path, config=Config(tiers=("memory", "sqlite")), clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", changed)  # LMDB is not open: it cannot follow
    with mds.open(path, clock=clock) as st:
        got = st.candles("KRW-BTC", "1m", start=T0, end=T0 + 100 * MIN)
        assert np.array_equal(got, changed)
        assert st.check().ok


def test_delete_in_memory_only_store_keeps_the_rest(tmp_path, clock) -> None:
    with mds.open(tmp_path / "m", config=Config(tiers=("memory",)), clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", candles(100))
        assert st.delete("KRW-BTC", "1m", start=T0, end=T0 + 10 * MIN) == 10
        assert len(st.candles("KRW-BTC", "1m", start=T0, end=T0 + DAY)) == 90


def test_a_memory_hit_does_not_wait_for_another_threads_fetch(tmp_path, fake, clock) -> None:
    import threading

    inner = router(fake, clock)

    class GatedLayer1:
        """Holds KRW-CBK candle fetches until the test opens the gate."""

        def __init__(self) -> None:
            self.entered = threading.Event()
            self.gate = threading.Event()

        async def get_candle_data(self, symbols, *args, **kwargs):
            if symbols == ["KRW-CBK"]:
                self.entered.set()
                await asyncio.to_thread(self.gate.wait, 60)
            return await inner.get_candle_data(symbols, *args, **kwargs)

        async def get_ticker_data(self, *args, **kwargs):
            return await inner.get_ticker_data(*args, **kwargs)

        async def get_orderbook_data(self, *args, **kwargs):
            return await inner.get_orderbook_data(*args, **kwargs)

        async def get_trades(self, *args, **kwargs):
            return await inner.get_trades(*args, **kwargs)

    l1 = GatedLayer1()
    st = mds.open(tmp_path / "s", layer1=l1, config=Config(lookup="storage_first"), clock=clock)
    try:
        st.candles("KRW-BTC", "1m", count=100)  # cached in memory
        slow = threading.Thread(target=st.candles, args=("KRW-CBK", "1m"), kwargs={"count": 100})
        slow.start()
        assert l1.entered.wait(30)  # the other thread is now waiting on Layer 1
        got: list[np.ndarray] = []
        hit = threading.Thread(target=lambda: got.append(st.candles("KRW-BTC", "1m", count=100)))
        hit.start()
        hit.join(30)  # a liveness bound, not a speed check: behind the fetch it would never finish
        done_before_fetch = not hit.is_alive()
        l1.gate.set()
        slow.join(30)
        hit.join(30)
        assert done_before_fetch, "the memory hit waited behind another thread's Layer 1 fetch"
        assert len(got[0]) == 100
        assert len(st.candles("KRW-CBK", "1m", count=100)) == 100
        assert st.check().ok
    finally:
        l1.gate.set()
        st.close()


def test_n_from_an_old_start_fetches_a_window_not_all_history(store, fake, markets) -> None:
    start = T0 + DAY // 2
    got = store.candles("KRW-CBK", "1m", start=start, count=50)  # illiquid: the window must grow
    want = expected(markets, "KRW-CBK", start, T0 + 3 * DAY)[:50]
    assert np.array_equal(got, want)
    cov = store.coverage("KRW-CBK", "1m")
    assert cov[0][0] == start
    assert cov[-1][1] < T0 + DAY  # far from "now" (1.5 days later): only a window was fetched


def test_storage_down_range_read_is_whole_when_part_was_covered(tmp_path, fake, markets, clock) -> None:
    cfg = Config(lookup="storage_first", tiers=("sqlite",))
    st = mds.open(tmp_path / "s", layer1=router(fake, clock), config=cfg, clock=clock)
    try:
        st.candles("KRW-CBK", "1m", start=T0, end=T0 + 60 * MIN)  # [T0, T0+60m) covered
        st._health.states["sqlite"].obj.close()  # SQLite fails from here on
        got = st.candles("KRW-CBK", "1m", start=T0, end=T0 + 120 * MIN)
        assert np.array_equal(got, expected(markets, "KRW-CBK", T0, T0 + 120 * MIN))
    finally:
        st.close()


@pytest.mark.parametrize(("tf", "span_days"), [("1d", 400), ("1w", 7 * 120), ("1M", 31 * 40), ("4h", 60)])
def test_calendar_timeframes_end_to_end(tmp_path, clock, tf: str, span_days: int) -> None:
    """Days, Monday weeks, calendar months and 4h candles through FakeUpbit, the router and the store."""
    tfo = mds.parse_timeframe(tf)
    end = tfo.floor(clock())
    start = tfo.ceil(end - span_days * DAY)
    data = generate_market("KRW-BTC", tf, start, tfo.next(clock()), liquidity="liquid", seed=5)
    with FakeUpbit({("KRW-BTC", tf): data}, clock=clock, rate_limit=None) as up:
        cfg = Config(lookup="storage_first")
        with mds.open(tmp_path / "s", layer1=router(up, clock), config=cfg, clock=clock) as st:
            got = st.candles("KRW-BTC", tf, count=30)
            closed = data[data["ts"] < end]
            assert np.array_equal(got, closed[-30:])
            assert tfo.aligned(got["ts"]).all()
            calls = up.request_count()
            again = st.candles("KRW-BTC", tf, start=int(got["ts"][0]), end=end)
            assert np.array_equal(again, got)
            assert up.request_count() == calls  # covered: no new request
            assert all(g.kind == "no_trades" for g in st.gaps("KRW-BTC", tf, start=int(got["ts"][0]), end=end))
            assert st.check().ok
