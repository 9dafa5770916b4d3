"""``UpbitRouter``: a Layer 1 over Upbit's public REST quotation API.

It has the Smart Router's async shape (DESIGN.md section 5): ``get_candle_data``,
``get_ticker_data``, ``get_orderbook_data``, ``get_trades``, ``peek_cache``, ``cache_policy``,
``get_performance_summary``, each answer ``{"success": True, "data": [...], "metadata": {...}}``
with data in Upbit's REST field names. Failures raise :class:`~mds.errors.Layer1Error` (typed
errors, not ``success: false``); :class:`~mds.layer1.SmartRouterConnector` accepts both.

Behaviour towards Upbit:

- Candle pagination for any count or range: 200 a request, newest first, the next ``to`` is the
  oldest ``candle_date_time_utc`` read as UTC and sent with a ``Z`` (``to`` is exclusive), so
  there are no duplicates and no holes. Only an empty page means the history ran out (a short
  page is followed by one more request: one extra, empty request where a walk reaches a
  market's first candle).
- Pacing: at most ``rate_limit`` requests per ``rate_window_s`` per group (Upbit: 10 a second per
  IP for each of candles, ticker, orderbook, trades), from one budget per machine: every router
  on it, in any thread or process, draws from the same window of the same server and group (a
  small locked file, :mod:`mds.layer1._budget`). A slot is released when its response has
  arrived, so the server can never count more than the limit in any window, whatever the network
  delay. ``Remaining-Req: ... sec=N`` lowers the budget when others share the IP.
- 429: the group's window is treated as used up, then the request is retried with exponential
  backoff. 418 (blocked): :class:`Layer1Error` at once with Upbit's block message. Timeouts,
  transport errors, 5xx and broken payloads (invalid JSON, truncated bodies, another market's
  rows) are retried with bounded exponential backoff; 400/404 fail at once.
- A small TTL cache (the seed Layer 1's): the latest 200 candles per series for 5 minutes,
  tickers and orderbooks for 5 seconds; ``peek_cache`` reads it without touching the network.

This module maps the Smart Router's calls to Upbit's endpoints and checks the rows they return;
pacing and retries live in :mod:`mds.layer1._transport`, the cache in
:mod:`mds.layer1._response_cache`, candle pagination in :mod:`mds.layer1._paging`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mds.errors import InvalidRequestError
from mds.layer1._paging import PAGE_SIZE, BadPayload, CandlePages, page_ts, paginate_candles
from mds.layer1._response_cache import ResponseCache
from mds.layer1._settings import Forwarded
from mds.layer1._transport import Transport
from mds.symbols import validate_symbol
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import iso_utc_z, now_ms, to_ms

__all__ = ["DEFAULT_BASE_URL", "UpbitRouter"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.upbit.com"
_TICKER_BATCH = 100
_TRADES_MAX = 500


def _symbols(symbols: str | Iterable[str]) -> list[str]:
    syms = [symbols] if isinstance(symbols, str) else list(symbols)
    if not syms:
        raise InvalidRequestError("symbols is empty")
    out: list[str] = []
    for s in syms:
        validate_symbol(s)
        if s not in out:
            out.append(s)
    return out


class UpbitRouter:
    """A Layer 1 over Upbit's public REST API (or any server speaking it, e.g. ``FakeUpbit``).

    Parameters
    ----------
    base_url : str
        Scheme and host, without ``/v1`` (default ``https://api.upbit.com``).
    timeout_s : float
        Per-request timeout (connect, read, write, pool).
    max_retries : int
        Retries after the first attempt for 429, 5xx, timeouts, transport errors and broken
        payloads; then :class:`Layer1Error`.
    backoff_s, max_backoff_s : float
        Exponential backoff: ``backoff_s * 2**(attempt-1)``, capped, with jitter (50-100 %).
    rate_limit, rate_window_s : int, float
        At most ``rate_limit`` requests per ``rate_window_s`` per group (Upbit: 10 per second),
        counted over every router on this machine that talks to the same server (scheme, host
        and port) with the same window.
    candle_ttl_s, candle_cache_count : float, int
        Cache of the latest candles per series (default 200 for 5 minutes); 0 disables it.
    ticker_ttl_s, orderbook_ttl_s : float
        Cache lifetime of tickers and orderbooks (default 5 s); 0 disables it.
    trade_ttl_s : float
        How long the latest trades of a market are kept for :meth:`peek_cache` (default 1 s);
        0 disables it.
    clock : callable, optional
        Epoch ms; dates answers (``fetched_at``) and decides which interval is still forming.
        Default: the wall clock. Cache expiry always uses the monotonic clock.
    headers : mapping, optional
        Extra request headers. Never send ``Origin``: Upbit limits such clients to 1 request
        per 10 s.
    budget_dir : str, optional
        Directory of the machine-wide request budgets (created mode 0700). Default:
        ``$MDS_BUDGET_DIR``, else ``$XDG_RUNTIME_DIR/mds-budget``, else
        ``<tempdir>/mds-budget-<uid>``. Routers share a budget only through the same directory;
        where it cannot be used (no ``fcntl.flock``, a directory of another user) each router
        paces itself alone and a warning says so.

    Notes
    -----
    Use ``async with UpbitRouter(...) as r:`` or call :meth:`aclose`. The HTTP client is created
    in the event loop of the first call; one router serves one event loop at a time.
    """

    # Each setting has one home, read at each use: the transport's or the cache's attribute.
    # Assigning one here after construction takes effect at the next request or cache access.
    base_url = Forwarded[str]("_transport")
    timeout_s = Forwarded[float]("_transport")
    max_retries = Forwarded[int]("_transport")
    backoff_s = Forwarded[float]("_transport")
    max_backoff_s = Forwarded[float]("_transport")
    rate_limit = Forwarded[int]("_transport")
    rate_window_s = Forwarded[float]("_transport")
    budget_dir = Forwarded[str | None]("_transport")
    candle_ttl_s = Forwarded[float]("_cache")
    candle_cache_count = Forwarded[int]("_cache")
    ticker_ttl_s = Forwarded[float]("_cache")
    orderbook_ttl_s = Forwarded[float]("_cache")
    trade_ttl_s = Forwarded[float]("_cache")

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        rate_limit: int = 10,
        rate_window_s: float = 1.0,
        candle_ttl_s: float = 300.0,
        candle_cache_count: int = PAGE_SIZE,
        ticker_ttl_s: float = 5.0,
        orderbook_ttl_s: float = 5.0,
        trade_ttl_s: float = 1.0,
        clock: Callable[[], int] | None = None,
        headers: Mapping[str, str] | None = None,
        budget_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if rate_limit < 1 or rate_window_s <= 0:
            raise InvalidRequestError("rate_limit must be >= 1 and rate_window_s > 0")
        if max_retries < 0 or timeout_s <= 0:
            raise InvalidRequestError("max_retries must be >= 0 and timeout_s > 0")
        self._clock = clock or now_ms
        self._counts: collections.Counter[str] = collections.Counter()
        self._transport = Transport(
            base_url.rstrip("/"),
            headers={"Accept": "application/json", **dict(headers or {})},
            timeout_s=float(timeout_s),
            max_retries=int(max_retries),
            backoff_s=float(backoff_s),
            max_backoff_s=float(max_backoff_s),
            rate_limit=int(rate_limit),
            rate_window_s=float(rate_window_s),
            counts=self._counts,
            budget_dir=None if budget_dir is None else os.fspath(budget_dir),
        )
        self._cache = ResponseCache(
            candle_ttl_s=float(candle_ttl_s),
            candle_cache_count=int(candle_cache_count),
            ticker_ttl_s=float(ticker_ttl_s),
            orderbook_ttl_s=float(orderbook_ttl_s),
            trade_ttl_s=float(trade_ttl_s),
        )

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> UpbitRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections (the router may be used again afterwards)."""
        await self._transport.aclose()

    async def _get(
        self, path: str, params: dict[str, Any], validate: Callable[[Any], None] | None = None
    ) -> tuple[Any, int]:
        """GET ``path`` with pacing, retries and payload checks; returns (parsed JSON, attempts).

        Every request of the router goes through here (see :class:`~mds.layer1._transport.Transport`).
        """
        return await self._transport.get(path, params, validate)

    # -- candles -----------------------------------------------------------------------------
    def _page_fetcher(self, symbol: str, tf: Timeframe) -> Any:
        path = f"/v1/candles/{tf.rest_path}"

        async def fetch(count: int, to: int | None) -> list[dict[str, Any]]:
            params: dict[str, Any] = {"market": symbol, "count": count}
            if to is not None:
                # Whole seconds: candle starts are, so rounding up keeps the same set of candles.
                params["to"] = iso_utc_z(-(-to // 1000) * 1000)

            def check(payload: Any) -> None:
                page_ts(payload, tf, symbol, None if to is None else -(-to // 1000) * 1000)

            rows, _ = await self._get(path, params, check)
            return list(rows)

        return fetch

    async def _latest(self, symbol: str, tf: Timeframe, count: int, use_cache: bool) -> tuple[CandlePages, bool, int]:
        """Latest ``count`` candles; served from or written to the cache when it fits."""
        key = (symbol, tf.name)
        cacheable = self._cache.holds_candles(count)
        if use_cache and cacheable:
            hit = self._cache.candles(key, count)
            if hit is not None:
                self._counts["cache_hits"] += 1
                return hit[0], True, hit[1]
        if cacheable:
            self._counts["cache_misses"] += 1
        fetched_at = int(self._clock())
        want = max(count, self.candle_cache_count) if cacheable else count
        pages = await paginate_candles(self._page_fetcher(symbol, tf), tf, symbol, count=want)
        if cacheable:
            self._cache.put_candles(key, fetched_at, pages)
        if len(pages.rows) > count:
            pages = CandlePages(pages.rows[:count], pages.ts[:count], int(pages.ts[count - 1]), False, pages.requests)
        return pages, False, fetched_at

    async def get_candle_data(
        self,
        symbols: str | Iterable[str],
        interval: str | Timeframe,
        count: int = 200,
        to: Any = None,
        use_cache: bool = True,
    ) -> dict[str, Any]:
        """Candles of one or more markets, newest first, paginated for any ``count``.

        Parameters
        ----------
        symbols : str or list of str
        interval : str
            An mds timeframe name or alias (``1m``, ``1h``, ``1d`` ...).
        count : int
            Candles per symbol (fewer when the history runs out).
        to : str, int or datetime, optional
            Exclusive end: ISO-8601 (no offset = UTC), epoch ms or datetime. None: the latest,
            including the still-forming candle.
        use_cache : bool
            Serve the latest candles (``to`` None, ``count`` within the cache) from the cache.

        Returns
        -------
        dict
            ``{"success": True, "data": [candle dicts, per symbol in the order given, newest
            first], "metadata": {...}}``. ``metadata["covered"][symbol]`` is ``[from, to]``: in
            ``[from, to)`` every candle the source has is in ``data`` (``to`` is the forming
            interval's start when ``to`` was None); ``metadata["exhausted"][symbol]`` tells that
            the source has nothing older than the oldest candle.

        Raises
        ------
        InvalidRequestError
            Bad symbol, interval, count or ``to``.
        Layer1Error
            Upbit refused (400/404), blocked (418) or kept failing after the retries.
        """
        t0 = time.perf_counter()
        syms = _symbols(symbols)
        tf = parse_timeframe(interval)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise InvalidRequestError(f"count must be a positive int, not {count!r}")
        count = int(count)
        to_ms_ = None if to is None else to_ms(to, name="to")

        async def one(sym: str) -> tuple[CandlePages, bool, int]:
            if to_ms_ is None:
                return await self._latest(sym, tf, count, use_cache)
            fetched_at = int(self._clock())
            pages = await paginate_candles(self._page_fetcher(sym, tf), tf, sym, count=count, end=to_ms_)
            return pages, False, fetched_at

        results = await asyncio.gather(*(one(s) for s in syms))
        data: list[Mapping[str, Any]] = []
        covered: dict[str, list[int | None]] = {}
        exhausted: dict[str, bool] = {}
        requests = 0
        all_cached = True
        fetched = []
        for sym, (pages, cached, fetched_at) in zip(syms, results):
            data.extend(pages.rows)
            hi = to_ms_ if to_ms_ is not None else tf.floor(fetched_at)
            covered[sym] = [pages.covered_from if pages.covered_from is not None else hi, hi]
            exhausted[sym] = pages.exhausted
            requests += pages.requests
            all_cached = all_cached and cached
            fetched.append(fetched_at)
        self._counts["calls_candle"] += 1
        return {
            "success": True,
            "data": data,
            "metadata": {
                "data_type": "candle",
                "source": "cache" if all_cached else "api",
                "cache_hit": all_cached,
                "symbols": syms,
                "interval": tf.name,
                "count": len(data),
                "requests": requests,
                "covered": covered,
                "exhausted": exhausted,
                "policy_version": self._cache.version,
                "fetched_at": min(fetched),
                "response_time_ms": (time.perf_counter() - t0) * 1000.0,
            },
        }

    async def get_candle_range(self, symbol: str, interval: str | Timeframe, start: Any, end: Any) -> dict[str, Any]:
        """Every candle of ``symbol`` with ``start <= ts < end``, newest first.

        Paginates from ``to=end`` backwards until a page reaches ``start`` or an empty page
        shows that history ran out, so an uncovered range costs ``ceil(candles / 200)`` requests
        (no-trade intervals make it fewer), plus one empty request when the range starts before
        the market's first candle. The cache is neither read nor written.

        Returns
        -------
        dict
            ``{"success": True, "data": [...], "metadata": {"covered": [from, to], "exhausted",
            "requests", ...}}``. ``covered`` is ``[start, min(end, start of the forming
            interval)]`` when the walk finished; within it an absent candle means no trades.
            A forming candle inside the range is returned but not counted as covered.

        Raises
        ------
        InvalidRequestError
            Bad symbol, interval or range.
        Layer1Error
            As :meth:`get_candle_data`.
        """
        t0 = time.perf_counter()
        sym = _symbols(symbol)[0]
        tf = parse_timeframe(interval)
        lo, hi = to_ms(start, name="start"), to_ms(end, name="end")
        if hi <= lo:
            raise InvalidRequestError("end must be after start")
        fetched_at = int(self._clock())
        pages = await paginate_candles(self._page_fetcher(sym, tf), tf, sym, start=lo, end=hi)
        covered_to = min(hi, tf.floor(fetched_at))
        covered_from = pages.covered_from if pages.covered_from is not None else covered_to
        self._counts["calls_candle_range"] += 1
        return {
            "success": True,
            "data": pages.rows,
            "metadata": {
                "data_type": "candle",
                "source": "api",
                "cache_hit": False,
                "symbols": [sym],
                "interval": tf.name,
                "count": len(pages.rows),
                "requests": pages.requests,
                "covered": [min(covered_from, covered_to), covered_to],
                "exhausted": pages.exhausted,
                "policy_version": self._cache.version,
                "fetched_at": fetched_at,
                "response_time_ms": (time.perf_counter() - t0) * 1000.0,
            },
        }

    # -- realtime ----------------------------------------------------------------------------
    async def _snapshots(
        self, kind: str, path: str, syms: list[str], use_cache: bool, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        out, fetched_at = self._cache.snapshots(kind, syms) if use_cache else ({}, {})
        missing = [s for s in syms if s not in out]
        requests = 0
        for i in range(0, len(missing), _TICKER_BATCH):
            batch = missing[i : i + _TICKER_BATCH]

            def check(payload: Any, batch: list[str] = batch) -> None:
                if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
                    raise BadPayload(f"expected a JSON list of {kind} objects")
                got = {r.get("market") for r in payload}
                if got != set(batch):
                    raise BadPayload(f"asked for {sorted(batch)}, got {sorted(map(str, got))}")

            at = int(self._clock())
            rows, _ = await self._get(path, {"markets": ",".join(batch), **(extra or {})}, check)
            requests += 1
            for r in rows:
                out[r["market"]] = r
                fetched_at[r["market"]] = at
                self._cache.put_snapshot(kind, r, at)
        if missing:
            self._counts[f"cache_misses_{kind}"] += 1
        else:
            self._counts[f"cache_hits_{kind}"] += 1
        self._counts[f"calls_{kind}"] += 1
        return {
            "success": True,
            "data": [out[s] for s in syms],
            "metadata": {
                "data_type": kind,
                "source": "api" if missing else "cache",
                "cache_hit": not missing,
                "symbols": syms,
                "count": len(syms),
                "requests": requests,
                "policy_version": self._cache.version,
                "fetched_at": min(fetched_at.values()),
                "response_time_ms": (time.perf_counter() - t0) * 1000.0,
            },
        }

    async def get_ticker_data(self, symbols: str | Iterable[str], use_cache: bool = True) -> dict[str, Any]:
        """Tickers (``/v1/ticker``) in the order given; cached ``ticker_ttl_s``.

        Raises
        ------
        InvalidRequestError, Layer1Error
        """
        syms = _symbols(symbols)
        return await self._snapshots("ticker", "/v1/ticker", syms, use_cache)

    async def get_orderbook_data(self, symbols: str | Iterable[str], use_cache: bool = True) -> dict[str, Any]:
        """Orderbooks (``/v1/orderbook``) in the order given; cached ``orderbook_ttl_s``.

        Raises
        ------
        InvalidRequestError, Layer1Error
        """
        syms = _symbols(symbols)
        return await self._snapshots("orderbook", "/v1/orderbook", syms, use_cache)

    async def get_trades(self, symbols: str | Iterable[str], count: int = 100) -> dict[str, Any]:
        """Recent trades (``/v1/trades/ticks``) per symbol, newest first, deduplicated on
        ``sequential_id`` (of duplicates, the row delivered later wins); ``count`` is capped at
        Upbit's 500. Always asked of the network; the answer is kept ``trade_ttl_s`` for
        :meth:`peek_cache`.

        Raises
        ------
        InvalidRequestError, Layer1Error
        """
        t0 = time.perf_counter()
        syms = _symbols(symbols)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise InvalidRequestError(f"count must be a positive int, not {count!r}")
        n = min(int(count), _TRADES_MAX)

        async def one(sym: str) -> list[dict[str, Any]]:
            def check(payload: Any) -> None:
                if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
                    raise BadPayload("expected a JSON list of trades")
                if any(r.get("market", sym) != sym for r in payload):
                    raise BadPayload(f"asked for {sym}, the answer holds another market")

            rows, _ = await self._get("/v1/trades/ticks", {"market": sym, "count": n}, check)
            # Duplicates of a sequential_id: the row delivered later in the answer wins (the
            # store's last-wins rule), then newest first.
            last: dict[Any, dict[str, Any]] = {}
            for r in rows:
                last[r.get("sequential_id")] = r
            return sorted(last.values(), key=lambda r: (r.get("timestamp", 0), r.get("sequential_id", 0)), reverse=True)

        fetched_at = int(self._clock())
        results = await asyncio.gather(*(one(s) for s in syms))
        for s, rows in zip(syms, results):
            self._cache.put_trades(s, rows, fetched_at, n)
        self._counts["calls_trade"] += 1
        data = [r for rows in results for r in rows]
        return {
            "success": True,
            "data": data,
            "metadata": {
                "data_type": "trade",
                "source": "api",
                "cache_hit": False,
                "symbols": syms,
                "count": len(data),
                "requests": len(syms),
                "policy_version": self._cache.version,
                "fetched_at": fetched_at,
                "response_time_ms": (time.perf_counter() - t0) * 1000.0,
            },
        }

    # -- cache introspection -----------------------------------------------------------------
    def peek_cache(
        self,
        data_type: Any,
        symbols: str | Iterable[str],
        interval: str | Timeframe | None = None,
        count: int = 200,
    ) -> dict[str, Any] | None:
        """Answer from the cache only, never the network; None unless every symbol is cached.

        ``data_type`` is ``"candle"``, ``"ticker"`` or ``"orderbook"`` (a ``DataType`` works too).
        Candles: the latest ``count`` of ``interval`` (the cache holds the latest 200).
        """
        kind = str(getattr(data_type, "value", data_type)).lower()
        return self._cache.peek(kind, _symbols(symbols), interval, count)

    def cache_policy(self) -> dict[str, Any]:
        """The cache's TTLs and sizes (seconds; 0 means not cached)."""
        return self._cache.policy()

    def clear_cache(self) -> None:
        """Drop every cached answer."""
        self._cache.clear()

    def get_performance_summary(self) -> dict[str, Any]:
        """JSON-serialisable counters: requests, retries, 429s, cache hits, latency per group, and
        ``budget``: whether the request budgets are machine-wide (``shared``), their ``dir``,
        this router's ``waits`` for them and the seconds ``waited_s``, and per group the budget
        file (``path``), slots of dead holders it expired (``reaped``), stamps added because
        the server counted more (``corrections``) and the times this process gave up waiting
        for a budget lock another process kept and paced alone (``lock_fallbacks``)."""
        return {"counters": dict(self._counts), **self._transport.summary(), "cached_series": len(self._cache)}
