"""Realtime cache: latest ticker and orderbook per symbol, their recent history, and trades.

Memory only; nothing here is ever written to disk (DESIGN.md sections 1, 2 and 4).

Upbit sends the same data in three shapes: REST responses (``market``), WebSocket messages in
DEFAULT format (``type``, ``code``) and in SIMPLE format (abbreviated keys: ``ty``, ``cd``, ``tp``
...). Every message is normalised on the way in to one shape, the REST one: ``market`` names the
symbol, every other field carries its DEFAULT (= REST) name, and the WebSocket ``type`` is dropped
(``stream_type`` is kept when present). Field names follow ../shared/UPBIT_API.md section 6.

Bounds
------
- Tickers and orderbooks: per symbol the latest snapshot plus a history bounded by a count
  (``history_max``) and by the TTL of its kind, measured with the cache's clock at receipt.
- Trades: per symbol a TRADE_DTYPE ring of the newest ``trades_capacity`` trades, sorted by
  ``(ts, sequential_id)`` and deduplicated on ``sequential_id`` (unique, not ordered, per Upbit).
- A symbol whose kind has not been put within its TTL is evicted, so memory stays bounded by
  the number of symbols that are live.

Snapshot semantics: dicts handed out are fresh copies, and trade arrays are read-only views of
rows that are never written again (new rows go to fresh slots or a fresh buffer).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mds._dtypes import TRADE_DTYPE
from mds.errors import InvalidRequestError
from mds.symbols import validate_symbol
from mds.timeutil import Clock, now_ms

__all__ = ["RealtimeCache"]

log = logging.getLogger(__name__)

# -- field names --------------------------------------------------------------------------------
# SIMPLE key -> DEFAULT key, per data type (the same SIMPLE key can mean different fields:
# ``td`` is a trade's date, a ticker's is ``tdt``).
_COMMON_SIMPLE = {"ty": "type", "cd": "code", "tms": "timestamp", "st": "stream_type"}
TICKER_SIMPLE: dict[str, str] = {
    **_COMMON_SIMPLE,
    "op": "opening_price",
    "hp": "high_price",
    "lp": "low_price",
    "tp": "trade_price",
    "pcp": "prev_closing_price",
    "c": "change",
    "cp": "change_price",
    "scp": "signed_change_price",
    "cr": "change_rate",
    "scr": "signed_change_rate",
    "tv": "trade_volume",
    "atv": "acc_trade_volume",
    "atv24h": "acc_trade_volume_24h",
    "atp": "acc_trade_price",
    "atp24h": "acc_trade_price_24h",
    "tdt": "trade_date",
    "ttm": "trade_time",
    "ttms": "trade_timestamp",
    "ab": "ask_bid",
    "aav": "acc_ask_volume",
    "abv": "acc_bid_volume",
    "h52wp": "highest_52_week_price",
    "h52wdt": "highest_52_week_date",
    "l52wp": "lowest_52_week_price",
    "l52wdt": "lowest_52_week_date",
    "ts": "trade_status",
    "ms": "market_state",
    "msfi": "market_state_for_ios",
    "its": "is_trading_suspended",
    "dd": "delisting_date",
    "mw": "market_warning",
}
TRADE_SIMPLE: dict[str, str] = {
    **_COMMON_SIMPLE,
    "tp": "trade_price",
    "tv": "trade_volume",
    "ab": "ask_bid",
    "pcp": "prev_closing_price",
    "c": "change",
    "cp": "change_price",
    "td": "trade_date",
    "ttm": "trade_time",
    "ttms": "trade_timestamp",
    "sid": "sequential_id",
    "bap": "best_ask_price",
    "bas": "best_ask_size",
    "bbp": "best_bid_price",
    "bbs": "best_bid_size",
}
ORDERBOOK_SIMPLE: dict[str, str] = {
    **_COMMON_SIMPLE,
    "tas": "total_ask_size",
    "tbs": "total_bid_size",
    "obu": "orderbook_units",
    "lv": "level",
}
UNIT_FIELDS = ("ask_price", "bid_price", "ask_size", "bid_size")
UNIT_SIMPLE = {"ap": "ask_price", "bp": "bid_price", "as": "ask_size", "bs": "bid_size"}

#: Fields a ticker must carry (in REST and both WebSocket formats) to be accepted.
TICKER_REQUIRED = frozenset(
    {
        "market",
        "opening_price",
        "high_price",
        "low_price",
        "trade_price",
        "prev_closing_price",
        "change",
        "trade_volume",
        "acc_trade_volume",
        "acc_trade_price",
        "trade_timestamp",
        "timestamp",
    }
)
ORDERBOOK_REQUIRED = frozenset({"market", "timestamp", "total_ask_size", "total_bid_size", "orderbook_units"})

_NUMBER = (int, float)
_SIDES = {"BID": 1, "ASK": -1}
_EMPTY_TRADES = np.zeros(0, dtype=TRADE_DTYPE)
_EMPTY_TRADES.flags.writeable = False


def _is_number(v: object) -> bool:
    t = type(v)
    if t is float or t is int:
        return True
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _normalise(msg: object, kind: str, simple: Mapping[str, str]) -> dict[str, Any]:
    """One message in REST shape (``market``, DEFAULT names, no ``type``); a new dict."""
    if not isinstance(msg, dict):
        if not isinstance(msg, Mapping):
            raise InvalidRequestError(f"a {kind} must be a dict in Upbit field names, got {type(msg).__name__}")
        msg = dict(msg)
    if "ty" in msg:  # WebSocket SIMPLE
        if msg["ty"] != kind:
            raise InvalidRequestError(f"expected a {kind} message, got type {msg['ty']!r}")
        out = {simple.get(k, k): v for k, v in msg.items()}
    elif "type" in msg:  # WebSocket DEFAULT
        if msg["type"] != kind:
            raise InvalidRequestError(f"expected a {kind} message, got type {msg['type']!r}")
        out = dict(msg)
    else:  # REST
        return dict(msg)
    del out["type"]
    if "code" in out:
        out["market"] = out.pop("code")
    return out


def _as_int(v: object) -> int:
    """``v`` as an int; integral floats and digit strings pass, anything else is a ValueError."""
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(v)
    if isinstance(v, bool):
        raise TypeError(v)
    return int(v)  # type: ignore[call-overload]


def _missing(d: Mapping[str, Any], required: frozenset[str], kind: str) -> None:
    if not required <= d.keys():
        missing = sorted(required - d.keys())
        raise InvalidRequestError(f"{kind} message lacks the field(s) {', '.join(missing)}")


class _Snapshots:
    """Latest snapshot of one symbol and its history, oldest first."""

    __slots__ = ("history", "latest", "touched")

    def __init__(self, maxlen: int) -> None:
        self.history: deque[tuple[int, Any]] = deque(maxlen=maxlen)
        self.latest: Any = None
        self.touched = 0

    def trim(self, cutoff: int) -> None:
        h = self.history
        while h and h[0][0] < cutoff:
            h.popleft()


class _TradeRing:
    """Newest ``capacity`` trades of one symbol, sorted by ``(ts, sequential_id)``.

    Rows ``buf[lo:hi]`` are live. New rows that sort after the last one are appended in place;
    rows already handed out are never written again. When the slack runs out, or a batch has to
    be merged in the middle, the live rows move to a fresh buffer (old views keep the old one).
    ``sids`` is a sorted index of the sequential ids of ``buf[lo:indexed]``; rows after
    ``indexed`` are searched linearly until the tail grows past ``_TAIL`` rows.
    """

    __slots__ = ("buf", "capacity", "hi", "indexed", "lo", "sids", "touched", "ts")
    _TAIL = 256

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buf = np.zeros(0, dtype=TRADE_DTYPE)
        self.ts = np.zeros(0, dtype=np.int64)  # contiguous mirror of buf["ts"] for searchsorted
        self.sids = np.zeros(0, dtype=np.int64)
        self.lo = self.hi = self.indexed = 0
        self.touched = 0

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes + self.ts.nbytes + self.sids.nbytes

    def _alloc(self, rows: np.ndarray) -> None:
        """Move ``rows`` (sorted, at most ``capacity``) to a fresh buffer with slack."""
        size = self.capacity + max(self.capacity // 2, 16)
        buf = np.zeros(size, dtype=TRADE_DTYPE)
        n = len(rows)
        buf[:n] = rows
        ts = np.zeros(size, dtype=np.int64)
        ts[:n] = rows["ts"]
        self.buf, self.ts, self.lo, self.hi = buf, ts, 0, n
        self._reindex()

    def _reindex(self) -> None:
        self.sids = np.sort(self.buf["sequential_id"][self.lo : self.hi])
        self.indexed = self.hi

    def fresh(self, batch: np.ndarray) -> np.ndarray:
        """The rows of ``batch`` (sorted, unique sids) whose sequential id is not held yet."""
        sid = batch["sequential_id"]
        keep = np.ones(len(batch), dtype=bool)
        if len(self.sids):
            pos = np.searchsorted(self.sids, sid)
            np.minimum(pos, len(self.sids) - 1, out=pos)
            keep &= self.sids[pos] != sid
        if self.indexed < self.hi:
            keep &= ~np.isin(sid, self.buf["sequential_id"][self.indexed : self.hi])
        return batch if keep.all() else batch[keep]

    def add(self, rows: np.ndarray) -> int:
        """Add ``rows`` (sorted by ``(ts, sequential_id)``, sids new), trim to capacity.

        Returns how many of ``rows`` are held afterwards (older ones fall out at once).
        """
        hi, lo = self.hi, self.lo
        if hi - lo >= self.capacity:
            # Full: rows older than the oldest held would be trimmed again at once.
            head = self.buf[lo]
            h_ts, h_sid = int(head["ts"]), int(head["sequential_id"])
            r_ts, r_sid = rows["ts"], rows["sequential_id"]
            keep = (r_ts > h_ts) | ((r_ts == h_ts) & (r_sid > h_sid))
            if not keep.all():
                rows = rows[keep]
        k = len(rows)
        if k == 0:
            return 0
        last = self.buf[hi - 1] if hi > lo else None
        first = rows[0]
        in_order = last is None or (int(first["ts"]), int(first["sequential_id"])) > (
            int(last["ts"]),
            int(last["sequential_id"]),
        )
        if in_order and hi + k <= len(self.buf):
            self.buf[hi : hi + k] = rows
            self.ts[hi : hi + k] = rows["ts"]
            self.hi = hi + k
            if self.hi - self.lo > self.capacity:
                self.lo = self.hi - self.capacity
            if self.hi - self.indexed > self._TAIL:
                self._reindex()
            return min(k, self.capacity)
        live = self.buf[lo:hi]
        merged = np.concatenate([live, rows])
        is_new = np.concatenate([np.zeros(len(live), dtype=bool), np.ones(k, dtype=bool)])
        if not in_order:
            order = np.lexsort((merged["sequential_id"], merged["ts"]))
            merged, is_new = merged[order], is_new[order]
        self._alloc(merged[-self.capacity :])
        return int(is_new[-self.capacity :].sum())

    def view(self, count: int | None, since: int | None) -> np.ndarray:
        lo, hi = self.lo, self.hi
        if since is not None:
            lo += int(np.searchsorted(self.ts[lo:hi], since, side="left"))
            if count is not None:
                hi = min(hi, lo + count)
        elif count is not None:
            lo = max(lo, hi - count)
        out = self.buf[lo:hi]
        out.flags.writeable = False
        return out


class RealtimeCache:
    """Latest ticker and orderbook per symbol with a bounded history, and trades per symbol.

    Parameters
    ----------
    ticker_ttl_ms : int
        How long a ticker snapshot is kept (history) and how long a symbol without a new ticker
        stays in the cache. Default one hour.
    orderbook_ttl_ms : int
        The same for orderbooks. Default 30 minutes.
    history_max : int
        Most snapshots kept per symbol and kind, the latest included. Default 256. Measured with
        tracemalloc: a ticker snapshot takes about 1 KB, so at most ~0.25 MB per symbol. An orderbook
        with 30 levels takes about 1.7 KB, because its levels are held as one float64 array.
    trades_capacity : int
        Most trades kept per symbol (the newest by ``(ts, sequential_id)``). Default 10,000
        (about 0.6 MB per symbol with the buffer slack and indexes).
    trades_ttl_ms : int, optional
        How long a symbol without new trades stays in the cache; defaults to ``ticker_ttl_ms``.
    clock : callable, optional
        Returns epoch ms; every TTL is measured with it at receipt. Default: the wall clock.

    Notes
    -----
    Not thread-safe: one writer at a time (the store serialises access). Every ``put_*`` checks
    the whole payload before it changes anything, so a rejected payload leaves the cache as it
    was.
    """

    def __init__(
        self,
        *,
        ticker_ttl_ms: int = 3_600_000,
        orderbook_ttl_ms: int = 1_800_000,
        history_max: int = 256,
        trades_capacity: int = 10_000,
        trades_ttl_ms: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        for name, v in (
            ("ticker_ttl_ms", ticker_ttl_ms),
            ("orderbook_ttl_ms", orderbook_ttl_ms),
            ("history_max", history_max),
            ("trades_capacity", trades_capacity),
            ("trades_ttl_ms", ticker_ttl_ms if trades_ttl_ms is None else trades_ttl_ms),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidRequestError(f"RealtimeCache {name} must be a positive int, not {v!r}")
        self._ticker_ttl = ticker_ttl_ms
        self._orderbook_ttl = orderbook_ttl_ms
        self._trades_ttl = ticker_ttl_ms if trades_ttl_ms is None else trades_ttl_ms
        self._history_max = history_max
        self._trades_capacity = trades_capacity
        self._clock: Clock = clock or now_ms
        # Insertion order = order of last put, so expiry only ever looks at the front.
        self._tickers: OrderedDict[str, _Snapshots] = OrderedDict()
        self._orderbooks: OrderedDict[str, _Snapshots] = OrderedDict()
        self._trades: OrderedDict[str, _TradeRing] = OrderedDict()
        self._next_expiry = [0, 0, 0]  # earliest clock value at which anything can expire, per kind
        self._counts = {"puts": 0, "rejected": 0, "hits": 0, "misses": 0, "evicted_symbols": 0, "duplicates": 0}

    # -- housekeeping -----------------------------------------------------------------------------
    def _expire(self, table: OrderedDict[str, Any], kind: int, ttl: int, now: int) -> None:
        if now < self._next_expiry[kind]:
            return
        while table:
            sym, entry = next(iter(table.items()))
            if now - entry.touched <= ttl:
                self._next_expiry[kind] = entry.touched + ttl + 1
                return
            del table[sym]
            self._counts["evicted_symbols"] += 1
            log.debug("realtime: evicted %s after %d ms without an update", sym, now - entry.touched)
        self._next_expiry[kind] = now + ttl + 1

    def expire(self) -> None:
        """Drop every symbol (per kind) not updated within its TTL; puts and reads do this lazily."""
        now = self._clock()
        self._expire(self._tickers, 0, self._ticker_ttl, now)
        self._expire(self._orderbooks, 1, self._orderbook_ttl, now)
        self._expire(self._trades, 2, self._trades_ttl, now)

    def _store(self, table: OrderedDict[str, _Snapshots], kind: int, ttl: int, items: list[tuple[str, Any]]) -> None:
        now = self._clock()
        for sym, snap in items:
            entry = table.get(sym)
            if entry is None:
                entry = table[sym] = _Snapshots(self._history_max)
            else:
                table.move_to_end(sym)
            entry.latest = snap
            entry.touched = now
            entry.history.append((now, snap))
            if entry.history[0][0] < now - ttl:
                entry.trim(now - ttl)
        self._counts["puts"] += len(items)
        self._expire(table, kind, ttl, now)

    def _get(self, table: OrderedDict[str, _Snapshots], ttl: int, symbol: str) -> _Snapshots | None:
        entry = table.get(symbol)
        if entry is None:
            validate_symbol(symbol)
            self._counts["misses"] += 1
            return None
        if self._clock() - entry.touched > ttl:
            self._counts["misses"] += 1
            return None
        self._counts["hits"] += 1
        return entry

    # -- tickers ------------------------------------------------------------------------------------
    def put_ticker(self, msg: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> int:
        """Store one ticker, or a REST ``/v1/ticker`` response (a list of them).

        Parameters
        ----------
        msg
            A REST ticker dict, a WebSocket ``ticker`` message in DEFAULT or SIMPLE format, or a
            list of such dicts (stored all or nothing).

        Returns
        -------
        int
            The number of tickers stored.

        Raises
        ------
        InvalidRequestError
            A message of another data type, one that lacks a required field (``market`` or
            ``code``, prices, volumes, ``trade_timestamp``, ``timestamp``), a non-numeric
            ``trade_price`` or ``timestamp``, or a bad market code. Nothing is stored then.
        """
        try:
            msgs = [msg] if isinstance(msg, Mapping) else list(msg)
            items = [self._ticker_item(m) for m in msgs]
        except InvalidRequestError:
            self._counts["rejected"] += 1
            raise
        except TypeError:
            self._counts["rejected"] += 1
            raise InvalidRequestError("put_ticker takes a ticker dict or a list of them") from None
        self._store(self._tickers, 0, self._ticker_ttl, items)
        return len(items)

    def _ticker_item(self, msg: Any) -> tuple[str, dict[str, Any]]:
        d = _normalise(msg, "ticker", TICKER_SIMPLE)
        _missing(d, TICKER_REQUIRED, "ticker")
        if not (_is_number(d["trade_price"]) and _is_number(d["timestamp"])):
            raise InvalidRequestError("ticker trade_price and timestamp must be numbers")
        if not (math.isfinite(d["trade_price"]) and d["trade_price"] > 0):
            raise InvalidRequestError(f"ticker trade_price must be a finite price > 0, not {d['trade_price']!r}")
        sym = d["market"]
        if sym not in self._tickers:
            validate_symbol(sym)
        return sym, d

    @property
    def duplicates(self) -> int:
        """Trades offered to :meth:`put_trades` so far that were already held (same
        ``sequential_id``), in all."""
        return self._counts["duplicates"]

    def checked(self, kind: str, msg: Any) -> dict[str, Any]:
        """What :meth:`ticker` (``kind="ticker"``) or :meth:`orderbook` (``"orderbook"``) would
        answer for ``msg`` once put, without keeping it: the same checks, a new object that
        shares nothing with ``msg``.

        Raises
        ------
        InvalidRequestError
            As :meth:`put_ticker` / :meth:`put_orderbook`.
        """
        if kind == "ticker":
            return self._ticker_item(msg)[1].copy()
        if kind == "orderbook":
            return self._orderbook_out(self._orderbook_item(msg)[1])
        raise InvalidRequestError(f"checked() takes 'ticker' or 'orderbook', not {kind!r}")

    def set_ttls(self, *, ticker_ms: int, orderbook_ms: int, trades_ms: int) -> None:
        """Keep tickers, orderbooks and trades this long from now on (ms, each > 0)."""
        for name, v in (("ticker_ms", ticker_ms), ("orderbook_ms", orderbook_ms), ("trades_ms", trades_ms)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidRequestError(f"{name} must be a positive int, not {v!r}")
        self._ticker_ttl, self._orderbook_ttl, self._trades_ttl = ticker_ms, orderbook_ms, trades_ms
        self._next_expiry = [0, 0, 0]

    def ticker(self, symbol: str) -> dict[str, Any] | None:
        """The latest ticker of ``symbol`` in REST field names (a copy), or None.

        None when no ticker was put for it within ``ticker_ttl_ms``.
        """
        entry = self._get(self._tickers, self._ticker_ttl, symbol)
        return None if entry is None else entry.latest.copy()

    def ticker_history(self, symbol: str, since: int | None = None) -> list[dict[str, Any]]:
        """Ticker snapshots of ``symbol`` received within the TTL, oldest first (copies).

        Parameters
        ----------
        since : int, optional
            Only snapshots whose ``timestamp`` (Upbit's, epoch ms) is at least ``since``.
        """
        return self._history(self._tickers, self._ticker_ttl, symbol, since, dict.copy)

    def _history(
        self, table: OrderedDict[str, _Snapshots], ttl: int, symbol: str, since: int | None, out: Any
    ) -> list[Any]:
        entry = self._get(table, ttl, symbol)
        if entry is None:
            return []
        entry.trim(self._clock() - ttl)
        snaps = [s for _, s in entry.history]
        if since is not None:
            since = int(since)
            snaps = [s for s in snaps if s["timestamp"] >= since]
        return [out(s) for s in snaps]

    # -- orderbooks ---------------------------------------------------------------------------------
    def put_orderbook(self, msg: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> int:
        """Store one orderbook snapshot, or a REST ``/v1/orderbook`` response (a list of them).

        Every message is a full snapshot of the top levels (Upbit sends all levels each time).
        The levels are held as a float64 array; reads rebuild ``orderbook_units`` dicts.

        Returns
        -------
        int
            The number of orderbooks stored.

        Raises
        ------
        InvalidRequestError
            Another data type, a missing field (``market``/``code``, ``timestamp``,
            ``total_ask_size``, ``total_bid_size``, ``orderbook_units`` and the four fields of
            each unit), a non-numeric level, or a bad market code. Nothing is stored then.
        """
        try:
            msgs = [msg] if isinstance(msg, Mapping) else list(msg)
            items = [self._orderbook_item(m) for m in msgs]
        except InvalidRequestError:
            self._counts["rejected"] += 1
            raise
        except TypeError:
            self._counts["rejected"] += 1
            raise InvalidRequestError("put_orderbook takes an orderbook dict or a list of them") from None
        self._store(self._orderbooks, 1, self._orderbook_ttl, items)
        return len(items)

    def _orderbook_item(self, msg: Any) -> tuple[str, dict[str, Any]]:
        d = _normalise(msg, "orderbook", ORDERBOOK_SIMPLE)
        _missing(d, ORDERBOOK_REQUIRED, "orderbook")
        if not _is_number(d["timestamp"]):
            raise InvalidRequestError("orderbook timestamp must be a number")
        units = d["orderbook_units"]
        if not isinstance(units, list):
            raise InvalidRequestError("orderbook_units must be a list of dicts")
        try:
            rows = [[u[f] for f in UNIT_FIELDS] if "ask_price" in u else [u[f] for f in UNIT_SIMPLE] for u in units]
            levels = np.array(rows, dtype=np.float64).reshape(len(rows), 4)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"orderbook unit is malformed: {exc!r}") from None
        if not np.isfinite(levels).all():
            raise InvalidRequestError("orderbook unit holds a non-finite number")
        # columns: ask_price, bid_price, ask_size, bid_size (UNIT_FIELDS)
        if len(levels) and not (bool((levels[:, :2] > 0).all()) and bool((levels[:, 2:] >= 0).all())):
            raise InvalidRequestError("orderbook unit holds a price <= 0 or a negative size")
        levels.flags.writeable = False
        d["orderbook_units"] = levels
        sym = d["market"]
        if sym not in self._orderbooks:
            validate_symbol(sym)
        return sym, d

    @staticmethod
    def _orderbook_out(d: dict[str, Any]) -> dict[str, Any]:
        out = d.copy()
        out["orderbook_units"] = [dict(zip(UNIT_FIELDS, row)) for row in d["orderbook_units"].tolist()]
        return out

    def orderbook(self, symbol: str) -> dict[str, Any] | None:
        """The latest orderbook of ``symbol`` (REST shape, ``orderbook_units`` as dicts), or None."""
        entry = self._get(self._orderbooks, self._orderbook_ttl, symbol)
        return None if entry is None else self._orderbook_out(entry.latest)

    def orderbook_history(self, symbol: str, since: int | None = None) -> list[dict[str, Any]]:
        """Orderbook snapshots of ``symbol`` received within the TTL, oldest first.

        ``since`` filters on Upbit's ``timestamp`` (epoch ms), inclusive.
        """
        return self._history(self._orderbooks, self._orderbook_ttl, symbol, since, self._orderbook_out)

    # -- trades -------------------------------------------------------------------------------------
    def put_trades(self, symbol: str, trades: np.ndarray | Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> int:
        """Add trades of ``symbol``; the ones already held (same ``sequential_id``) are skipped.

        Parameters
        ----------
        symbol
            Upbit market code; every trade dict that names a market must name this one.
        trades
            A TRADE_DTYPE array, or REST ``/v1/trades/ticks`` rows, or WebSocket ``trade`` messages
            (DEFAULT or SIMPLE), or one such dict. Any order; Upbit's ``sequential_id`` is unique
            but not ordered. ``ts`` is the trade time: REST ``timestamp``, WebSocket
            ``trade_timestamp``. ``side``: +1 for ``BID``, -1 for ``ASK``.

        Returns
        -------
        int
            The number of trades added (new sequential ids). Trades older than the newest
            ``trades_capacity`` fall out of the ring again at once.

        Raises
        ------
        InvalidRequestError
            Another data type or market, a missing field, a non-finite or negative price or
            volume, an unknown side, or a wrong array dtype. Nothing is stored then.
        """
        try:
            ring = self._trades.get(symbol)
            if ring is None:
                validate_symbol(symbol)
            batch, offered = self._trade_batch(symbol, trades)
        except InvalidRequestError:
            self._counts["rejected"] += 1
            raise
        now = self._clock()
        if ring is None:
            ring = self._trades[symbol] = _TradeRing(self._trades_capacity)
        else:
            self._trades.move_to_end(symbol)
        ring.touched = now
        self._counts["puts"] += 1
        added = fresh = 0
        if len(batch):
            new = ring.fresh(batch)
            fresh = len(new)
            if fresh:
                added = ring.add(new)
        self._counts["duplicates"] += offered - fresh
        self._expire(self._trades, 2, self._trades_ttl, now)
        return added

    def _trade_batch(self, symbol: str, trades: Any) -> tuple[np.ndarray, int]:
        """A new TRADE_DTYPE array sorted by ``(ts, sequential_id)`` with unique sids, and the
        number of trades offered."""
        if isinstance(trades, np.ndarray):
            if trades.dtype != TRADE_DTYPE:
                raise InvalidRequestError(f"trades array must have TRADE_DTYPE, got {trades.dtype}")
            batch = np.array(trades, dtype=TRADE_DTYPE, copy=True).reshape(-1)
            if not (np.isin(batch["side"], (1, -1)).all()):
                raise InvalidRequestError("trade side must be +1 (bid) or -1 (ask)")
        else:
            if isinstance(trades, Mapping):
                trades = [trades]
            try:
                rows = [self._trade_row(symbol, t) for t in trades]
            except TypeError:
                raise InvalidRequestError("trades must be a TRADE_DTYPE array or Upbit trade dicts") from None
            batch = np.array(rows, dtype=TRADE_DTYPE)
        offered = len(batch)
        if offered == 0:
            return batch, 0
        price, volume = batch["price"], batch["volume"]
        if not (np.isfinite(price).all() and np.isfinite(volume).all()) or (price <= 0).any() or (volume < 0).any():
            raise InvalidRequestError("trade price must be finite and positive, volume finite and >= 0")
        batch = batch[np.lexsort((batch["sequential_id"], batch["ts"]))]
        sid = batch["sequential_id"]
        if len(batch) > 1 and not (sid[1:] != sid[:-1]).all():
            # Duplicate ids within the batch: keep each id's first row in (ts, sid) order.
            _, first = np.unique(sid, return_index=True)
            batch = batch[np.sort(first)]
        return batch, offered

    @staticmethod
    def _trade_row(symbol: str, t: Any) -> tuple[int, float, float, int, int]:
        if not isinstance(t, Mapping):
            raise InvalidRequestError(f"a trade must be a dict, got {type(t).__name__}")
        try:
            if "ty" in t:
                if t["ty"] != "trade":
                    raise InvalidRequestError(f"expected a trade message, got type {t['ty']!r}")
                market, ts, price, vol, ab, sid = t["cd"], t["ttms"], t["tp"], t["tv"], t["ab"], t["sid"]
            elif "type" in t:
                if t["type"] != "trade":
                    raise InvalidRequestError(f"expected a trade message, got type {t['type']!r}")
                market, ts, price, vol, ab, sid = (
                    t["code"],
                    t["trade_timestamp"],
                    t["trade_price"],
                    t["trade_volume"],
                    t["ask_bid"],
                    t["sequential_id"],
                )
            else:
                market = t.get("market", symbol)
                ts, price, vol, ab, sid = (
                    t["timestamp"],
                    t["trade_price"],
                    t["trade_volume"],
                    t["ask_bid"],
                    t["sequential_id"],
                )
        except KeyError as exc:
            raise InvalidRequestError(f"trade message lacks the field {exc.args[0]!r}") from None
        if market != symbol:
            raise InvalidRequestError(f"trade of {market!r} given for {symbol!r}")
        side = _SIDES.get(ab)
        if side is None:
            raise InvalidRequestError(f"trade ask_bid must be 'BID' or 'ASK', got {ab!r}")
        try:
            ts_i, sid_i = _as_int(ts), _as_int(sid)
            price_f, vol_f = float(price), float(vol)
        except (TypeError, ValueError):
            raise InvalidRequestError(
                "trade timestamp and sequential_id must be integers, price and volume numbers"
            ) from None
        return ts_i, price_f, vol_f, side, sid_i

    def trades(self, symbol: str, *, count: int | None = None, since: int | None = None) -> np.ndarray:
        """Trades of ``symbol`` sorted by ``(ts, sequential_id)``: a read-only TRADE_DTYPE array.

        Parameters
        ----------
        count : int, optional
            The newest ``count`` trades; with ``since``, the first ``count`` from ``since``.
        since : int, optional
            Only trades with ``ts >= since`` (epoch ms).

        Returns
        -------
        numpy.ndarray
            A read-only view that never changes afterwards (snapshot semantics); empty when
            nothing is held or the symbol had no trades within its TTL.

        Raises
        ------
        InvalidRequestError
            A bad market code or a negative ``count``.
        """
        if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0):
            raise InvalidRequestError(f"count must be a non-negative int, not {count!r}")
        ring = self._trades.get(symbol)
        if ring is None:
            validate_symbol(symbol)
            self._counts["misses"] += 1
            return _EMPTY_TRADES
        if self._clock() - ring.touched > self._trades_ttl:
            self._counts["misses"] += 1
            return _EMPTY_TRADES
        self._counts["hits"] += 1
        return ring.view(None if count is None else int(count), None if since is None else int(since))

    # -- dispatch and stats --------------------------------------------------------------------------
    def put_message(self, msg: Mapping[str, Any]) -> str:
        """Store one WebSocket message (DEFAULT or SIMPLE) by its type; returns the type.

        Raises
        ------
        InvalidRequestError
            A message that is not a ticker, orderbook or trade, or is malformed.
        """
        kind = msg.get("ty", msg.get("type")) if isinstance(msg, Mapping) else None
        if kind == "ticker":
            self.put_ticker(msg)
        elif kind == "orderbook":
            self.put_orderbook(msg)
        elif kind == "trade":
            code = msg.get("cd", msg.get("code"))
            if not isinstance(code, str):
                self._counts["rejected"] += 1
                raise InvalidRequestError("trade message lacks the field 'code'")
            self.put_trades(code, msg)
        else:
            self._counts["rejected"] += 1
            raise InvalidRequestError(f"not a ticker, orderbook or trade message: type {kind!r}")
        return str(kind)

    def clear(self) -> None:
        """Drop everything."""
        self._tickers.clear()
        self._orderbooks.clear()
        self._trades.clear()

    def stats(self) -> dict[str, int]:
        """JSON-serialisable counters and sizes.

        Keys: ``tickers``, ``ticker_history``, ``orderbooks``, ``orderbook_history`` (symbols and
        snapshots held), ``trade_symbols``, ``trades``, ``trade_bytes`` (arrays allocated for
        trades), and the counters ``puts``, ``rejected``, ``hits``, ``misses``,
        ``evicted_symbols``, ``duplicates`` (trades skipped as already held).
        """
        self.expire()
        return {
            "tickers": len(self._tickers),
            "ticker_history": sum(len(e.history) for e in self._tickers.values()),
            "orderbooks": len(self._orderbooks),
            "orderbook_history": sum(len(e.history) for e in self._orderbooks.values()),
            "trade_symbols": len(self._trades),
            "trades": sum(len(r) for r in self._trades.values()),
            "trade_bytes": sum(r.nbytes for r in self._trades.values()),
            **self._counts,
        }
