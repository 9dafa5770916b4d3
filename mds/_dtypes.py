"""Record layouts shared by every tier (DESIGN.md section 1)."""

from __future__ import annotations

import numpy as np

CANDLE_DTYPE = np.dtype(
    [
        ("ts", "<i8"),  # candle open time, epoch milliseconds, UTC
        ("open", "<f8"),
        ("high", "<f8"),
        ("low", "<f8"),
        ("close", "<f8"),
        ("volume", "<f8"),  # Upbit candle_acc_trade_volume
        ("value", "<f8"),  # Upbit candle_acc_trade_price (quote volume)
    ]
)

TRADE_DTYPE = np.dtype(
    [
        ("ts", "<i8"),  # trade time, epoch milliseconds, UTC
        ("price", "<f8"),
        ("volume", "<f8"),
        ("side", "<i1"),  # +1 bid (buyer took the ask), -1 ask
        ("sequential_id", "<i8"),
    ]
)

#: The same 56 bytes as one opaque field: numpy copies a structured array field by field,
#: a raw view copies rows as bytes (several times faster).
CANDLE_RAW = np.dtype((np.void, CANDLE_DTYPE.itemsize))

assert CANDLE_DTYPE.itemsize == 56


def empty_candles(n: int = 0) -> np.ndarray:
    """A new zero-filled CANDLE_DTYPE array of ``n`` rows."""
    return np.zeros(n, dtype=CANDLE_DTYPE)


def read_only(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself, made read-only (arrays handed to users never change afterwards)."""
    if arr.flags.writeable:
        arr.flags.writeable = False
    return arr


#: An empty, read-only CANDLE_DTYPE array (an answer with no candles).
EMPTY_CANDLES = read_only(np.zeros(0, dtype=CANDLE_DTYPE))
