"""Upbit WebSocket messages: field tables, the typed messages and the frame parser.

Upbit sends each message kind in two spellings: DEFAULT (``trade_price``) and SIMPLE
(``tp``), per ../shared/UPBIT_API.md section 6. The tables below name every field once, with
its SIMPLE key and the JSON types it may hold; :class:`FrameParser` maps either spelling to the
DEFAULT names in one pass, checks the types on the way, and builds one small typed message per
frame. SIMPLE keys of the two candle volume fields (``catv``, ``catp``) are not in the fact
sheet; they are the keys several independent public clients use.

Nothing here touches the network: :mod:`mds.layer1.stream` feeds frames in, and a recorded
frame file can be replayed through the same parser.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, TypeVar

import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds.convert import candles_from_upbit
from mds.errors import InvalidCandleError, InvalidRequestError
from mds.timeframes import parse_timeframe

__all__ = [
    "CANDLE_TYPES",
    "KINDS",
    "CandleMessage",
    "FrameParser",
    "OrderbookMessage",
    "TickerMessage",
    "TradeMessage",
    "Watermark",
    "candle_rows",
    "simple_keys",
]

log = logging.getLogger(__name__)

#: Message kinds besides candles, as Upbit names them in a request's ``type``.
KINDS = ("ticker", "trade", "orderbook")
#: Upbit candle type -> mds timeframe name.
CANDLE_TYPES: dict[str, str] = {
    f"candle.{u}": parse_timeframe(u).name for u in ("1s", "1m", "3m", "5m", "10m", "15m", "30m", "60m", "240m")
}


def candle_types(candles: Iterable[str]) -> tuple[str, ...]:
    """Upbit's ``candle.*`` types of the timeframes ``candles`` (any mds spelling), in order.

    Raises
    ------
    InvalidRequestError
        A timeframe Upbit does not stream.
    """
    by_tf = {tf: ty for ty, tf in CANDLE_TYPES.items()}
    types = []
    for c in candles:
        tf = parse_timeframe(c).name
        if tf not in by_tf:
            raise InvalidRequestError(f"Upbit streams no {c!r} candles; use one of {', '.join(by_tf)}")
        types.append(by_tf[tf])
    return tuple(dict.fromkeys(types))


async def deliver(
    get_batch: Callable[[int], Awaitable[list[Any]]],
    done: Callable[[], bool],
    callback: Callable[[list[Any]], Awaitable[None] | None],
    max_items: int,
) -> None:
    """The ``run(callback)`` of a stream: every batch to ``callback`` (sync or async) until an
    empty batch comes when ``done()``."""
    while True:
        batch = await get_batch(max_items)
        if batch:
            res = callback(batch)
            if res is not None:
                await res
        elif done():
            return


_N = TypeVar("_N", int, float)


def lag_percentiles(lags: Iterable[_N]) -> dict[str, _N | None]:
    """``{"p50", "p99"}`` of lag samples (ms; None without samples): the samples at those ranks,
    no interpolation (the live feed's, a replay's and the demo's figures all come from here)."""
    xs = sorted(lags)
    if not xs:
        return {"p50": None, "p99": None}
    return {"p50": xs[len(xs) // 2], "p99": xs[min(len(xs) - 1, len(xs) * 99 // 100)]}


class Watermark:
    """How far one epoch of a connection is known to have delivered what the server sent.

    Upbit stamps ticker, orderbook and candle messages with its time (``timestamp``) and sends
    them in order on one connection; a server sends the messages of one moment together, in no
    promised order among themselves. So a message stamped later than any before proves that the
    previous newest moment was sent in full: :meth:`see` returns that moment (never later than
    the message's receipt). A clock that jumped ahead of the server proves nothing by itself.
    Trade messages carry the trade's time, not the sending time, and are not seen.
    """

    __slots__ = ("prev", "top")

    def __init__(self, start: int) -> None:
        self.prev = self.top = start

    def see(self, timestamp: int, received: int) -> int:
        """Note a message; returns what the epoch proved through (ms)."""
        if timestamp > self.top:
            self.prev, self.top = self.top, timestamp
        return self.prev if self.prev < received else received


_NUM = (float, int)
_TYPES: dict[str, tuple[type, ...]] = {
    "num": _NUM,
    "num?": (float, int, type(None)),
    "int": (int,),
    "str": (str,),
    "str?": (str, type(None)),
    "bool": (bool,),
    "list": (list,),
}

# One line per field: DEFAULT name, SIMPLE key, JSON type (see _TYPES). ``type``/``ty`` and
# ``code``/``cd`` are common to every kind and handled by the parser itself.
_COMMON = """
timestamp tms int
stream_type st str
"""
_TICKER = """
opening_price op num
high_price hp num
low_price lp num
trade_price tp num
prev_closing_price pcp num
change c str
change_price cp num
signed_change_price scp num
change_rate cr num
signed_change_rate scr num
trade_volume tv num
acc_trade_volume atv num
acc_trade_volume_24h atv24h num
acc_trade_price atp num
acc_trade_price_24h atp24h num
trade_date tdt str
trade_time ttm str
trade_timestamp ttms int
ask_bid ab str
acc_ask_volume aav num
acc_bid_volume abv num
highest_52_week_price h52wp num
highest_52_week_date h52wdt str
lowest_52_week_price l52wp num
lowest_52_week_date l52wdt str
trade_status ts str?
market_state ms str
market_state_for_ios msfi str?
is_trading_suspended its bool
delisting_date dd str?
market_warning mw str
"""
_TRADE = """
trade_price tp num
trade_volume tv num
ask_bid ab str
prev_closing_price pcp num
change c str
change_price cp num
trade_date td str
trade_time ttm str
trade_timestamp ttms int
sequential_id sid int
best_ask_price bap num?
best_ask_size bas num?
best_bid_price bbp num?
best_bid_size bbs num?
"""
_ORDERBOOK = """
total_ask_size tas num
total_bid_size tbs num
orderbook_units obu list
level lv num?
"""
_UNIT = """
ask_price ap num
bid_price bp num
ask_size as num
bid_size bs num
"""
_CANDLE = """
candle_date_time_utc cdttmu str
candle_date_time_kst cdttmk str
opening_price op num
high_price hp num
low_price lp num
trade_price tp num
candle_acc_trade_volume catv num
candle_acc_trade_price catp num
"""

_Table = dict[str, tuple[str, tuple[type, ...]]]


def _table(*specs: str) -> _Table:
    """Both spellings of every field -> (DEFAULT name, accepted types)."""
    out: _Table = {}
    for spec in specs:
        for line in spec.split("\n"):
            if line:
                name, short, kind = line.split()
                out[name] = out[short] = (name, _TYPES[kind])
    return out


_TABLES: dict[str, _Table] = {
    "ticker": _table(_COMMON, _TICKER),
    "trade": _table(_COMMON, _TRADE),
    "orderbook": _table(_COMMON, _ORDERBOOK),
    "candle": _table(_COMMON, _CANDLE),
}
_UNIT_TABLE = _table(_UNIT)
_REQUIRED = {
    "ticker": ("trade_price", "timestamp"),
    "trade": ("trade_price", "trade_volume", "ask_bid", "trade_timestamp", "sequential_id"),
    "orderbook": ("timestamp", "total_ask_size", "total_bid_size", "orderbook_units"),
    "candle": ("candle_date_time_utc", "opening_price", "high_price", "low_price", "trade_price"),
}
_SIDES = {"BID": 1, "ASK": -1}


def simple_keys(kind: str) -> dict[str, str]:
    """DEFAULT name -> SIMPLE key for ``kind`` (``ticker``, ``trade``, ``orderbook``, ``candle``,
    ``unit`` for an orderbook level), plus ``type``/``code``; what a server writing SIMPLE needs."""
    specs = {"ticker": _TICKER, "trade": _TRADE, "orderbook": _ORDERBOOK, "candle": _CANDLE, "unit": _UNIT}
    out = {"type": "ty", "code": "cd"} if kind != "unit" else {}
    for spec in (_COMMON, specs[kind]) if kind != "unit" else (specs[kind],):
        for line in spec.split("\n"):
            if line:
                name, short, _ = line.split()
                out[name] = short
    return out


# -- messages ------------------------------------------------------------------------------------
# NamedTuples: a frame becomes one tuple (the cheapest typed object Python builds), and the
# consumer dispatches on the class. ``fields`` is the whole message in REST shape (``market``,
# DEFAULT names, no ``type``), what RealtimeCache.put_ticker / put_orderbook accept as is.
# ``received`` is the stream's clock (epoch ms) when the frame arrived.


class TickerMessage(NamedTuple):
    """A ``ticker`` message."""

    market: str
    trade_price: float
    timestamp: int  # Upbit's message time, epoch ms
    stream_type: str  # SNAPSHOT | REALTIME
    received: int
    fields: dict[str, Any]


class TradeMessage(NamedTuple):
    """A ``trade`` message; ``ts, price, volume, side, sequential_id`` are a TRADE_DTYPE row."""

    market: str
    ts: int  # trade_timestamp, epoch ms
    price: float
    volume: float
    side: int  # +1 BID (the buyer took the ask), -1 ASK
    sequential_id: int  # unique, not ordered (dedup on it)
    timestamp: int  # Upbit's message time (trade_timestamp when absent)
    stream_type: str
    received: int
    fields: dict[str, Any]

    @property
    def row(self) -> tuple[int, float, float, int, int]:
        """The TRADE_DTYPE row ``(ts, price, volume, side, sequential_id)``."""
        return (self.ts, self.price, self.volume, self.side, self.sequential_id)


class OrderbookMessage(NamedTuple):
    """An ``orderbook`` message: a full snapshot of the top levels (``fields['orderbook_units']``
    holds them as dicts with DEFAULT names, best first)."""

    market: str
    timestamp: int
    total_ask_size: float
    total_bid_size: float
    stream_type: str
    received: int
    fields: dict[str, Any]


class CandleMessage(NamedTuple):
    """A ``candle.*`` message: the candle of ``(market, timeframe, row['ts'])`` as of ``timestamp``.

    Upbit sends the same interval many times while it forms; the latest one wins. ``row`` is a
    read-only one-row CANDLE_DTYPE array built by :func:`mds.convert.candles_from_upbit`, the
    conversion of REST candles.
    """

    market: str
    timeframe: str  # mds name: 1s, 1m, 3m ... 30m, 1h, 4h
    row: np.ndarray
    timestamp: int
    stream_type: str
    received: int
    fields: dict[str, Any]

    @property
    def ts(self) -> int:
        """The candle's open time, epoch ms UTC."""
        return int(self.row["ts"][0])


Message = TickerMessage | TradeMessage | OrderbookMessage | CandleMessage


class _Bad(Exception):
    """A frame to count as malformed and skip (never raised out of the parser)."""


def _loads_json(data: bytes | str) -> Any:
    # parse_constant: Python's json accepts NaN/Infinity, which are not JSON and not prices;
    # parse_float: nor 1e400, which it would read as inf (orjson refuses all three)
    return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is out of a double's range")
    return x


class FrameParser:
    """Parse Upbit WebSocket frames (either format) into typed messages, counting what it skips.

    Parameters
    ----------
    clock : callable
        Returns epoch ms; stamps ``received``.
    loads : callable, optional
        JSON decoder for one frame (bytes or str); default ``json.loads`` that rejects
        ``NaN``/``Infinity``.

    Notes
    -----
    Never raises for bad input: a frame that is not JSON, not an object, of an unknown type, that
    lacks a required field or holds a wrong type is counted in ``malformed`` and skipped with a
    log line (the first ten of a kind at WARNING, later ones at DEBUG). A field not in the tables
    is dropped from ``fields`` and counted in ``unknown_fields``; the message is kept, because
    Upbit adds fields over time. ``{"status":"UP"}`` (the answer to a text ``PING``) counts as a
    keepalive; ``{"error": ...}`` frames count in ``errors`` and are logged.
    """

    def __init__(self, clock: Callable[[], int], loads: Callable[[bytes | str], Any] | None = None) -> None:
        self.clock = clock
        self.loads = loads or _loads_json
        self.malformed = 0
        self.unknown_fields = 0
        self.errors = 0
        self.keepalives = 0
        self.last_error: str | None = None
        self._unknown_seen: set[tuple[str, str]] = set()
        self._warned: dict[str, int] = {}

    def _skip(self, why: str, data: object) -> None:
        self.malformed += 1
        n = self._warned.get(why, 0) + 1
        self._warned[why] = n
        level = logging.WARNING if n <= 10 else logging.DEBUG
        log.log(level, "upbit stream: skipped a malformed frame (%s, %d so far): %.200r", why, n, data)

    def parse(self, data: bytes | str) -> Message | None:
        """The message in ``data`` (one frame), or None for a keepalive, an error or a bad frame.

        Which of the three a None was shows in the counters: ``keepalives``, ``errors`` or
        ``malformed`` grew by one. A stream must tell them apart: a keepalive proves that
        everything sent before it arrived, a bad frame is a loss.
        """
        try:
            obj = self.loads(data)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            self._skip(f"not JSON: {exc}", data)
            return None
        return self.parse_obj(obj, data)

    def parse_obj(self, obj: Any, data: object = None) -> Message | None:
        """Like :meth:`parse` for a frame already decoded from JSON."""
        if type(obj) is not dict:
            self._skip("not a JSON object", data if data is not None else obj)
            return None
        ty = obj.get("ty")
        if ty is None:
            ty = obj.get("type")
        try:
            if ty == "trade":
                return self._trade(obj)
            if ty == "ticker":
                return self._ticker(obj)
            if ty == "orderbook":
                return self._orderbook(obj)
            if ty in CANDLE_TYPES:
                return self._candle(obj, ty)
        except _Bad as exc:
            self._skip(str(exc), data if data is not None else obj)
            return None
        if ty is None:
            if obj.get("status") == "UP":
                self.keepalives += 1
                return None
            err = obj.get("error")
            if isinstance(err, dict):
                self.errors += 1
                self.last_error = f"{err.get('name')}: {err.get('message')}"
                log.warning("upbit stream: the server answered an error: %s", self.last_error)
                return None
        self._skip(f"unknown message type {ty!r}", data if data is not None else obj)
        return None

    def _fields(self, obj: dict[str, Any], kind: str) -> dict[str, Any]:
        """``obj`` in DEFAULT names with ``market``; wrong types raise _Bad, unknown keys drop."""
        table = _TABLES[kind]
        out: dict[str, Any] = {}
        for k, v in obj.items():
            spec = table.get(k)
            if spec is None:
                if k == "cd" or k == "code":
                    if type(v) is not str:
                        raise _Bad(f"{kind} code is {type(v).__name__}, not a string")
                    out["market"] = v
                elif k != "ty" and k != "type":
                    self._unknown(kind, k)
                continue
            name, types = spec
            if type(v) not in types:
                raise _Bad(f"{kind} field {name} holds {type(v).__name__}")
            out[name] = v
        if "market" not in out:
            raise _Bad(f"{kind} message lacks its code")
        for name in _REQUIRED[kind]:
            if name not in out:
                raise _Bad(f"{kind} message lacks {name}")
        return out

    def _unknown(self, kind: str, key: str) -> None:
        self.unknown_fields += 1
        if (kind, key) not in self._unknown_seen:
            self._unknown_seen.add((kind, key))
            log.warning("upbit stream: dropped the unknown %s field %r (logged once per field)", kind, key)

    def _trade(self, obj: dict[str, Any]) -> TradeMessage:
        f = self._fields(obj, "trade")
        price, volume = f["trade_price"], f["trade_volume"]
        if not (math.isfinite(price) and price > 0 and math.isfinite(volume) and volume >= 0):
            raise _Bad(f"trade price {price!r} or volume {volume!r} out of range")
        side = _SIDES.get(f["ask_bid"])
        if side is None:
            raise _Bad(f"trade ask_bid {f['ask_bid']!r}")
        ts = f["trade_timestamp"]
        return TradeMessage(
            f["market"],
            ts,
            float(price),
            float(volume),
            side,
            f["sequential_id"],
            f.get("timestamp", ts),
            f.get("stream_type", "REALTIME"),
            self.clock(),
            f,
        )

    def _ticker(self, obj: dict[str, Any]) -> TickerMessage:
        f = self._fields(obj, "ticker")
        price = f["trade_price"]
        if not (math.isfinite(price) and price > 0):
            raise _Bad(f"ticker trade_price {price!r} out of range")
        return TickerMessage(
            f["market"], float(price), f["timestamp"], f.get("stream_type", "REALTIME"), self.clock(), f
        )

    def _orderbook(self, obj: dict[str, Any]) -> OrderbookMessage:
        f = self._fields(obj, "orderbook")
        units = []
        for u in f["orderbook_units"]:
            if type(u) is not dict:
                raise _Bad("orderbook unit is not an object")
            unit: dict[str, Any] = {}
            for k, v in u.items():
                spec = _UNIT_TABLE.get(k)
                if spec is None:
                    self._unknown("orderbook unit", k)
                    continue
                if type(v) not in _NUM or not math.isfinite(v):
                    raise _Bad(f"orderbook unit {spec[0]} holds {v!r}")
                unit[spec[0]] = v
            if len(unit) != 4:
                raise _Bad("orderbook unit lacks a price or size")
            units.append(unit)
        f["orderbook_units"] = units
        tas, tbs = f["total_ask_size"], f["total_bid_size"]
        return OrderbookMessage(
            f["market"], f["timestamp"], float(tas), float(tbs), f.get("stream_type", "REALTIME"), self.clock(), f
        )

    def _candle(self, obj: dict[str, Any], ty: str) -> CandleMessage:
        f = self._fields(obj, "candle")
        for name in ("candle_acc_trade_volume", "candle_acc_trade_price"):
            if name not in f:
                raise _Bad(f"candle message lacks {name}")
        try:
            row = candles_from_upbit([f])
        except InvalidCandleError as exc:
            raise _Bad(f"candle: {exc}") from None
        vals = row[["open", "high", "low", "close", "volume", "value"]][0].tolist()
        if not all(math.isfinite(v) for v in vals):
            raise _Bad("candle holds a non-finite number")
        row.flags.writeable = False
        ts = f.get("timestamp")
        return CandleMessage(
            f["market"],
            CANDLE_TYPES[ty],
            row,
            ts if ts is not None else int(row["ts"][0]),
            f.get("stream_type", "REALTIME"),
            self.clock(),
            f,
        )


def candle_rows(messages: list[CandleMessage] | tuple[CandleMessage, ...]) -> np.ndarray:
    """The rows of ``messages`` as one CANDLE_DTYPE array (message order, duplicates kept)."""
    if not messages:
        return np.zeros(0, dtype=CANDLE_DTYPE)
    return np.concatenate([m.row for m in messages])
