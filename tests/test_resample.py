"""mds.resample and derived timeframes: Upbit's own 3m candles, calendar edges, a naive groupby,
and derived reads through the store (storage only, and over FakeUpbit on loopback)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import mds
from mds import CANDLE_DTYPE, InvalidRequestError, parse_timeframe
from mds.convert import candles_from_upbit
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, dense_candles, generate_market
from mds.timeutil import to_ms

DATA = Path(__file__).parent / "data"
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
UTC = dt.timezone.utc


def ms(*args: int) -> int:
    return to_ms(dt.datetime(*args, tzinfo=UTC))


def upbit_page(name: str) -> np.ndarray:
    rows = json.loads((DATA / name).read_text(encoding="utf-8"))
    return np.sort(candles_from_upbit(rows), order="ts")


def naive(candles: np.ndarray, key: object) -> np.ndarray:
    """Resampling written the obvious way: a dict of lists keyed by the target open time."""
    groups: dict[int, list[tuple]] = {}
    for row in candles.tolist():
        groups.setdefault(key(row[0]), []).append(row)  # type: ignore[operator]
    out = [
        (t, g[0][1], max(r[2] for r in g), min(r[3] for r in g), g[-1][4], sum(r[5] for r in g), sum(r[6] for r in g))
        for t, g in sorted(groups.items())
    ]
    return np.array(out, dtype=CANDLE_DTYPE)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal candles; sums compared to the last bits (a sum of sums adds in another order)."""
    return (
        len(a) == len(b)
        and all(np.array_equal(a[f], b[f]) for f in ("ts", "open", "high", "low", "close"))
        and all(np.allclose(a[f], b[f], rtol=1e-12, atol=0) for f in ("volume", "value"))
    )


# --------------------------------------------------------------------------------- Upbit's own
def test_resampled_1m_equals_upbits_3m() -> None:
    one = upbit_page("krw-btc_1m_smtm_20200220_0800.json")
    three = upbit_page("krw-btc_3m_smtm_20200220_0800.json")
    assert len(one) == 200 and len(three) == 60
    assert np.all(np.diff(one["ts"]) == MIN)  # the 1m page is complete: no gap to excuse
    got = mds.resample(one, "1m", "3m")
    # the 1m page runs to 11:19; the 3m page ends with the 10:57 candle: compare where both are
    got = got[got["ts"] <= three["ts"][-1]]
    assert np.array_equal(got["ts"], three["ts"])
    for f in ("open", "high", "low", "close"):
        assert np.array_equal(got[f], three[f]), f
    # sums of Upbit's rounded figures: equal to the last digit Upbit prints
    np.testing.assert_allclose(got["volume"], three["volume"], rtol=0, atol=5e-8)
    np.testing.assert_allclose(got["value"], three["value"], rtol=0, atol=5e-4)


# --------------------------------------------------------------------------------- semantics
def test_ohlcv_of_one_group_and_no_candle_for_an_empty_interval() -> None:
    a = np.zeros(4, CANDLE_DTYPE)
    a["ts"] = [0, MIN, 2 * MIN, 7 * MIN]  # nothing in [3m, 6m): no candle there
    a["open"], a["close"] = [10, 11, 12, 20], [11, 12, 13, 21]
    a["high"], a["low"] = [15, 19, 13, 22], [9, 8, 12, 19]
    a["volume"], a["value"] = [1, 2, 3, 4], [10, 20, 30, 40]
    out = mds.resample(a, "1m", "3m")
    assert out["ts"].tolist() == [0, 6 * MIN]
    assert out[0].tolist() == (0, 10.0, 19.0, 8.0, 13.0, 6.0, 60.0)
    assert out[1].tolist() == (6 * MIN, 20.0, 22.0, 19.0, 21.0, 4.0, 40.0)


def test_empty_and_read_only_inputs() -> None:
    empty = mds.resample(np.zeros(0, CANDLE_DTYPE), "1m", "2h")
    assert empty.dtype == CANDLE_DTYPE and len(empty) == 0
    a = dense_candles(300, ms(2024, 1, 1))
    a.flags.writeable = False
    assert len(mds.resample(a, "1m", "2h")) == 3


