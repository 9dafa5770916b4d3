"""The router's small TTL cache (the seed Layer 1's) and ``peek_cache`` answers from it.

The latest ``candle_cache_count`` candles per series for ``candle_ttl_s``, tickers and orderbooks
for their own TTLs; expiry runs on the monotonic clock, ``fetched_at`` (epoch ms) dates each entry.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mds.errors import InvalidRequestError
from mds.layer1._paging import CandlePages, page_ts
from mds.timeframes import Timeframe, parse_timeframe


class ResponseCache:
    """Cached Upbit answers of one router.

    Parameters
    ----------
    candle_ttl_s, candle_cache_count : float, int
        Lifetime and size of the latest-candles entry per series; 0 disables it.
    ticker_ttl_s, orderbook_ttl_s : float
        Lifetime of tickers and orderbooks; 0 disables them.

    These four attributes are the one home of the router's settings of the same names; each is
    read when it is used.
    """

    def __init__(
        self, *, candle_ttl_s: float, candle_cache_count: int, ticker_ttl_s: float, orderbook_ttl_s: float
    ) -> None:
        self.candle_ttl_s = candle_ttl_s
        self.candle_cache_count = candle_cache_count
        self.ticker_ttl_s = ticker_ttl_s
        self.orderbook_ttl_s = orderbook_ttl_s
        # key -> (expires_monotonic, fetched_at_ms, payload[, exhausted])
        self._candles: dict[tuple[str, str], tuple[float, int, list[dict[str, Any]], bool]] = {}
        self._snapshots: dict[str, dict[str, tuple[float, int, dict[str, Any]]]] = {"ticker": {}, "orderbook": {}}

    def __len__(self) -> int:
        """Candle series cached (expired entries included until next read)."""
        return len(self._candles)

    # -- candles -----------------------------------------------------------------------------
    def holds_candles(self, count: int) -> bool:
        """Whether the latest ``count`` candles of a series are cached at all (TTL > 0, count fits)."""
        return self.candle_ttl_s > 0 and count <= self.candle_cache_count

    def candles(self, key: tuple[str, str], count: int) -> tuple[CandlePages, int] | None:
        """The latest ``count`` candles of ``key`` (symbol, timeframe name) and their
        ``fetched_at``, or None when not cached, expired, or fewer cached than asked (unless
        the entry holds the market's whole history)."""
        entry = self._candles.get(key)
        if entry is None:
            return None
        expires, fetched_at, rows, exhausted = entry
        if time.monotonic() >= expires:
            del self._candles[key]
            return None
        if len(rows) < count and not exhausted:
            return None
        sel = rows[:count]
        ts = page_ts(sel, parse_timeframe(key[1]), key[0], None)
        full = exhausted and len(sel) == len(rows)
        covered = int(ts[-1]) if len(ts) else None
        return CandlePages(sel, ts, covered, full, 0), fetched_at

    def put_candles(self, key: tuple[str, str], fetched_at: int, pages: CandlePages) -> None:
        """Keep the newest ``candle_cache_count`` rows of a latest-candles walk."""
        rows = [dict(r) for r in pages.rows[: self.candle_cache_count]]
        exhausted = pages.exhausted and len(pages.rows) <= self.candle_cache_count
        self._candles[key] = (time.monotonic() + self.candle_ttl_s, fetched_at, rows, exhausted)

    # -- tickers and orderbooks --------------------------------------------------------------
    def _ttl(self, kind: str) -> float:
        return self.ticker_ttl_s if kind == "ticker" else self.orderbook_ttl_s

    def snapshots(self, kind: str, syms: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """The live ``kind`` (``"ticker"`` or ``"orderbook"``) entries of ``syms``: ``({symbol:
        row}, {symbol: fetched_at})``, both empty when that kind is not cached."""
        out: dict[str, dict[str, Any]] = {}
        fetched_at: dict[str, int] = {}
        if self._ttl(kind) > 0:
            now = time.monotonic()
            cache = self._snapshots[kind]
            for s in syms:
                e = cache.get(s)
                if e is not None and e[0] > now:
                    out[s] = e[2]
                    fetched_at[s] = e[1]
        return out, fetched_at

    def put_snapshot(self, kind: str, row: dict[str, Any], fetched_at: int) -> None:
        """Keep one ticker or orderbook row (of ``row["market"]``) for its TTL, if cached at all."""
        ttl = self._ttl(kind)
        if ttl > 0:
            self._snapshots[kind][row["market"]] = (time.monotonic() + ttl, fetched_at, row)

    # -- the cache as a whole ----------------------------------------------------------------
    def peek(self, kind: str, syms: list[str], interval: str | Timeframe | None, count: int) -> dict[str, Any] | None:
        """``UpbitRouter.peek_cache`` for ``kind`` (lower case) and validated ``syms``."""
        if kind == "candle":
            if interval is None:
                raise InvalidRequestError("peek_cache for candles needs an interval")
            tf = parse_timeframe(interval)
            data: list[Mapping[str, Any]] = []
            covered: dict[str, list[int]] = {}
            exhausted: dict[str, bool] = {}
            fetched = []
            for s in syms:
                hit = self.candles((s, tf.name), int(count))
                if hit is None:
                    return None
                pages, at = hit
                data.extend(pages.rows)
                hi = tf.floor(at)
                covered[s] = [pages.covered_from if pages.covered_from is not None else hi, hi]
                exhausted[s] = pages.exhausted
                fetched.append(at)
            meta: dict[str, Any] = {"interval": tf.name, "covered": covered, "exhausted": exhausted}
        elif kind in ("ticker", "orderbook"):
            rows, at_of = self.snapshots(kind, syms)
            if len(rows) < len(syms):
                return None
            data = [rows[s] for s in syms]
            fetched = [at_of[s] for s in syms]
            meta = {}
        else:
            return None
        return {
            "success": True,
            "data": data,
            "metadata": {
                "data_type": kind,
                "source": "cache",
                "cache_hit": True,
                "symbols": syms,
                "count": len(data),
                "requests": 0,
                "fetched_at": min(fetched),
                **meta,
            },
        }

    def policy(self) -> dict[str, Any]:
        """The TTLs and sizes (seconds; 0 means not cached)."""
        return {
            "candle_ttl_s": self.candle_ttl_s,
            "candle_cache_count": self.candle_cache_count,
            "ticker_ttl_s": self.ticker_ttl_s,
            "orderbook_ttl_s": self.orderbook_ttl_s,
            "trade_ttl_s": 0.0,
        }

    def clear(self) -> None:
        """Drop every entry."""
        self._candles.clear()
        for cache in self._snapshots.values():
            cache.clear()
