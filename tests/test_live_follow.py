"""store.follow(feed): the live feed applied to a store, against FakeUpbit's WebSocket (loopback
only), and recorded Upbit frames replayed into the realtime cache."""

from __future__ import annotations

import ast
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds
from mds import TRADE_DTYPE
from mds.errors import InvalidRequestError
from mds.layer1 import ReplayStream, UpbitStream
from mds.layer1._ws_parse import simple_keys
from mds.layer1.router import UpbitRouter
from mds.store.series import stored_rows
from mds.testing import FakeUpbit, MarketClock, generate_market
from mds.testing._quotation import _trades_from_candle
from mds.timeframes import parse_timeframe
from mds.timeutil import to_ms

DATA = Path(__file__).parent / "data"
T0 = to_ms("2025-01-01T00:00:00Z")
MIN = 60_000
FAST = {"backoff_base_s": 0.02, "backoff_max_s": 0.1, "ping_interval_s": 0.2, "stale_after_s": 5.0}
TF = parse_timeframe("1m")


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def open_store(path: Path, up: FakeUpbit, clock: MarketClock, **cfg: Any) -> mds.Store:
    router = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
    config = mds.Config(lookup="storage_first", live_grace_s=5.0, **cfg)
    return mds.open(path, layer1=router, config=config, clock=clock)


def fake_trades(arr: np.ndarray) -> np.ndarray:
    """Every trade FakeUpbit's stream derives from a 1m series (as its REST trades)."""
    return np.concatenate([_trades_from_candle(row, TF, int(row["ts"]) + MIN - 1) for row in arr])


