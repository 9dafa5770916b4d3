"""mds.to_pandas / to_arrow / to_polars: types, time zones, empty and read-only inputs, copies."""

from __future__ import annotations

import builtins
import datetime as dt
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import mds
from mds import CANDLE_DTYPE, InvalidRequestError
from mds.testing import dense_candles
from mds.timeutil import to_ms

FIELDS = ["open", "high", "low", "close", "volume", "value"]
T0 = to_ms("2024-12-31T14:59:00Z")  # 23:59 KST: the next minute is a new day in Seoul only


@pytest.fixture
def candles() -> np.ndarray:
    a = dense_candles(5, T0)
    a.flags.writeable = False  # as every store read returns them
    return a


def test_pandas_utc_index_and_zero_copy_columns(candles: np.ndarray) -> None:
    df = mds.to_pandas(candles)
    assert list(df.columns) == FIELDS and all(str(t) == "float64" for t in df.dtypes)
    assert str(df.index.tz) == "UTC" and df.index.name == "ts"
    assert df.index[0] == pd.Timestamp(T0, unit="ms", tz="UTC")
    for f in FIELDS:
        assert np.array_equal(df[f].to_numpy(), candles[f])
        assert np.shares_memory(df[f].to_numpy(), candles)  # a view, no copy
    assert df.index.as_unit("ms").asi8.tolist() == candles["ts"].tolist()


def test_pandas_seoul_display_and_copy(candles: np.ndarray) -> None:
    kst = mds.to_pandas(candles, tz="Asia/Seoul")
    assert str(kst.index.tz) == "Asia/Seoul"
    assert kst.index[0].hour == 23 and kst.index[1].hour == 0 and kst.index[1].day == 1  # same instants
    assert (kst.index == mds.to_pandas(candles).index).all()
    own = mds.to_pandas(candles, copy=True)
    own.iloc[0, 0] = 1.0  # a copy can change; the candles do not
    assert candles["open"][0] != 1.0 and not np.shares_memory(own["open"].to_numpy(), candles)


def test_arrow_schema_and_values(candles: np.ndarray) -> None:
    t = mds.to_arrow(candles)
    assert t.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert [t.schema.field(f).type for f in FIELDS] == [pa.float64()] * 6
    assert t.column_names == ["ts", *FIELDS]
    assert t.column("ts").cast(pa.int64()).to_pylist() == candles["ts"].tolist()
    for f in FIELDS:
        assert t.column(f).to_numpy().tolist() == candles[f].tolist()


def test_polars_schema_and_values(candles: np.ndarray) -> None:
    df = mds.to_polars(candles)
    assert df.schema["ts"] == pl.Datetime("ms", "UTC")
    assert [df.schema[f] for f in FIELDS] == [pl.Float64] * 6
    assert df["ts"][0] == dt.datetime(2024, 12, 31, 14, 59, tzinfo=dt.timezone.utc)
    assert df["ts"].dt.epoch("ms").to_list() == candles["ts"].tolist()
    for f in FIELDS:
        assert df[f].to_list() == candles[f].tolist()


def test_empty_input_gives_empty_typed_frames() -> None:
    empty = np.zeros(0, CANDLE_DTYPE)
    df = mds.to_pandas(empty)
    assert len(df) == 0 and list(df.columns) == FIELDS and str(df.index.tz) == "UTC"
    t = mds.to_arrow(empty)
    assert t.num_rows == 0 and t.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    p = mds.to_polars(empty)
    assert p.height == 0 and p.schema["ts"] == pl.Datetime("ms", "UTC")


def test_a_strided_slice_converts_too(candles: np.ndarray) -> None:
    every_other = candles[::2]
    assert mds.to_arrow(every_other).column("close").to_pylist() == every_other["close"].tolist()
    assert mds.to_pandas(every_other)["close"].tolist() == every_other["close"].tolist()
    assert mds.to_polars(every_other)["ts"].dt.epoch("ms").to_list() == every_other["ts"].tolist()


@pytest.mark.parametrize("fn", [mds.to_pandas, mds.to_arrow, mds.to_polars])
def test_not_candles_is_refused(fn: Any) -> None:
    with pytest.raises(InvalidRequestError):
        fn(np.zeros(3))


@pytest.mark.parametrize(
    ("fn", "module", "extra"),
    [(mds.to_pandas, "pandas", "pandas"), (mds.to_arrow, "pyarrow", "arrow"), (mds.to_polars, "polars", "polars")],
)
def test_a_missing_library_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, candles: np.ndarray, fn: Any, module: str, extra: str
) -> None:
    real = builtins.__import__
    import importlib

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", lambda name: refuse(name))
    with pytest.raises(ImportError, match=rf"pip install 'upbit-mds\[{extra}\]'"):
        fn(candles)
