"""Upbit timeframes: parsing, aliases, alignment and calendar arithmetic.

Every timeframe has one canonical name (``1s``, ``1m`` ... ``30m``, ``1h``, ``4h``, ``1d``,
``1w``, ``1M``). Fixed intervals are aligned to the epoch, weeks to Monday 00:00 UTC and months
to the 1st 00:00 UTC (calendar months differ in length, so they are never a fixed interval).

*Derived* timeframes (``2h``, ``3h``, ``6h``, ``8h``, ``12h``, ``2d`` ... ``6d``) are whole multiples of a
native one that Upbit does not serve: they are built by resampling (:mod:`mds.resampling`), never
fetched or stored, so :func:`parse_timeframe` accepts them only where a caller asks for them
(``derived=True``: reads, resampling, panels).
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
    derived : bool
        Not an Upbit timeframe: built from a native one by resampling (no REST path, never
        stored). Derived timeframes are fixed intervals aligned to the epoch: whole hours that
        divide a day, or 2 to 6 days.
    """

    name: str
    interval_ms: int
    origin_ms: int
    is_month: bool
    rest_path: str
    minutes_unit: int | None
    derived: bool = False

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

    def floor_many(self, ts: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`floor` over an int64 array (a new int64 array)."""
        ts = np.asarray(ts, dtype=np.int64)
        if self.is_month:
            months = ts.astype("datetime64[ms]").astype("datetime64[M]")
            return np.asarray(months.astype("datetime64[ms]").astype(np.int64))
        return ts - (ts - self.origin_ms) % self.interval_ms

    def grid(self, start: int, end: int) -> np.ndarray:
        """Every aligned slot ``t`` with ``start <= t < end`` as int64."""
        lo, hi = self.ceil(start), int(end)
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        if self.is_month:
            a = np.datetime64(lo, "ms").astype("datetime64[M]")
            months = a + np.arange(self.count(lo, hi))
            return np.asarray(months.astype("datetime64[ms]").astype(np.int64))
        return np.arange(lo, hi, self.interval_ms, dtype=np.int64)

    def divides(self, target: Timeframe) -> bool:
        """Whether every ``target`` interval is a whole number of ``self`` intervals (the
        boundaries of ``target`` are boundaries of ``self``): ``target`` can be resampled from
        ``self``."""
        if target.is_month:
            # months start at 00:00 UTC: any fixed grid through every midnight nests into them
            return self.is_month or (DAY_MS % self.interval_ms == 0 and self.origin_ms % self.interval_ms == 0)
        if self.is_month:
            return False
        return (
            target.interval_ms % self.interval_ms == 0 and (target.origin_ms - self.origin_ms) % self.interval_ms == 0
        )

    def sources(self) -> tuple[Timeframe, ...]:
        """The native timeframes this one can be resampled from, finest first (a native
        timeframe lists itself)."""
        return tuple(tf for tf in TIMEFRAMES.values() if tf.divides(self))

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


#: Derived timeframes parsed so far, by every spelling seen (one object per canonical name).
_DERIVED: dict[str, Timeframe] = {}
_MULTIPLE = re.compile(r"^([0-9]{1,5})([smhd])$")
_UNIT_MS = {"s": SECOND_MS, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS}
#: Derived day multiples go up to 6 days; longer spans are weeks (``7d`` means ``1w``) or months.
MAX_DERIVED_DAYS = 6


def _derived(text: str) -> Timeframe | None:
    """The derived (or native) timeframe spelled ``<n><s|m|h|d>``, or None."""
    m = _MULTIPLE.match(text)
    if m is None:
        return None
    ms = int(m.group(1)) * _UNIT_MS[m.group(2)]
    if ms <= 0 or not (DAY_MS % ms == 0 or (ms % DAY_MS == 0 and ms // DAY_MS <= MAX_DERIVED_DAYS)):
        return None  # a grid that does not meet every midnight would drift across days
    if ms % HOUR_MS and TIMEFRAMES.get(_ALIASES.get(m.group(0), m.group(0))) is None:
        return None  # below an hour Upbit's own minute units (1 3 5 10 15 30) are the choice
    for unit, size in (("d", DAY_MS), ("h", HOUR_MS), ("m", MINUTE_MS), ("s", SECOND_MS)):
        if ms % size == 0:
            name = f"{ms // size}{unit}"
            break
    native = TIMEFRAMES.get(_ALIASES.get(name, name))
    if native is not None:
        return native
    tf = _DERIVED.get(name)
    if tf is None:
        tf = _DERIVED[name] = Timeframe(name, ms, 0, False, "", None, derived=True)
    return tf


def parse_timeframe(value: str | Timeframe, *, derived: bool = False) -> Timeframe:
    """Parse a timeframe name or alias into its canonical :class:`Timeframe`.

    Accepts canonical names, ``60m``/``240m``, pyupbit's ``minute1`` ... ``minute240``, ``day``,
    ``week``, ``month`` (and plurals), and ``1mo``. Case matters only between ``1m`` (minute) and
    ``1M`` (month); word aliases are case-insensitive.

    Parameters
    ----------
    derived
        Also accept derived timeframes: whole hours that divide a day (``2h``, ``3h``, ``6h``,
        ``8h``, ``12h``; also spelled in minutes, ``120m`` = ``2h``) or 2 to 6 days (``3d``).
        Only reads take them: they are resampled from a native series, never fetched from
        Upbit or stored.

    Raises
    ------
    InvalidRequestError
        For anything that is not an Upbit timeframe (or, with ``derived``, a derived one); for a
        derived timeframe when ``derived`` is false.
    """
    if value.__class__ is str:
        tf = TIMEFRAMES.get(value)  # a canonical name: every hot path's case
        if tf is not None:
            return tf
        if derived:
            tf = _DERIVED.get(value)
            if tf is not None:
                return tf
    elif isinstance(value, Timeframe):
        if value.derived and not derived:
            raise _not_native(value.name)
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
    tf = _derived(text)
    if tf is not None:
        if tf.derived and not derived:
            raise _not_native(tf.name)
        if tf.derived and text != tf.name:
            _DERIVED[text] = tf  # "120m": the next parse of this spelling is one lookup
        return tf
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise InvalidRequestError(
        f"unknown timeframe {shown!r}; use one of {', '.join(TIMEFRAMES)} (or an alias such as 60m, minute1, day)"
    )


def _not_native(name: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{name} is a derived timeframe (resampled from a native one): it can be read "
        "(store.candles, store.panel, mds.resample) but not stored, fetched or deleted"
    )