def test_weeks_start_on_monday_and_days_at_midnight_utc() -> None:
    a = dense_candles(14, ms(2024, 1, 3), step=DAY)  # Wednesday 3rd to Tuesday 16th
    weeks = mds.resample(a, "1d", "1w")
    starts = [dt.datetime.fromtimestamp(t / 1000, UTC) for t in weeks["ts"].tolist()]
    assert [d.date() for d in starts] == [dt.date(2024, 1, 1), dt.date(2024, 1, 8), dt.date(2024, 1, 15)]
    assert all(d.weekday() == 0 for d in starts)
    h = dense_candles(48, ms(2024, 1, 1), step=HOUR)
    days = mds.resample(h, "1h", "1d")
    assert days["ts"].tolist() == [ms(2024, 1, 1), ms(2024, 1, 2)]  # 00:00 UTC = 09:00 KST


def test_a_month_that_crosses_a_year() -> None:
    a = dense_candles(62, ms(2023, 12, 1), step=DAY)  # December 2023 and January 2024
    months = mds.resample(a, "1d", "1M")
    assert months["ts"].tolist() == [ms(2023, 12, 1), ms(2024, 1, 1)]
    dec = a[a["ts"] < ms(2024, 1, 1)]
    assert months[0]["open"] == dec[0]["open"] and months[0]["close"] == dec[-1]["close"]
    assert months[1]["close"] == a[-1]["close"]
    assert months[0]["volume"] == pytest.approx(dec["volume"].sum())
    # 3 days from 1d, aligned to the epoch like every fixed derived interval
    three = mds.resample(a, "1d", "3d")
    assert all(t % (3 * DAY) == 0 for t in three["ts"].tolist())


@pytest.mark.parametrize(
    ("source", "target"),
    [("3m", "5m"), ("1w", "1M"), ("1h", "1m"), ("1w", "3d"), ("4h", "6h")],
)
def test_target_not_a_whole_multiple_is_refused(source: str, target: str) -> None:
    with pytest.raises(InvalidRequestError, match="whole multiple"):
        mds.resample(dense_candles(10, 0, step=parse_timeframe(source, derived=True).interval_ms), source, target)


def test_bad_inputs_are_refused() -> None:
    a = dense_candles(5, 0)
    with pytest.raises(InvalidRequestError, match="ascending"):
        mds.resample(a[::-1].copy(), "1m", "3m")
    b = a.copy()
    b["ts"][2] += 1
    with pytest.raises(InvalidRequestError, match="aligned"):
        mds.resample(b, "1m", "3m")
    with pytest.raises(InvalidRequestError, match="CANDLE_DTYPE"):
        mds.resample(np.zeros(3), "1m", "3m")


# --------------------------------------------------------------------------------- timeframes
@pytest.mark.parametrize(("text", "name"), [("2h", "2h"), ("6h", "6h"), ("12h", "12h"), ("3d", "3d"), ("120m", "2h")])
def test_derived_timeframes_parse_only_where_asked(text: str, name: str) -> None:
    tf = parse_timeframe(text, derived=True)
    assert tf.derived and tf.name == name and tf.rest_path == ""
    assert parse_timeframe(tf, derived=True) is tf
    with pytest.raises(InvalidRequestError, match="derived"):
        parse_timeframe(text)
    with pytest.raises(InvalidRequestError, match="derived"):
        parse_timeframe(tf)  # a Timeframe object cannot smuggle a derived one into a write


