"""What :class:`~mds.testing.FakeUpbit` serves: the series and snapshots it holds, and Upbit's
quotation payloads built from them (candles, tickers, orderbooks, trades) in Upbit's field names.

The HTTP side (server, rate limits, faults, request log) is :mod:`mds.testing.fake_upbit`.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE, TRADE_DTYPE
from mds.errors import InvalidRequestError
from mds.symbols import validate_symbol
from mds.testing.generators import krw_tick_size
from mds.timeframes import DAY_MS, Timeframe, parse_timeframe
from mds.timeutil import iso_utc, now_ms, to_ms

_KST_MS = 9 * 3_600_000
_MINUTE_UNITS = (1, 3, 5, 10, 15, 30, 60, 240)
_PATH_TIMEFRAME = {"seconds": "1s", "days": "1d", "weeks": "1w", "months": "1M"}


class _NotFound(InvalidRequestError):
    pass


#: Names of a few markets, as ``/v1/market/all`` gives them; others get their currency code.
_NAMES = {
    "BTC": ("비트코인", "Bitcoin"),
    "ETH": ("이더리움", "Ethereum"),
    "XRP": ("엑스알피(리플)", "XRP"),
    "SOL": ("솔라나", "Solana"),
    "DOGE": ("도지코인", "Dogecoin"),
    "MED": ("메디블록", "Medibloc"),
    "GRS": ("그로스톨코인", "Groestlcoin"),
    "STRAX": ("스트라티스", "Stratis"),
    "LAMB": ("람다", "Lambda"),
}
#: The alert kinds of ``market_event.caution`` (all false: a fake market is never under an alert).
_CAUTIONS = (
    "PRICE_FLUCTUATIONS",
    "TRADING_VOLUME_SOARING",
    "DEPOSIT_AMOUNT_SOARING",
    "GLOBAL_PRICE_DIFFERENCES",
    "CONCENTRATION_OF_SMALL_ACCOUNTS",
)


def market_info(sym: str, details: bool) -> dict[str, Any]:
    """One entry of ``/v1/market/all``: ``market``, ``korean_name``, ``english_name`` and, with
    ``is_details=true``, ``market_warning`` (the older field) and ``market_event`` (the newer)."""
    base = sym.split("-", 1)[1]
    korean, english = _NAMES.get(base, (base, base))
    out: dict[str, Any] = {"market": sym, "korean_name": korean, "english_name": english}
    if details:
        out["market_warning"] = "NONE"
        out["market_event"] = {"warning": False, "caution": dict.fromkeys(_CAUTIONS, False)}
    return out


def _parse_to(value: str) -> int:
    """Upbit's ``to``: ``...Z``, ``YYYY-MM-DD HH:MM:SS`` (UTC) or with an offset (``+09:00``)."""
    text = value.strip()
    if not text:
        raise InvalidRequestError("empty to")
    return to_ms(text, name="to")


