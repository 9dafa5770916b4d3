"""The Store: the public facade over the tiers (DESIGN.md sections 2 and 3).

``mds.open()`` composes the tiers chosen in :class:`~mds.models.Config` (memory, LMDB disk, the
durable tier) above an optional Layer 1. Each public method checks its arguments and hands the
work to the role that owns it:

- :mod:`mds.store.reads`: the lookup plan (which tier proves an answer, fill on the way back);
- :mod:`mds.store.writes`: validation, commit order, batches, deletes;
- :mod:`mds.store.coverage`: the coverage cache and gap kinds;
- :mod:`mds.store.changes`: cross-process change stamps;
- :mod:`mds.store.remote`: other hosts' changes to a shared durable tier;
- :mod:`mds.store.fetch`: what to ask Layer 1, on the store's Layer 1 thread;
- :mod:`mds.store.health`: the tiers' lifecycle, degradation and recovery;
- :mod:`mds.store.upkeep`: ``maintain()`` and ``check()``;
- :mod:`mds.store.metrics`: counters and ``stats()``;
- :mod:`mds.store.api`: the seed-compatible async ``get()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mds._files import check_store_dir
from mds.errors import InvalidRequestError, StorageUnavailableError
from mds.models import (
    CheckReport,
    Config,
    Gap,
    MaintenanceReport,
    SeriesInfo,
    StorageRequest,
    StorageResponse,
    WriteResult,
)
from mds.store import upkeep
from mds.store.api import AsyncApi
from mds.store.changes import ChangeSlots
from mds.store.coverage import Coverage, gap_kinds
from mds.store.fetch import Fetcher
from mds.store.health import Tiers, counting, storage_errors
from mds.store.metrics import Metrics
from mds.store.peeks import CachePeeks
from mds.store.reads import Reader, time_range
from mds.store.remote import RemoteChanges
from mds.store.series import list_series
from mds.store.writes import Writer
from mds.symbols import validate_symbol
from mds.tiers.realtime import RealtimeCache
from mds.timeframes import TIMEFRAMES, Timeframe, parse_timeframe
from mds.timeutil import checked_clock, now_ms, to_ms

logger = logging.getLogger(__name__)

# the memory hit's path (Store.candles) looks these up once per call: module globals, not
# attributes of modules
_perf_counter = time.perf_counter
_CANONICAL = TIMEFRAMES

__all__ = ["Store", "open"]


def default_path() -> Path:
    """``$MDS_HOME`` if set, else ``~/.mds``."""
    env = os.environ.get("MDS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".mds"


class Store:
    """A market-data store over the tiers chosen in ``config``. Create it with :func:`mds.open`.

    Thread-safe: one lock serialises tier mutations; reads that hit memory take it briefly. One
    writer process and many reader processes may open the same path.

    Arrays handed out are read-only and never change afterwards (snapshot semantics).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        layer1: Any = None,
        config: Config | None = None,
        clock: Callable[[], int] | None = None,
        history: str | None = None,
    ) -> None:
        if history is not None and not isinstance(history, str):
            raise InvalidRequestError("history must be None or a postgresql:// URL string")
        cfg = config if config is not None else Config()
        if not isinstance(cfg, Config):
            raise InvalidRequestError("config must be an mds.Config")
        if history is not None and "sqlite" not in cfg.tiers:
            raise InvalidRequestError('history names the durable tier: config.tiers must include "sqlite"')
        self._config = cfg
        self._clock: Callable[[], int] = checked_clock(clock) if clock is not None else now_ms
        self.path = Path(path).expanduser() if path is not None else default_path()
        self._lock = counting(threading.RLock())  # Tiers.off_lock asks how often it is held
        self._metrics = Metrics()
        self._memory_hit = self._metrics.memory_hit  # the memory hit's one compiled call, at hand
        self._symbols_ok: set[str] = set()
        self._closed = False
        self._live: list[Any] = []  # the LiveFeeds started by follow(), closed by close()
        persistent = any(t in cfg.tiers for t in ("disk", "sqlite"))
        writable = True
        if persistent:
            # no planted links, ours and private (0700); raises before anything is opened
            writable = check_store_dir(self.path, create=True)
        self._health = Tiers(self.path, cfg, self._clock, writable, history)
        self._health.lock = self._lock
        self._slots = ChangeSlots()
        self._coverage = Coverage(self._health, self._slots)
        self._remote = RemoteChanges(self._health, self._slots, self._coverage, self._lock)
        self._health.on_open.append(self._remote.opened)
        try:
            if persistent:
                self._slots.open(self.path / "changes.bin", writable)
            self._health.open(stamp=self._slots.stamp)
            durable = self._health.states.get("sqlite")
            if history is not None and durable is not None and durable.obj is None:
                # a wrong URL, refused credentials, no driver, no server: said at open, not
                # discovered later as a store that silently passes every read through
                raise StorageUnavailableError(f"history: {durable.error}")
            if persistent:
                upkeep.warn_lost_commits(self._health, self._slots)
        except BaseException:
            self._close_tiers()
            raise
        self._realtime = RealtimeCache(
            ticker_ttl_ms=int(self.config.realtime_ttl_s * 1000),
            orderbook_ttl_ms=int(self.config.orderbook_ttl_s * 1000),
            clock=self._clock,
        )
        self._writer = Writer(self._health, self._slots, self._coverage, self.config, self._lock)
        self._fetcher: Fetcher | None = None
        self._peeks: CachePeeks | None = None
        if layer1 is not None:
            from mds.layer1.connector import SmartRouterConnector

            connector = (
                layer1
                if isinstance(layer1, SmartRouterConnector)
                else SmartRouterConnector(
                    layer1, clock=self._clock, timeout_s=self.config.layer1_timeout_s, config=self.config
                )
            )
            self._fetcher = Fetcher(
                connector,
                self.config,
                self._metrics,
                self._lock,
                self._clock,
                self._writer.in_batch,
                self._health.first_stored,
            )
            self._peeks = CachePeeks(self._fetcher, self.config, self._metrics, self._clock, self._realtime)
            try:
                self._peeks.sync_policy()  # bounded by the Layer 1 timeout; a failure is logged
            except BaseException:
                self._fetcher.close()
                self._close_tiers()
                raise
        self._reader = Reader(
            self._health,
            self._slots,
            self._coverage,
            self._writer,
            self._fetcher,
            self._metrics,
            self.config,
            self._clock,
            self._peeks,
        )
        self._api = AsyncApi(
            self._reader,
            self._fetcher,
            self._realtime,
            self._metrics,
            self.config,
            self._lock,
            self._check_open,
            self._peeks,
        )

    @property
    def config(self) -> Config:
        """The configuration the store was opened with (open another store to change it)."""
        return self._config

    @property
    def writable(self) -> bool:
        """False on a directory this process cannot write: the store opened read-only (reads are
        served, writes raise StorageUnavailableError). Setting it False makes this store refuse
        writes from then on."""
        return self._health.writable

    @writable.setter
    def writable(self, value: bool) -> None:
        self._health.writable = bool(value)

    # ------------------------------------------------------------------ candles
    def write_candles(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        candles: Any,
        *,
        complete: tuple[Any, Any] | None = None,
    ) -> WriteResult:
        """Validate and store a batch of candles in every tier.

        Parameters
        ----------
        symbol, timeframe
            The series, e.g. ``"KRW-BTC"``, ``"1m"``.
        candles
            A CANDLE_DTYPE array (any order; duplicate ``ts``: the last wins) or an iterable of
            Upbit candle dicts.
        complete
            ``(start, end)``: the batch holds every candle of that range, so absent slots in it
            are no-trade intervals (recorded as coverage).

        Returns
        -------
        WriteResult
            Inserted, updated and unchanged counts over closed candles.

        Raises
        ------
        InvalidRequestError
            Bad symbol, timeframe or ``complete`` range.
        InvalidCandleError
            Any row is invalid (non-finite, high/low outside the body, negative volume or value,
            misaligned or in the future): nothing at all is stored.
        StorageUnavailableError
            The durable write failed; nothing was stored.

        Notes
        -----
        The candle still forming at the store's clock (partial) is kept in memory only. The durable
        write commits before the faster tiers change.
        """
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        arr = Writer.candles_in(candles)
        now = int(self._clock())
        rows = Writer.prepared(arr, tf, now)
        self._writer.check_writable()
        covered = Writer.complete_range(complete, tf, now)
        return self._writer.store(sym, tf, rows, covered, now, prepared=True)

    def candles(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        *,
        count: int | None = None,
        start: Any = None,
        end: Any = None,
        include_partial: bool = False,
    ) -> np.ndarray:
        """Read candles as a read-only CANDLE_DTYPE array, ascending ``ts``, no duplicates.

        Parameters
        ----------
        timeframe
            A native timeframe, or a derived one (``"2h"``, ``"6h"``, ``"12h"``, ``"3d"``):
            resampled from a native series (:mod:`mds.store.derived`), never stored.
        count
            The latest ``count`` closed candles (before ``end`` when given); with ``start``, the
            first ``count`` candles from ``start``.
        start, end
            The half-open range ``[start, end)``: int epoch ms, ``datetime`` (naive = UTC) or ISO
            string. ``start`` alone reads up to the last closed interval.
        include_partial
            Append the candle still forming (memory only; fetched from Layer 1 when there is one).

        Returns
        -------
        numpy.ndarray
            Read-only; it never changes afterwards.

        Raises
        ------
        InvalidRequestError
            Bad symbol, timeframe, range or count, or neither ``count`` nor ``start`` given.
        Layer1Error
            A part the tiers do not cover had to be fetched and Layer 1 failed (nothing partial
            is returned).
        StorageUnavailableError
            Storage could not answer and there is no Layer 1 to pass the read through to.
        """
        t0 = _perf_counter()
        if self._closed:  # _check_open and _sym written out: this is the memory hit's path
            raise StorageUnavailableError("the store is closed")
        sym = symbol if symbol.__class__ is str and symbol in self._symbols_ok else self._sym(symbol)
        tf = _CANONICAL.get(timeframe) if timeframe.__class__ is str else None  # parse_timeframe's first step
        if tf is None:
            tf = parse_timeframe(timeframe, derived=True)
        if tf.derived:  # "2h", "3d" ...: resampled from a native series (mds/store/derived.py)
            from mds.store import derived

            with self._lock:
                rows, served = derived.read(self._reader, sym, tf, count, start, end, include_partial)
            self._metrics.served(served, "api.candles", (_perf_counter() - t0) * 1000)
            return rows
        with self._lock:
            if count.__class__ is int and count > 0 and start is None and end is None and not include_partial:
                peeks = self._peeks
                if peeks is not None and self._config.lookup == "layer1_first":
                    arr = peeks.fast_latest(sym, tf, count)
                    if arr is not None:
                        self._metrics.served("layer1_cache", "api.candles", (_perf_counter() - t0) * 1000)
                        return arr
                arr = self._reader.fast_latest(sym, tf, count)
                if arr is not None:
                    self._memory_hit(t0)
                    return arr
            arr, source = self._reader.read(sym, tf, count, start, end, include_partial, allow_layer1=True)
        self._metrics.served(source, "api.candles", (_perf_counter() - t0) * 1000)
        return arr

    def coverage(self, symbol: str, timeframe: str | Timeframe) -> list[tuple[int, int]]:
        """Covered ranges ``[(start, end), ...]`` (epoch ms, half-open, merged) of a series.

        A range that starts at 0 reaches back to the start of the market's history.
        """
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        with self._lock, storage_errors(sym, tf):
            self._coverage.sync(sym, tf)
            return [(int(a), int(b)) for a, b in self._coverage.of(sym, tf).tolist()]

    def gaps(self, symbol: str, timeframe: str | Timeframe, *, start: Any = None, end: Any = None) -> list[Gap]:
        """Runs of absent candles with their kind.

        ``no_trades``: inside coverage (the source was asked and had nothing); ``missing``: outside
        coverage. Without a range, the span of the series' coverage and data (coverage reaching back
        to the start of history counts from the first candle).
        """
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        s, e = time_range(start, end)
        with self._lock, storage_errors(sym, tf):
            self._coverage.sync(sym, tf)
            cov = self._coverage.of(sym, tf)
            data = self._coverage.stored_ts(sym, tf, s, e)
        return gap_kinds(data, cov, tf, s, e)

    def delete(self, symbol: str, timeframe: str | Timeframe, *, start: Any = None, end: Any = None) -> int:
        """Remove candles in ``[start, end)`` (default: all) from every tier; coverage shrinks with it.

        Returns the number of candles removed from the durable tier (or from memory without one).
        """
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        s, e = time_range(start, end)
        return self._writer.delete(sym, tf, s, e)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Store]:
        """Every write inside commits as one durable transaction, all or nothing.

        The faster tiers (LMDB, memory) are updated after the commit; if the batch fails nothing
        of it is stored anywhere. A store without a durable tier (``tiers=("memory",)`` or
        ``("memory", "disk")``) has no transaction to roll back: there each write inside is
        stored when it returns, and a failure later in the batch keeps the writes before it.
        """
        self._check_open()
        with self._writer.batch():
            yield self

    def maintain(self, force: bool = False) -> MaintenanceReport:
        """Run maintenance now: SQLite fragmentation check and VACUUM past the threshold (always
        with ``force``), ANALYZE / ``PRAGMA optimize``, and purge of expired LMDB entries."""
        self._check_open()
        with self._lock:
            return upkeep.maintain(self._health, force)

    def check(self) -> CheckReport:
        """Integrity of every tier: SQLite integrity and coverage vs data, LMDB vs SQLite."""
        self._check_open()
        with self._lock:
            return upkeep.check(self._health, self._slots, self._lock)

    def panel(
        self,
        symbols: Any,
        timeframe: str | Timeframe,
        *,
        start: Any,
        end: Any,
        field: str = "close",
        fill: str = "nan",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Several markets on one time grid, for vectorised backtests.

        Parameters
        ----------
        symbols
            Market codes (no repeats); column ``j`` of ``values`` is ``symbols[j]``.
        timeframe
            Any timeframe a read takes, derived ones (``"2h"``, ``"3d"``) included.
        start, end
            The half-open range ``[start, end)`` (both required).
        field
            ``open``, ``high``, ``low``, ``close`` (default), ``volume`` or ``value``.
        fill
            ``"nan"`` (default): NaN where no candle is; ``"ffill"``: a no-trade slot takes the
            last close (volume and value: 0).

        Returns
        -------
        ts, values
            ``ts`` int64[n]: every open time of the grid in ``[start, end)``; ``values``
            float64[n, k]. Slots not known to be no-trade (``missing``: never fetched, not yet
            closed) are always NaN, and so is every slot before a market's first candle.
        """
        self._check_open()
        from mds.store import panel

        return panel.build(self, symbols, timeframe, start, end, field, fill)

    # ------------------------------------------------------------------ listing, long reads, datasets
    def series(self) -> list[SeriesInfo]:
        """Every stored series: symbol, timeframe, first and last candle, count and the share of
        the intervals between them that coverage proves (see :class:`~mds.SeriesInfo`).

        Lists what the durable tier holds (SQLite or PostgreSQL); a store without one lists what
        its memory and LMDB tiers hold now. A series with coverage but no candle (a span known to
        have had no trades) is listed with ``first``/``last``/``covered`` None.

        Raises
        ------
        StorageUnavailableError
            The durable tier cannot answer (never a shorter list).
        """
        self._check_open()
        with self._lock:
            return list_series(self._health, self._coverage)

    def iter_candles(
        self, symbol: str, timeframe: str | Timeframe, *, start: Any, end: Any = None, chunk: int = 100_000
    ) -> Iterator[np.ndarray]:
        """Read ``[start, end)`` in chunks of ``chunk`` intervals, without holding it all.

        Each chunk is one :meth:`candles` range read (proven like any read: a span the tiers do
        not cover is fetched from Layer 1 when there is one, and without one a missing span reads
        as :meth:`candles` reads it, stored candles only); chunks without candles are skipped.

        Parameters
        ----------
        start, end
            The half-open range (as for :meth:`candles`); ``end`` None: up to the last interval
            closed when the iteration was asked for.
        chunk
            Intervals per chunk (so at most that many candles per array), 1 to 10,000,000.

        Yields
        ------
        numpy.ndarray
            Read-only CANDLE_DTYPE arrays, ascending and consecutive (each starts after the last).

        Raises
        ------
        InvalidRequestError
            Bad symbol, timeframe, range or chunk (at the call, before anything is read).
        """
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or not 0 < int(chunk) <= 10_000_000:
            raise InvalidRequestError(f"chunk must be an int in 1..10000000, not {chunk!r}")
        s, e = time_range(start, end)
        if s is None:
            raise InvalidRequestError("iter_candles needs start")
        hi = tf.floor(int(self._clock())) if e is None else e
        return self._chunks(sym, tf, tf.ceil(s), hi, int(chunk))

    def _chunks(self, sym: str, tf: Timeframe, lo: int, hi: int, chunk: int) -> Iterator[np.ndarray]:
        a = lo
        while a < hi:
            b = min(tf.add(a, chunk), hi)
            arr = self.candles(sym, tf, start=a, end=b)
            if len(arr):
                yield arr
            a = b

    def export_dataset(
        self,
        directory: str | os.PathLike[str],
        symbols: Any = None,
        timeframes: Any = None,
        start: Any = None,
        end: Any = None,
    ) -> list[SeriesInfo]:
        """Write stored series as a Hive-partitioned Parquet dataset
        (``symbol=.../timeframe=.../year=.../part-0.parquet``) with their coverage.

        Reads what is stored (never Layer 1), chunk by chunk. The dataset appears at
        ``directory`` whole or not at all (written beside it, renamed when complete); pyarrow,
        DuckDB and Polars read it as it is, and :meth:`import_dataset` restores the series and
        their gap kinds exactly. Needs the ``parquet`` (or ``arrow``) extra.

        Parameters
        ----------
        directory
            A new or empty directory.
        symbols, timeframes
            Only these (a name or a list of names); None: every stored one.
        start, end
            Only candles and coverage in ``[start, end)``; None: unbounded.

        Returns
        -------
        list of SeriesInfo
            The series written, as the dataset holds them.

        Raises
        ------
        ImportError
            pyarrow is not installed (names the extra).
        InvalidRequestError
            Bad arguments, or ``directory`` exists and is not an empty directory.
        StorageUnavailableError
            Storage could not answer; nothing is left at ``directory``.
        """
        self._check_open()
        from mds import _dataset

        syms = None if symbols is None else {self._sym(x) for x in _names(symbols, "symbols")}
        tfs = None if timeframes is None else {parse_timeframe(x).name for x in _names(timeframes, "timeframes")}
        s, e = time_range(start, end)
        parts = (self._health, self._coverage, self._slots, self._lock)
        return _dataset.export_dataset(directory, *parts, syms, tfs, s, e)

    def import_dataset(self, directory: str | os.PathLike[str]) -> list[SeriesInfo]:
        """Store a dataset written by :meth:`export_dataset`: its candles and coverage.

        Everything is checked before anything is stored (the manifest, every file's size and
        SHA-256, the schema, every candle through the write path's validation); then it is
        written in one :meth:`batch`. Candles of a time already stored are replaced.

        Returns
        -------
        list of SeriesInfo
            The series the dataset held.

        Raises
        ------
        ImportError
            pyarrow is not installed (names the extra).
        InvalidRequestError
            Not a complete mds dataset, or a file that differs from what was exported: nothing
            is stored.
        InvalidCandleError
            An invalid candle (or one after this store's clock): nothing is stored.
        StorageUnavailableError
            The write failed: nothing is stored.
        """
        self._check_open()
        from mds import _dataset

        return _dataset.import_dataset(directory, self._writer, self._clock)

    # ------------------------------------------------------------------ live feed
    def follow(self, feed: Any) -> Any:
        """Follow a live feed in the background: returns a started :class:`~mds.store.live.LiveFeed`.

        Parameters
        ----------
        feed
            An :class:`mds.layer1.UpbitStream` (give it the store's clock) or a replay of recorded
            frames; a feed is followed once.

        Returns
        -------
        LiveFeed
            ``stats()`` and ``close()`` (any thread; also a context manager). Tickers,
            orderbooks and trades go to the realtime cache, the forming candle to memory, and
            closed candles to history with the coverage the stream watched
            (:mod:`mds.store.live`, ``Config.live_grace_s``). :meth:`close` closes it too.

        Raises
        ------
        InvalidRequestError
            Not a feed, a closed one, or one already followed (by any store) or started by
            another consumer.
        """
        self._check_open()
        from mds.store.live import LiveFeed, claim_feed

        live = LiveFeed(
            feed,
            writer=self._writer,
            reader=self._reader,
            tiers=self._health,
            realtime=self._realtime,
            lock=self._lock,
            clock=self._clock,
            grace_s=self.config.live_grace_s,
            on_close=self._live_closed,
        )
        claim_feed(feed)  # a feed runs in one event loop: a second consumer would stop both
        with self._lock:
            self._live.append(live)
        return live.start()

    def _live_closed(self, live: Any) -> None:
        with self._lock:
            if live in self._live:
                self._live.remove(live)

    # ------------------------------------------------------------------ realtime
    def put_ticker(self, ticker: Mapping[str, Any]) -> None:
        """Store a ticker (Upbit REST, WebSocket DEFAULT or SIMPLE). Memory only."""
        self._realtime.put_ticker(ticker)

    def ticker(self, symbol: str) -> dict[str, Any] | None:
        """The latest ticker of a market in Upbit field names, or None."""
        return self._realtime.ticker(self._sym(symbol))

    def ticker_history(self, symbol: str, since: Any = None) -> list[dict[str, Any]]:
        """Tickers kept within the TTL, oldest first, optionally only those at or after ``since``."""
        s = None if since is None else to_ms(since, name="since")
        return self._realtime.ticker_history(self._sym(symbol), since=s)

    def put_orderbook(self, orderbook: Mapping[str, Any]) -> None:
        """Store an orderbook snapshot (REST or WebSocket). Memory only."""
        self._realtime.put_orderbook(orderbook)

    def orderbook(self, symbol: str) -> dict[str, Any] | None:
        """The latest orderbook with ``orderbook_units``, or None."""
        return self._realtime.orderbook(self._sym(symbol))

    def put_trades(self, symbol: str, trades: Any) -> int:
        """Add trades (TRADE_DTYPE array or Upbit dicts), deduplicated on ``sequential_id``."""
        return int(self._realtime.put_trades(self._sym(symbol), trades))

    def trades(self, symbol: str, *, count: int | None = None, since: Any = None) -> np.ndarray:
        """Trades of a market as a TRADE_DTYPE array, ascending time."""
        s = None if since is None else to_ms(since, name="since")
        return self._realtime.trades(self._sym(symbol), count=count, since=s)

    # ------------------------------------------------------------------ async API
    async def get(self, request: StorageRequest) -> StorageResponse:
        """Serve a seed-compatible request; errors become ``success=False``, never exceptions.

        ``resp.arrays`` holds ``{symbol: array}`` (candles, trades) or ``{symbol: dict}``; ``resp.data``
        is built from it only when asked for.
        """
        return await self._api.get(request)

    # ------------------------------------------------------------------ stats and lifecycle
    def stats(self) -> dict[str, Any]:
        """JSON-serialisable figures: hits and misses per tier, hit rate, latency percentiles per
        tier and per API, Layer 1 calls and candles fetched, sizes per tier, degraded tiers."""
        connector = None if self._fetcher is None else self._fetcher.monitor
        out = self._metrics.stats(self._health, self._lock, self._realtime, connector)
        if self._peeks is not None:
            out["layer1"]["policy"] = self._peeks.report()
        return out

    def close(self) -> None:
        """Flush and release files. Further calls raise StorageUnavailableError."""
        if self._closed:
            return
        for live in list(self._live):  # before the tiers: a feed's last write must find them open
            live.close()
        self._closed = True
        self._close_tiers()
        if self._fetcher is not None:
            self._fetcher.close()

    def _close_tiers(self) -> None:
        self._slots.close()
        self._health.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store(path={str(self.path)!r}, tiers={self.config.tiers}, layer1={self._fetcher is not None})"

    # ------------------------------------------------------------------ argument checks
    def _sym(self, symbol: object) -> str:
        if symbol.__class__ is str and symbol in self._symbols_ok:
            return symbol
        s = validate_symbol(symbol)
        if len(self._symbols_ok) < 100_000:
            self._symbols_ok.add(s)
        return s

    def _check_open(self) -> None:
        if self._closed:
            raise StorageUnavailableError("the store is closed")


def _names(value: Any, what: str) -> list[Any]:
    """A name or an iterable of names (``symbols=``, ``timeframes=``)."""
    if isinstance(value, (str, Timeframe)):
        return [value]
    try:
        names = list(value)
    except TypeError:
        raise InvalidRequestError(f"{what} must be a name or a list of names, not {value!r}") from None
    if not names:
        raise InvalidRequestError(f"{what} is empty (give None for all)")
    return names


def open(  # the public name fixed by DESIGN.md
    path: str | os.PathLike[str] | None = None,
    *,
    layer1: Any = None,
    config: Config | None = None,
    clock: Callable[[], int] | None = None,
    history: str | None = None,
) -> Store:
    """Open (creating if needed) a store.

    Parameters
    ----------
    path
        Store directory; None means ``$MDS_HOME`` or ``~/.mds``. Created with mode 0700.
    layer1
        An object with the Smart Router's async shape (or a SmartRouterConnector); None means
        storage only: reads return what is stored.
    config
        :class:`mds.Config`; defaults for every field.
    clock
        Callable returning epoch ms (for simulations and tests); default the wall clock.
    history
        None: the durable tier (history, coverage, change tracking) is the SQLite file under
        ``path``. A ``postgresql://`` URL puts it in that PostgreSQL database, shared by every host
        that names it; memory and LMDB stay local under ``path`` (needs the ``postgres`` extra).
    """
    return Store(path, layer1=layer1, config=config, clock=clock, history=history)