@pytest.mark.parametrize("bad", ["5h", "7h", "9d", "2w", "2M", "0m", "2H", "2m", "20m", "30s", "１h"])
def test_derived_timeframes_must_nest_into_days(bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_timeframe(bad, derived=True)


def test_native_spellings_stay_native() -> None:
    assert parse_timeframe("60m", derived=True) is parse_timeframe("1h")
    assert parse_timeframe("1440m", derived=True) is parse_timeframe("1d")
    assert [t.name for t in parse_timeframe("12h", derived=True).sources()][-2:] == ["1h", "4h"]


# --------------------------------------------------------------------------------- property
TARGETS = ["3m", "5m", "2h", "6h", "1d", "3d", "1w", "1M"]


@settings(max_examples=60, deadline=None)
@given(
    start_day=st.integers(0, 20_000),
    n=st.integers(0, 400),
    keep=st.floats(0.05, 1.0),
    target=st.sampled_from(TARGETS),
    seed=st.integers(0, 2**16),
)
def test_resample_matches_a_naive_groupby(start_day: int, n: int, keep: float, target: str, seed: int) -> None:
    tgt = parse_timeframe(target, derived=True)
    step = MIN if tgt.interval_ms < 3 * DAY and not tgt.is_month else HOUR
    src = "1m" if step == MIN else "1h"
    a = dense_candles(n, start_day * DAY, step=step, seed=seed)
    a = a[np.random.default_rng(seed).random(n) < keep]  # no-trade intervals
    got = mds.resample(a, src, target)
    want = naive(a, tgt.floor)
    assert np.array_equal(got["ts"], want["ts"])
    for f in ("open", "high", "low", "close"):
        assert np.array_equal(got[f], want[f])
    np.testing.assert_allclose(got["volume"], want["volume"], rtol=1e-12)
    np.testing.assert_allclose(got["value"], want["value"], rtol=1e-12)


# --------------------------------------------------------------------------------- the store
T0 = ms(2025, 1, 6)


def test_derived_read_from_a_stored_series(tmp_path: Path) -> None:
    a = generate_market("KRW-BTC", "1m", T0, T0 + DAY, liquidity="illiquid", seed=3)

    def clock():
        return T0 + DAY + 5 * MIN

    with mds.open(tmp_path / "s", clock=clock) as store:
        store.write_candles("KRW-BTC", "1m", a, complete=(T0, T0 + DAY))
        got = store.candles("KRW-BTC", "2h", start=T0, end=T0 + DAY)
        assert not got.flags.writeable
        assert np.array_equal(got, mds.resample(a, "1m", "2h"))
        assert len(got) == 12
        latest = store.candles("KRW-BTC", "6h", count=2)
        assert latest["ts"].tolist() == [T0 + 12 * HOUR, T0 + 18 * HOUR]
        # the coarser stored series is used when it alone covers the range
        h = mds.resample(a, "1m", "1h")
        store.write_candles("KRW-BTC", "1h", h, complete=(T0, T0 + DAY))
        store.delete("KRW-BTC", "1m")
        assert same(store.candles("KRW-BTC", "12h", start=T0, end=T0 + DAY), mds.resample(a, "1m", "12h"))
        with pytest.raises(InvalidRequestError, match="derived"):
            store.write_candles("KRW-BTC", "2h", got)
        with pytest.raises(InvalidRequestError, match="derived"):
            store.gaps("KRW-BTC", "2h")


def test_a_derived_candle_with_a_missing_source_slot_is_not_served(tmp_path: Path) -> None:
    a = dense_candles(6 * 60, T0)  # 00:00 to 06:00, every minute traded

    def clock():
        return T0 + DAY

    with mds.open(tmp_path / "s", clock=clock) as store:
        # covered: 00:00-02:00 (complete) and 04:00-06:00; 02:00-04:00 stored but one minute
        # of it absent and never fetched (missing): that 2h candle cannot be proved
        hole = T0 + 3 * HOUR
        store.write_candles("KRW-BTC", "1m", a[a["ts"] != hole], complete=(T0, T0 + 2 * HOUR))
        store.write_candles("KRW-BTC", "1m", a[a["ts"] >= T0 + 4 * HOUR], complete=(T0 + 4 * HOUR, T0 + 6 * HOUR))
        got = store.candles("KRW-BTC", "2h", start=T0, end=T0 + 6 * HOUR)
        assert got["ts"].tolist() == [T0, T0 + 4 * HOUR]
        assert np.array_equal(got, mds.resample(a, "1m", "2h")[[0, 2]])


@pytest.fixture
def fake_market() -> Iterator[tuple[FakeUpbit, object, np.ndarray]]:
    a = generate_market("KRW-BTC", "1m", T0, T0 + 2 * DAY, liquidity="illiquid", seed=5)

    def clock():
        return T0 + 2 * DAY + 30_000

    with FakeUpbit({("KRW-BTC", "1m"): a, ("KRW-BTC", "1h"): mds.resample(a, "1m", "1h")}, clock=clock) as up:
        yield up, clock, a


def test_derived_read_fetches_a_native_series_first(tmp_path: Path, fake_market: tuple) -> None:
    up, clock, a = fake_market
    router = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
    with mds.open(tmp_path / "s", layer1=router, clock=clock) as store:
        got = store.candles("KRW-BTC", "6h", start=T0, end=T0 + 2 * DAY)
        assert same(got, mds.resample(a, "1m", "6h"))
        # fetched the cheapest source (1h: 48 candles, not 2,880 1m ones) and stored it
        assert store.coverage("KRW-BTC", "1h") and not store.coverage("KRW-BTC", "1m")
        calls = store.stats()["layer1"]["calls"]
        again = store.candles("KRW-BTC", "6h", start=T0, end=T0 + 2 * DAY)
        assert np.array_equal(again, got) and store.stats()["layer1"]["calls"] == calls  # from storage
        latest = store.candles("KRW-BTC", "2h", count=3)
        assert same(latest, mds.resample(a, "1m", "2h")[-3:])