def _int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise InvalidRequestError(f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise InvalidRequestError(f"{name} must be in {lo}..{hi}")
    return v


class Quotation:
    """The candles, tickers, orderbooks and trades of a :class:`~mds.testing.FakeUpbit`, and the
    payload of each quotation endpoint (:meth:`route`).

    Parameters are those of FakeUpbit (``candles``, ``clock``, ``tickers``, ``orderbooks``,
    ``trades``). Thread-safe: the data may change while requests are answered.
    """

    def __init__(
        self,
        candles: Mapping[tuple[str, str], np.ndarray] | None,
        clock: Callable[[], int] | None,
        tickers: Mapping[str, Mapping[str, Any]] | None,
        orderbooks: Mapping[str, Mapping[str, Any]] | None,
        trades: Mapping[str, np.ndarray] | None,
    ) -> None:
        self.clock = clock
        self._lock = threading.RLock()
        self._candles: dict[tuple[str, str], np.ndarray] = {}
        for (sym, tf), arr in (candles or {}).items():
            self.set_candles(sym, tf, arr)
        self._tickers = {validate_symbol(k): dict(v) for k, v in (tickers or {}).items()}
        self._orderbooks = {validate_symbol(k): dict(v) for k, v in (orderbooks or {}).items()}
        self._trades: dict[str, np.ndarray] = {}
        for sym, arr in (trades or {}).items():
            a = np.asarray(arr)
            if a.dtype != TRADE_DTYPE:
                raise InvalidRequestError("trades must be TRADE_DTYPE arrays")
            self._trades[validate_symbol(sym)] = np.sort(a.copy(), order="ts", kind="stable")

    # -- data ------------------------------------------------------------------------------
    def set_candles(self, symbol: str, timeframe: str | Timeframe, candles: np.ndarray) -> None:
        """Replace the series ``(symbol, timeframe)`` with ``candles`` (sorted, last duplicate wins)."""
        sym = validate_symbol(symbol)
        tf = parse_timeframe(timeframe)
        arr = np.asarray(candles)
        if arr.dtype != CANDLE_DTYPE:
            raise InvalidRequestError("candles must be a CANDLE_DTYPE array")
        arr = arr[::-1]
        _, first = np.unique(arr["ts"], return_index=True)  # first in reversed = last given
        clean = np.ascontiguousarray(arr[first])
        with self._lock:
            self._candles[(sym, tf.name)] = clean

    def candles(self, symbol: str, timeframe: str | Timeframe) -> np.ndarray:
        """The full series held (ascending ``ts``), regardless of the clock."""
        tf = parse_timeframe(timeframe)
        with self._lock:
            return self._candles.get((symbol, tf.name), np.zeros(0, dtype=CANDLE_DTYPE)).copy()

    def now(self) -> int:
        """The fake's time: ``clock()`` or the wall clock."""
        return int(self.clock()) if self.clock is not None else now_ms()

    # -- dispatch ----------------------------------------------------------------------------
    def route(self, path: str, params: dict[str, str]) -> tuple[int, Any]:
        """``(HTTP status, payload)`` of a quotation request; raises InvalidRequestError for a bad
        parameter (400) and ``_NotFound`` for an unknown market (404)."""
        if path.startswith("/v1/candles/"):
            return self._candles_endpoint(path[len("/v1/candles/") :], params)
        if path == "/v1/market/all":
            details = params.get("is_details", params.get("isDetails", "false")).lower() == "true"
            return 200, [market_info(s, details) for s in self.markets()]
        if path == "/v1/ticker":
            return 200, [self._ticker(s) for s in self._markets_param(params)]
        if path == "/v1/ticker/all":
            quotes = params.get("quote_currencies")
            if not quotes:
                raise InvalidRequestError("quote_currencies is required")
            wanted = {q.strip() for q in quotes.split(",") if q.strip()}
            return 200, [self._ticker(s) for s in self.markets() if s.split("-", 1)[0] in wanted]
        if path == "/v1/orderbook":
            count = _int_param(params, "count", 30, 1, 30)
            return 200, [self._orderbook(s, count) for s in self._markets_param(params)]
        if path == "/v1/trades/ticks":
            sym = self._market_param(params)
            count = _int_param(params, "count", 1, 1, 500)
            return 200, self._trades_for(sym, count)
        return 404, f"Not found: {path}"

    def markets(self) -> list[str]:
        """Every market held (candles, tickers, orderbooks or trades), sorted."""
        with self._lock:
            names = {k[0] for k in self._candles} | set(self._tickers) | set(self._orderbooks) | set(self._trades)
        return sorted(names)

    def _known(self, sym: str) -> bool:
        with self._lock:
            return (
                any(k[0] == sym for k in self._candles)
                or sym in self._tickers
                or sym in self._orderbooks
                or sym in self._trades
            )

    def _market_param(self, params: dict[str, str]) -> str:
        sym = params.get("market")
        if not sym:
            raise InvalidRequestError("market is required")
        if not self._known(sym):
            raise _NotFound("Code not found")
        return sym

    def _markets_param(self, params: dict[str, str]) -> list[str]:
        raw = params.get("markets")
        if not raw:
            raise InvalidRequestError("markets is required")
        syms = [s.strip() for s in raw.split(",") if s.strip()]
        if not syms or any(not self._known(s) for s in syms):
            raise _NotFound("Code not found")
        return syms

    # -- candles -------------------------------------------------------------------------------
    def _visible(self, sym: str, tf: Timeframe, to: int | None) -> tuple[np.ndarray, int | None]:
        """Candles with ts < to that opened by now; and the forming candle's index (or None)."""
        with self._lock:
            arr = self._candles.get((sym, tf.name))
        if arr is None or len(arr) == 0:
            return np.zeros(0, dtype=CANDLE_DTYPE), None
        bound = to if to is not None else None
        now = self.now() if self.clock is not None else None
        if now is not None:
            bound = now + 1 if bound is None else min(bound, now + 1)
        hi = len(arr) if bound is None else int(np.searchsorted(arr["ts"], bound, side="left"))
        vis = arr[:hi]
        forming = None
        if now is not None and hi > 0 and now < tf.add(int(vis["ts"][-1]), 1):
            forming = hi - 1
        return vis, forming

    def _partial(self, row: np.void, tf: Timeframe, now: int) -> np.ndarray:
        ts = int(row["ts"])
        span = tf.add(ts, 1) - ts
        share = min(1.0, max(0.0, (now - ts + 1) / span))
        out = np.array([row], dtype=CANDLE_DTYPE)[0]
        o, c = float(row["open"]), float(row["close"])
        c2 = o + (c - o) * share
        out["close"] = c2
        out["high"] = max(o, c2) + (float(row["high"]) - max(o, c)) * share
        out["low"] = min(o, c2) - (min(o, c) - float(row["low"])) * share
        out["volume"] = float(row["volume"]) * share
        out["value"] = float(row["value"]) * share
        return out

    def _candles_endpoint(self, sub: str, params: dict[str, str]) -> tuple[int, Any]:
        if sub.startswith("minutes/"):
            try:
                unit = int(sub[len("minutes/") :])
            except ValueError:
                return 404, f"Not found: minutes unit {sub!r}"
            if unit not in _MINUTE_UNITS:
                raise InvalidRequestError(f"unit must be one of {_MINUTE_UNITS}")
            tf = parse_timeframe(f"{unit}m")
        elif sub in _PATH_TIMEFRAME:
            tf = parse_timeframe(_PATH_TIMEFRAME[sub])
        else:
            return 404, f"Not found: /v1/candles/{sub}"
        sym = self._market_param(params)
        count = _int_param(params, "count", 1, 1, 200)
        to = _parse_to(params["to"]) if "to" in params else None
        vis, forming = self._visible(sym, tf, to)
        if len(vis) == 0:
            return 200, []
        lo = max(0, len(vis) - count)
        page = vis[lo:][::-1].copy()
        now = self.now()
        if forming is not None and forming >= lo:
            page[0] = self._partial(page[0], tf, now)
        return 200, self._candle_rows(sym, tf, page, vis, lo, now if forming is not None else None)

    def _candle_rows(
        self, sym: str, tf: Timeframe, page: np.ndarray, vis: np.ndarray, lo: int, now: int | None
    ) -> list[dict[str, Any]]:
        ts = page["ts"].astype(np.int64)
        nxt = np.asarray([tf.add(int(t), 1) for t in ts], dtype=np.int64) if tf.is_month else ts + tf.interval_ms
        last_tick = ts + (nxt - ts) * 9 // 10
        if now is not None and len(ts):
            last_tick[0] = min(int(last_tick[0]), now)
        utc = np.datetime_as_string(ts.astype("datetime64[ms]").astype("datetime64[s]")).tolist()
        kst = np.datetime_as_string((ts + _KST_MS).astype("datetime64[ms]").astype("datetime64[s]")).tolist()
        rows: list[dict[str, Any]] = []
        # Previous closes for day candles: the candle before each row in the held series.
        prev = None
        if tf.name == "1d":
            closes = vis["close"]
            pos = np.arange(len(vis) - 1, lo - 1, -1)
            prev = np.where(pos > 0, closes[np.maximum(pos - 1, 0)], vis["open"][pos])
        for i in range(len(page)):
            r = page[i]
            row: dict[str, Any] = {
                "market": sym,
                "candle_date_time_utc": utc[i],
                "candle_date_time_kst": kst[i],
                "opening_price": float(r["open"]),
                "high_price": float(r["high"]),
                "low_price": float(r["low"]),
                "trade_price": float(r["close"]),
                "timestamp": int(last_tick[i]),
                "candle_acc_trade_price": float(r["value"]),
                "candle_acc_trade_volume": float(r["volume"]),
            }
            if tf.minutes_unit is not None:
                row["unit"] = tf.minutes_unit
            elif prev is not None:
                pc = float(prev[i])
                row["prev_closing_price"] = pc
                row["change_price"] = float(r["close"]) - pc
                row["change_rate"] = (float(r["close"]) - pc) / pc if pc else 0.0
            elif tf.name in ("1w", "1M"):
                row["first_day_of_period"] = utc[i][:10]
            rows.append(row)
        return rows

    # -- realtime --------------------------------------------------------------------------------
    def _finest(self, sym: str) -> tuple[np.ndarray, Timeframe] | None:
        with self._lock:
            keys = [k for k in self._candles if k[0] == sym and len(self._candles[k])]
        if not keys:
            return None
        tfs = sorted((parse_timeframe(k[1]) for k in keys), key=lambda t: t.interval_ms)
        for tf in tfs:
            vis, forming = self._visible(sym, tf, None)
            if len(vis):
                if forming is not None:
                    vis = vis.copy()
                    vis[-1] = self._partial(vis[-1], tf, self.now())
                return vis, tf
        return None

    def _ticker(self, sym: str) -> dict[str, Any]:
        if sym in self._tickers:
            return dict(self._tickers[sym])
        now = self.now()
        found = self._finest(sym)
        if found is None:
            raise _NotFound("Code not found")
        vis, tf = found
        last = vis[-1]
        day0 = int(last["ts"]) - int(last["ts"]) % DAY_MS
        today = vis[vis["ts"] >= day0]
        before = vis[vis["ts"] < day0]
        day24 = vis[vis["ts"] >= int(last["ts"]) - DAY_MS + tf.interval_ms]
        year = vis[vis["ts"] >= int(last["ts"]) - 364 * DAY_MS]
        price = float(last["close"])
        prev_close = float(before["close"][-1]) if len(before) else float(today["open"][0])
        change = price - prev_close
        trade_ts = min(now, tf.add(int(last["ts"]), 1) - 1)
        tdt = _dt.datetime.fromtimestamp(trade_ts / 1000, tz=_dt.timezone.utc)
        kdt = tdt + _dt.timedelta(hours=9)
        hi_i, lo_i = int(np.argmax(year["high"])), int(np.argmin(year["low"]))
        return {
            "market": sym,
            "trade_date": tdt.strftime("%Y%m%d"),
            "trade_time": tdt.strftime("%H%M%S"),
            "trade_date_kst": kdt.strftime("%Y%m%d"),
            "trade_time_kst": kdt.strftime("%H%M%S"),
            "trade_timestamp": trade_ts,
            "opening_price": float(today["open"][0]),
            "high_price": float(today["high"].max()),
            "low_price": float(today["low"].min()),
            "trade_price": price,
            "prev_closing_price": prev_close,
            "change": "RISE" if change > 0 else ("FALL" if change < 0 else "EVEN"),
            "change_price": abs(change),
            "change_rate": abs(change) / prev_close if prev_close else 0.0,
            "signed_change_price": change,
            "signed_change_rate": change / prev_close if prev_close else 0.0,
            "trade_volume": round(float(last["volume"]) / 7.0, 8),
            "acc_trade_price": float(today["value"].sum()),
            "acc_trade_price_24h": float(day24["value"].sum()),
            "acc_trade_volume": float(today["volume"].sum()),
            "acc_trade_volume_24h": float(day24["volume"].sum()),
            "highest_52_week_price": float(year["high"][hi_i]),
            "highest_52_week_date": iso_utc(int(year["ts"][hi_i]))[:10],
            "lowest_52_week_price": float(year["low"][lo_i]),
            "lowest_52_week_date": iso_utc(int(year["ts"][lo_i]))[:10],
            "timestamp": now,
        }

    def _orderbook(self, sym: str, count: int) -> dict[str, Any]:
        if sym in self._orderbooks:
            return dict(self._orderbooks[sym])
        now = self.now()
        found = self._finest(sym)
        if found is None:
            raise _NotFound("Code not found")
        price = float(found[0]["close"][-1])
        quote = sym.split("-", 1)[0]
        tick = float(krw_tick_size(price)) if quote == "KRW" else max(1e-8, round(price * 1e-4, 8))
        best_bid = math.floor(price / tick) * tick
        rng = np.random.default_rng([zlib.crc32(sym.encode()), now // 1000 & 0xFFFFFFFF])
        asks = np.round(rng.lognormal(-1.0, 1.0, count), 8)
        bids = np.round(rng.lognormal(-1.0, 1.0, count), 8)
        units = [
            {
                "ask_price": round(best_bid + tick * (i + 1), 8),
                "bid_price": round(best_bid - tick * i, 8),
                "ask_size": float(asks[i]),
                "bid_size": float(bids[i]),
            }
            for i in range(count)
        ]
        return {
            "market": sym,
            "timestamp": now,
            "total_ask_size": round(float(asks.sum()), 8),
            "total_bid_size": round(float(bids.sum()), 8),
            "orderbook_units": units,
            "level": 0,
        }

    def _trades_for(self, sym: str, count: int) -> list[dict[str, Any]]:
        now = self.now()
        with self._lock:
            arr = self._trades.get(sym)
        if arr is None:
            found = self._finest(sym)
            if found is None:
                return []
            arr = _trades_from_candle(found[0][-1], found[1], now)
        elif self.clock is not None:
            arr = arr[arr["ts"] <= now]
        rows = arr[::-1][:count]
        prev_close = float(rows["price"][-1]) if len(rows) else 0.0
        out = []
        for t in rows:
            tdt = _dt.datetime.fromtimestamp(int(t["ts"]) / 1000, tz=_dt.timezone.utc)
            out.append(
                {
                    "market": sym,
                    "trade_date_utc": tdt.strftime("%Y-%m-%d"),
                    "trade_time_utc": tdt.strftime("%H:%M:%S"),
                    "timestamp": int(t["ts"]),
                    "trade_price": float(t["price"]),
                    "trade_volume": float(t["volume"]),
                    "prev_closing_price": prev_close,
                    "change_price": float(t["price"]) - prev_close,
                    "ask_bid": "BID" if int(t["side"]) > 0 else "ASK",
                    "sequential_id": int(t["sequential_id"]),
                }
            )
        return out


def _trades_from_candle(row: np.void, tf: Timeframe, now: int) -> np.ndarray:
    ts = int(row["ts"])
    end = min(now, tf.add(ts, 1) - 1)
    n = 20
    rng = np.random.default_rng([ts & 0xFFFFFFFF, 7])
    out = np.zeros(n, dtype=TRADE_DTYPE)
    out["ts"] = np.sort(rng.integers(ts, max(ts + 1, end + 1), n))
    lo, hi = float(row["low"]), float(row["high"])
    prices = lo + (hi - lo) * rng.random(n)
    out["price"] = np.clip(np.round(prices / krw_tick_size(prices)) * krw_tick_size(prices), lo, hi)
    out["price"][-1] = float(row["close"])
    out["volume"] = np.round(max(float(row["volume"]), 1e-8) / n * rng.random(n) * 2, 8)
    out["side"] = np.where(rng.random(n) < 0.5, 1, -1)
    out["sequential_id"] = out["ts"] * 1000 + np.arange(n)
    return out
