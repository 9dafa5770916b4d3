import datetime as dt

import pytest

import mds
from mds import (
    CANDLE_DTYPE,
    TRADE_DTYPE,
    Config,
    DataType,
    InvalidCandleError,
    InvalidRequestError,
    Layer1Error,
    MdsError,
    StorageRequest,
    StorageUnavailableError,
    validate_symbol,
)
from mds.timeutil import to_ms


def test_candle_dtype_is_the_contract() -> None:
    assert CANDLE_DTYPE.names == ("ts", "open", "high", "low", "close", "volume", "value")
    assert CANDLE_DTYPE.itemsize == 56
    assert [CANDLE_DTYPE.fields[n][1] for n in CANDLE_DTYPE.names] == [0, 8, 16, 24, 32, 40, 48]
    assert TRADE_DTYPE.names == ("ts", "price", "volume", "side", "sequential_id")


@pytest.mark.parametrize("sym", ["KRW-BTC", "BTC-ETH", "USDT-XRP", "KRW-1INCH", "KRW-A"])
def test_valid_symbols(sym: str) -> None:
    assert validate_symbol(sym) == sym


@pytest.mark.parametrize(
    "sym",
    [
        "krw-btc",
        "KRW_BTC",
        "KRWBTC",
        "KRW-BTC ",
        " KRW-BTC",
        "KRW-BTC\n",
        "KRW-BTC'; DROP TABLE x;--",
        "../../etc",
        "KRW-비트",
        "",
        "K-BTC",
        "KRW-" + "A" * 50,
        "KRW--BTC",
        None,
        5,
        b"KRW-BTC",
    ],
)
def test_invalid_symbols(sym: object) -> None:
    with pytest.raises(InvalidRequestError):
        validate_symbol(sym)


def test_error_hierarchy_inherits_the_expected_builtins() -> None:
    for cls in (InvalidRequestError, InvalidCandleError, StorageUnavailableError, Layer1Error):
        assert issubclass(cls, MdsError)
    assert issubclass(InvalidRequestError, ValueError) and issubclass(InvalidCandleError, ValueError)
    assert issubclass(StorageUnavailableError, OSError) and issubclass(Layer1Error, ConnectionError)


def test_request_is_validated_and_normalised() -> None:
    r = StorageRequest(
        DataType.CANDLE,
        ["KRW-BTC"],
        timeframe="minute60",
        start_time=dt.datetime(2025, 1, 1),
        end_time="2025-01-02T00:00:00Z",
        count=5,
    )
    assert r.timeframe == "1h" and r.symbols == ("KRW-BTC",)
    assert r.start_time == to_ms("2025-01-01T00:00:00Z")  # naive datetime is UTC
    assert r.end_time == r.start_time + 86_400_000
    assert StorageRequest("ticker", "KRW-BTC").data_type is DataType.TICKER


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data_type": "candles", "symbols": ["KRW-BTC"], "timeframe": "1m"},
        {"data_type": DataType.CANDLE, "symbols": ["KRW-BTC"]},
        {"data_type": DataType.CANDLE, "symbols": [], "timeframe": "1m"},
        {"data_type": DataType.CANDLE, "symbols": ["krw-btc"], "timeframe": "1m"},
        {"data_type": DataType.CANDLE, "symbols": ["KRW-BTC"], "timeframe": "2m"},
        {"data_type": DataType.CANDLE, "symbols": ["KRW-BTC"], "timeframe": "1m", "start_time": 10, "end_time": 5},
        {"data_type": DataType.CANDLE, "symbols": ["KRW-BTC"], "timeframe": "1m", "count": 0},
        {"data_type": DataType.CANDLE, "symbols": ["KRW-BTC"], "timeframe": "1m", "count": True},
        {"data_type": DataType.CANDLE, "symbols": ["KRW-BTC"], "timeframe": "1m", "start_time": "soon"},
        {"data_type": DataType.TICKER, "symbols": None},
    ],
)
def test_bad_requests_raise_at_construction(kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError):
        StorageRequest(**kwargs)


def test_aware_datetimes_convert_to_utc() -> None:
    kst = dt.timezone(dt.timedelta(hours=9))
    assert to_ms(dt.datetime(2025, 1, 1, 9, tzinfo=kst)) == to_ms(dt.datetime(2025, 1, 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lookup": "fast"},
        {"tiers": ()},
        {"tiers": ("memory", "redis")},
        {"memory_candles": 0},
        {"vacuum_threshold": 1.5},
        {"disk_ttl_s": -1},
        {"memory_bytes": True},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError):
        Config(**kwargs)


def test_config_orders_tiers() -> None:
    assert Config(tiers=("sqlite", "memory")).tiers == ("memory", "sqlite")


def test_public_api_is_exactly_this_list() -> None:
    assert sorted(mds.__all__) == mds.__all__
    assert mds.__all__ == [
        "CANDLE_DTYPE",
        "CheckReport",
        "Config",
        "DataType",
        "Gap",
        "InvalidCandleError",
        "InvalidRequestError",
        "Layer1Error",
        "MaintenanceReport",
        "MdsError",
        "SeriesInfo",  # issue 19
        "SmartRouterConnector",
        "StorageMetadata",
        "StorageRequest",
        "StorageResponse",
        "StorageUnavailableError",
        "Store",
        "TRADE_DTYPE",
        "Timeframe",
        "WriteResult",
        "__version__",
        "candles_from_upbit",
        "candles_to_upbit",
        "open",
        "parse_timeframe",
        "resample",  # issue 19: research and backtests
        "to_arrow",
        "to_pandas",
        "to_polars",
        "validate_symbol",
    ]
    for name in mds.__all__:
        assert hasattr(mds, name)
