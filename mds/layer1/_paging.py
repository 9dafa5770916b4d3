"""Backward candle pagination with Upbit's exclusive ``to``, shared by the router and the connector.

One algorithm, used wherever pages of at most 200 candles are stitched together: ask for the
newest page before ``to`` (or the latest page), then set ``to`` to the oldest candle start seen
(exclusive, so no overlap and no hole), until the count is reached, the range start is passed,
or a short page says the market's history has run out. Pages are normalised on the way:
duplicate rows dropped, any order accepted (the next ``to`` is the true minimum), rows of another
market, misaligned starts or starts at or after ``to`` rejected as a broken answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
    """An answer that parsed but cannot be right (another market, misaligned or out-of-range rows)."""


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
        returned: the range start when it was reached, else the oldest candle returned; None when
        nothing was returned and history did not run out.
    exhausted : bool
        A page came back short and no candle before ``start`` was dropped: the source has
        nothing older than the oldest row returned.
    requests : int
        Pages fetched.
    """

    rows: list[Any]
    ts: np.ndarray
    covered_from: int | None
    exhausted: bool
    requests: int


def page_ts(rows: Any, tf: Timeframe, market: str, to: int | None) -> np.ndarray:
    """Validate one page and return its candle starts (epoch ms), in the page's order.

    Raises
    ------
    BadPayload
        Not a list of candle dicts, another market, unparsable or misaligned times, or a start at
        or after ``to`` (``to`` is exclusive).
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
    try:
        ts = parse_utc_strings(names) if names else np.zeros(0, dtype=np.int64)
    except InvalidRequestError as exc:
        raise BadPayload(f"bad candle_date_time_utc: {exc}") from None
    if len(ts) and not tf.aligned(ts).all():
        raise BadPayload(f"candle times not aligned to {tf.name}")
    if to is not None and len(ts) and int(ts.max()) >= to:
        raise BadPayload("a candle starts at or after the exclusive 'to'")
    return ts


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
    dropped), or at a short page. With neither ``count`` nor ``start`` one page is fetched.

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
    seen: set[int] = set()
    requests = 0
    exhausted = False
    reached = False
    oldest: int | None = None
    while True:
        n = page_size if remaining is None else min(page_size, remaining)
        if start is not None and to is not None:
            # Never ask for more slots than lie in [start, to): a new minute costs one row, not
            # 200. Upbit still returns the n newest candles before `to` (skipping no-trade
            # slots), so a page shorter than n still means the history ran out.
            n = max(1, min(n, tf.count(start, to)))
        page = await fetch(n, to)
        requests += 1
        ts = page_ts(page, tf, market, to)
        order = np.argsort(-ts, kind="stable")
        uniq: list[int] = []
        for i in order.tolist():
            t = int(ts[i])
            if t in seen:
                continue
            seen.add(t)
            uniq.append(i)
        distinct = len(uniq)
        if distinct:
            page_min = int(ts[uniq[-1]])
            oldest = page_min
            keep = [i for i in uniq if start is None or int(ts[i]) >= start]
            if remaining is not None:
                keep = keep[:remaining]
                remaining -= len(keep)
            out_rows.extend(page[i] for i in keep)
            out_ts.append(ts[keep])
        if distinct < n:
            # Rows before ``start`` were dropped: the source has older candles than the oldest
            # row returned, so callers must not read this as the start of the market's history.
            reached = start is not None and oldest is not None and oldest <= start
            exhausted = not (start is not None and oldest is not None and oldest < start)
            break
        if start is not None and oldest is not None and oldest <= start:
            reached = True
            break
        if remaining is not None and remaining <= 0:
            break
        if requests >= max_pages:
            raise Layer1Error(f"candle pagination for {market} {tf.name} did not finish in {max_pages} pages")
        to = oldest
    all_ts = np.concatenate(out_ts) if out_ts else np.zeros(0, dtype=np.int64)
    if start is not None and (reached or exhausted):
        covered_from: int | None = start
    elif out_rows:
        covered_from = int(all_ts[-1])
    else:
        covered_from = start if exhausted and start is not None else None
    return CandlePages(out_rows, all_ts, covered_from, exhausted, requests)
