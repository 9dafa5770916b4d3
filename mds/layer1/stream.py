"""Upbit's live feed over one WebSocket: :class:`UpbitStream` (DESIGN.md section 8).

One connection carries every market and kind asked for (``ticker``, ``trade``, ``orderbook``,
``candle.*``). The stream keeps it alive (WebSocket pings, a text ``PING`` that Upbit answers
with ``{"status":"UP"}``, a watchdog for a silent server), reconnects with jittered exponential
backoff that never starts more than 5 connections a second (Upbit's limit per IP), resubscribes,
and parses every frame into a typed message (:mod:`mds.layer1._ws_parse`). Bad frames are
counted and skipped, never fatal.

Consumers read :class:`StreamEvent` values in order from a bounded queue: the messages, and
:class:`Connected` / :class:`Disconnected` markers that delimit *epochs*, the spans the stream
watched without losing anything. A consumer that falls behind loses messages, never memory: when
the queue is full the epoch ends (``Disconnected(reason="overflow")``), the messages that do not
fit are counted in ``dropped``, and a new epoch starts with the first message that fits again.
So ``[Connected.at, Disconnected.at]`` of one epoch is exactly a span whose every message was
delivered, which is what a store needs to record as coverage.

All of it runs in the asyncio loop of the caller (``async with stream`` / ``async for``), which
may be a loop on a consumer's own thread; :meth:`UpbitStream.close` and
:meth:`UpbitStream.stats` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple

from mds.errors import InvalidRequestError
from mds.layer1._ws_parse import (
    KINDS,
    CandleMessage,
    FrameParser,
    OrderbookMessage,
    TickerMessage,
    TradeMessage,
    Watermark,
    candle_rows,
    candle_types,
    deliver,
    lag_percentiles,
)
from mds.symbols import validate_symbol
from mds.timeutil import Clock, now_ms

__all__ = [
    "DEFAULT_WS_URL",
    "CandleMessage",
    "Connected",
    "Disconnected",
    "FrameParser",
    "OrderbookMessage",
    "StreamEvent",
    "TickerMessage",
    "TradeMessage",
    "UpbitStream",
    "candle_rows",
]

log = logging.getLogger(__name__)

DEFAULT_WS_URL = "wss://api.upbit.com/websocket/v1"
_FORMATS = ("DEFAULT", "SIMPLE")
_DEPTHS = (1, 5, 15, 30)
#: Slack on the connect window: attempts spaced by the client's clock arrive at the server a
#: little unevenly, and a server counting a strict 1 s window must never see a sixth.
_WINDOW_MARGIN_S = 0.1
_LAG_SAMPLES = 4096


def _fast_loads() -> Callable[[bytes | str], Any] | None:
    """``orjson.loads`` when orjson is importable, else None (the parser's ``json.loads``).

    orjson refuses ``NaN``, ``Infinity`` and numbers that overflow a double, as the parser's
    ``json.loads`` does for the first two; it is the stricter of the two, never the laxer.
    """
    try:
        import orjson
    except ImportError:
        return None
    loads: Callable[[bytes | str], Any] = orjson.loads
    return loads


class Connected(NamedTuple):
    """Epoch ``epoch`` starts: subscribed at ``at`` (stream clock, epoch ms); every message from
    here to the matching :class:`Disconnected` is delivered."""

    epoch: int
    at: int


class Disconnected(NamedTuple):
    """Epoch ``epoch`` ends.

    ``at`` is when the last frame of the epoch that was delivered arrived (the epoch's start if
    none; for a keepalive answer, what it proves: see :attr:`UpbitStream.proven`), so
    ``[Connected.at, at]`` is the span watched without a loss. ``detected`` is when the loss was
    noticed. ``reason``: ``closed`` (the server closed), ``error`` (the connection failed),
    ``stale`` (nothing arrived within ``stale_after_s``), ``overflow`` (the consumer fell behind
    and messages were dropped), ``malformed`` (a frame could not be read: whatever it carried is
    lost; the connection stays and the next good message starts a new epoch) or ``stopped``
    (:meth:`UpbitStream.close`).
    """

    epoch: int
    at: int
    detected: int
    reason: str


StreamEvent = TickerMessage | TradeMessage | OrderbookMessage | CandleMessage | Connected | Disconnected


class UpbitStream:
    """Upbit's public WebSocket feed for many markets on one connection.

    Parameters
    ----------
    markets : sequence of str
        Upbit market codes (``KRW-BTC``), upper case.
    kinds : iterable of str
        Any of ``ticker``, ``trade``, ``orderbook``.
    candles : iterable of str
        Candle timeframes to subscribe: ``1s``, ``1m``, ``3m``, ``5m``, ``10m``, ``15m``, ``30m``,
        ``1h``/``60m``, ``4h``/``240m`` (Upbit's ``candle.*`` types).
    url : str
        ``wss://api.upbit.com/websocket/v1``, or a local server's (``FakeUpbit(...).ws_url``).
    format : {"DEFAULT", "SIMPLE"}
        Upbit's message format for the whole connection. SIMPLE frames are about half the size;
        both parse into the same messages.
    orderbook_depth : int, optional
        1, 5, 15 or 30 levels (``CODE.N``); Upbit's default (30) when None.
    queue_size : int
        Most events held for the consumer; see the module notes for what happens beyond.
    ping_interval_s : float
        Interval of WebSocket pings and of the text ``PING`` keepalive. Upbit closes a connection
        idle for about 120 s.
    stale_after_s : float
        Reconnect when no frame at all arrived for this long (a server that stopped sending while
        the TCP connection stays up). Must exceed ``ping_interval_s``.
    open_timeout_s : float
        Limit on one connection's opening handshake.
    backoff_base_s, backoff_max_s : float
        Reconnect delays grow as ``base * 2**(n-1)`` up to ``max`` after ``n`` failed attempts in
        a row, each drawn uniformly from its upper half (jitter); a connection that delivered a
        message resets ``n``.
    max_connects_per_s : int
        Connection attempts allowed in any second (Upbit: 5 per IP), whatever the backoff says.
    compression : bool
        Offer permessage-deflate (Upbit supports it; it costs CPU per frame).
    clock : callable, optional
        Epoch ms for ``received`` stamps, epoch bounds and lag; default the wall clock. A store
        passes its own clock, a test its FakeUpbit's.
    loads : callable, optional
        JSON decoder for one frame. Default: ``orjson.loads`` when orjson is installed (the
        ``fast`` extra; about 1.5-2x the messages a second on one core), else ``json.loads``;
        both refuse ``NaN``/``Infinity``, so such a frame counts as malformed either way.
    on_frame : callable, optional
        Called with every frame as received (bytes or str) before it is parsed, in the loop's
        thread; for recording raw frames (``mds watch --record``). Must not block.
    seed : int, optional
        Seeds the backoff jitter (tests).

    Raises
    ------
    InvalidRequestError
        A bad market code, kind, timeframe, format, depth or setting.

    Notes
    -----
    Use inside a running event loop: ``async with UpbitStream(...) as s: async for ev in s``, or
    ``await s.run(callback)``, or ``await s.get_batch()``. One consumer per stream.
    """

    def __init__(
        self,
        markets: Sequence[str],
        kinds: Iterable[str] = KINDS,
        candles: Iterable[str] = (),
        url: str = DEFAULT_WS_URL,
        format: str = "DEFAULT",
        *,
        orderbook_depth: int | None = None,
        queue_size: int = 65_536,
        ping_interval_s: float = 20.0,
        stale_after_s: float = 60.0,
        open_timeout_s: float = 10.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_connects_per_s: int = 5,
        compression: bool = True,
        clock: Clock | None = None,
        loads: Callable[[bytes | str], Any] | None = None,
        on_frame: Callable[[bytes | str], None] | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(markets, str):
            markets = [markets]
        self.markets = tuple(dict.fromkeys(validate_symbol(m) for m in markets))
        if not self.markets:
            raise InvalidRequestError("UpbitStream needs at least one market")
        self.kinds = tuple(dict.fromkeys(kinds))
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise InvalidRequestError(f"unknown stream kind(s) {bad}; use {', '.join(KINDS)}")
        self.candle_types = candle_types(candles)
        if not self.kinds and not self.candle_types:
            raise InvalidRequestError("UpbitStream needs at least one kind or candle timeframe")
        if format not in _FORMATS:
            raise InvalidRequestError(f"format must be DEFAULT or SIMPLE, not {format!r}")
        self.format = format
        if orderbook_depth is not None and orderbook_depth not in _DEPTHS:
            raise InvalidRequestError(f"orderbook_depth must be one of {_DEPTHS}, not {orderbook_depth!r}")
        self.orderbook_depth = orderbook_depth
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise InvalidRequestError(f"url must be a ws:// or wss:// URL, not {url!r}")
        self.url = url
        for name, v in (
            ("queue_size", queue_size),
            ("max_connects_per_s", max_connects_per_s),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be a positive int, not {v!r}")
        for name, f in (
            ("ping_interval_s", ping_interval_s),
            ("stale_after_s", stale_after_s),
            ("open_timeout_s", open_timeout_s),
            ("backoff_base_s", backoff_base_s),
            ("backoff_max_s", backoff_max_s),
        ):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
                raise InvalidRequestError(f"{name} must be a positive number of seconds, not {f!r}")
        if stale_after_s <= ping_interval_s:
            raise InvalidRequestError("stale_after_s must exceed ping_interval_s")
        self.queue_size = queue_size
        self.ping_interval_s = float(ping_interval_s)
        self.stale_after_s = float(stale_after_s)
        self.open_timeout_s = float(open_timeout_s)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_connects_per_s = max_connects_per_s
        self.compression = bool(compression)
        self.clock: Clock = clock or now_ms
        self._parser = FrameParser(self.clock, loads if loads is not None else _fast_loads())
        self._on_frame = on_frame
        self._rng = random.Random(seed)

        self._q: collections.deque[StreamEvent] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop_thread = 0
        self._ready: asyncio.Event | None = None
        self._waiting = False
        self._stopping = False
        self._done = False
        self._attempts: collections.deque[float] = collections.deque()
        # epoch state
        self._epoch = 0
        self._span_open = False
        self._connected = False
        self._last_frame_at = 0
        # what the open epoch proves: everything sent before was received (see ``proven``)
        self._proof_at = 0
        self._proof_mono = 0.0
        self._mark = Watermark(0)
        self._last_rx_mono = 0.0
        self._stale = False
        # counters (only the loop thread writes them; stats() copies them from any thread)
        self._messages = dict.fromkeys(("ticker", "trade", "orderbook", "candle"), 0)
        self._dropped = 0
        self._connects = 0
        self._connect_failures = 0
        self._refused = 0
        self._reconnects = 0
        # every reason present from the start: stats() copies it from other threads
        self._disconnects = dict.fromkeys(("closed", "error", "stale", "overflow", "malformed", "stopped"), 0)
        self._last_message_mono: float | None = None
        self._lags: collections.deque[int] = collections.deque(maxlen=_LAG_SAMPLES)
        self._last_error: str | None = None
        self._requests_sent = 0

    # -- the request -------------------------------------------------------------------------
    def request(self, ticket: str | None = None) -> list[dict[str, Any]]:
        """The subscription request sent on every connection (a fresh ticket each time)."""
        req: list[dict[str, Any]] = [{"ticket": ticket or str(uuid.uuid4())}]
        for kind in self.kinds:
            codes = list(self.markets)
            if kind == "orderbook" and self.orderbook_depth is not None:
                codes = [f"{m}.{self.orderbook_depth}" for m in codes]
            req.append({"type": kind, "codes": codes})
        for ty in self.candle_types:
            req.append({"type": ty, "codes": list(self.markets)})
        req.append({"format": self.format})
        return req

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting in the running event loop (idempotent)."""
        if self._task is not None:
            return
        if self._done:
            raise InvalidRequestError("this UpbitStream was closed; make a new one")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ready = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name="UpbitStream")

    def close(self) -> None:
        """Stop the stream (any thread, idempotent). Queued events stay readable; the last one is
        the ``Disconnected(reason="stopped")`` of an open epoch."""
        self._stopping = True
        loop, task = self._loop, self._task
        if task is None:
            self._done = True
            return
        assert loop is not None
        if threading.get_ident() == self._loop_thread:
            task.cancel()
        else:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is closed: the task is gone with it
                self._done = True

    async def aclose(self) -> None:
        """Stop the stream and wait until its connection is closed."""
        self.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> UpbitStream:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once the stream stopped (queued events may remain)."""
        return self._done

    @property
    def connected(self) -> bool:
        """Whether a connection is up and subscribed now."""
        return self._connected

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran (a stream runs in one event loop, for one consumer)."""
        return self._task is not None

    @property
    def proven(self) -> tuple[int, int] | None:
        """``(epoch, at)``: the open epoch delivered everything the server sent about times up to
        ``at`` (stream clock, ms); None between epochs.

        Ticker, orderbook and candle messages prove what :class:`~mds.layer1._ws_parse.Watermark`
        says (the server's moments sent in full; a clock that jumped ahead of the server proves
        nothing). A keepalive answer (``{"status":"UP"}``) proves ``min(received, p + elapsed)``,
        ``p`` the newest proof (or the epoch's start) and ``elapsed`` the monotonic time since:
        everything sent before it arrived, and the server cannot be further along than that. It
        speaks for the events already taken from the queue once the queue is empty.
        """
        if not self._span_open:
            return None
        return (self._epoch, self._proof_at)

    # -- consuming ------------------------------------------------------------------------------
    def __aiter__(self) -> UpbitStream:
        self.start()
        return self

    async def __anext__(self) -> StreamEvent:
        while True:
            if self._q:
                return self._q.popleft()
            if self._done:
                raise StopAsyncIteration
            await self._wait(None)

    async def get_batch(self, max_items: int = 4096, timeout: float | None = None) -> list[StreamEvent]:
        """Up to ``max_items`` events in order, waiting up to ``timeout`` seconds (None: until
        one arrives) for the first; ``[]`` on timeout or when the stream is closed and drained."""
        self.start()
        if not self._q and not self._done:
            await self._wait(timeout)
        q = self._q
        n = min(len(q), max_items)
        return [q.popleft() for _ in range(n)]

    async def run(self, callback: Callable[[list[StreamEvent]], Awaitable[None] | None], max_items: int = 4096) -> None:
        """Hand every batch of events to ``callback`` (sync or async) until the stream closes."""
        await deliver(self.get_batch, lambda: self._done, callback, max_items)

    async def _wait(self, timeout: float | None) -> None:
        ready = self._ready
        assert ready is not None
        ready.clear()
        self._waiting = True
        try:
            if timeout is None:
                await ready.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), timeout)
        finally:
            self._waiting = False

    def _wake(self) -> None:
        if self._waiting and self._ready is not None:
            self._ready.set()

    # -- the queue and epochs -------------------------------------------------------------------------
    def _open_epoch(self, at: int) -> None:
        self._epoch += 1
        self._span_open = True
        self._last_frame_at = at
        self._proof_at = at
        self._proof_mono = time.monotonic()
        self._mark = Watermark(at)
        self._q.append(Connected(self._epoch, at))
        self._wake()

    def _close_epoch(self, reason: str) -> None:
        if self._span_open:
            self._span_open = False
            self._disconnects[reason] += 1
            # May exceed queue_size by this one marker; the next message needs room again.
            self._q.append(Disconnected(self._epoch, self._last_frame_at, self.clock(), reason))
            self._wake()

    def _push(self, msg: TickerMessage | TradeMessage | OrderbookMessage | CandleMessage) -> None:
        q = self._q
        if not self._span_open:
            if len(q) >= self.queue_size:
                self._dropped += 1
                return
            self._open_epoch(msg.received)
        elif len(q) >= self.queue_size:
            self._dropped += 1
            log.warning("upbit stream: the consumer fell behind (%d events queued); dropping", len(q))
            self._close_epoch("overflow")
            return
        q.append(msg)
        self._last_frame_at = msg.received
        if type(msg) is not TradeMessage:
            at = self._mark.see(msg.timestamp, msg.received)
            if at > self._proof_at:
                self._proof_at = at
                self._proof_mono = time.monotonic()
        if self._waiting:
            self._wake()

    # -- the connection loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus

        failures = 0
        try:
            while not self._stopping:
                await self._admit()
                try:
                    ws = await connect(
                        self.url,
                        open_timeout=self.open_timeout_s,
                        ping_interval=self.ping_interval_s,
                        ping_timeout=self.ping_interval_s,
                        close_timeout=2.0,
                        compression="deflate" if self.compression else None,
                        max_queue=64,
                    )
                except asyncio.CancelledError:
                    raise
                except InvalidStatus as exc:
                    failures += 1
                    self._connect_failures += 1
                    status = exc.response.status_code
                    if status == 429:
                        self._refused += 1
                    self._last_error = f"handshake refused with HTTP {status}"
                    log.warning("upbit stream: connect refused with HTTP %d", status)
                    await self._backoff(failures)
                    continue
                except Exception as exc:  # OSError, TimeoutError, InvalidHandshake ...
                    failures += 1
                    self._connect_failures += 1
                    self._last_error = f"connect failed: {exc!r}"
                    log.warning("upbit stream: connect to %s failed: %r", self.url, exc)
                    await self._backoff(failures)
                    continue
                self._connects += 1
                if self._connects > 1:
                    self._reconnects += 1
                reason = "error"
                delivered_before = sum(self._messages.values())
                try:
                    reason = await self._session(ws)
                except asyncio.CancelledError:
                    reason = "stopped"
                    raise
                except ConnectionClosedOK:
                    reason = "closed"
                except ConnectionClosed as exc:
                    reason = "stale" if self._stale else "error"
                    self._last_error = f"connection lost: {exc!r}"
                except Exception as exc:
                    reason = "error"
                    self._last_error = f"connection failed: {exc!r}"
                    log.warning("upbit stream: connection failed: %r", exc)
                finally:
                    self._connected = False
                    self._close_epoch(reason)
                    if reason == "stopped":
                        ws.transport.abort()
                    else:
                        with contextlib.suppress(Exception):  # already gone
                            await asyncio.shield(ws.close())
                log.info("upbit stream: disconnected (%s) after epoch %d", reason, self._epoch)
                failures = 0 if sum(self._messages.values()) > delivered_before else failures + 1
                await self._backoff(max(failures, 1))
        except asyncio.CancelledError:
            pass
        finally:
            self._connected = False
            self._close_epoch("stopped")
            self._done = True
            self._wake()

    async def _admit(self) -> None:
        """Wait until another connection attempt stays within ``max_connects_per_s``."""
        window = 1.0 + _WINDOW_MARGIN_S
        att = self._attempts
        while True:
            now = time.monotonic()
            while att and att[0] <= now - window:
                att.popleft()
            if len(att) < self.max_connects_per_s:
                att.append(now)
                return
            await asyncio.sleep(att[0] + window - now)

    async def _backoff(self, failures: int) -> None:
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(failures - 1, 30))
        delay = cap / 2 + self._rng.uniform(0, cap / 2)
        log.debug("upbit stream: reconnecting in %.3f s (%d failed in a row)", delay, failures)
        await asyncio.sleep(delay)

    async def _session(self, ws: Any) -> str:
        """Subscribe on ``ws`` and deliver its frames until it ends; returns the reason."""
        await ws.send(json.dumps(self.request()))
        self._requests_sent += 1
        self._stale = False
        self._connected = True
        self._last_rx_mono = time.monotonic()
        self._open_epoch(self.clock())
        keeper = asyncio.get_running_loop().create_task(self._keepalive(ws))
        parser = self._parser
        parse = parser.parse
        messages = self._messages
        lags = self._lags
        on_frame = self._on_frame
        try:
            async for frame in ws:
                self._last_rx_mono = now = time.monotonic()
                if on_frame is not None:
                    on_frame(frame)
                malformed, keepalives = parser.malformed, parser.keepalives
                msg = parse(frame)
                if msg is None:
                    if parser.malformed != malformed:
                        # What the frame carried is lost (a candle's final update, a trade): the
                        # epoch ends at the last good frame, and the next good one opens another.
                        self._close_epoch("malformed")
                    elif parser.keepalives != keepalives and self._span_open:
                        self._keepalive_proof(now)
                    continue
                kind = type(msg)
                if kind is TradeMessage:
                    messages["trade"] += 1
                elif kind is TickerMessage:
                    messages["ticker"] += 1
                elif kind is OrderbookMessage:
                    messages["orderbook"] += 1
                else:
                    messages["candle"] += 1
                self._last_message_mono = now
                lags.append(msg.received - msg.timestamp)
                self._push(msg)
        finally:
            keeper.cancel()
        return "stale" if self._stale else "closed"

    def _keepalive_proof(self, mono: float) -> None:
        """A keepalive answer arrived: everything sent before it was received (TCP is in order),
        so the epoch watched through the server's time now, at most (see ``proven``)."""
        at = min(self.clock(), self._proof_at + int((mono - self._proof_mono) * 1000))
        if at > self._proof_at:
            self._proof_at = at
            self._proof_mono = mono
        self._last_frame_at = max(self._last_frame_at, at)

    async def _keepalive(self, ws: Any) -> None:
        """Send Upbit's text ``PING`` and abort a connection that went silent."""
        while True:
            await asyncio.sleep(min(self.ping_interval_s, self.stale_after_s / 4))
            if time.monotonic() - self._last_rx_mono > self.stale_after_s:
                log.warning("upbit stream: nothing received for %.1f s; reconnecting", self.stale_after_s)
                self._stale = True
                ws.transport.abort()
                return
            try:
                await ws.send("PING")
            except Exception:  # the receive loop sees the closed connection
                return

    # -- figures --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters and state (any thread; JSON-serialisable).

        Keys: ``messages`` (by kind), ``dropped`` (not delivered: the queue was full),
        ``malformed``, ``unknown_fields``, ``server_errors``, ``keepalives``, ``connects``,
        ``reconnects``, ``connect_failures``, ``refused`` (HTTP 429 at the handshake),
        ``disconnects`` (by reason), ``epoch``, ``connected``, ``queued``, ``last_message_age_s``
        (None before the first), ``lag_ms`` (p50 and p99 of receipt minus Upbit's ``timestamp``
        over the last 4096 messages), ``last_error``.
        """
        age = None if self._last_message_mono is None else time.monotonic() - self._last_message_mono
        p = self._parser
        return {
            "messages": dict(self._messages),
            "dropped": self._dropped,
            "malformed": p.malformed,
            "unknown_fields": p.unknown_fields,
            "server_errors": p.errors,
            "keepalives": p.keepalives,
            "connects": self._connects,
            "reconnects": self._reconnects,
            "connect_failures": self._connect_failures,
            "refused": self._refused,
            "disconnects": dict(self._disconnects),
            "epoch": self._epoch,
            "connected": self._connected,
            "queued": len(self._q),
            "last_message_age_s": age,
            "lag_ms": lag_percentiles(self._lags.copy()),
            "last_error": self._last_error or p.last_error,
        }
