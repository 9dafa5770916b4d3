import json
from pathlib import Path

import numpy as np
import pytest

from mds import CANDLE_DTYPE, InvalidCandleError, candles_from_upbit, candles_to_upbit
from mds.timeutil import to_ms

DATA = Path(__file__).parent / "data"


def load(name: str) -> list[dict]:
    return json.loads((DATA / name).read_text())


def test_raw_page_parses_as_utc_newest_first() -> None:
    rows = load("krw-btc_1m_smtm_raw200.json")
    arr = candles_from_upbit(rows, market="KRW-BTC")
    assert arr.dtype == CANDLE_DTYPE and len(arr) == 200
    # candle_date_time_utc has no zone suffix: it must be read as UTC, not local time
    assert arr["ts"][0] == to_ms(rows[0]["candle_date_time_utc"] + "Z")
    assert arr["ts"][-1] == to_ms("2021-01-30T10:28:00Z")
    assert (np.diff(arr["ts"]) == -60_000).all()  # newest first, no gaps
    assert arr["close"][0] == float(rows[0]["trade_price"])
    assert arr["value"][0] == float(rows[0]["candle_acc_trade_price"])


@pytest.mark.parametrize(("name", "tf"), [("krw-btc_1m_smtm_raw200.json", "1m"), ("krw-btc_3m_smtm_200.json", "3m")])
def test_round_trip_through_upbit_dicts(name: str, tf: str) -> None:
    rows = load(name)
    arr = candles_from_upbit(rows)
    back = candles_to_upbit(arr, "KRW-BTC", tf)
    for orig, mine in zip(rows, back):
        for key in (
            "market",
            "candle_date_time_utc",
            "candle_date_time_kst",
            "opening_price",
            "high_price",
            "low_price",
            "trade_price",
            "candle_acc_trade_price",
            "candle_acc_trade_volume",
            "unit",
        ):
            assert mine[key] == orig[key] or float(mine[key]) == float(orig[key]), key
    assert np.array_equal(candles_from_upbit(back), arr)


def test_numbers_as_strings_are_accepted() -> None:
    row = dict(load("krw-btc_1m_smtm_raw200.json")[0])
    row["trade_price"] = "37270000.00000000"
    assert candles_from_upbit([row])["close"][0] == 37270000.0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.pop("trade_price"),
        lambda r: r.pop("candle_date_time_utc"),
        lambda r: r.update(trade_price="abc"),
        lambda r: r.update(trade_price=None),
        lambda r: r.update(trade_price=True),
        lambda r: r.update(candle_date_time_utc="yesterday"),
        lambda r: r.update(market="KRW-ETH"),
    ],
)
def test_malformed_rows_raise_invalid_candle(mutate) -> None:
    rows = [dict(r) for r in load("krw-btc_1m_smtm_raw200.json")[:3]]
    mutate(rows[1])
    with pytest.raises(InvalidCandleError):
        candles_from_upbit(rows, market="KRW-BTC")


def test_not_dicts_raise_invalid_candle() -> None:
    with pytest.raises(InvalidCandleError):
        candles_from_upbit([1, 2, 3])  # type: ignore[list-item]


def test_empty_input() -> None:
    assert len(candles_from_upbit([])) == 0
    assert candles_to_upbit(np.zeros(0, CANDLE_DTYPE), "KRW-BTC", "1m") == []