def test_twenty_markets_for_thirty_minutes_with_drops(tmp_path: Path) -> None:
    markets = [f"KRW-C{i:02d}" for i in range(20)]
    illiquid = set(markets[-4:])
    data = {
        (m, "1m"): generate_market(
            m, "1m", T0, T0 + 2 * 3_600_000, liquidity="illiquid" if m in illiquid else "liquid", seed=i
        )
        for i, m in enumerate(markets)
    }
    start = T0 + 60 * MIN + 30_000
    end = start + 30 * MIN
    clock = MarketClock(start)
    frames: list[bytes | str] = []
    with FakeUpbit(data, clock=clock, rate_limit=None) as up:
        store = open_store(tmp_path / "s", up, clock)
        try:
            feed = UpbitStream(
                markets,
                kinds=("ticker", "trade"),
                candles=("1m",),
                url=up.ws_url,
                format="SIMPLE",
                clock=clock,
                on_frame=frames.append,
                **FAST,
            )
            live = store.follow(feed)
            wait_for(lambda: store.ticker(markets[-1]) is not None, "the first tickers")
            drops = {10: 90_000, 20: 150_000}  # minute of the window -> simulated ms lost
            lost_until = 0
            while clock() < end:
                minute = (clock() - start) // MIN
                if minute in drops and lost_until == 0:
                    lost = live.stats()["feed"]["disconnects"]["error"]
                    up.ws.inject("refuse")  # the reconnects fail until cleared
                    up.ws.inject("drop", times=1)
                    lost_until = clock() + drops.pop(minute)
                    clock.advance(1_000)  # the next frame is not sent: the connection drops
                    wait_for(lambda lost=lost: live.stats()["feed"]["disconnects"]["error"] > lost, "the drop")  # type: ignore[misc]
                if lost_until and clock() >= lost_until:
                    up.ws.clear_faults("refuse")
                    lost_until = 0
                    n = live.stats()["epochs"]
                    wait_for(lambda n=n: live.stats()["epochs"] > n, "the reconnect")  # type: ignore[misc]
                if minute == 5 and not up.ws.faults:
                    # the next 60 frames twice, whichever kind comes next (tickers, trades, candles):
                    # enough trades among them for the dedup figures below
                    up.ws.inject("duplicate", times=60)
                clock.advance(3_000)
                if not lost_until:
                    now = clock()
                    wait_for(lambda now=now: (store.ticker(markets[-1]) or {}).get("timestamp", 0) >= now, "ticks")  # type: ignore[misc]
            wait_for(lambda: live.stats()["feed"]["queued"] == 0, "the queue to drain")
            time.sleep(0.2)
            during = up.requests("/v1/candles")
            stats = live.stats()
            watched = stats["watched"]
            # Before any read: what the stream wrote equals FakeUpbit's candles, and the gaps.
            stored = {m: stored_rows(store._health, m, TF, start - MIN, end) for m in markets}
            gaps = {m: store.gaps(m, "1m", start=start + MIN, end=TF.floor(end) - MIN) for m in markets}
            covs = {m: store.coverage(m, "1m") for m in markets}
            live_trades = {m: store.trades(m) for m in markets}
        except BaseException:
            store.close()
            raise
        # -- the stream's view --------------------------------------------------------------------
        assert during == []  # no REST request while following (no read was made)
        assert len(watched) == 3 and stats["epochs"] == 3 and stats["reconnects"] == 2, watched
        assert stats["error"] is None and stats["running"] and stats["candles_rejected"] == 0
        spans = [(a, b if b is not None else end) for a, b in watched]
        grace = 5_000
        for m in markets:
            fake = data[(m, "1m")]
            rows = stored[m]
            assert len(rows) > 0
            i = np.searchsorted(fake["ts"], rows["ts"])
            assert np.array_equal(fake[i], rows), m  # every streamed candle is REST's, byte for byte
            # Coverage: exactly the watched spans, each from its first whole interval.
            for (a, b), (cs, ce) in zip(spans, covs[m]):
                assert cs == TF.ceil(a)
                assert TF.floor(b - grace) <= ce <= TF.floor(b) or b == end
            assert len(covs[m]) == 3
            # Inside a watched span every held candle was written; gaps there are no_trades.
            for cs, ce in covs[m]:
                inside = fake[(fake["ts"] >= cs) & (fake["ts"] < ce)]
                assert np.isin(inside["ts"], rows["ts"]).all(), m
            for g in gaps[m]:
                inside = any(cs <= g.start and g.end <= ce for cs, ce in covs[m])
                assert g.kind == ("no_trades" if inside else "missing"), (m, g)
        kinds = Counter(g.kind for m in markets for g in gaps[m])
        assert kinds["no_trades"] > 0 and kinds["missing"] > 0, kinds
        # Trades: each delivered once, equal to the fake's; none lost inside a watched span.
        got = Counter()
        for f in frames:
            obj = json.loads(f)
            if obj.get("ty") == "trade":
                got[(obj["cd"], obj["sid"])] += 1
        assert stats["trades_duplicate"] >= 5 and sum(n - 1 for n in got.values()) >= 5
        for m in markets:
            mine = live_trades[m]
            assert len(np.unique(mine["sequential_id"])) == len(mine)
            assert {int(s) for s in mine["sequential_id"]} == {sid for (mm, sid) in got if mm == m}
            everything = fake_trades(data[(m, "1m")])
            by_sid = {int(r["sequential_id"]): r.tobytes() for r in everything}
            assert all(by_sid[int(r["sequential_id"])] == r.tobytes() for r in mine), m
            for a, b in spans:
                # all but the edges: a step of the clock (3 s) and the drop's second
                want = everything[(everything["ts"] > a + 3_000) & (everything["ts"] <= b - 5_000)]
                assert np.isin(want["sequential_id"], mine["sequential_id"]).all(), (m, a, b)
        # -- after the window: reads fetch exactly the missed spans ----------------------------------
        try:
            up.reset_log()
            # The spans no epoch watched whole: between the covered runs.
            unwatched = {m: [(c[1], d[0]) for c, d in zip(covs[m][:-1], covs[m][1:])] for m in markets}
            liquid = markets[0]
            last = unwatched[liquid][-1]
            n = TF.count(last[0], TF.floor(clock()))
            rows = store.candles(liquid, "1m", count=n)
            reqs = up.requests("/v1/candles")
            assert len(reqs) == 1 and to_ms(reqs[0].params["to"]) == last[1], reqs
            fake = data[(liquid, "1m")]
            assert np.array_equal(rows, fake[fake["ts"] < TF.floor(clock())][-n:])
            for m in markets:
                up.reset_log()
                want = unwatched[m][:-1] if m == liquid else unwatched[m]
                got_rows = store.candles(m, "1m", start=start + MIN, end=TF.floor(end) - MIN)
                ends = sorted(to_ms(r.params["to"]) for r in up.requests("/v1/candles"))
                assert ends == sorted(e for _, e in want), (m, ends, want)
                fake = data[(m, "1m")]
                assert np.array_equal(got_rows, fake[(fake["ts"] >= start + MIN) & (fake["ts"] < TF.floor(end) - MIN)])
                assert all(
                    g.kind == "no_trades" for g in store.gaps(m, "1m", start=start + MIN, end=TF.floor(end) - MIN)
                )
            assert live.stats()["rest_differences"] == 0
        finally:
            store.close()
        assert not live.stats()["running"]


