"""Conversion between Upbit candle dicts and CANDLE_DTYPE arrays.

Upbit's REST candles carry ``candle_date_time_utc`` without a zone suffix; it is read as UTC here,
never as local time (the 9-hour KST pitfall of ../shared/UPBIT_API.md). Numbers arrive as JSON
floats (``37270000.00000000``) or, from some clients, as strings; both are accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from operator import itemgetter
from typing import Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds.errors import InvalidCandleError
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import parse_utc_strings

__all__ = ["UPBIT_CANDLE_FIELDS", "candles_from_upbit", "candles_to_upbit"]

#: Upbit field -> CANDLE_DTYPE field, in CANDLE_DTYPE order after ``ts``.
UPBIT_CANDLE_FIELDS: dict[str, str] = {
    "opening_price": "open",
    "high_price": "high",
    "low_price": "low",
    "trade_price": "close",
    "candle_acc_trade_volume": "volume",
    "candle_acc_trade_price": "value",
}
_GET = itemgetter("candle_date_time_utc", *UPBIT_CANDLE_FIELDS)
_KST_MS = 9 * 3_600_000


def candles_from_upbit(rows: Iterable[Mapping[str, Any]], *, market: str | None = None) -> np.ndarray:
    """Convert Upbit REST (or WebSocket DEFAULT) candle dicts to a CANDLE_DTYPE array.

    Rows keep their order (Upbit sends newest first); sorting and dedup happen on write.

    Parameters
    ----------
    rows
        Dicts with ``candle_date_time_utc`` and the six price/volume fields; extra fields are ignored.
    market
        When given, every row that carries a ``market`` field must name it.

    Raises
    ------
    InvalidCandleError
        A row is not a mapping, lacks a field, names another market, or holds a non-number.
    """
    rows = rows if isinstance(rows, list) else list(rows)
    try:
        tuples = [_GET(r) for r in rows]
    except KeyError as exc:
        raise InvalidCandleError(f"candle dict lacks the field {exc.args[0]!r}") from None
    except TypeError:
        raise InvalidCandleError("candles must be a list of Upbit candle dicts") from None
    if market is not None:
        bad = [i for i, r in enumerate(rows) if r.get("market", market) != market]
        if bad:
            raise InvalidCandleError(
                f"{len(bad)} candle(s) belong to another market than {market}", rows=bad, reasons=["market"] * len(bad)
            )
    out = np.empty(len(tuples), dtype=CANDLE_DTYPE)
    if not tuples:
        return out
    cols = list(zip(*tuples))
    try:
        out["ts"] = parse_utc_strings(list(cols[0]))
    except Exception as exc:  # numpy raises several types for bad strings
        raise InvalidCandleError(f"bad candle_date_time_utc: {exc}") from None
    for col, name in zip(cols[1:], UPBIT_CANDLE_FIELDS.values()):
        if any(v is None or isinstance(v, bool) for v in col):
            raise InvalidCandleError(f"candle field {name!r} holds null or a boolean, not a number")
        try:
            out[name] = np.asarray(col, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond a double
            raise InvalidCandleError(f"candle field {name!r} holds a value that is not a number") from None
    return out


def candles_to_upbit(candles: np.ndarray, symbol: str, timeframe: str | Timeframe) -> list[dict[str, Any]]:
    """Convert a CANDLE_DTYPE array to Upbit REST candle dicts (same order as the array).

    ``timestamp`` is set to the candle's open time: mds does not keep Upbit's last-tick time.
    """
    tf = parse_timeframe(timeframe)
    n = len(candles)
    if n == 0:
        return []
    ts = np.ascontiguousarray(candles["ts"])
    utc = np.datetime_as_string(ts.astype("datetime64[ms]").astype("datetime64[s]")).tolist()
    kst = np.datetime_as_string((ts + _KST_MS).astype("datetime64[ms]").astype("datetime64[s]")).tolist()
    cols = [candles[f].tolist() for f in ("open", "high", "low", "close", "value", "volume")]
    tss = ts.tolist()
    keys = (
        "market",
        "candle_date_time_utc",
        "candle_date_time_kst",
        "opening_price",
        "high_price",
        "low_price",
        "trade_price",
        "timestamp",
        "candle_acc_trade_price",
        "candle_acc_trade_volume",
    )
    rows = [
        dict(zip(keys, (symbol, u, k, o, h, lo, c, t, val, vol)))
        for u, k, o, h, lo, c, t, val, vol in zip(utc, kst, *cols[:4], tss, *cols[4:])
    ]
    if tf.minutes_unit is not None:
        for r in rows:
            r["unit"] = tf.minutes_unit
    return rows
