"""Upbit timeframes: parsing, aliases, alignment and calendar arithmetic.

Every timeframe has one canonical name (``1s``, ``1m`` ... ``30m``, ``1h``, ``4h``, ``1d``,
``1w``, ``1M``). Fixed intervals are aligned to the epoch, weeks to Monday 00:00 UTC and months
to the 1st 00:00 UTC (calendar months differ in length, so they are never a fixed interval).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from mds.errors import InvalidRequestError

__all__ = ["TIMEFRAMES", "Timeframe", "parse_timeframe"]

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
#: 1970-01-01 was a Thursday; the first Monday 00:00 UTC is four days later.
WEEK_ORIGIN_MS = 4 * DAY_MS


@dataclass(frozen=True, slots=True)
class Timeframe:
    """One Upbit candle timeframe.

    Attributes
    ----------
    name : str
        Canonical name (``"1m"``, ``"1h"``, ``"1M"`` ...).
    interval_ms : int
        Interval length in ms; for months the shortest month (28 days), only a lower bound.
    origin_ms : int
        Grid origin: aligned timestamps satisfy ``(ts - origin_ms) % interval_ms == 0``.
    is_month : bool
        Calendar months (aligned to the 1st, 00:00 UTC).
    rest_path : str
        Upbit REST path under ``/v1/candles/`` (``minutes/1``, ``days``, ``weeks``, ``months``, ``seconds``).
    minutes_unit : int or None
        The ``unit`` of a minute candle, else None.
    """

    name: str
    interval_ms: int
    origin_ms: int
    is_month: bool
    rest_path: str
    minutes_unit: int | None

    @property
    def kernel_args(self) -> tuple[int, int, bool]:
        """``(interval_ms, origin_ms, is_month)`` as the kernels take them."""
        return (self.interval_ms, self.origin_ms, self.is_month)

    # -- scalar calendar arithmetic -------------------------------------------------
    def floor(self, ts: int) -> int:
        """Open time of the interval that contains ``ts`` (epoch ms)."""
        ts = int(ts)
        if self.is_month:
            month = np.datetime64(ts, "ms").astype("datetime64[M]")
            return int(month.astype("datetime64[ms]").astype(np.int64))
        return ts - (ts - self.origin_ms) % self.interval_ms

    def ceil(self, ts: int) -> int:
        """The first aligned time ``>= ts``."""
        f = self.floor(ts)
        return f if f == int(ts) else self.add(f, 1)

    def add(self, ts: int, n: int) -> int:
        """``ts`` (aligned) moved by ``n`` intervals (negative moves back)."""
        if self.is_month:
            month = np.datetime64(int(ts), "ms").astype("datetime64[M]") + np.timedelta64(int(n), "M")
            return int(month.astype("datetime64[ms]").astype(np.int64))
        return int(ts) + int(n) * self.interval_ms

    def next(self, ts: int) -> int:
        """Open time of the interval after the one containing ``ts``."""
        return self.add(self.floor(ts), 1)

    def is_aligned(self, ts: int) -> bool:
        """Whether ``ts`` is the open time of an interval."""
        return self.floor(ts) == int(ts)

    def aligned(self, ts: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`is_aligned` over an int64 array."""
        ts = np.asarray(ts, dtype=np.int64)
        if self.is_month:
            months = ts.astype("datetime64[ms]").astype("datetime64[M]")
            return np.asarray(months.astype("datetime64[ms]").astype(np.int64) == ts)
        return np.asarray((ts - self.origin_ms) % self.interval_ms == 0)

    def count(self, start: int, end: int) -> int:
        """Number of aligned slots ``t`` with ``start <= t < end``."""
        start, end = self.ceil(start), int(end)
        if end <= start:
            return 0
        if self.is_month:
            a = np.datetime64(start, "ms").astype("datetime64[M]")
            b = np.datetime64(self.ceil(end), "ms").astype("datetime64[M]")
            return int((b - a).astype(np.int64))
        return (end - start + self.interval_ms - 1) // self.interval_ms

    def __str__(self) -> str:
        return self.name


def _minutes(n: int) -> Timeframe:
    name = {60: "1h", 240: "4h"}.get(n, f"{n}m")
    return Timeframe(name, n * MINUTE_MS, 0, False, f"minutes/{n}", n)


TIMEFRAMES: dict[str, Timeframe] = {
    tf.name: tf
    for tf in [
        Timeframe("1s", SECOND_MS, 0, False, "seconds", None),
        *(_minutes(n) for n in (1, 3, 5, 10, 15, 30, 60, 240)),
        Timeframe("1d", DAY_MS, 0, False, "days", None),
        Timeframe("1w", WEEK_MS, WEEK_ORIGIN_MS, False, "weeks", None),
        Timeframe("1M", 28 * DAY_MS, 0, True, "months", None),
    ]
}

_ALIASES: dict[str, str] = {
    "60m": "1h",
    "240m": "4h",
    "1440m": "1d",
    "24h": "1d",
    "7d": "1w",
    "second": "1s",
    "seconds": "1s",
    "sec": "1s",
    "day": "1d",
    "days": "1d",
    "week": "1w",
    "weeks": "1w",
    "month": "1M",
    "months": "1M",
    "1mo": "1M",
}
_MINUTE_ALIAS = re.compile(r"^(?:minutes?|min)(\d{1,3})$")


def parse_timeframe(value: str | Timeframe) -> Timeframe:
    """Parse a timeframe name or alias into its canonical :class:`Timeframe`.

    Accepts canonical names, ``60m``/``240m``, pyupbit's ``minute1`` ... ``minute240``, ``day``,
    ``week``, ``month`` (and plurals), and ``1mo``. Case matters only between ``1m`` (minute) and
    ``1M`` (month); word aliases are case-insensitive.

    Raises
    ------
    InvalidRequestError
        For anything that is not an Upbit timeframe.
    """
    if value.__class__ is str:
        tf = TIMEFRAMES.get(value)  # a canonical name: every hot path's case
        if tf is not None:
            return tf
    elif isinstance(value, Timeframe):
        return value
    if not isinstance(value, str):
        raise InvalidRequestError(f"timeframe must be a string, got {type(value).__name__}")
    text = value.strip()
    if text in TIMEFRAMES:
        return TIMEFRAMES[text]
    lower = text.lower()
    if lower in _ALIASES:
        return TIMEFRAMES[_ALIASES[lower]]
    if text in _ALIASES:
        return TIMEFRAMES[_ALIASES[text]]
    m = _MINUTE_ALIAS.match(lower)
    if m:
        name = f"{int(m.group(1))}m"
        name = _ALIASES.get(name, name)
        if name in TIMEFRAMES:
            return TIMEFRAMES[name]
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise InvalidRequestError(
        f"unknown timeframe {shown!r}; use one of {', '.join(TIMEFRAMES)} (or an alias such as 60m, minute1, day)"
    )