def test_recorded_simple_frames_replay_into_the_realtime_cache_exactly(tmp_path: Path) -> None:
    """Every trade and the last orderbook of each market in cryptofeed's recording of Upbit's
    SIMPLE frames reach the cache with the raw JSON's values; bad frames are counted, not fatal."""
    lines = (DATA / "ws_trade_orderbook_simple_cryptofeed_2021.txt").read_text().splitlines()
    items: list[Any] = []
    for line in filter(None, lines[2:]):
        at, _, rest = line.partition(": ")
        items.append((int(float(at) * 1000), ast.literal_eval(rest)))
    bad = [b"{not json", b'{"ty":"trade","cd":"KRW-LAMB","tp":"1"}', b"[]"]
    for k, frame in enumerate(bad):
        items.insert(50 * (k + 1), (items[50 * (k + 1)][0], frame))
    names = {k: {v: n for n, v in simple_keys(k).items()} for k in ("trade", "orderbook", "unit")}
    trades: dict[str, list[tuple[int, float, float, int, int]]] = {}
    books: dict[str, dict[str, Any]] = {}
    for _, frame in items:
        if frame in bad:
            continue
        raw = json.loads(frame)
        if raw["ty"] == "trade":
            side = 1 if raw["ab"] == "BID" else -1
            trades.setdefault(raw["cd"], []).append((raw["ttms"], raw["tp"], raw["tv"], side, raw["sid"]))
        else:
            book = {("market" if k == "cd" else names["orderbook"][k]): v for k, v in raw.items() if k != "ty"}
            book["orderbook_units"] = [{names["unit"][k]: v for k, v in u.items()} for u in raw["obu"]]
            books[raw["cd"]] = book
    last = items[-1][0]
    store = mds.open(tmp_path / "s", clock=lambda: last)
    try:
        live = store.follow(ReplayStream(items))
        wait_for(lambda: not live.stats()["running"], "the replay")
        stats = live.stats()
        assert stats["error"] is None and stats["malformed"] == len(bad)
        assert stats["epochs"] == len(bad) + 1  # each bad frame is a loss: it ends the span watched
        assert stats["applied"]["trade"] == 304 and stats["applied"]["orderbook"] == 145
        for market, rows in trades.items():
            want = np.sort(np.array(rows, dtype=TRADE_DTYPE), order=["ts", "sequential_id"])
            assert np.array_equal(store.trades(market), want), market
        assert len(books) >= 2 and len(trades) >= 2
        for market, book in books.items():
            assert store.orderbook(market) == book, market
        with pytest.raises(InvalidRequestError):
            store.follow(object())
    finally:
        store.close()


def test_forming_candle_is_visible_and_store_close_stops_the_feed(tmp_path: Path) -> None:
    markets = ["KRW-BTC", "KRW-ETH"]
    data = {(m, "1m"): generate_market(m, "1m", T0, T0 + 3_600_000, seed=i) for i, m in enumerate(markets)}
    clock = MarketClock(T0 + 20 * MIN + 30_000)
    with FakeUpbit(data, clock=clock, rate_limit=None) as up:
        store = mds.open(tmp_path / "s", config=mds.Config(live_grace_s=5.0), clock=clock)
        feed = UpbitStream(markets, kinds=(), candles=("1m",), url=up.ws_url, clock=clock, **FAST)
        with store.follow(feed) as live:
            for _ in range(5):
                clock.advance(2_000)
                now = clock()

                def forming(now: int = now) -> bool:
                    got = store.candles("KRW-BTC", "1m", start=T0 + 20 * MIN, include_partial=True)
                    return (
                        len(got) > 0 and int(got["ts"][-1]) == TF.floor(now) and live.stats()["applied"]["candle"] > 0
                    )

                wait_for(forming, "the forming candle")
            fake = httpx_candle(up, "KRW-BTC")  # REST's partial candle at the same clock
            wait_for(
                lambda: np.array_equal(
                    store.candles("KRW-BTC", "1m", start=TF.floor(clock()), include_partial=True), fake
                ),
                "the stream's forming candle to equal REST's",
            )
            live2 = store.follow(UpbitStream(markets[:1], kinds=("ticker",), url=up.ws_url, clock=clock, **FAST))
            wait_for(lambda: store.ticker("KRW-BTC") is not None, "a ticker")
        assert not live.stats()["running"] and live2.stats()["running"]
        store.close()
        assert not live2.stats()["running"] and live2.feed.closed


