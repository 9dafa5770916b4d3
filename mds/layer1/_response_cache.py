"""The router's small TTL cache (the seed Layer 1's) and ``peek_cache`` answers from it.

The latest ``candle_cache_count`` candles per series for ``candle_ttl_s``, tickers, orderbooks and
the latest trades for their own TTLs; expiry runs on the monotonic clock, ``fetched_at`` (epoch
ms) dates each entry.

A peek answers from the entries as they are: while they stay the same, a repeated peek returns
the same ``data`` list (a new outer dict), built once. Entries are replaced, never changed in
place, so a reader may keep what it derived from a ``data`` list for as long as a peek returns
that list (mds's store does: its conversion of an answer is kept with the list's identity).
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

    trade_ttl_s : float
        Lifetime of the latest trades of a market (kept for ``peek_cache``; ``get_trades`` always
        asks the network); 0 disables it.

    These five attributes are the one home of the router's settings of the same names; each is
    read when it is used. Setting one changes :meth:`policy`'s ``version`` (a reader that
    settled its policy on the old one can tell).
    """

    _POLICY = frozenset(("candle_ttl_s", "candle_cache_count", "ticker_ttl_s", "orderbook_ttl_s", "trade_ttl_s"))

    def __init__(
        self,
        *,
        candle_ttl_s: float,
        candle_cache_count: int,
        ticker_ttl_s: float,
        orderbook_ttl_s: float,
        trade_ttl_s: float = 0.0,
    ) -> None:
        self.version = 0
        # key -> (expires_monotonic, fetched_at_ms, payload[, exhausted])
        self._candles: dict[tuple[str, str], tuple[float, int, list[dict[str, Any]], bool]] = {}
        self._snapshots: dict[str, dict[str, tuple[float, int, dict[str, Any]]]] = {"ticker": {}, "orderbook": {}}
        # symbol -> (expires_monotonic, fetched_at_ms, rows newest first, all the source had)
        self._trades: dict[str, tuple[float, int, list[dict[str, Any]], bool]] = {}
        # (kind, symbols, interval, count) -> (the entries it was built from, earliest expiry, answer)
        self._answers: dict[tuple[Any, ...], tuple[tuple[Any, ...], float, dict[str, Any]]] = {}
        self.candle_ttl_s = candle_ttl_s
        self.candle_cache_count = candle_cache_count
        self.ticker_ttl_s = ticker_ttl_s
        self.orderbook_ttl_s = orderbook_ttl_s
        self.trade_ttl_s = trade_ttl_s
        self.version = 0

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._POLICY and getattr(self, name, None) != value:
            object.__setattr__(self, "version", self.version + 1)
            self._answers.clear()
        object.__setattr__(self, name, value)

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

    # -- trades ------------------------------------------------------------------------------
    def put_trades(self, sym: str, rows: list[dict[str, Any]], fetched_at: int, asked: int) -> None:
        """Keep the latest trades of ``sym`` (newest first) for ``trade_ttl_s``, if cached at all;
        fewer rows than ``asked`` were all the source had."""
        if self.trade_ttl_s > 0:
            self._trades[sym] = (time.monotonic() + self.trade_ttl_s, fetched_at, list(rows), len(rows) < asked)

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
        """``UpbitRouter.peek_cache`` for ``kind`` (lower case) and validated ``syms``: a new dict
        whose ``data`` list is the one of the previous peek while the entries it came from live."""
        key = (kind, tuple(syms), interval, count)
        memo = self._answers.get(key)
        if memo is not None:
            entries, expires, answer = memo
            if time.monotonic() < expires and all(
                self._entry(kind, syms, interval, i) is e for i, e in enumerate(entries)
            ):
                return {**answer, "metadata": dict(answer["metadata"])}
            del self._answers[key]
        built = self._build(kind, syms, interval, count)
        if built is None:
            return None
        entries = tuple(self._entry(kind, syms, interval, i) for i in range(len(syms)))
        if all(e is not None for e in entries):
            self._answers[key] = (entries, min(e[0] for e in entries), built)
        return {**built, "metadata": dict(built["metadata"])}

    def _entry(self, kind: str, syms: list[str], interval: Any, i: int) -> Any:
        """The entry a peek of ``kind`` read for ``syms[i]`` (identity tells a replaced one)."""
        if kind == "candle":
            return self._candles.get((syms[i], parse_timeframe(interval).name))
        if kind == "trade":
            return self._trades.get(syms[i])
        return self._snapshots[kind].get(syms[i]) if kind in self._snapshots else None

    def _build(self, kind: str, syms: list[str], interval: str | Timeframe | None, count: int) -> dict[str, Any] | None:
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
        elif kind == "trade":
            now = time.monotonic()
            data, fetched = [], []
            whole: dict[str, bool] = {}
            for s in syms:
                e = self._trades.get(s)
                if e is None or e[0] <= now or (len(e[2]) < int(count) and not e[3]):
                    return None
                data.extend(e[2][: int(count)])
                fetched.append(e[1])
                whole[s] = len(e[2]) < int(count)
            meta = {"exhausted": whole}
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
                "policy_version": self.version,
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
            "trade_ttl_s": self.trade_ttl_s,
            "version": self.version,
        }

    def clear(self) -> None:
        """Drop every entry."""
        self._candles.clear()
        self._trades.clear()
        self._answers.clear()
        for cache in self._snapshots.values():
            cache.clear()
