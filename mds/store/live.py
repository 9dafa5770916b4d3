"""A store following a live feed: :class:`LiveFeed`, behind ``Store.follow`` (DESIGN.md section 8).

The feed (an :class:`~mds.layer1.stream.UpbitStream`, or a
:class:`~mds.layer1._replay.ReplayStream`) runs in an event loop on the LiveFeed's own thread.
Each batch of events is applied in order:

- tickers, orderbooks and trades go into the realtime cache (trades dedup on ``sequential_id``,
  so a snapshot replayed after a reconnect adds nothing twice); the feed is the cache's writer;
- a candle message updates the forming candle of its series (memory tier, under the store lock);
- closed candles are handed to history, with the coverage the epochs prove.

Handoff to history. The candle of an interval is *final* once the stream moved past it: a message
of a later interval of the series arrived in the same epoch (Upbit sends an interval's updates in
order, on one connection), or the epoch watched ``live_grace_s`` past the interval's end. A
candle whose epoch ended before either happened is not known to be final and is never written
(``candles_unconfirmed``); its interval stays missing, for REST to fetch. Coverage: an interval
is covered when it lies wholly inside one epoch's span ``[Connected.at, Disconnected.at]``
(``Disconnected.at`` is the last frame delivered) with ``live_grace_s`` to spare before its end,
so an absent candle there is a true no-trade interval; a span lost to a reconnect stays
uncovered, and the next read fetches exactly it over REST. While an epoch is open, it watched
through what the frames applied prove, never through the store's clock: ticker, orderbook and
candle messages prove the server's moments sent in full (:class:`~mds.layer1._ws_parse.Watermark`:
TCP delivers in order, and a message stamped later than any before closes the previous moment),
and a keepalive answer proves what the feed's ``proven`` says once every message before it was
applied. A server that went silent,
or a clock that jumped ahead of what the server sent, proves nothing more; a quiet market is
proven by tickers and keepalive answers that arrive after an interval's end plus the grace.

Final candles and coverage go through the write path (``Writer.store`` inside one
``Writer.batch`` per flush), so every tier stays consistent; history writes run on a worker
thread of the feed's loop, so the stream goes on receiving while a write waits for the store
lock. A candle the write path rejects is counted and logged, never fatal. REST wins: a candle
REST stored before the stream's is not overwritten, one REST stores later replaces the stream's
(the store's last-wins writes); each difference is counted (``rest_differences``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from mds._dtypes import EMPTY_CANDLES, TRADE_DTYPE
from mds.errors import InvalidCandleError, InvalidRequestError, MdsError
from mds.layer1._ws_parse import CANDLE_TYPES, Watermark, lag_percentiles
from mds.layer1.stream import (
    CandleMessage,
    Connected,
    Disconnected,
    OrderbookMessage,
    StreamEvent,
    TickerMessage,
    TradeMessage,
)
from mds.store.coverage import EMPTY_RANGES
from mds.store.health import Tiers
from mds.store.reads import Reader
from mds.store.writes import Writer
from mds.tiers.realtime import RealtimeCache
from mds.timeframes import Timeframe, parse_timeframe

__all__ = ["LiveFeed"]

logger = logging.getLogger(__name__)

#: Streamed candles kept per series to compare with REST's later answer.
RECENT_CANDLES = 256
#: How often (wall seconds) the feed's loop looks at the clock when no message arrives.
_TICK_S = 0.05
_LAG_SAMPLES = 4096
_KINDS = ("ticker", "trade", "orderbook", "candle")

_Key = tuple[str, str]  # (symbol, timeframe name)

#: Feeds some store follows (or followed): a feed runs in one event loop for one consumer.
_FOLLOWED: weakref.WeakSet[Any] = weakref.WeakSet()
_FOLLOWED_LOCK = threading.Lock()


def claim_feed(feed: Any) -> None:
    """Mark ``feed`` as followed; refuse one already followed or started by another consumer.

    Raises
    ------
    InvalidRequestError
        ``feed`` is followed already (by any store), or was started outside a store.
    """
    with _FOLLOWED_LOCK:
        if feed in _FOLLOWED:
            raise InvalidRequestError("this feed is followed already; a feed is followed once (make a new one)")
        if getattr(feed, "started", False):
            raise InvalidRequestError("this feed was started by another consumer; give follow() a new one")
        _FOLLOWED.add(feed)


#: A flush: final candles by series and open time, coverage to record, forming candles.
_Work = tuple[
    dict[_Key, dict[int, np.ndarray]],
    list[tuple[_Key, Timeframe, np.ndarray]],
    dict[_Key, tuple[Timeframe, np.ndarray]],
]


class _Forming:
    """The newest candle a series' stream sent: the latest message of its interval."""

    __slots__ = ("epoch", "row", "tf", "ts")

    def __init__(self, tf: Timeframe, ts: int, row: np.ndarray, epoch: int) -> None:
        self.tf, self.ts, self.row, self.epoch = tf, ts, row, epoch


