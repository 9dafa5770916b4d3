"""Candles as pandas, Arrow and Polars frames (DESIGN.md section 9).

A candle is one 56-byte record of seven 8-byte fields, so a column is a strided view of the
records. pandas can hold the six price and volume fields as one 2-D view of the records (no copy
at all); Arrow and Polars columns are contiguous buffers, so each field is copied once, all seven
in a single transposing pass over the records, and the libraries take the copies without
another. Each library is optional (extras ``pandas``, ``arrow``, ``polars``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds.errors import InvalidRequestError

__all__ = ["FIELDS", "to_arrow", "to_pandas", "to_polars"]

#: The value columns of every frame, in record order (``ts`` is the index or first column).
FIELDS = ("open", "high", "low", "close", "volume", "value")


def _library(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed: install the extra with pip install 'upbit-mds[{extra}]'"
        ) from exc


def _checked(candles: Any) -> np.ndarray:
    if not isinstance(candles, np.ndarray) or candles.dtype != CANDLE_DTYPE or candles.ndim != 1:
        raise InvalidRequestError("candles must be a one-dimensional mds.CANDLE_DTYPE array")
    return candles


def _columns(candles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ts int64[n], values float64[6, n])``: every field copied once into a contiguous row,
    in one transposing pass (seven strided field copies read the records seven times)."""
    n = len(candles)
    if n and candles.strides[0] == CANDLE_DTYPE.itemsize:
        words = np.ndarray((n, 7), dtype="<i8", buffer=candles, offset=0, strides=(CANDLE_DTYPE.itemsize, 8))
        block = np.ascontiguousarray(words.T)  # (7, n): row 0 is ts, rows 1-6 the float fields' bits
        return block[0], block[1:].view("<f8")
    values = np.empty((len(FIELDS), n), dtype="<f8")
    for i, name in enumerate(FIELDS):
        values[i] = candles[name]
    return np.ascontiguousarray(candles["ts"]), values


def to_pandas(candles: np.ndarray, tz: str = "UTC", *, copy: bool = False) -> Any:
    """Candles as a ``pandas.DataFrame`` indexed by their tz-aware open time.

    Parameters
    ----------
    candles
        CANDLE_DTYPE array (read-only is fine).
    tz
        Time zone of the index: ``"UTC"`` (default) or any IANA name, e.g. ``"Asia/Seoul"`` to
        show Korean time (the instants are the same; only the display changes).
    copy
        False (default): the six columns ``open high low close volume value`` view the candles'
        memory (float64, no copy); a frame over a read-only array (every array the store returns)
        is then read-only: ``df.copy()`` or ``copy=True`` gives one that can be changed in place.

    Returns
    -------
    pandas.DataFrame
        Index ``ts`` (``datetime64[ms, tz]``), float64 columns in record order.

    Raises
    ------
    ImportError
        pandas is not installed (extra ``pandas``).
    InvalidRequestError
        ``candles`` is not a CANDLE_DTYPE array.
    """
    pd = _library("pandas", "pandas")
    arr = _checked(candles)
    if len(arr) and arr.strides[0] == CANDLE_DTYPE.itemsize:
        # the six float fields sit side by side in each record: one (n, 6) view of them all
        values = np.ndarray((len(arr), len(FIELDS)), dtype="<f8", buffer=arr, offset=8, strides=(arr.strides[0], 8))
    else:
        values = np.column_stack([arr[name] for name in FIELDS]) if len(arr) else np.zeros((0, len(FIELDS)))
    if copy:
        values = values.copy()
    index = pd.DatetimeIndex(arr["ts"].astype("datetime64[ms]"), name="ts").tz_localize("UTC")
    if tz != "UTC":
        index = index.tz_convert(tz)
    return pd.DataFrame(values, index=index, columns=list(FIELDS), copy=False)


def to_arrow(candles: np.ndarray) -> Any:
    """Candles as a ``pyarrow.Table``: ``ts`` as ``timestamp[ms, tz=UTC]`` and six float64
    columns, each field copied once (the table owns the copies).

    Raises
    ------
    ImportError
        pyarrow is not installed (extra ``arrow``).
    InvalidRequestError
        ``candles`` is not a CANDLE_DTYPE array.
    """
    pa = _library("pyarrow", "arrow")
    ts, values = _columns(_checked(candles))
    arrays = [pa.array(ts, type=pa.timestamp("ms", tz="UTC"))]
    arrays += [pa.array(values[i], type=pa.float64()) for i in range(len(FIELDS))]
    return pa.Table.from_arrays(arrays, names=["ts", *FIELDS])


def to_polars(candles: np.ndarray) -> Any:
    """Candles as a ``polars.DataFrame``: ``ts`` as ``Datetime("ms", "UTC")`` and six Float64
    columns, each field copied once (polars takes the copies without another; no pyarrow needed).

    Raises
    ------
    ImportError
        polars is not installed (extra ``polars``).
    InvalidRequestError
        ``candles`` is not a CANDLE_DTYPE array.
    """
    pl = _library("polars", "polars")
    ts, values = _columns(_checked(candles))
    columns = [pl.Series("ts", ts, dtype=pl.Int64).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")]
    columns += [pl.Series(name, values[i], dtype=pl.Float64) for i, name in enumerate(FIELDS)]
    return pl.DataFrame(columns)
