"""store.panel(): one grid for several markets, NaN and carried closes, missing slots, listings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mds
from mds import InvalidRequestError
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, dense_candles
from mds.timeutil import to_ms

MIN = 60_000
HOUR = 60 * MIN
T0 = to_ms("2025-01-06T00:00:00Z")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[mds.Store]:
    """KRW-BTC traded every minute of 00:00-02:00, covered in full except 01:30-01:40 (never
    fetched); KRW-NEW listed at 01:00 with a no-trade minute at 01:05."""
    with mds.open(tmp_path / "s", clock=lambda: T0 + 3 * HOUR) as st:
        btc = dense_candles(120, T0, seed=1)
        keep = (btc["ts"] < T0 + 90 * MIN) | (btc["ts"] >= T0 + 100 * MIN)
        st.write_candles("KRW-BTC", "1m", btc[keep], complete=(T0, T0 + 90 * MIN))
        st.write_candles("KRW-BTC", "1m", btc[btc["ts"] >= T0 + 100 * MIN], complete=(T0 + 100 * MIN, T0 + 2 * HOUR))
        new = dense_candles(60, T0 + HOUR, seed=2)
        new = new[new["ts"] != T0 + 65 * MIN]
        # coverage from the start of history: before 01:00 the market did not trade (listing)
        st.write_candles("KRW-NEW", "1m", new, complete=(0, T0 + 2 * HOUR))
        yield st


def test_grid_columns_nan_and_missing(store: mds.Store) -> None:
    ts, v = store.panel(["KRW-BTC", "KRW-NEW"], "1m", start=T0, end=T0 + 2 * HOUR)
    assert ts.dtype == np.int64 and v.dtype == np.float64 and v.shape == (120, 2)
    assert np.array_equal(ts, T0 + np.arange(120) * MIN)
    btc = store.candles("KRW-BTC", "1m", start=T0, end=T0 + 2 * HOUR)
    at = (btc["ts"] - T0) // MIN
    assert np.array_equal(v[at, 0], btc["close"])
    assert np.isnan(v[90:100, 0]).all()  # missing: never fetched
    assert np.isnan(v[:60, 1]).all() and not np.isnan(v[60:, 1][np.arange(60) != 5]).any()
    assert np.isnan(v[65, 1])  # no trades, fill="nan"


def test_ffill_carries_closes_over_no_trade_slots_only(store: mds.Store) -> None:
    _ts, v = store.panel(["KRW-BTC", "KRW-NEW"], "1m", start=T0, end=T0 + 2 * HOUR, fill="ffill")
    assert np.isnan(v[90:100, 0]).all()  # missing stays NaN, whatever the fill
    assert np.isnan(v[:60, 1]).all()  # a market listed mid-range is NaN before its first candle
    assert v[65, 1] == v[64, 1]  # the last close carried over the no-trade minute
    _, vol = store.panel(["KRW-NEW"], "1m", start=T0, end=T0 + 2 * HOUR, field="volume", fill="ffill")
    assert vol[65, 0] == 0.0 and np.isnan(vol[59, 0])
    _, hi = store.panel(["KRW-NEW"], "1m", start=T0, end=T0 + 2 * HOUR, field="high", fill="ffill")
    assert hi[65, 0] == v[64, 1]  # nothing traded: the price stood at the last close


def test_slots_after_the_clock_are_missing(store: mds.Store) -> None:
    ts, v = store.panel(["KRW-NEW"], "1m", start=T0 + HOUR, end=T0 + 4 * HOUR, fill="ffill")
    assert len(ts) == 180
    assert np.isnan(v[60:, 0]).all()  # 02:00 on: not covered; from 03:00 on: not even closed


def test_derived_timeframe_panel(store: mds.Store) -> None:
    ts, v = store.panel(["KRW-BTC", "KRW-NEW"], "2h", start=T0, end=T0 + 4 * HOUR, fill="ffill")
    assert ts.tolist() == [T0, T0 + 2 * HOUR]
    assert np.isnan(v[0, 0])  # 00:00-02:00 holds the missing 01:30-01:40: no 2h candle is proved
    new = store.candles("KRW-NEW", "1m", start=T0, end=T0 + 2 * HOUR)
    assert v[0, 1] == new["close"][-1]  # covered from the start of history: a real 2h candle
    assert np.isnan(v[1]).all()  # 02:00-04:00: never fetched
    _, hi = store.panel(["KRW-NEW"], "2h", start=T0, end=T0 + 2 * HOUR, field="high")
    assert hi[0, 0] == new["high"].max()


def test_matches_the_pandas_route(store: mds.Store) -> None:
    syms = ["KRW-BTC", "KRW-NEW"]
    ts, v = store.panel(syms, "1m", start=T0, end=T0 + 2 * HOUR)
    frames = [mds.to_pandas(store.candles(s, "1m", start=T0, end=T0 + 2 * HOUR))["close"] for s in syms]
    grid = pd.DatetimeIndex(pd.to_datetime(ts, unit="ms", utc=True))
    want = pd.concat(frames, axis=1, keys=syms, sort=False).reindex(grid.as_unit("ms"))
    assert np.array_equal(want.to_numpy(), v, equal_nan=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"field": "vwap"},
        {"fill": "bfill"},
        {"start": None},
        {"end": T0},
    ],
)
def test_bad_arguments(store: mds.Store, kwargs: dict) -> None:
    args = {"start": T0, "end": T0 + HOUR, **kwargs}
    with pytest.raises(InvalidRequestError):
        store.panel(["KRW-BTC"], "1m", **args)


def test_bad_symbols(store: mds.Store) -> None:
    with pytest.raises(InvalidRequestError):
        store.panel("KRW-BTC", "1m", start=T0, end=T0 + HOUR)
    with pytest.raises(InvalidRequestError):
        store.panel(["KRW-BTC", "KRW-BTC"], "1m", start=T0, end=T0 + HOUR)
    with pytest.raises(InvalidRequestError):
        store.panel(["btc"], "1m", start=T0, end=T0 + HOUR)


def test_empty_symbols_and_empty_grid(store: mds.Store) -> None:
    ts, v = store.panel([], "1m", start=T0, end=T0 + HOUR)
    assert v.shape == (60, 0)
    ts, v = store.panel(["KRW-BTC"], "1d", start=T0 + MIN, end=T0 + 2 * MIN)
    assert ts.shape == (0,) and v.shape == (0, 1)


def test_panel_fetches_through_layer1(tmp_path: Path) -> None:
    def clock():
        return T0 + 2 * HOUR + 30_000

    a = dense_candles(120, T0, seed=3)
    listed = dense_candles(30, T0 + 90 * MIN, seed=4)
    with FakeUpbit({("KRW-BTC", "1m"): a, ("KRW-NEW", "1m"): listed}, clock=clock, rate_limit=None) as up:
        router = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
        with mds.open(tmp_path / "s", layer1=router, clock=clock) as st:
            _ts, v = st.panel(["KRW-BTC", "KRW-NEW"], "1m", start=T0, end=T0 + 2 * HOUR, fill="ffill")
            assert np.array_equal(v[:, 0], a["close"])
            assert np.isnan(v[:90, 1]).all() and np.array_equal(v[90:, 1], listed["close"])