class LiveFeed:
    """A store following a feed; made by :meth:`mds.Store.follow`, which starts it.

    ``stats()`` and ``close()`` may be called from any thread; ``close()`` is idempotent and the
    store closes every LiveFeed it started. Also a context manager (closes on exit).
    """

    def __init__(
        self,
        feed: Any,
        *,
        writer: Writer,
        reader: Reader,
        tiers: Tiers,
        realtime: RealtimeCache,
        lock: Any,
        clock: Callable[[], int],
        grace_s: float,
        on_close: Callable[[LiveFeed], None] | None = None,
    ) -> None:
        for name in ("get_batch", "close", "stats", "candle_types"):
            if not hasattr(feed, name):
                raise InvalidRequestError(f"follow() takes an UpbitStream or a ReplayStream, not {type(feed).__name__}")
        if getattr(feed, "closed", False):
            raise InvalidRequestError("this feed was closed; make a new one")
        self.feed = feed
        self._writer = writer
        self._reader = reader
        self._tiers = tiers
        self._realtime = realtime
        self._lock = lock
        self._clock = clock
        self._grace = round(grace_s * 1000)
        self._on_close = on_close
        #: candle timeframes the feed subscribed: coverage is recorded for these only
        self._covered_tfs = {CANDLE_TYPES[ty] for ty in feed.candle_types}
        # Guards _forming and _final, which the read path's hook (another thread, under the store
        # lock) reads; the feed's thread holds it only while it changes them, never the store lock.
        self._mu = threading.Lock()
        # epoch state (loop thread only, but for _forming/_final: see _mu)
        self._epoch = 0
        self._epoch_open = False
        self._epoch_start = 0
        self._watched = 0  # the current epoch watched through here (stream clock, epoch ms)
        self._mark = Watermark(0)  # the server's moments the current epoch's messages closed
        self._forming: dict[_Key, _Forming] = {}
        self._final: dict[_Key, dict[int, np.ndarray]] = {}  # ts -> row, waiting to be written
        self._cov_from: dict[_Key, int] = {}  # coverage already recorded up to here, this epoch
        self._partials: dict[_Key, tuple[Timeframe, np.ndarray]] = {}
        self._partial_at: dict[_Key, int] = {}  # the forming interval whose candle memory holds
        self._cover: list[tuple[_Key, Timeframe, np.ndarray]] = []  # coverage waiting to be written
        # shared with the read path's hook (both under the store lock)
        self._recent: dict[_Key, collections.OrderedDict[int, bytes]] = {}
        self._rest: dict[_Key, collections.OrderedDict[int, bytes]] = {}
        # figures (written by the loop thread, or under the store lock; read from any thread)
        self._applied = dict.fromkeys(_KINDS, 0)
        self._counts = dict.fromkeys(
            (
                "candles_written",
                "candles_rejected",
                "candles_unconfirmed",
                "candles_late",
                "covered_intervals",
                "rest_differences",
                "trades_duplicate",
                "rejected",
                "write_errors",
                "epochs",
            ),
            0,
        )
        self._apply_lags: collections.deque[int] = collections.deque(maxlen=_LAG_SAMPLES)
        self._error: str | None = None
        #: the last epochs' watched spans ``[Connected.at, Disconnected.at or None]``
        self._spans: collections.deque[list[int | None]] = collections.deque(maxlen=16)
        self._running = False
        self._closing = False
        self._started = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> LiveFeed:
        """Start receiving on the LiveFeed's thread (the store calls it)."""
        if self._thread is not None:
            return self
        self._reader.on_fetched.append(self._on_fetched)
        self._reader.live_forming.append(self._keeps_forming)
        self._running = True
        self._thread = threading.Thread(target=self._thread_main, name="mds-live", daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the feed and wait for its thread (any thread; idempotent)."""
        self._closing = True
        self.feed.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("live feed: the feed's thread did not stop within %.1f s", timeout)
        with self._lock:
            if self._on_fetched in self._reader.on_fetched:
                self._reader.on_fetched.remove(self._on_fetched)
            if self._keeps_forming in self._reader.live_forming:
                self._reader.live_forming.remove(self._keeps_forming)
        if self._on_close is not None:
            cb, self._on_close = self._on_close, None
            cb(self)

    def _keeps_forming(self, sym: str, tf: Timeframe, forming: int) -> bool:
        """Whether this feed, connected now, put the candle of ``forming`` in memory (the reader
        then answers ``include_partial`` from memory instead of asking REST)."""
        return self._epoch_open and self._running and self._partial_at.get((sym, tf.name)) == forming

    def __enter__(self) -> LiveFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Whether the feed's loop still runs."""
        return self._running

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported in stats(); the store goes on
            self._error = repr(exc)
            logger.error("live feed stopped: %r", exc)
        finally:
            self._running = False
            self._started.set()

    async def _main(self) -> None:
        feed = self.feed
        feed.start()
        self._started.set()
        try:
            while True:
                batch = await feed.get_batch(4096, timeout=_TICK_S)
                if batch:
                    self._apply(batch)
                    idle = False
                else:
                    idle = True
                    if feed.closed:
                        break
                work = self._due(idle)
                if work is not None:
                    await asyncio.to_thread(self._write, *work)
        finally:
            close = getattr(feed, "aclose", None)
            if close is not None:
                await close()

    # -- applying events (loop thread) ---------------------------------------------------------------
    def _apply(self, batch: list[StreamEvent]) -> None:
        trades: dict[str, list[tuple[int, float, float, int, int]]] = {}
        rt = self._realtime
        applied = self._applied
        now = self.feed.clock()
        lags = self._apply_lags
        proof = 0  # what this batch's messages of the open epoch prove (see the module notes)
        mark = self._mark
        for ev in batch:
            kind = type(ev)
            if kind is TradeMessage:
                trades.setdefault(ev.market, []).append(ev.row)  # type: ignore[union-attr,arg-type]
                lags.append(now - ev.received)  # type: ignore[union-attr]
                continue
            if kind is TickerMessage or kind is OrderbookMessage:
                try:
                    if kind is TickerMessage:
                        rt.put_ticker(ev.fields)  # type: ignore[union-attr]
                        applied["ticker"] += 1
                    else:
                        rt.put_orderbook(ev.fields)  # type: ignore[union-attr]
                        applied["orderbook"] += 1
                except MdsError as exc:
                    self._counts["rejected"] += 1
                    logger.warning("live feed: the realtime cache refused a %s: %s", kind.__name__, exc)
                lags.append(now - ev.received)  # type: ignore[union-attr]
            elif kind is CandleMessage:
                self._candle(ev)  # type: ignore[arg-type]
                applied["candle"] += 1
                lags.append(now - ev.received)  # type: ignore[union-attr]
            elif kind is Connected or kind is Disconnected:
                # the messages before the marker belong to the epoch it opens or closes after
                if self._epoch_open and proof > self._watched:
                    self._watched = proof
                proof = 0
                if kind is Connected:
                    self._connected(ev)  # type: ignore[arg-type]
                    mark = self._mark
                else:
                    self._disconnected(ev)  # type: ignore[arg-type]
                continue
            at = mark.see(ev.timestamp, ev.received)  # type: ignore[union-attr]
            if at > proof:
                proof = at
        if trades:
            self._put_trades(trades)
        if self._epoch_open and proof > self._watched:
            self._watched = proof

    def _put_trades(self, trades: dict[str, list[tuple[int, float, float, int, int]]]) -> None:
        for market, rows in trades.items():
            arr = np.array(rows, dtype=TRADE_DTYPE)
            before = self._realtime.duplicates
            try:
                self._realtime.put_trades(market, arr)
            except MdsError as exc:
                self._counts["rejected"] += len(rows)
                logger.warning("live feed: the realtime cache refused %d %s trades: %s", len(rows), market, exc)
                continue
            self._counts["trades_duplicate"] += self._realtime.duplicates - before
            self._applied["trade"] += len(rows)

    def _connected(self, ev: Connected) -> None:
        self._spans.append([ev.at, None])
        self._epoch = ev.epoch
        self._epoch_open = True
        self._epoch_start = ev.at
        self._watched = ev.at
        self._mark = Watermark(ev.at)
        self._cov_from.clear()
        self._counts["epochs"] += 1

    def _disconnected(self, ev: Disconnected) -> None:
        # What the applied frames proved, and never past the last frame the epoch delivered.
        self._watched = max(self._epoch_start, min(self._watched, ev.at))
        if self._spans and self._spans[-1][1] is None:
            self._spans[-1][1] = self._watched
        # What the epoch proved is settled now: finals and coverage up to its end.
        self._settle(self._watched, closing=True)
        self._epoch_open = False
        self._cov_from.clear()

    def _candle(self, msg: CandleMessage) -> None:
        with self._mu:
            self._candle_locked(msg)

    def _candle_locked(self, msg: CandleMessage) -> None:
        key = (msg.market, msg.timeframe)
        ts = msg.ts
        cur = self._forming.get(key)
        if cur is None or ts > cur.ts:
            if cur is not None:
                if cur.epoch == self._epoch and self._epoch_open:
                    self._finalise(key, cur)  # the stream moved past it in the same epoch
                else:
                    self._counts["candles_unconfirmed"] += 1
            self._forming[key] = _Forming(
                cur.tf if cur is not None else parse_timeframe(msg.timeframe), ts, msg.row, self._epoch
            )
            self._partials[key] = (self._forming[key].tf, msg.row)
        elif ts == cur.ts:
            cur.row, cur.epoch = msg.row, self._epoch
            self._partials[key] = (cur.tf, msg.row)
        else:
            # An older interval after a newer one (reordered frames): the later message of that
            # interval wins over the version taken as final.
            self._counts["candles_late"] += 1
            self._final.setdefault(key, {})[ts] = msg.row

    def _finalise(self, key: _Key, cur: _Forming) -> None:
        self._final.setdefault(key, {})[cur.ts] = cur.row

    def _settle(self, watched: int, closing: bool = False) -> None:
        """Finalise what the open epoch watching through ``watched`` proves, and queue the
        coverage it adds."""
        if not self._epoch_open:
            return
        grace = self._grace
        now = int(self._clock())
        with self._mu:
            for key, cur in list(self._forming.items()):
                if cur.epoch == self._epoch and self._epoch_open and cur.tf.add(cur.ts, 1) + grace <= watched:
                    self._finalise(key, cur)
                    del self._forming[key]
                    self._partials.pop(key, None)
                elif closing and cur.epoch == self._epoch:
                    cur.epoch = -1  # not proven final; a message of the next epoch may replace it
        for key in self._series_to_cover():
            tf = parse_timeframe(key[1])
            start = self._cov_from.get(key, tf.ceil(self._epoch_start))
            end = tf.floor(max(watched - grace, 0))
            newest = self._forming.get(key)
            if newest is not None and newest.epoch == self._epoch:
                # a message of a later interval arrived in this epoch: every interval before it
                # was sent in full (one connection delivers in order), trades or none
                end = max(end, newest.ts)
            end = min(end, tf.floor(now))  # closed intervals only, by the store's clock too
            if end > start:
                self._cover.append((key, tf, np.array([[start, end]], dtype=np.int64)))
                self._cov_from[key] = end

    def _series_to_cover(self) -> list[_Key]:
        markets = getattr(self.feed, "markets", ()) or tuple(
            {k[0] for k in self._forming} | {k[0] for k in self._final}
        )
        return [(m, tf) for m in markets for tf in sorted(self._covered_tfs)]

    # -- handing off to history -------------------------------------------------------------------
    def _due(self, idle: bool) -> _Work | None:
        """What to write now: finals, coverage and forming candles; None when nothing."""
        if self._epoch_open and idle:
            # Drained: every message received before the feed's newest keepalive answer was
            # applied, so what that answer proves holds (never the store's clock: a connection
            # that stays up proves nothing by itself).
            proven = getattr(self.feed, "proven", None)
            if proven is not None and proven[0] == self._epoch and proven[1] > self._watched:
                self._watched = proven[1]
        self._settle(self._watched)
        if not self._final and not self._cover and not self._partials:
            return None
        with self._mu:
            work = (self._final, self._cover, self._partials)
            self._final, self._cover, self._partials = {}, [], {}
        return work

    def _write(
        self,
        final: dict[_Key, dict[int, np.ndarray]],
        cover: list[tuple[_Key, Timeframe, np.ndarray]],
        partials: dict[_Key, tuple[Timeframe, np.ndarray]],
    ) -> None:
        """Write finals and coverage through the write path, forming candles to memory (worker
        thread; takes the store lock)."""
        writer = self._writer
        # a series may have coverage from several epochs queued (a batch spanning a reconnect):
        # every range is kept, not only the last
        spans: dict[_Key, list[np.ndarray]] = {}
        for key, _tf, rng in cover:
            spans.setdefault(key, []).append(rng)
        ranges = {key: np.concatenate(parts) for key, parts in spans.items()}
        keys = list(dict.fromkeys([*final, *ranges]))
        with self._lock:
            now = int(self._clock())
            jobs: list[tuple[str, Timeframe, np.ndarray, np.ndarray, int]] = []
            for key in keys:
                tf = parse_timeframe(key[1])
                rows = self._rows(key, tf, final.get(key, {}), now)
                rng = ranges.get(key, EMPTY_RANGES)
                if len(rows) or len(rng):
                    jobs.append((key[0], tf, rows, rng, sum(tf.count(int(a), int(b)) for a, b in rng)))
            if jobs:
                try:
                    with writer.batch():
                        for sym, tf, rows, rng, _n in jobs:
                            writer.store(sym, tf, rows, rng, now)
                except MdsError as exc:
                    self._counts["write_errors"] += 1
                    logger.warning("live feed: writing %d series to history failed, nothing stored: %s", len(jobs), exc)
                else:
                    for sym, tf, rows, _rng, n in jobs:
                        self._counts["candles_written"] += len(rows)
                        self._counts["covered_intervals"] += n
                        recent = self._recent.setdefault((sym, tf.name), collections.OrderedDict())
                        for r in rows:
                            recent[int(r["ts"])] = r.tobytes()
                        while len(recent) > RECENT_CANDLES:
                            recent.popitem(last=False)
            mem = self._tiers.tier("memory")
            if mem is not None:
                for (sym, _name), (tf, row) in partials.items():
                    if int(row["ts"][0]) == tf.floor(now):
                        mem.set_partial(sym, tf, row)
                        self._partial_at[(sym, tf.name)] = int(row["ts"][0])

    def _rows(self, key: _Key, tf: Timeframe, got: dict[int, np.ndarray], now: int) -> np.ndarray:
        """The final candles of ``key`` to write: checked, without those REST stored first."""
        if not got:
            return EMPTY_CANDLES
        rest: dict[int, bytes] = self._rest.get(key) or {}
        rows = []
        for ts in sorted(got):
            row = got[ts]
            seen = rest.get(ts)
            if seen is not None:  # REST stored this interval first: it stays
                if seen != row.tobytes():
                    self._counts["rest_differences"] += 1
                continue
            rows.append(row)
        if not rows:
            return EMPTY_CANDLES
        arr = np.concatenate(rows)
        try:
            return Writer.prepared(arr, tf, now)
        except InvalidCandleError as exc:
            bad = set(exc.rows)
            self._counts["candles_rejected"] += len(bad)
            logger.warning("live feed: %d streamed %s %s candle(s) rejected: %s", len(bad), key[0], key[1], exc)
            keep = np.array([i not in bad for i in range(len(arr))], dtype=bool)
            return Writer.prepared(arr[keep], tf, now) if keep.any() else EMPTY_CANDLES

    def _on_fetched(self, sym: str, tf: Timeframe, rows: np.ndarray, covered: np.ndarray) -> None:
        """The read path stored candles fetched from REST (under the store lock): count where they
        differ from what the stream wrote, and remember them so the stream does not overwrite."""
        key = (sym, tf.name)
        if key[1] not in self._covered_tfs and key not in self._recent and key not in self._forming:
            return
        recent = self._recent.get(key)
        got = {int(t): r.tobytes() for t, r in zip(rows["ts"].tolist(), rows)}
        if recent:
            for ts, mine in list(recent.items()):
                theirs = got.get(ts)
                inside = any(a <= ts < b for a, b in covered.tolist())
                if theirs is not None or inside:
                    if theirs != mine:
                        self._counts["rest_differences"] += 1
                        logger.info("live feed: %s %s at %d: REST's candle differs from the stream's", sym, tf.name, ts)
                    del recent[ts]  # compared once; REST's is stored now
        with self._mu:  # the feed's thread changes these dicts
            forming = self._forming.get(key)
            lo = forming.ts if forming is not None else None
            pending = self._final.get(key)
            if pending:
                lo = min(pending) if lo is None else min(lo, min(pending))
        if lo is None:
            return
        rest = self._rest.setdefault(key, collections.OrderedDict())
        for ts, b in got.items():
            if ts >= lo:
                rest[ts] = b
        while len(rest) > RECENT_CANDLES:
            rest.popitem(last=False)

    # -- figures ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """JSON-serialisable figures (any thread).

        Keys: ``messages`` (by kind, as received), ``applied`` (by kind), ``dropped``,
        ``malformed``, ``reconnects``, ``epochs``, ``lag_ms`` (``p50``/``p99``: receipt minus
        Upbit's timestamp; ``apply_p50``/``apply_p99``: applied minus receipt), ``last_message_age_s``,
        ``candles_written``, ``covered_intervals``, ``rest_differences``, ``trades_duplicate``,
        ``candles_rejected``, ``candles_unconfirmed`` (closed by a lost connection before they
        were known final: not written), ``candles_late``, ``watched`` (the last 16
        epochs' spans ``[start, end]``, epoch ms, end None while open), ``rejected`` (realtime messages the
        cache refused), ``write_errors``, ``running``, ``error``; ``feed`` holds the feed's own
        figures.
        """
        fs = self.feed.stats()
        applied = lag_percentiles(self._apply_lags.copy())
        out: dict[str, Any] = {
            "messages": fs.get("messages", {}),
            "applied": dict(self._applied),
            "dropped": fs.get("dropped", 0),
            "malformed": fs.get("malformed", 0),
            "reconnects": fs.get("reconnects", 0),
            "lag_ms": {
                **fs.get("lag_ms", {"p50": None, "p99": None}),
                "apply_p50": applied["p50"],
                "apply_p99": applied["p99"],
            },
            "last_message_age_s": fs.get("last_message_age_s"),
            **self._counts,
            "watched": [list(s) for s in self._spans.copy()],
            "running": self._running,
            "error": self._error,
            "feed": fs,
        }
        return out
