"""FakeUpbit: the local Upbit behaves like Upbit's quotation API (loopback only)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from mds import CANDLE_DTYPE, TRADE_DTYPE, candles_from_upbit
from mds.errors import InvalidRequestError
from mds.testing import FAULT_KINDS, FakeUpbit, Fault, generate_market, krw_tick_size
from mds.timeframes import parse_timeframe
from mds.timeutil import iso_utc, to_ms

DATA = Path(__file__).parent / "data"
T0 = to_ms("2025-01-01T00:00:00Z")
DAY = 86_400_000


def valid(arr: np.ndarray, tf: str) -> bool:
    t = parse_timeframe(tf)
    body_lo = np.minimum(arr["open"], arr["close"])
    body_hi = np.maximum(arr["open"], arr["close"])
    fields = ["open", "high", "low", "close", "volume", "value"]
    return bool(
        all(np.isfinite(arr[f]).all() for f in fields)
        and (arr["low"] <= body_lo).all()
        and (arr["high"] >= body_hi).all()
        and (arr["volume"] > 0).all()
        and (arr["value"] > 0).all()
        and t.aligned(arr["ts"]).all()
        and (np.diff(arr["ts"]) > 0).all()
    )


def get(up: FakeUpbit, path: str, **params: object) -> httpx.Response:
    return httpx.get(up.base_url + path, params=params, timeout=5)


# -- generators ------------------------------------------------------------------------------


def test_generated_liquid_market_is_valid_seeded_and_nearly_gapless() -> None:
    a = generate_market("KRW-BTC", "1m", T0, T0 + 7 * DAY, seed=3)
    b = generate_market("KRW-BTC", "1m", T0, T0 + 7 * DAY, seed=3)
    c = generate_market("KRW-BTC", "1m", T0, T0 + 7 * DAY, seed=4)
    assert a.dtype == CANDLE_DTYPE and valid(a, "1m")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) >= 7 * 1440 - 10  # a few single-minute gaps at most
    ticks = krw_tick_size(a["close"])
    assert np.allclose(np.round(a["close"] / ticks) * ticks, a["close"])


def test_generated_illiquid_market_has_many_no_trade_minutes_mostly_at_korean_night() -> None:
    arr = generate_market("KRW-DOGE", "1m", T0, T0 + 3 * DAY, liquidity="illiquid", seed=1)
    assert valid(arr, "1m")
    slots = 3 * 1440
    assert 0.3 * slots < len(arr) < 0.8 * slots
    hours = (arr["ts"] // 3_600_000) % 24
    night = ((hours >= 16) & (hours < 22)).mean()
    assert night < 6 / 24  # fewer candles in the quiet hours than their share of the day
    # thin market: many single-trade candles
    assert (arr["open"] == arr["high"]).mean() > 0.2


@pytest.mark.parametrize("tf", ["1s", "3m", "1h", "4h", "1d", "1w", "1M"])
def test_generated_candles_are_aligned_for_every_timeframe(tf: str) -> None:
    span = {"1s": 3_600_000, "1w": 400 * DAY, "1M": 900 * DAY}.get(tf, 60 * DAY)
    arr = generate_market("KRW-ETH", tf, T0 + 1, T0 + span, liquidity=0.5, seed=2)
    assert len(arr) > 5 and valid(arr, tf)
    assert arr["ts"][0] >= T0 + 1


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidRequestError):
        generate_market("btc", "1m", T0, T0 + DAY)
    with pytest.raises(InvalidRequestError):
        generate_market("KRW-BTC", "7m", T0, T0 + DAY)
    with pytest.raises(InvalidRequestError):
        generate_market("KRW-BTC", "1m", T0, T0 + DAY, liquidity="medium")
    assert len(generate_market("KRW-BTC", "1m", T0, T0)) == 0


# -- candles -----------------------------------------------------------------------------------


def test_recorded_page_is_served_back_with_upbit_fields_and_number_forms() -> None:
    rows = json.loads((DATA / "krw-btc_1m_smtm_raw200.json").read_text())
    arr = candles_from_upbit(rows, market="KRW-BTC")
    with FakeUpbit({("KRW-BTC", "1m"): arr}) as up:
        r = get(up, "/v1/candles/minutes/1", market="KRW-BTC", count=200)
    assert r.status_code == 200
    served = r.json()
    assert [list(x) for x in served] == [list(x) for x in rows]  # same fields, same order
    for got, want in zip(served, rows):
        for k, v in want.items():
            if k != "timestamp":  # Upbit's last-tick time is not kept in CANDLE_DTYPE
                assert got[k] == v, k
    assert re.search(r'"opening_price":\d+\.\d{8},', r.text)
    assert r.text.startswith('[{"market":"KRW-BTC","candle_date_time_utc":"2021-01-30T13:47:00"')


@pytest.mark.parametrize(
    "to",
    ["2021-01-30T12:00:00Z", "2021-01-30 12:00:00", "2021-01-30T21:00:00+09:00", "2021-01-30T12:00:00"],
)
def test_to_is_exclusive_in_each_accepted_form(to: str) -> None:
    arr = candles_from_upbit(json.loads((DATA / "krw-btc_1m_smtm_raw200.json").read_text()))
    with FakeUpbit({("KRW-BTC", "1m"): arr}) as up:
        r = get(up, "/v1/candles/minutes/1", market="KRW-BTC", count=3, to=to)
    assert r.status_code == 200
    assert [x["candle_date_time_utc"] for x in r.json()] == [
        "2021-01-30T11:59:00",
        "2021-01-30T11:58:00",
        "2021-01-30T11:57:00",
    ]


def test_unencoded_plus_in_to_is_rejected_like_a_space() -> None:
    arr = generate_market("KRW-BTC", "1m", T0, T0 + DAY, seed=1)
    with FakeUpbit({("KRW-BTC", "1m"): arr}) as up:
        r = httpx.get(up.base_url + "/v1/candles/minutes/1?market=KRW-BTC&to=2025-01-01T09:30:00+09:00")
    assert r.status_code == 400


def test_count_defaults_to_one_and_is_capped_at_200() -> None:
    arr = generate_market("KRW-BTC", "1m", T0, T0 + DAY, seed=1)
    with FakeUpbit({("KRW-BTC", "1m"): arr}) as up:
        one = get(up, "/v1/candles/minutes/1", market="KRW-BTC")
        assert len(one.json()) == 1
        assert one.json()[0]["candle_date_time_utc"] == iso_utc(int(arr["ts"][-1]))
        assert get(up, "/v1/candles/minutes/1", market="KRW-BTC", count=201).status_code == 400
        assert get(up, "/v1/candles/minutes/1", market="KRW-BTC", count=0).status_code == 400
        assert get(up, "/v1/candles/minutes/7", market="KRW-BTC").status_code == 400
        assert get(up, "/v1/candles/minutes/1").status_code == 400
        nf = get(up, "/v1/candles/minutes/1", market="KRW-NOPE")
        assert nf.status_code == 404 and nf.json()["error"]["message"] == "Code not found"
        assert get(up, "/v1/candles/minutes/3", market="KRW-BTC", count=5).json() == []


def test_no_candle_is_served_for_no_trade_intervals() -> None:
    arr = generate_market("KRW-DOGE", "1m", T0, T0 + DAY, liquidity="illiquid", seed=5)
    end = T0 + 600 * 60_000
    with FakeUpbit({("KRW-DOGE", "1m"): arr}) as up:
        page = get(up, "/v1/candles/minutes/1", market="KRW-DOGE", count=200, to=iso_utc(end) + "Z").json()
    got = candles_from_upbit(page)["ts"][::-1]
    held = arr["ts"][arr["ts"] < end][-200:]
    assert np.array_equal(got, held)
    assert len(got) == 200 and got[0] < end - 200 * 60_000  # 200 candles span more than 200 minutes


@pytest.mark.parametrize(
    ("path", "tf", "extra"),
    [
        ("/v1/candles/seconds", "1s", None),
        ("/v1/candles/minutes/240", "4h", "unit"),
        ("/v1/candles/days", "1d", "prev_closing_price"),
        ("/v1/candles/weeks", "1w", "first_day_of_period"),
        ("/v1/candles/months", "1M", "first_day_of_period"),
    ],
)
def test_every_candle_endpoint_serves_its_timeframe(path: str, tf: str, extra: str | None) -> None:
    span = {"1s": 600_000, "1w": 300 * DAY, "1M": 900 * DAY}.get(tf, 100 * DAY)
    arr = generate_market("KRW-BTC", tf, T0, T0 + span, seed=1)
    with FakeUpbit({("KRW-BTC", tf): arr}) as up:
        page = get(up, path, market="KRW-BTC", count=10).json()
    assert [x["candle_date_time_utc"] for x in page] == [iso_utc(int(t)) for t in arr["ts"][::-1][:10]]
    if extra:
        assert extra in page[0]
    if tf == "1d":
        assert page[0]["prev_closing_price"] == arr["close"][-2]


# -- rate limit and log -----------------------------------------------------------------------------


def test_remaining_req_counts_down_and_the_eleventh_request_in_a_second_gets_429() -> None:
    arr = generate_market("KRW-BTC", "1m", T0, T0 + DAY, seed=1)
    with FakeUpbit({("KRW-BTC", "1m"): arr}, rate_window_s=30.0) as up, httpx.Client() as c:
        rs = [c.get(up.base_url + "/v1/candles/minutes/1", params={"market": "KRW-BTC"}) for _ in range(12)]
        other = c.get(up.base_url + "/v1/ticker", params={"markets": "KRW-BTC"})
        assert [r.status_code for r in rs] == [200] * 10 + [429, 429]
        assert rs[0].headers["Remaining-Req"] == "group=candles; min=600; sec=9"
        assert rs[9].headers["Remaining-Req"] == "group=candles; min=600; sec=0"
        assert rs[10].text == "Too many API requests."
        assert other.status_code == 200  # groups have separate budgets
        assert other.headers["Remaining-Req"].startswith("group=ticker;")
        assert up.request_count() == 13
        assert up.request_count("/v1/candles") == 12
        assert up.status_counts("/v1/candles") == {200: 10, 429: 2}
        assert up.requests("/v1/ticker")[0].params == {"markets": "KRW-BTC"}


# -- clock --------------------------------------------------------------------------------------------


def test_clock_serves_only_opened_candles_and_the_newest_partial() -> None:
    arr = generate_market("KRW-BTC", "1m", T0, T0 + DAY, seed=1)
    now = [T0 + 100 * 60_000 + 30_000]  # half-way through minute 100
    with FakeUpbit({("KRW-BTC", "1m"): arr}, clock=lambda: now[0]) as up:
        page = get(up, "/v1/candles/minutes/1", market="KRW-BTC", count=3).json()
        assert page[0]["candle_date_time_utc"] == iso_utc(T0 + 100 * 60_000)
        full = arr[arr["ts"] == T0 + 100 * 60_000][0]
        assert page[0]["candle_acc_trade_volume"] == pytest.approx(full["volume"] * 30_001 / 60_000)
        assert page[0]["low_price"] <= min(page[0]["opening_price"], page[0]["trade_price"])
        assert page[0]["high_price"] >= max(page[0]["opening_price"], page[0]["trade_price"])
        assert page[1]["candle_acc_trade_volume"] == arr[arr["ts"] == T0 + 99 * 60_000][0]["volume"]
        assert page[0]["timestamp"] <= now[0]
        now[0] = T0 + 150 * 60_000 + 59_999  # the end of minute 150: the candle is complete
        page = get(up, "/v1/candles/minutes/1", market="KRW-BTC", count=1).json()
        assert page[0]["candle_date_time_utc"] == iso_utc(T0 + 150 * 60_000)
        assert page[0]["trade_price"] == arr[arr["ts"] == T0 + 150 * 60_000][0]["close"]
        tick = get(up, "/v1/ticker", markets="KRW-BTC").json()[0]
        assert tick["trade_price"] == page[0]["trade_price"] and tick["timestamp"] == now[0]


# -- realtime ----------------------------------------------------------------------------------------


def test_ticker_orderbook_and_trades_use_upbit_field_names() -> None:
    arr = generate_market("KRW-BTC", "1m", T0, T0 + 2 * DAY, seed=1)
    eth = generate_market("KRW-ETH", "1m", T0, T0 + 2 * DAY, seed=1)
    with FakeUpbit({("KRW-BTC", "1m"): arr, ("KRW-ETH", "1m"): eth}) as up:
        tick = get(up, "/v1/ticker", markets="KRW-BTC,KRW-ETH").json()
        ob = get(up, "/v1/orderbook", markets="KRW-BTC", count=15).json()
        trades = get(up, "/v1/trades/ticks", market="KRW-BTC", count=5).json()
        assert get(up, "/v1/ticker", markets="KRW-BTC,KRW-NOPE").status_code == 404
        assert get(up, "/v1/ticker").status_code == 400
    assert [t["market"] for t in tick] == ["KRW-BTC", "KRW-ETH"]
    for key in ("trade_price", "acc_trade_price_24h", "signed_change_rate", "change", "trade_timestamp"):
        assert key in tick[0]
    assert tick[0]["trade_price"] == arr["close"][-1]
    assert tick[0]["opening_price"] == arr["open"][arr["ts"] >= T0 + DAY][0]
    units = ob[0]["orderbook_units"]
    assert len(units) == 15 and set(units[0]) == {"ask_price", "bid_price", "ask_size", "bid_size"}
    assert units[0]["ask_price"] > units[0]["bid_price"] > units[1]["bid_price"]
    assert len(trades) == 5 and trades[0]["timestamp"] >= trades[-1]["timestamp"]
    assert {"sequential_id", "ask_bid", "trade_date_utc", "trade_time_utc"} <= set(trades[0])


def test_given_tickers_orderbooks_and_trades_are_served_as_given() -> None:
    tr = np.zeros(3, dtype=TRADE_DTYPE)
    tr["ts"] = [T0 + 3, T0 + 1, T0 + 2]
    tr["price"] = [100.0, 101.0, 102.0]
    tr["volume"] = 1.0
    tr["side"] = [1, -1, 1]
    tr["sequential_id"] = [30, 10, 20]
    with FakeUpbit(
        tickers={"KRW-XRP": {"market": "KRW-XRP", "trade_price": 700.0}},
        orderbooks={"KRW-XRP": {"market": "KRW-XRP", "orderbook_units": []}},
        trades={"KRW-XRP": tr},
    ) as up:
        assert get(up, "/v1/ticker", markets="KRW-XRP").json() == [{"market": "KRW-XRP", "trade_price": 700.0}]
        assert get(up, "/v1/orderbook", markets="KRW-XRP").json()[0]["orderbook_units"] == []
        got = get(up, "/v1/trades/ticks", market="KRW-XRP", count=10).json()
    assert [t["sequential_id"] for t in got] == [30, 20, 10]
    assert [t["ask_bid"] for t in got] == ["BID", "BID", "ASK"]


# -- faults ----------------------------------------------------------------------------------------


def test_each_fault_kind_misbehaves_as_announced_then_expires() -> None:
    arr = generate_market("KRW-BTC", "1m", T0, T0 + DAY, seed=1)
    with FakeUpbit({("KRW-BTC", "1m"): arr}, rate_limit=None) as up:

        def page() -> httpx.Response:
            return get(up, "/v1/candles/minutes/1", market="KRW-BTC", count=5)

        good = page().json()
        up.inject("status", times=1, status=503)
        assert page().status_code == 503
        up.inject("rate_limit", times=2)
        assert [page().status_code for _ in range(3)] == [429, 429, 200]
        f = up.inject("blocked", times=1, message="blocked for 30 seconds")
        r = page()
        assert r.status_code == 418 and "30 seconds" in r.text and f.hits == 1 and not f.active
        up.inject("malformed_json", times=1)
        with pytest.raises(json.JSONDecodeError):
            json.loads(page().content)
        up.inject("truncated", times=1)
        with pytest.raises(httpx.RemoteProtocolError):
            page()
        up.inject("wrong_market", times=1)
        assert {x["market"] for x in page().json()} == {"KRW-XRP"}
        up.inject("duplicate_rows", times=1)
        dup = page().json()
        assert len(dup) == 7 and dup[0] == dup[1] and dup[-1] == dup[-2]
        up.inject("unordered_rows", times=1)
        shuffled = page().json()
        assert shuffled != good and sorted(shuffled, key=lambda x: x["candle_date_time_utc"], reverse=True) == good
        up.inject("short_page", times=1)
        assert page().json() == good[: len(good) // 2]  # the newest half, as a capped page would be
        up.inject("latency", times=1, seconds=0.2)
        r = page()
        rec = up.requests()[-1]
        assert r.status_code == 200 and rec.faults == ("latency",)
        assert page().json() == good
        up.inject("status", path_prefix="/v1/ticker")
        assert page().status_code == 200
        assert get(up, "/v1/ticker", markets="KRW-BTC").status_code == 500
        up.clear_faults()
        assert up.faults == []
        assert get(up, "/v1/ticker", markets="KRW-BTC").status_code == 200


def test_fault_kinds_are_checked() -> None:
    assert "truncated" in FAULT_KINDS
    with pytest.raises(InvalidRequestError):
        Fault("earthquake")
    with FakeUpbit() as up:
        with pytest.raises(InvalidRequestError):
            up.inject("gremlins")
        url = up.base_url
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(RuntimeError):
        _ = up.base_url
