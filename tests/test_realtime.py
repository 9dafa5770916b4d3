"""Realtime cache: recorded SIMPLE frames, DEFAULT and REST shapes, dedup, TTL, rejections."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mds._dtypes import TRADE_DTYPE
from mds.errors import InvalidRequestError
from mds.tiers.realtime import ORDERBOOK_SIMPLE, TICKER_SIMPLE, TRADE_SIMPLE, UNIT_SIMPLE, RealtimeCache

DATA = Path(__file__).parent / "data" / "ws_trade_orderbook_simple_cryptofeed_2021.txt"
NOW = 1_800_000_000_000


class Clock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def recorded_frames() -> list[dict[str, Any]]:
    """The JSON messages of the cryptofeed recording (lines ``<recv_ts>: b'<json>'``)."""
    lines = DATA.read_text().splitlines()[2:]
    return [json.loads(ast.literal_eval(line.partition(": ")[2])) for line in lines if line.strip()]


def to_simple(msg: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    inverse = {v: k for k, v in table.items()}
    out = {inverse.get(k, k): v for k, v in msg.items()}
    if "obu" in out:
        units = {v: k for k, v in UNIT_SIMPLE.items()}
        out["obu"] = [{units[k]: v for k, v in u.items()} for u in out["obu"]]
    return out


def ticker_default(code: str = "KRW-BTC", price: float = 143_250_000.0, ts: int = NOW - 5) -> dict[str, Any]:
    """A WebSocket ticker in DEFAULT format with every field of ../shared/UPBIT_API.md section 6."""
    return {
        "type": "ticker",
        "code": code,
        "opening_price": 142_000_000.0,
        "high_price": 144_100_000.0,
        "low_price": 141_800_000.0,
        "trade_price": price,
        "prev_closing_price": 142_000_000.0,
        "acc_trade_price": 81_234_567_890.1234,
        "change": "RISE",
        "change_price": price - 142_000_000.0,
        "signed_change_price": price - 142_000_000.0,
        "change_rate": 0.0088,
        "signed_change_rate": 0.0088,
        "ask_bid": "BID",
        "trade_volume": 0.0123,
        "acc_trade_volume": 567.891,
        "trade_date": "20261001",
        "trade_time": "031500",
        "trade_timestamp": ts - 10,
        "acc_ask_volume": 300.1,
        "acc_bid_volume": 267.791,
        "highest_52_week_price": 163_325_000.0,
        "highest_52_week_date": "2026-01-20",
        "lowest_52_week_price": 71_000_000.0,
        "lowest_52_week_date": "2025-11-02",
        "market_state": "ACTIVE",
        "is_trading_suspended": False,
        "delisting_date": None,
        "market_warning": "NONE",
        "timestamp": ts,
        "acc_trade_price_24h": 190_000_000_000.5,
        "acc_trade_volume_24h": 1333.4,
        "stream_type": "REALTIME",
    }


def ticker_rest(code: str = "KRW-BTC", price: float = 143_250_000.0, ts: int = NOW - 5) -> dict[str, Any]:
    """The REST ``/v1/ticker`` shape: ``market``, KST date fields, no WebSocket-only fields."""
    d = ticker_default(code, price, ts)
    for k in ("type", "code", "ask_bid", "acc_ask_volume", "acc_bid_volume", "market_state"):
        d.pop(k)
    for k in ("is_trading_suspended", "delisting_date", "market_warning", "stream_type"):
        d.pop(k)
    return {"market": code, **d, "trade_date_kst": "20261001", "trade_time_kst": "121500"}


def orderbook_default(code: str = "KRW-BTC", ts: int = NOW - 5, levels: int = 15) -> dict[str, Any]:
    units = [
        {"ask_price": 100.0 + i, "bid_price": 99.0 - i, "ask_size": 1.5 + i, "bid_size": 2.5 + i} for i in range(levels)
    ]
    return {
        "type": "orderbook",
        "code": code,
        "timestamp": ts,
        "total_ask_size": sum(u["ask_size"] for u in units),
        "total_bid_size": sum(u["bid_size"] for u in units),
        "orderbook_units": units,
        "level": 0,
        "stream_type": "SNAPSHOT",
    }


def trade_rest(sid: int, ts: int, price: float = 100.0, side: str = "BID", market: str = "KRW-BTC") -> dict[str, Any]:
    return {
        "market": market,
        "trade_date_utc": "2026-10-01",
        "trade_time_utc": "03:15:00",
        "timestamp": ts,
        "trade_price": price,
        "trade_volume": 0.5,
        "prev_closing_price": 99.0,
        "change_price": price - 99.0,
        "ask_bid": side,
        "sequential_id": sid,
    }


def trade_default(sid: int, ts: int, price: float = 100.0, side: str = "ASK", code: str = "KRW-BTC") -> dict[str, Any]:
    return {
        "type": "trade",
        "code": code,
        "trade_price": price,
        "trade_volume": 0.25,
        "ask_bid": side,
        "prev_closing_price": 99.0,
        "change": "RISE",
        "change_price": price - 99.0,
        "trade_date": "2026-10-01",
        "trade_time": "03:15:00",
        "trade_timestamp": ts,
        "timestamp": ts + 30,
        "sequential_id": sid,
        "stream_type": "REALTIME",
    }


def state(cache: RealtimeCache) -> Any:
    """Everything observable, for 'nothing changed' checks."""
    st = cache.stats()
    for k in ("puts", "rejected", "hits", "misses", "evicted_symbols", "duplicates"):
        st.pop(k)
    syms = ("KRW-BTC", "KRW-ETH", "KRW-LAMB")
    return (
        st,
        [cache.ticker_history(s) for s in syms],
        [cache.orderbook_history(s) for s in syms],
        [cache.trades(s).tobytes() for s in syms],
    )


# -- recorded SIMPLE frames ---------------------------------------------------------------------
def test_recorded_simple_frames_fill_trades_and_orderbooks():
    frames = recorded_frames()
    assert len(frames) == 449
    cache = RealtimeCache(clock=Clock())
    kinds = [cache.put_message(f) for f in frames]
    assert kinds.count("trade") == 304 and kinds.count("orderbook") == 145
    trades = [f for f in frames if f["ty"] == "trade"]
    for market in {f["cd"] for f in trades}:
        mine = [f for f in trades if f["cd"] == market]
        got = cache.trades(market)
        assert len(got) == len({f["sid"] for f in mine})
        assert sorted(got["sequential_id"].tolist()) == sorted({f["sid"] for f in mine})
        assert np.all(np.diff(got["ts"]) >= 0)
        by_sid = {f["sid"]: f for f in mine}
        for row in got:
            f = by_sid[int(row["sequential_id"])]
            assert row["ts"] == f["ttms"] and row["price"] == f["tp"] and row["volume"] == f["tv"]
            assert row["side"] == (1 if f["ab"] == "BID" else -1)
    last_book = {f["cd"]: f for f in frames if f["ty"] == "orderbook"}
    for market, f in last_book.items():
        ob = cache.orderbook(market)
        assert ob is not None and ob["market"] == market and "type" not in ob and "code" not in ob
        assert ob["timestamp"] == f["tms"] and ob["total_ask_size"] == f["tas"] and ob["stream_type"] == "REALTIME"
        assert ob["orderbook_units"] == [
            {"ask_price": u["ap"], "bid_price": u["bp"], "ask_size": u["as"], "bid_size": u["bs"]} for u in f["obu"]
        ]
    st = cache.stats()
    assert st["trades"] == 304 - st["duplicates"] and st["orderbooks"] == len(last_book)
    assert st["orderbook_history"] == 145


def test_recorded_trades_in_any_order_with_replays_give_the_same_ring():
    trades = [f for f in recorded_frames() if f["ty"] == "trade" and f["cd"] == "KRW-LAMB"]
    ordered = RealtimeCache(clock=Clock())
    ordered.put_trades("KRW-LAMB", trades)
    want = ordered.trades("KRW-LAMB")
    rng = np.random.default_rng(7)
    for _ in range(5):
        cache = RealtimeCache(clock=Clock())
        shuffled = [trades[i] for i in rng.permutation(len(trades))]
        replays = [trades[i] for i in rng.choice(len(trades), 100)]
        added = 0
        for chunk in np.array_split(np.arange(len(shuffled) + 100), 23):
            added += cache.put_trades("KRW-LAMB", [(shuffled + replays)[i] for i in chunk])
        assert added == len(want)
        assert cache.trades("KRW-LAMB").tobytes() == want.tobytes()


# -- tickers ------------------------------------------------------------------------------------
def test_ticker_rest_default_and_simple_normalise_to_rest_names():
    default = ticker_default()
    simple = to_simple(default, TICKER_SIMPLE)
    assert "ty" in simple and "cd" in simple and "tp" in simple and "atp24h" in simple
    got = []
    for msg in (default, simple):
        cache = RealtimeCache(clock=Clock())
        cache.put_ticker(msg)
        got.append(cache.ticker("KRW-BTC"))
    want = {"market": "KRW-BTC", **{k: v for k, v in default.items() if k not in ("type", "code")}}
    assert got[0] == want and got[1] == want
    cache = RealtimeCache(clock=Clock())
    assert cache.put_ticker([ticker_rest(), ticker_rest("KRW-ETH", 5_000_000.0)]) == 2  # a REST response
    assert cache.ticker("KRW-BTC") == ticker_rest()
    assert cache.ticker("KRW-ETH")["trade_price"] == 5_000_000.0
    assert cache.ticker("KRW-XRP") is None


def test_ticker_history_is_bounded_by_count_and_filtered_by_since():
    cache = RealtimeCache(history_max=5, clock=Clock())
    for i in range(8):
        cache.put_ticker(ticker_default(price=100.0 + i, ts=NOW + i))
    hist = cache.ticker_history("KRW-BTC")
    assert [h["trade_price"] for h in hist] == [103.0, 104.0, 105.0, 106.0, 107.0]
    assert [h["timestamp"] for h in cache.ticker_history("KRW-BTC", since=NOW + 6)] == [NOW + 6, NOW + 7]
    assert cache.ticker("KRW-BTC")["trade_price"] == 107.0
    assert cache.ticker_history("KRW-ETH") == []


def test_returned_dicts_are_copies():
    cache = RealtimeCache(clock=Clock())
    msg = ticker_default()
    cache.put_ticker(msg)
    msg["trade_price"] = 1.0  # the caller's dict is not the cached one
    t = cache.ticker("KRW-BTC")
    t["trade_price"] = 2.0
    cache.ticker_history("KRW-BTC")[0]["trade_price"] = 3.0
    assert cache.ticker("KRW-BTC")["trade_price"] == 143_250_000.0
    cache.put_orderbook(orderbook_default())
    ob = cache.orderbook("KRW-BTC")
    ob["orderbook_units"][0]["ask_price"] = -1.0
    assert cache.orderbook("KRW-BTC")["orderbook_units"][0]["ask_price"] == 100.0


def test_symbols_not_updated_within_ttl_are_evicted():
    clock = Clock()
    cache = RealtimeCache(ticker_ttl_ms=60_000, orderbook_ttl_ms=30_000, clock=clock)
    cache.put_ticker(ticker_default("KRW-BTC"))
    cache.put_ticker(ticker_default("KRW-ETH"))
    cache.put_orderbook(orderbook_default("KRW-BTC"))
    cache.put_trades("KRW-BTC", [trade_rest(1, NOW)])
    clock.now += 20_000
    cache.put_ticker(ticker_default("KRW-ETH", price=2.0))
    clock.now += 20_000
    assert cache.orderbook("KRW-BTC") is None  # 40 s > 30 s
    assert cache.ticker("KRW-BTC") is not None  # 40 s < 60 s
    clock.now += 30_000  # BTC ticker 70 s old, ETH 50 s
    assert cache.ticker("KRW-BTC") is None
    assert len(cache.trades("KRW-BTC")) == 0  # trades share the ticker TTL by default
    assert [h["trade_price"] for h in cache.ticker_history("KRW-ETH")] == [2.0]  # the first one aged out
    st = cache.stats()
    assert (st["tickers"], st["orderbooks"], st["trade_symbols"]) == (1, 0, 0)
    assert st["evicted_symbols"] == 3


def test_rejected_messages_leave_the_cache_unchanged():
    cache = RealtimeCache(clock=Clock())
    cache.put_ticker(ticker_default())
    cache.put_orderbook(orderbook_default())
    cache.put_trades("KRW-BTC", [trade_rest(1, NOW), trade_rest(2, NOW + 1)])
    before = state(cache)
    missing = ticker_default()
    del missing["trade_timestamp"]
    bad_units = orderbook_default()
    del bad_units["orderbook_units"][3]["bid_size"]
    nan_trade = trade_rest(9, NOW, price=float("nan"))
    attempts = [
        lambda: cache.put_ticker(orderbook_default()),  # another data type
        lambda: cache.put_ticker(to_simple(orderbook_default(), ORDERBOOK_SIMPLE)),
        lambda: cache.put_ticker(missing),
        lambda: cache.put_ticker(to_simple(missing, TICKER_SIMPLE)),
        lambda: cache.put_ticker([ticker_default("KRW-ETH"), ticker_default("krw-eth")]),  # all or nothing
        lambda: cache.put_ticker({**ticker_default(), "trade_price": "high"}),
        lambda: cache.put_ticker("KRW-BTC"),
        lambda: cache.put_orderbook(ticker_default()),
        lambda: cache.put_orderbook(bad_units),
        lambda: cache.put_orderbook({**orderbook_default(), "orderbook_units": "none"}),
        lambda: cache.put_trades("KRW-BTC", [trade_rest(5, NOW), trade_rest(6, NOW, market="KRW-ETH")]),
        lambda: cache.put_trades("KRW-BTC", [trade_rest(5, NOW), nan_trade]),
        lambda: cache.put_trades("KRW-BTC", [trade_rest(5, NOW), trade_rest(7, NOW, side="SELL")]),
        lambda: cache.put_trades("KRW-BTC", [trade_rest(5, NOW), {**trade_rest(8, NOW), "sequential_id": 1.5}]),
        lambda: cache.put_trades("KRW-BTC", [trade_rest(5, NOW), {"type": "ticker", "code": "KRW-BTC"}]),
        lambda: cache.put_trades("KRW-BTC", [{k: v for k, v in trade_default(5, NOW).items() if k != "ask_bid"}]),
        lambda: cache.put_trades("KRW-BTC", np.zeros(3, dtype=[("ts", "<i8")])),
        lambda: cache.put_trades("KRW-BTC", np.zeros(3, dtype=TRADE_DTYPE)),  # side 0, price 0
        lambda: cache.put_trades("KRW BTC", [trade_rest(5, NOW)]),
        lambda: cache.put_message({"ty": "candle.1m", "cd": "KRW-BTC"}),
        lambda: cache.put_message({"type": "trade", "sequential_id": 3}),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidRequestError):
            attempt()
        assert state(cache) == before
    assert cache.stats()["rejected"] == len(attempts)


# -- orderbooks ---------------------------------------------------------------------------------
def test_orderbook_shapes_normalise_the_same_and_keep_history():
    default = orderbook_default()
    rest = {"market": "KRW-BTC", **{k: v for k, v in default.items() if k not in ("type", "code", "stream_type")}}
    want_units = default["orderbook_units"]
    for msg in (default, to_simple(default, ORDERBOOK_SIMPLE), [rest]):
        cache = RealtimeCache(clock=Clock())
        cache.put_orderbook(copy.deepcopy(msg))
        ob = cache.orderbook("KRW-BTC")
        assert ob["orderbook_units"] == want_units and ob["market"] == "KRW-BTC" and ob["level"] == 0
        assert ob["total_bid_size"] == default["total_bid_size"]
    clock = Clock()
    cache = RealtimeCache(orderbook_ttl_ms=10_000, clock=clock)
    for i in range(4):
        cache.put_orderbook(orderbook_default(ts=NOW + i))
        clock.now += 4_000
    clock.now -= 4_000  # snapshots received 12, 8, 4 and 0 s ago
    assert [o["timestamp"] for o in cache.orderbook_history("KRW-BTC")] == [NOW + 1, NOW + 2, NOW + 3]
    assert [o["timestamp"] for o in cache.orderbook_history("KRW-BTC", since=NOW + 3)] == [NOW + 3]


# -- trades -------------------------------------------------------------------------------------
def test_trades_from_rest_default_simple_and_arrays_agree():
    rest = [trade_rest(10 + i, NOW + i * 100, price=100.0 + i, side="BID" if i % 2 else "ASK") for i in range(6)]
    default = [trade_default(10 + i, NOW + i * 100, price=100.0 + i, side="BID" if i % 2 else "ASK") for i in range(6)]
    simple = [to_simple(d, TRADE_SIMPLE) for d in default]
    arrays = []
    for trades in (rest[::-1], default, simple):  # REST pages come newest first
        cache = RealtimeCache(clock=Clock())
        assert cache.put_trades("KRW-BTC", trades) == 6
        arrays.append(cache.trades("KRW-BTC"))
    for a in arrays:
        assert (
            a[["ts", "price", "side", "sequential_id"]].tolist()
            == arrays[0][["ts", "price", "side", "sequential_id"]].tolist()
        )
    assert arrays[0]["side"].tolist() == [-1, 1, -1, 1, -1, 1]
    cache = RealtimeCache(clock=Clock())
    assert cache.put_trades("KRW-BTC", arrays[0]) == 6
    assert cache.put_trades("KRW-BTC", arrays[0]) == 0
    assert cache.put_trades("KRW-BTC", simple[0]) == 0  # one message on its own
    assert cache.trades("KRW-BTC").tobytes() == arrays[0].tobytes()


def test_unordered_sequential_ids_are_deduplicated():
    rng = np.random.default_rng(3)
    sids = rng.permutation(np.arange(1_000, 1_500)) * 7  # unique, in no particular order
    ts = NOW + np.sort(rng.integers(0, 50_000, 500))
    trades = [trade_rest(int(s), int(t)) for s, t in zip(sids, ts)]
    cache = RealtimeCache(trades_capacity=10_000, clock=Clock())
    added = 0
    for i in rng.permutation(500):  # one at a time, shuffled
        added += cache.put_trades("KRW-BTC", [trades[i]])
    assert added == 500
    for i in rng.choice(500, 200):
        assert cache.put_trades("KRW-BTC", [trades[i], trades[i]]) == 0
    got = cache.trades("KRW-BTC")
    assert len(got) == 500 and len(np.unique(got["sequential_id"])) == 500
    order = np.lexsort((got["sequential_id"], got["ts"]))
    assert np.array_equal(order, np.arange(500))
    assert cache.stats()["duplicates"] == 400


def test_trades_read_by_count_and_since():
    cache = RealtimeCache(clock=Clock())
    cache.put_trades("KRW-BTC", [trade_rest(i, NOW + i * 1000) for i in range(20)])
    assert cache.trades("KRW-BTC", count=3)["sequential_id"].tolist() == [17, 18, 19]
    assert cache.trades("KRW-BTC", since=NOW + 17_500)["sequential_id"].tolist() == [18, 19]
    assert cache.trades("KRW-BTC", since=NOW + 5000, count=2)["sequential_id"].tolist() == [5, 6]
    assert len(cache.trades("KRW-BTC", count=0)) == 0
    assert len(cache.trades("KRW-BTC", count=100)) == 20
    assert len(cache.trades("KRW-ETH")) == 0
    with pytest.raises(InvalidRequestError):
        cache.trades("KRW-BTC", count=-1)
    with pytest.raises(InvalidRequestError):
        cache.trades("btc")


def test_trade_ring_keeps_the_newest_and_views_never_change():
    cache = RealtimeCache(trades_capacity=50, clock=Clock())
    cache.put_trades("KRW-BTC", [trade_rest(i, NOW + i) for i in range(40)])
    view = cache.trades("KRW-BTC")
    tail = cache.trades("KRW-BTC", count=5)
    frozen, frozen_tail = view.tobytes(), tail.tobytes()
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view["price"][0] = 1.0
    for i in range(40, 200):  # appends, several buffer moves
        cache.put_trades("KRW-BTC", [trade_rest(i, NOW + i)])
    cache.put_trades("KRW-BTC", [trade_rest(1_000, NOW + 170)])  # lands in the middle: merge
    assert view.tobytes() == frozen and tail.tobytes() == frozen_tail
    got = cache.trades("KRW-BTC")
    assert len(got) == 50
    assert got["sequential_id"].tolist() == [*range(151, 171), 1_000, *range(171, 200)]
    assert cache.put_trades("KRW-BTC", [trade_rest(3, NOW + 3)]) == 0  # fell out: not re-added
    stats = cache.stats()
    assert stats["trades"] == 50 and stats["trade_bytes"] < 50 * 80