def httpx_candle(up: FakeUpbit, market: str) -> np.ndarray:
    import httpx

    from mds import candles_from_upbit

    rows = httpx.get(up.base_url + "/v1/candles/minutes/1", params={"market": market, "count": 1}).json()
    return candles_from_upbit(rows)


def test_with_a_layer1_the_forming_candle_comes_from_the_connected_feed(tmp_path: Path) -> None:
    """A store with a Layer 1 asked REST for the forming candle on every include_partial read;
    while a connected feed keeps it in memory, the feed's (newer) candle answers."""
    data = {("KRW-BTC", "1m"): generate_market("KRW-BTC", "1m", T0, T0 + 3_600_000, seed=4)}
    clock = MarketClock(T0 + 20 * MIN + 30_000)
    with FakeUpbit(data, clock=clock, rate_limit=None) as up, open_store(tmp_path / "s", up, clock) as store:
        store.candles("KRW-BTC", "1m", start=T0 + 10 * MIN)  # the closed minutes, over REST
        feed = UpbitStream(["KRW-BTC"], kinds=(), candles=("1m",), url=up.ws_url, clock=clock, **FAST)
        with store.follow(feed) as live:
            clock.advance(2_000)
            wait_for(lambda: live.stats()["applied"]["candle"] > 0, "a candle message")

            def streamed() -> bool:
                n = up.request_count("/v1/candles")
                got = store.candles("KRW-BTC", "1m", start=TF.floor(clock()), include_partial=True)
                return len(got) == 1 and up.request_count("/v1/candles") == n

            wait_for(streamed, "an include_partial read answered from the feed, without REST")
            got = store.candles("KRW-BTC", "1m", start=TF.floor(clock()), include_partial=True)
            assert np.array_equal(got, httpx_candle(up, "KRW-BTC"))  # the same as REST's
        # the feed is closed: REST answers the forming candle again
        n = up.request_count("/v1/candles")
        got = store.candles("KRW-BTC", "1m", start=TF.floor(clock()), include_partial=True)
        assert up.request_count("/v1/candles") > n and np.array_equal(got, httpx_candle(up, "KRW-BTC"))


def covered_within_watched(covs: list[tuple[int, int]], watched: list[list[int | None]], now: int) -> bool:
    """Whether every covered run lies inside one watched span (an open span ends at ``now``)."""
    spans = [(int(a), int(b) if b is not None else now) for a, b in watched]  # type: ignore[arg-type]
    return all(any(a <= cs and ce <= b for a, b in spans) for cs, ce in covs)


def stream_candles_equal_rest(store: mds.Store, data: dict[tuple[str, str], np.ndarray], lo: int, hi: int) -> int:
    """Assert every candle the stream wrote in [lo, hi) equals FakeUpbit's; returns how many."""
    n = 0
    for (m, _tf), fake in data.items():
        rows = stored_rows(store._health, m, TF, lo, hi)
        i = np.searchsorted(fake["ts"], rows["ts"])
        assert np.array_equal(fake[i], rows), m
        n += len(rows)
    return n


