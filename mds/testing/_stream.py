"""FakeUpbit's WebSocket endpoint: Upbit's quotation stream on 127.0.0.1.

:class:`FakeStream` is a real ``websockets`` server in its own thread and event loop. It speaks
Upbit's protocol (../shared/UPBIT_API.md section 6): a JSON array request with ``ticket``,
``type``/``codes`` objects and ``format`` (DEFAULT or SIMPLE), binary frames of UTF-8 JSON,
``SNAPSHOT`` then ``REALTIME`` messages, the text ``PING`` answered with ``{"status":"UP"}``,
Upbit's error objects, an idle close, and HTTP 429 for connects over the limit.

What it sends comes from the same :class:`~mds.testing._quotation.Quotation` as FakeUpbit's REST
answers, moved by the same clock, so a stream and REST agree:

- ``candle.*``: the candles of the held series, through the REST candle endpoint itself. Every
  interval that closed since the last tick is sent once in its final form (equal to the REST
  candle), and the forming candle at most once per clock second (REST's partial candle as of
  the clock). Intervals without a held candle send nothing, as on Upbit.
- ``trade``: the trades held for the market, or else the trades the REST trade endpoint derives
  from each candle of the finest held series, generated for the whole interval and sent as the
  clock passes them (prices within the candle, the last one at its close, sequential ids unique).
- ``ticker`` and ``orderbook``: the REST payloads as of the clock, once per clock second.

Faults (:meth:`FakeStream.inject`, :data:`WS_FAULT_KINDS`) act on the next frames of any
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mds._dtypes import TRADE_DTYPE
from mds.errors import InvalidRequestError
from mds.layer1._ws_parse import CANDLE_TYPES, simple_keys
from mds.testing._quotation import Quotation, _trades_from_candle
from mds.testing.fake_upbit import Fault
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import to_ms

__all__ = ["WS_FAULT_KINDS", "FakeStream", "WsFault"]

logger = logging.getLogger(__name__)

#: Fault kinds accepted by :meth:`FakeStream.inject`.
WS_FAULT_KINDS = (
    "drop",  # abort the connection (no close frame) instead of sending the next frame
    "idle",  # send nothing and answer no text PING while active (``seconds``, or until cleared)
    "duplicate",  # send the frame twice
    "reorder",  # hold the frame back and send it after the next one
    "malformed",  # send a frame that is not JSON instead
    "wrong_type",  # the frame's ``timestamp`` becomes a string
    "unknown_field",  # the frame gains a field Upbit does not send
    "refuse",  # refuse the next connection handshake with HTTP 429
)
_PATHS = {ty: ("seconds" if tf == "1s" else f"minutes/{ty.split('.')[1][:-1]}") for ty, tf in CANDLE_TYPES.items()}
_KINDS = ("ticker", "trade", "orderbook")
_MAX_CATCHUP = 2000  # candles of trades generated per tick at most (a clock jumped far ahead)


@dataclass
class WsFault(Fault):
    """One injected misbehaviour of the WebSocket endpoint (see :data:`WS_FAULT_KINDS`).

    ``times``: frames (or handshakes, for ``refuse``) it still applies to, None until cleared;
    ``until``: for ``idle``, the ``time.monotonic()`` at which it ends (None: until cleared);
    ``hits``: how often it applied. The HTTP fields of :class:`Fault` are unused.
    """

    until: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:  # Fault's own check knows only the HTTP kinds
        if self.kind not in WS_FAULT_KINDS or (self.times is not None and self.times < 0):
            kinds = ", ".join(WS_FAULT_KINDS)
            raise InvalidRequestError(
                f"bad fault {self.kind!r} times={self.times!r}: kinds {kinds}, times >= 0 or None"
            )

    @property
    def active(self) -> bool:
        """Whether it still applies."""
        return (self.until is None or time.monotonic() < self.until) and super().active


@dataclass(frozen=True, slots=True)
class ConnectRecord:
    """One WebSocket handshake: when it arrived (``time.monotonic()``) and whether it was accepted."""

    received: float
    accepted: bool


class _Subscription:
    """What one request asked for, and how far this connection has sent it."""

    def __init__(self, request: list[Any], markets: set[str]) -> None:
        self.format = "DEFAULT"
        self.types: dict[str, list[str]] = {}
        self.depth: dict[str, int] = {}
        for obj in request[1:]:
            if "format" in obj:
                fmt = obj["format"]
                if fmt not in ("DEFAULT", "SIMPLE"):
                    raise _ReqError("INVALID_PARAM", f"format {fmt!r} is not served here")
                self.format = fmt
                continue
            ty = obj["type"]
            codes = []
            for code in obj["codes"]:
                sym, _, n = str(code).partition(".")
                if ty == "orderbook" and n:
                    self.depth[sym] = int(n) if n in ("1", "5", "15", "30") else 30
                if sym in markets:
                    codes.append(sym)
            self.types[ty] = codes
        self.trade_cursor: dict[str, int] = {}
        self.second: dict[tuple[str, str], int] = {}
        self.candle_closed: dict[tuple[str, str], int] = {}
        self.forming: dict[tuple[str, str], tuple[int, int]] = {}


class _ReqError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _parse_request(text: str | bytes) -> list[Any]:
    try:
        req = json.loads(text)
    except ValueError:
        raise _ReqError("WRONG_FORMAT", "the request is not JSON") from None
    if not isinstance(req, list) or not req or not all(isinstance(o, dict) for o in req):
        raise _ReqError("WRONG_FORMAT", "the request must be a JSON array of objects")
    if "ticket" not in req[0]:
        raise _ReqError("NO_TICKET", "the first object must carry a ticket")
    types = [o for o in req[1:] if "format" not in o]
    if not types or any("type" not in o for o in types):
        raise _ReqError("NO_TYPE", "a type object is missing its type")
    for o in types:
        if o["type"] not in _KINDS and o["type"] not in CANDLE_TYPES:
            raise _ReqError("INVALID_PARAM", f"unknown type {o['type']!r}")
        if not isinstance(o.get("codes"), list) or not o["codes"]:
            raise _ReqError("NO_CODES", f"type {o['type']!r} has no codes")
    return req


class FakeStream:
    """The WebSocket endpoint of a :class:`~mds.testing.FakeUpbit` (``FakeUpbit.ws``).

    Parameters
    ----------
    quotation : Quotation
        The data and clock FakeUpbit serves over REST.
    encode : callable
        Serialises a payload like Upbit (FakeUpbit's ``upbit_json``).
    connect_limit : int or None
        Handshakes accepted in any ``connect_window_s`` (Upbit: 5 a second per IP); beyond, HTTP
        429. None: no limit.
    idle_close_s : float or None
        Close a connection from which nothing (no frame, no ping) arrived for this long (Upbit:
        about 120 s). None: never.
    interval_s : float
        How often (wall seconds) each connection looks at the clock and sends what changed.

    Attributes
    ----------
    binary : bool
        Send binary frames, as Upbit does (text frames when False).
    connects : list of ConnectRecord
        Every handshake, accepted or refused.
    requests : list
        Every subscription request received (decoded JSON), in order.
    sent : collections.Counter
        Frames sent by kind (``ticker``, ``trade``, ``orderbook``, ``candle``, ``status``,
        ``error``, and fault kinds).
    """

    def __init__(
        self,
        quotation: Quotation,
        encode: Callable[[Any], bytes],
        *,
        connect_limit: int | None = 5,
        connect_window_s: float = 1.0,
        idle_close_s: float | None = 120.0,
        interval_s: float = 0.02,
    ) -> None:
        if connect_limit is not None and connect_limit < 1:
            raise InvalidRequestError("connect_limit must be >= 1 or None")
        self._q = quotation
        self._encode = encode
        self.connect_limit = connect_limit
        self.connect_window_s = float(connect_window_s)
        self.idle_close_s = idle_close_s
        self.interval_s = float(interval_s)
        self.binary = True
        self.connects: list[ConnectRecord] = []
        self.requests: list[Any] = []
        self.sent: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._faults: list[WsFault] = []
        self._window: deque[float] = deque()
        self._conns: set[Any] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._simple = {k: simple_keys(k) for k in ("ticker", "trade", "orderbook", "candle", "unit")}

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeStream:
        """Start serving on an ephemeral port of 127.0.0.1 (idempotent)."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready, failed), name="FakeUpbit-ws", daemon=True
        )
        self._thread.start()
        if not ready.wait(10) or failed:
            self._thread = None
            raise RuntimeError(f"FakeUpbit's WebSocket server did not start: {failed[:1]}")
        return self

    def close(self) -> None:
        """Stop serving and abort every connection (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT/websocket/v1``."""
        if self._thread is None:
            raise RuntimeError("the WebSocket endpoint is not running")
        return f"ws://127.0.0.1:{self._port}/websocket/v1"

    def _thread_main(self, ready: threading.Event, failed: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        except BaseException as exc:  # reported to start()
            failed.append(exc)
            ready.set()
        finally:
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        from websockets.asyncio.server import ServerConnection, serve

        class _Conn(ServerConnection):
            # Upbit's idle close counts every frame from the client, pings included; the
            # library answers pings itself, so frames are noted where they are processed.
            last_activity = 0.0

            def process_event(self, event: Any) -> None:
                self.last_activity = time.monotonic()
                super().process_event(event)

        self._stop = asyncio.Event()
        async with serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            create_connection=_Conn,
            ping_interval=None,
            close_timeout=1.0,
        ) as server:
            self._port = next(iter(server.sockets)).getsockname()[1]
            ready.set()
            await self._stop.wait()
            for conn in list(self._conns):
                conn.transport.abort()

    def _process_request(self, conn: Any, request: Any) -> Any:
        now = time.monotonic()
        with self._lock:
            refuse = next((f for f in self._faults if f.kind == "refuse" and f.active), None)
            if refuse is not None:
                refuse.consume()
            win = self._window
            while win and win[0] <= now - self.connect_window_s:
                win.popleft()
            over = self.connect_limit is not None and len(win) >= self.connect_limit
            win.append(now)  # refused attempts count too, as they do at Upbit
            accepted = refuse is None and not over
            self.connects.append(ConnectRecord(now, accepted))
        if accepted:
            return None
        self.sent["refused"] += 1
        return conn.respond(429, "Too Many Requests\n")

    # -- faults ------------------------------------------------------------------------------------
    def inject(self, kind: str, *, times: int | None = None, seconds: float | None = None) -> WsFault:
        """Make the next ``times`` frames (None: all while active) misbehave; see :data:`WS_FAULT_KINDS`."""
        f = WsFault(kind, times, until=None if seconds is None else time.monotonic() + seconds)
        with self._lock:
            self._faults.append(f)
        return f

    def clear_faults(self, kind: str | None = None) -> None:
        """Remove every fault, or those of ``kind``."""
        with self._lock:
            self._faults = [f for f in self._faults if kind is not None and f.kind != kind]

    def drop(self) -> int:
        """Abort every open connection now (no close frame); returns how many."""
        loop = self._loop
        if loop is None or self._thread is None:
            return 0

        async def abort() -> int:
            conns = list(self._conns)
            for c in conns:
                c.transport.abort()
            return len(conns)

        return asyncio.run_coroutine_threadsafe(abort(), loop).result(timeout=5)

    @property
    def faults(self) -> list[WsFault]:
        """The faults still active."""
        with self._lock:
            return [f for f in self._faults if f.active]

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def _fault(self, *kinds: str) -> WsFault | None:
        with self._lock:
            for f in self._faults:
                if f.kind in kinds and f.active:
                    return f
        return None

    # -- one connection ------------------------------------------------------------------------------
    async def _handler(self, conn: Any) -> None:
        self._conns.add(conn)
        box: list[_Subscription | None] = [None]
        reader = asyncio.get_running_loop().create_task(self._read(conn, box))
        held: list[bytes | str] = []
        try:
            while not reader.done():
                await asyncio.sleep(self.interval_s)
                idle = self.idle_close_s
                if idle is not None and time.monotonic() - conn.last_activity > idle:
                    logger.debug("fake upbit ws: closing an idle connection")
                    await conn.close(1000, "idle")
                    break
                sub = box[0]
                if sub is None or self._fault("idle") is not None:
                    continue
                for kind, payload in self._tick(sub):
                    if not await self._send(conn, kind, payload, sub.format, held):
                        return
        except Exception as exc:  # a connection closing under a send
            logger.debug("fake upbit ws: connection ended: %r", exc)
        finally:
            reader.cancel()
            self._conns.discard(conn)

    async def _read(self, conn: Any, box: list[_Subscription | None]) -> None:
        with contextlib.suppress(Exception):  # the connection closed: the handler ends too
            await self._read_frames(conn, box)

    async def _read_frames(self, conn: Any, box: list[_Subscription | None]) -> None:
        async for frame in conn:
            if frame == "PING" or frame == b"PING":
                if self._fault("idle") is None:
                    self.sent["status"] += 1
                    await conn.send(b'{"status":"UP"}' if self.binary else '{"status":"UP"}')
                continue
            try:
                req = _parse_request(frame)
                with self._lock:
                    self.requests.append(req)
                box[0] = _Subscription(req, set(self._q.markets()))
            except (_ReqError, KeyError, TypeError, ValueError) as exc:
                name = exc.name if isinstance(exc, _ReqError) else "WRONG_FORMAT"
                self.sent["error"] += 1
                await conn.send(json.dumps({"error": {"name": name, "message": str(exc)}}).encode())

    async def _send(self, conn: Any, kind: str, payload: dict[str, Any], fmt: str, held: list[bytes | str]) -> bool:
        """Send one message through the faults; False when the connection was dropped."""
        if fmt == "SIMPLE":
            payload = self._abbreviate(kind, payload)
        fault = self._fault("drop", "duplicate", "reorder", "malformed", "wrong_type", "unknown_field")
        if fault is not None:
            fault.consume()
            self.sent[fault.kind] += 1
            if fault.kind == "drop":
                conn.transport.abort()
                return False
            if fault.kind == "wrong_type":
                key = "tms" if "tms" in payload else "timestamp"
                payload = {**payload, key: "not a number"}
            elif fault.kind == "unknown_field":
                payload = {**payload, "zz_unknown_field": 1}
        raw = self._encode(payload)
        if fault is not None and fault.kind == "malformed":
            raw = raw[: len(raw) // 2]
        data: bytes | str = raw if self.binary else raw.decode(errors="replace")
        self.sent[kind] += 1
        if fault is not None and fault.kind == "reorder":
            held.append(data)
            return True
        await conn.send(data)
        if fault is not None and fault.kind == "duplicate":
            await conn.send(data)
        while held:
            await conn.send(held.pop(0))
        return True

    def _abbreviate(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        table = self._simple["candle" if kind == "candle" else kind]
        out = {table.get(k, k): v for k, v in payload.items()}
        if kind == "orderbook":
            units = self._simple["unit"]
            out["obu"] = [{units[k]: v for k, v in u.items()} for u in payload["orderbook_units"]]
        return out

    # -- what to send ------------------------------------------------------------------------------
    def _tick(self, sub: _Subscription) -> list[tuple[str, dict[str, Any]]]:
        q = self._q
        now = q.now()
        out: list[tuple[str, dict[str, Any]]] = []
        second = now // 1000
        for ty, codes in sub.types.items():
            for sym in codes:
                key = (ty, sym)
                if ty == "trade":
                    out.extend(("trade", t) for t in self._trades(sub, sym, now))
                elif ty in ("ticker", "orderbook"):
                    if sub.second.get(key) == second:
                        continue
                    st = "REALTIME" if key in sub.second else "SNAPSHOT"
                    sub.second[key] = second
                    if ty == "ticker":
                        out.append(("ticker", self._ticker(sym, now, st)))
                    else:
                        out.append(("orderbook", self._orderbook(sym, sub.depth.get(sym, 30), now, st)))
                else:
                    out.extend(("candle", c) for c in self._candles(sub, ty, sym, now))
        return out

    def _candles(self, sub: _Subscription, ty: str, sym: str, now: int) -> list[dict[str, Any]]:
        tf = parse_timeframe(CANDLE_TYPES[ty])
        key = (ty, sym)
        arr = self._series(sym, tf)
        if arr is None or len(arr) == 0:
            return []
        ts = arr["ts"]
        hi = int(np.searchsorted(ts, now, side="right"))
        if hi == 0:
            return []
        first = key not in sub.candle_closed and key not in sub.forming
        last_closed = sub.candle_closed.get(key)
        # The snapshot is the newest candle (the previous interval's when the current one has
        # none yet); afterwards every candle opened since the last one sent closed.
        count = 1 if last_closed is None else hi - int(np.searchsorted(ts, last_closed, side="right"))
        if count <= 0:
            return []
        status, rows = self._q.route(f"/v1/candles/{_PATHS[ty]}", {"market": sym, "count": str(min(count, 200))})
        if status != 200:
            return []
        out = []
        for row in reversed(rows):
            start = to_ms(row["candle_date_time_utc"] + "Z")
            if start > now:
                # the REST side read the shared clock after this tick did (a test moved it in
                # between): what opened since is the next tick's, sent then in order
                break
            closed = tf.add(start, 1) <= now
            if closed:
                if last_closed is not None and start <= last_closed:
                    continue
                sub.candle_closed[key] = last_closed = start
            else:
                if sub.forming.get(key) == (start, now // 1000):
                    continue
                sub.forming[key] = (start, now // 1000)
                if last_closed is None:
                    # Nothing closed was sent: later ticks start from the interval before this.
                    sub.candle_closed[key] = last_closed = start - 1
            out.append(
                {
                    "type": ty,
                    "code": sym,
                    "candle_date_time_utc": row["candle_date_time_utc"],
                    "candle_date_time_kst": row["candle_date_time_kst"],
                    "opening_price": row["opening_price"],
                    "high_price": row["high_price"],
                    "low_price": row["low_price"],
                    "trade_price": row["trade_price"],
                    "candle_acc_trade_volume": row["candle_acc_trade_volume"],
                    "candle_acc_trade_price": row["candle_acc_trade_price"],
                    "timestamp": now,
                    "stream_type": "SNAPSHOT" if first else "REALTIME",
                }
            )
            first = False
        return out

    def _series(self, sym: str, tf: Timeframe) -> np.ndarray | None:
        q = self._q
        with q._lock:
            return q._candles.get((sym, tf.name))

    def _finest(self, sym: str) -> tuple[np.ndarray, Timeframe] | None:
        q = self._q
        with q._lock:
            keys = [k for k in q._candles if k[0] == sym and len(q._candles[k])]
            if not keys:
                return None
            tf = min((parse_timeframe(k[1]) for k in keys), key=lambda t: t.interval_ms)
            return q._candles[(sym, tf.name)], tf

    def _trades_between(self, sym: str, lo: int, hi: int) -> np.ndarray:
        """Trades with ``lo < ts <= hi``, sorted by (ts, sequential_id)."""
        q = self._q
        with q._lock:
            held = q._trades.get(sym)
        if held is not None:
            ts = held["ts"]
            return held[int(np.searchsorted(ts, lo, side="right")) : int(np.searchsorted(ts, hi, side="right"))]
        found = self._finest(sym)
        if found is None:
            return np.zeros(0, dtype=TRADE_DTYPE)
        arr, tf = found
        ts = arr["ts"]
        a = int(np.searchsorted(ts, lo - tf.interval_ms, side="right")) if not tf.is_month else 0
        b = int(np.searchsorted(ts, hi, side="right"))
        a = max(a, b - _MAX_CATCHUP)
        parts = [_trades_from_candle(arr[i], tf, tf.add(int(ts[i]), 1) - 1) for i in range(a, b)]
        if not parts:
            return np.zeros(0, dtype=TRADE_DTYPE)
        out = np.concatenate(parts)
        return out[(out["ts"] > lo) & (out["ts"] <= hi)]

    def _trades(self, sub: _Subscription, sym: str, now: int) -> list[dict[str, Any]]:
        cursor = sub.trade_cursor.get(sym)
        if cursor is None:
            # The snapshot: the newest trade by now.
            found = self._finest(sym)
            span = found[1].interval_ms if found is not None else 60_000
            rows = self._trades_between(sym, now - 2 * span, now)[-1:]
            st = "SNAPSHOT"
        else:
            if now <= cursor:
                return []
            rows = self._trades_between(sym, cursor, now)
            st = "REALTIME"
        sub.trade_cursor[sym] = now
        if len(rows) == 0:
            return []
        prev = self._prev_close(sym)
        out = []
        for t in rows.tolist():
            ts, price, volume, side, sid = t
            d = _dt.datetime.fromtimestamp(ts / 1000, tz=_dt.timezone.utc)
            change = price - prev
            out.append(
                {
                    "type": "trade",
                    "code": sym,
                    "timestamp": ts,
                    "trade_date": d.strftime("%Y-%m-%d"),
                    "trade_time": d.strftime("%H:%M:%S"),
                    "trade_timestamp": ts,
                    "trade_price": price,
                    "trade_volume": volume,
                    "ask_bid": "BID" if side > 0 else "ASK",
                    "prev_closing_price": prev,
                    "change": "RISE" if change > 0 else ("FALL" if change < 0 else "EVEN"),
                    "change_price": abs(change),
                    "sequential_id": sid,
                    "stream_type": st,
                }
            )
        return out

    def _prev_close(self, sym: str) -> float:
        try:
            return float(self._q._ticker(sym)["prev_closing_price"])
        except Exception:  # a market without candles: no previous close to report
            return 0.0

    def _ticker(self, sym: str, now: int, st: str) -> dict[str, Any]:
        rest = self._q._ticker(sym)
        out: dict[str, Any] = {"type": "ticker", "code": sym}
        out.update((k, v) for k, v in rest.items() if k not in ("market", "trade_date_kst", "trade_time_kst"))
        acc = float(rest.get("acc_trade_volume", 0.0))
        out.update(
            {
                "ask_bid": "BID",
                "acc_ask_volume": acc / 2,
                "acc_bid_volume": acc - acc / 2,
                "market_state": "ACTIVE",
                "is_trading_suspended": False,
                "delisting_date": None,
                "market_warning": "NONE",
                "timestamp": now,
                "stream_type": st,
            }
        )
        return out

    def _orderbook(self, sym: str, depth: int, now: int, st: str) -> dict[str, Any]:
        rest = self._q._orderbook(sym, depth)
        out: dict[str, Any] = {"type": "orderbook", "code": sym}
        out.update((k, v) for k, v in rest.items() if k != "market")
        out["timestamp"] = now
        out["stream_type"] = st
        return out
