"""Backward candle pagination with Upbit's exclusive ``to``, shared by the router and the connector.

One algorithm, used wherever pages of at most 200 candles are stitched together: ask for the
newest page before ``to`` (or the latest page), then set ``to`` to the oldest candle start seen
(exclusive, so no overlap and no hole), until the count is reached, the range start is passed,
or an EMPTY page proves that the source has nothing older. A page shorter than asked is not such
a proof (a Layer 1 may cap its pages, or drop rows once): paging simply goes on from its oldest
row. On a real Upbit this costs one extra, empty request for a walk that reaches a market's first
candle (the page that used to end the walk by being short is now followed by the empty one).

Pages are normalised on the way: duplicate starts resolved (the row delivered later in the page
wins), any order accepted (the next ``to`` is the true minimum), rows of another market or of
another timeframe, misaligned starts or starts at or after ``to`` rejected as a broken answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mds.errors import InvalidRequestError, Layer1Error
from mds.timeframes import Timeframe
from mds.timeutil import parse_utc_strings

PAGE_SIZE = 200

#: ``fetch(count, to_ms_or_None) -> rows`` (Upbit candle dicts, as the source returned them).
PageFetcher = Callable[[int, "int | None"], Awaitable[list[Any]]]


class BadPayload(Layer1Error):
    """An answer that parsed but cannot be right (another market or timeframe, misaligned or
    out-of-range rows)."""


@dataclass(frozen=True, slots=True)
class CandlePages:
    """The result of :func:`paginate_candles`.

    Attributes
    ----------
    rows : list of dict
        Upbit candle dicts, newest first, unique ``candle_date_time_utc``, inside the bounds.
    ts : numpy.ndarray
        int64 epoch ms of ``rows`` (same order).
    covered_from : int or None
        Oldest time from which on, up to the request's end, every candle the source has was
        returned: the range start when a page reached it or the source proved it has nothing
        older, else the oldest candle returned; None when nothing was returned and nothing was
        proven.
    exhausted : bool
        Proven: an empty page was answered for ``to`` = the oldest candle returned (or the end
        asked for, when none was), so the source has nothing older than that. A short page
        never sets it.
    requests : int
        Pages fetched.
    """

    rows: list[Any]
    ts: np.ndarray
    covered_from: int | None
    exhausted: bool
    requests: int


#: Fields that only Upbit's day candles carry, and that only week, month (and year) candles carry.
_DAY_FIELDS = frozenset(("prev_closing_price", "change_price", "change_rate"))
_PERIOD_FIELD = "first_day_of_period"


def _unit_matches(unit: Any, minutes: int) -> bool:
    if isinstance(unit, bool):
        return False
    if isinstance(unit, (int, float, np.integer, np.floating)):
        return bool(unit == minutes)
    return isinstance(unit, str) and unit.strip() == str(minutes)


def check_timeframe(rows: Sequence[Mapping[str, Any]], tf: Timeframe) -> None:
    """Reject rows that say they are candles of another timeframe than ``tf``.

    Upbit marks its candle kinds (../shared/UPBIT_API.md section 2): minute candles carry
    ``unit`` (their minutes), day candles ``prev_closing_price``, ``change_price`` and
    ``change_rate``, week and month candles ``first_day_of_period``; seconds candles carry none
    of these. A row without a marker is not rejected here (a Layer 1 may drop the extra fields);
    alignment to ``tf`` is checked by :func:`page_ts`. Weeks and months share their marker, so
    a month candle answered for ``1w`` is caught only when it is misaligned to Monday.

    Raises
    ------
    BadPayload
        A row carries the marker of another kind of candle.
    """
    keys: set[Any] = set().union(*rows)  # every field name of the page, collected in C
    if tf.name != "1d" and keys & _DAY_FIELDS:
        raise BadPayload(f"asked for {tf.name} candles, got a day candle (it has {sorted(keys & _DAY_FIELDS)})")
    if tf.name not in ("1w", "1M") and _PERIOD_FIELD in keys:
        raise BadPayload(f"asked for {tf.name} candles, got a week or month candle (it has {_PERIOD_FIELD!r})")
    if "unit" in keys:
        try:
            units = {r.get("unit") for r in rows}
        except TypeError:  # an unhashable unit cannot be a number of minutes
            units = {"?"}
        units.discard(None)
        for unit in units:
            if tf.minutes_unit is None or not _unit_matches(unit, tf.minutes_unit):
                raise BadPayload(f"asked for {tf.name} candles, got a candle of unit={unit!r} (minutes)")


def page_ts(rows: Any, tf: Timeframe, market: str, to: int | None) -> np.ndarray:
    """Validate one page and return its candle starts (epoch ms), in the page's order.

    Raises
    ------
    BadPayload
        Not a list of candle dicts, another market, candles of another timeframe (see
        :func:`check_timeframe`), unparsable or misaligned times, or a start at or after ``to``
        (``to`` is exclusive).
    """
    if not isinstance(rows, list):
        raise BadPayload(f"expected a JSON list of candles, got {type(rows).__name__}")
    try:
        names = [r["candle_date_time_utc"] for r in rows]
        markets = {r.get("market", market) for r in rows}
    except (KeyError, TypeError, AttributeError):
        raise BadPayload("a candle lacks candle_date_time_utc or is not an object") from None
    if markets - {market}:
        raise BadPayload(f"asked for {market}, the answer holds {sorted(map(str, markets - {market}))}")
    check_timeframe(rows, tf)
    try:
        ts = parse_utc_strings(names) if names else np.zeros(0, dtype=np.int64)
    except InvalidRequestError as exc:
        raise BadPayload(f"bad candle_date_time_utc: {exc}") from None
    if len(ts) and not tf.aligned(ts).all():
        raise BadPayload(f"candle times not aligned to {tf.name}")
    if to is not None and len(ts) and int(ts.max()) >= to:
        raise BadPayload("a candle starts at or after the exclusive 'to'")
    return ts


def newest_first(ts: np.ndarray) -> np.ndarray:
    """Positions of a page's rows to keep, newest first, one per candle start.

    Of rows with the same start the one delivered LATER in the page wins (its higher position
    in the list as received), whatever order the page is in: for Upbit's newest-first pages that
    is the row further down the list. This is the store's rule for duplicates in a write (last
    wins, DESIGN.md section 2).
    """
    n = len(ts)
    if n == 0:
        return np.zeros(0, dtype=np.intp)
    pos = np.arange(n)
    order = np.lexsort((-pos, -ts))  # start descending; equal starts: later position first
    st = ts[order]
    keep = np.ones(n, dtype=bool)
    keep[1:] = st[1:] != st[:-1]
    return order[keep]


async def paginate_candles(
    fetch: PageFetcher,
    tf: Timeframe,
    market: str,
    *,
    count: int | None = None,
    start: int | None = None,
    end: int | None = None,
    page_size: int = PAGE_SIZE,
    max_pages: int = 1_000_000,
) -> CandlePages:
    """Fetch candles backwards from ``end`` (exclusive; None: the latest) in pages.

    Stops after ``count`` candles, once a page reaches ``start`` (candles before it are
    dropped), or at an empty page. With neither ``count`` nor ``start`` one page's worth
    (``page_size`` candles) is fetched.

    A page of k rows is read as the k newest candles before its ``to``, so ``[oldest row, to)``
    holds every candle the source has there, whatever k; a short page (k below the count asked)
    proves nothing else, and paging continues from its oldest row. Only an empty page proves
    that the source has nothing before its ``to`` (``exhausted``).

    Raises
    ------
    BadPayload
        A page failed :func:`page_ts` (the fetcher normally retries before this).
    Layer1Error
        ``max_pages`` reached before the stop condition (a runaway source).
    """
    if count is None and start is None:
        count = page_size
    to = end
    remaining = count
    out_rows: list[Any] = []
    out_ts: list[np.ndarray] = []
    requests = 0
    exhausted = False
    reached = False
    truncated = False  # rows dropped for ``count``: coverage ends at the oldest row kept
    while True:
        n = page_size if remaining is None else min(page_size, remaining)
        if start is not None and to is not None:
            # Never ask for more slots than lie in [start, to): a new minute costs one row, not
            # 200. Upbit still returns the n newest candles before `to` (skipping no-trade
            # slots), so the page usually reaches past `start`; when it comes back short it
            # proves nothing and the next page asks again from its oldest row.
            n = max(1, min(n, tf.count(start, to)))
        page = await fetch(n, to)
        requests += 1
        ts = page_ts(page, tf, market, to)
        uniq = newest_first(ts)
        if not len(uniq):
            # "the n newest candles before `to`": none at all is the proof that history ran out
            exhausted = True
            break
        oldest = int(ts[uniq[-1]])
        keep = uniq if start is None else uniq[ts[uniq] >= start]
        if remaining is not None:
            truncated = truncated or len(keep) > remaining
            keep = keep[:remaining]
            remaining -= len(keep)
        out_rows.extend(page[i] for i in keep.tolist())
        out_ts.append(ts[keep])
        if start is not None and oldest <= start:
            reached = True
            break
        if remaining is not None and remaining <= 0:
            break
        if requests >= max_pages:
            raise Layer1Error(f"candle pagination for {market} {tf.name} did not finish in {max_pages} pages")
        to = oldest
    all_ts = np.concatenate(out_ts) if out_ts else np.zeros(0, dtype=np.int64)
    if start is not None and (reached or exhausted) and not truncated:
        covered_from: int | None = start
    elif len(all_ts):
        covered_from = int(all_ts[-1])
    else:
        covered_from = None
    return CandlePages(out_rows, all_ts, covered_from, exhausted, requests)