def test_a_silent_server_is_not_coverage_and_the_read_fetches_its_span(tmp_path: Path) -> None:
    """The connection stays up but nothing arrives (no data, no keepalive answer): the epoch
    watched through the last frame only, however far the clock goes; a read fetches the rest."""
    m = "KRW-BTC"
    data = {(m, "1m"): generate_market(m, "1m", T0, T0 + 3 * 3_600_000, seed=0)}
    clock = MarketClock(T0 + 60 * MIN + 30_000)
    with FakeUpbit(data, clock=clock, rate_limit=None) as up, open_store(tmp_path / "s", up, clock) as store:
        feed = UpbitStream(
            [m], kinds=(), candles=("1m",), url=up.ws_url, clock=clock, **{**FAST, "stale_after_s": 60.0}
        )
        live = store.follow(feed)
        for _ in range(25):  # 2.5 minutes with candles arriving: covered
            n = live.stats()["applied"]["candle"]
            clock.advance(6_000)
            wait_for(lambda n=n: live.stats()["applied"]["candle"] > n, "a candle")  # type: ignore[misc]
        wait_for(lambda: len(store.coverage(m, "1m")) == 1, "coverage while frames arrive")
        up.ws.inject("idle")  # silent from now on; the connection stays open
        silent_from = clock()
        answers = up.ws.sent["status"]
        for _ in range(40):  # 4 simulated minutes, a few wall seconds (< stale_after_s)
            clock.advance(6_000)
            time.sleep(0.05)
        time.sleep(0.3)  # several of the feed's idle ticks
        st = live.stats()
        assert st["feed"]["connected"] and st["reconnects"] == 0 and up.ws.sent["status"] == answers
        assert store.coverage(m, "1m")[-1][1] <= silent_from  # never the clock's minutes since
        assert covered_within_watched(store.coverage(m, "1m"), st["watched"], clock())
        lo, hi = TF.ceil(silent_from), TF.floor(clock()) - MIN
        assert all(g.kind == "missing" for g in store.gaps(m, "1m", start=lo, end=hi))
        up.reset_log()
        got = store.candles(m, "1m", start=lo, end=hi)
        fake = data[(m, "1m")]
        assert len(up.requests("/v1/candles")) == 1
        assert np.array_equal(got, fake[(fake["ts"] >= lo) & (fake["ts"] < hi)]) and len(got) > 0
        up.ws.clear_faults()
        live.close()


@pytest.mark.parametrize("fault", ["malformed", "wrong_type"])
def test_a_frame_that_cannot_be_read_ends_the_epoch(tmp_path: Path, fault: str) -> None:
    """The final frames of two minutes are lost to bad frames: neither minute is written from
    an older partial nor covered as no_trades; the connection stays and a read fetches them."""
    m = "KRW-BTC"
    data = {(m, "1m"): generate_market(m, "1m", T0, T0 + 3 * 3_600_000, seed=0)}
    clock = MarketClock(T0 + 60 * MIN + 30_000)
    with FakeUpbit(data, clock=clock, rate_limit=None) as up, open_store(tmp_path / "s", up, clock) as store:
        live = store.follow(UpbitStream([m], kinds=(), candles=("1m",), url=up.ws_url, clock=clock, **FAST))
        wait_for(lambda: live.stats()["applied"]["candle"] > 0, "the first candle")
        clock.advance(35_000)
        for _ in range(5):  # partial versions of minute M
            n = live.stats()["applied"]["candle"]
            clock.advance(5_000)
            wait_for(lambda n=n: live.stats()["applied"]["candle"] > n, "a partial")  # type: ignore[misc]
        M = TF.floor(clock())
        up.ws.inject(fault, times=2)  # the next two frames: M's final and M+1's final
        clock.advance(M + 2 * MIN + 5_000 - clock())
        wait_for(lambda: live.stats()["feed"]["malformed"] >= 2, "the bad frames")
        for _ in range(4):
            n = live.stats()["applied"]["candle"]
            clock.advance(3_000)
            wait_for(lambda n=n: live.stats()["applied"]["candle"] > n, "a candle after them")  # type: ignore[misc]
        st = live.stats()
        assert st["reconnects"] == 0 and st["feed"]["connects"] == 1
        assert st["feed"]["disconnects"]["malformed"] == 1 and st["epochs"] == 2
        assert st["candles_unconfirmed"] >= 1
        assert covered_within_watched(store.coverage(m, "1m"), st["watched"], clock())
        assert all(not (a <= M < b) and not (a <= M + MIN < b) for a, b in store.coverage(m, "1m"))
        up.reset_log()
        got = store.candles(m, "1m", start=M, end=M + 2 * MIN)
        fake = data[(m, "1m")]
        assert np.array_equal(got, fake[(fake["ts"] >= M) & (fake["ts"] < M + 2 * MIN)]) and len(got) == 2
        assert len(up.requests("/v1/candles")) == 1
        live.close()


