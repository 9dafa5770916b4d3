"""Time conversions. Inside mds every time is an int of epoch milliseconds, UTC."""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mds.errors import InvalidRequestError

__all__ = ["Clock", "checked_clock", "iso_utc", "iso_utc_z", "now_ms", "parse_utc_strings", "to_ms"]

Clock = Callable[[], int]

_UTC = _dt.timezone.utc
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
# Years 1900..2200 are plenty for market data and keep arithmetic far from int64 limits.
_MIN_MS = -2_208_988_800_000
_MAX_MS = 7_258_118_400_000


def now_ms() -> int:
    """The wall clock as epoch ms (the default clock)."""
    return time.time_ns() // 1_000_000


def to_ms(value: object, *, name: str = "time") -> int:
    """Convert a time given by a user to epoch ms, UTC.

    Accepts an int (epoch ms), a ``datetime`` (naive means UTC, aware is converted), a
    ``numpy.datetime64`` or an ISO-8601 string (no offset means UTC, as Upbit reads it).

    Raises
    ------
    InvalidRequestError
        For other types, unparsable strings, and times outside the years 1900 to 2199.
    """
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be epoch ms or a datetime, got bool")
    if isinstance(value, (int, np.integer)):
        ms = int(value)
    elif isinstance(value, _dt.datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=_UTC)
        delta = dt - _EPOCH
        ms = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    elif isinstance(value, _dt.date):
        ms = to_ms(_dt.datetime(value.year, value.month, value.day), name=name)
    elif isinstance(value, np.datetime64):
        if np.isnat(value):
            raise InvalidRequestError(f"{name} is NaT")
        ms = int(value.astype("datetime64[ms]").astype(np.int64))
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = _dt.datetime.fromisoformat(text)
        except ValueError:
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise InvalidRequestError(f"{name} {shown!r} is not an ISO-8601 time") from None
        return to_ms(dt, name=name)
    else:
        raise InvalidRequestError(f"{name} must be epoch ms or a datetime, got {type(value).__name__}")
    if not _MIN_MS <= ms < _MAX_MS:
        raise InvalidRequestError(f"{name} {ms} is outside the supported years 1900 to 2199")
    return ms


def iso_utc(ms: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` in UTC, the zone-less form of Upbit's ``candle_date_time_utc``."""
    return str(np.datetime64(int(ms), "ms").astype("datetime64[s]"))


def iso_utc_z(ms: int) -> str:
    """ISO-8601 UTC with a ``Z`` (``2025-01-27T13:30:00Z``): the ``to`` form mds sends."""
    return iso_utc(ms) + "Z"


def parse_utc_strings(values: object) -> np.ndarray:
    """Parse zone-less UTC strings (Upbit's ``candle_date_time_utc``) into int64 epoch ms.

    numpy reads them as UTC (it has no local time), so the 9-hour KST pitfall cannot happen here.

    Raises
    ------
    InvalidRequestError
        When any value is not a date-time string.
    """
    try:
        arr = np.asarray(values, dtype="datetime64[ms]")
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"invalid UTC time string: {exc}") from None
    if arr.size and np.isnat(arr).any():
        raise InvalidRequestError("invalid UTC time string: empty or NaT")
    return arr.astype(np.int64)


#: A store clock must answer epoch ms inside this range (as the SQLite tier's keys require).
_CLOCK_MAX = 1 << 50


def _clock_value(t: Any) -> int:
    """Epoch ms from a clock's answer (an int, or a finite float, floored), or InvalidRequestError:
    never a bool, None, NaN or a string."""
    number = isinstance(t, (int, np.integer)) or (isinstance(t, (float, np.floating)) and math.isfinite(t))
    if not number or isinstance(t, (bool, np.bool_)):
        raise InvalidRequestError(f"the store clock returned {t!r}; it must return epoch milliseconds as an int")
    v = int(t // 1)
    if not 0 <= v < _CLOCK_MAX:
        raise InvalidRequestError(f"the store clock returned {v}, outside 0 .. 2**50 epoch milliseconds")
    return v


def checked_clock(fn: Any) -> Callable[[], int]:
    """Wrap a user's clock so every answer is checked (about 0.05 us on an int); it is asked once
    here, so a wrong clock fails at open instead of in the middle of a write."""
    if not callable(fn):
        raise InvalidRequestError(f"clock must be a callable returning epoch ms, not {type(fn).__name__}")

    def clock() -> int:
        t = fn()
        if t.__class__ is int and 0 <= t < _CLOCK_MAX:
            return t
        return _clock_value(t)

    clock()
    return clock