def test_a_clock_that_jumps_minutes_ahead_never_writes_a_forming_candle_as_final(tmp_path: Path) -> None:
    """The shared clock jumps several minutes at once, past minute ends plus the grace, before
    FakeUpbit's next send: every candle the stream wrote is FakeUpbit's REST candle, each written
    once, and coverage stays inside the watched spans."""
    markets = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL"]
    data = {(m, "1m"): generate_market(m, "1m", T0, T0 + 3 * 3_600_000, seed=i) for i, m in enumerate(markets)}
    start = T0 + 60 * MIN + 30_000
    clock = MarketClock(start)
    with FakeUpbit(data, clock=clock, rate_limit=None) as up, open_store(tmp_path / "s", up, clock) as store:
        live = store.follow(
            UpbitStream(markets, kinds=("ticker",), candles=("1m",), url=up.ws_url, clock=clock, **FAST)
        )
        wait_for(lambda: all(store.ticker(m) is not None for m in markets), "the first tickers")
        for k, jump in enumerate([3, 5, 4, 6, 3, 7, 4, 5]):
            for _ in range(3):  # a few partial versions of the current minute
                clock.advance(7_000)
                now = clock()
                wait_for(
                    lambda now=now: all(store.ticker(m)["timestamp"] >= now for m in markets),  # type: ignore[index,misc]
                    "the partials",
                )
                time.sleep(0.06)  # one idle tick of the feed at this clock
            clock.advance(jump * MIN + 1_000 * k)  # past several minute ends and the grace at once
            now = clock()
            wait_for(
                lambda now=now: all(store.ticker(m)["timestamp"] >= now for m in markets),  # type: ignore[index,misc]
                "the frames after the jump",
            )
            time.sleep(0.06)
        wait_for(lambda: live.stats()["feed"]["queued"] == 0, "the queue to drain")
        time.sleep(0.2)
        # each candle written once (a forming version written first would count twice)
        wait_for(
            lambda: live.stats()["candles_written"] == stream_candles_equal_rest(store, data, start - MIN, clock()),
            "every write to land",
        )
        st = live.stats()
        assert st["epochs"] == 1 and st["error"] is None and up.requests("/v1/candles") == []
        assert st["candles_written"] > 0
        for m in markets:
            covs = store.coverage(m, "1m")
            assert covs and covered_within_watched(covs, st["watched"], clock())
        live.close()


def test_a_feed_is_followed_once(tmp_path: Path) -> None:
    """A second follow of the same feed (this store or another), or of a feed another consumer
    started, is refused and changes nothing: the first follower goes on receiving."""
    data = {("KRW-BTC", "1m"): generate_market("KRW-BTC", "1m", T0, T0 + 3_600_000, seed=1)}
    clock = MarketClock(T0 + 20 * MIN)
    with FakeUpbit(data, clock=clock, rate_limit=None) as up:
        store = mds.open(tmp_path / "a", clock=clock)
        other = mds.open(tmp_path / "b", clock=clock)
        try:
            feed = UpbitStream(["KRW-BTC"], kinds=("ticker",), url=up.ws_url, clock=clock, **FAST)
            live = store.follow(feed)
            for s in (store, other):
                with pytest.raises(InvalidRequestError, match="followed already"):
                    s.follow(feed)
            assert store._live == [live] and other._live == []

            async def started_elsewhere() -> UpbitStream:
                s = UpbitStream(["KRW-BTC"], kinds=("ticker",), url=up.ws_url, clock=clock, **FAST)
                s.start()
                await s.aclose()
                return s

            import asyncio

            elsewhere = asyncio.run(started_elsewhere())
            with pytest.raises(InvalidRequestError):
                other.follow(elsewhere)
            for _ in range(3):
                n = live.stats()["applied"]["ticker"]
                clock.advance(2_000)
                wait_for(lambda n=n: live.stats()["applied"]["ticker"] > n, "tickers to the first follower")  # type: ignore[misc]
            assert live.stats()["running"] and live.stats()["error"] is None
        finally:
            store.close()
            other.close()
