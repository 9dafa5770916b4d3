"""The Store: tiered candle lookup, coverage-driven freshness, realtime data, metrics, degradation.

``mds.open()`` composes the tiers chosen in :class:`~mds.models.Config` (memory, LMDB disk,
SQLite) above an optional Layer 1. Reads follow DESIGN.md section 4; whatever is fetched from
Layer 1 is validated, written to SQLite first (the durable commit), then to LMDB and memory, and
the fetched range is recorded as covered even where Upbit had no candles.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mds import _kernels as K
from mds._dtypes import CANDLE_DTYPE, TRADE_DTYPE
from mds._files import check_store_dir, map_shared, open_private
from mds.convert import candles_from_upbit, candles_to_upbit
from mds.errors import InvalidCandleError, InvalidRequestError, Layer1Error, MdsError, StorageUnavailableError
from mds.models import (
    CheckReport,
    Config,
    DataType,
    Gap,
    MaintenanceReport,
    StorageMetadata,
    StorageRequest,
    StorageResponse,
    WriteResult,
)
from mds.symbols import validate_symbol
from mds.tiers.sqlite import DamagedChunkError
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import now_ms, to_ms

logger = logging.getLogger(__name__)

__all__ = ["Store", "open"]

T = TypeVar("T")

#: Coverage that starts here means "from the start of the market's history" (proven by an empty
#: page asked for before the oldest candle received; a short page proves nothing).
HISTORY_START = 0
_EMPTY_RANGES = np.zeros((0, 2), dtype=np.int64)
_EMPTY = np.zeros(0, dtype=CANDLE_DTYPE)
_EMPTY.flags.writeable = False
#: Rank of each source; an answer assembled from several names the slowest that contributed.
_SOURCE_RANK = {"storage_memory": 0, "layer1_cache": 1, "storage_disk": 2, "sqlite_db": 3, "layer1_api": 4}
_TIER_SOURCE = {"memory": "storage_memory", "disk": "storage_disk", "sqlite": "sqlite_db"}
_RETRY_DEGRADED_S = 5.0
#: How long stats() waits for a writer before it reports the tiers' sizes as busy.
_STATS_WAIT_S = 1.0
_CHANGE_SLOTS = 4096
_PAGE = 200


def default_path() -> Path:
    """``$MDS_HOME`` if set, else ``~/.mds``."""
    env = os.environ.get("MDS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".mds"


class _Latency:
    """A ring of the latest latency samples (ms) for percentiles, plus a running count."""

    __slots__ = ("buf", "n", "size")

    def __init__(self, size: int = 4096) -> None:
        self.buf: list[float] = [0.0] * size
        self.size = size
        self.n = 0

    def add(self, ms: float) -> None:
        self.buf[self.n % self.size] = ms
        self.n += 1

    def summary(self) -> dict[str, float | int]:
        k = min(self.n, self.size)
        if k == 0:
            return {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0}
        p50, p99 = np.percentile(np.asarray(self.buf[:k]), [50, 99])
        return {"count": self.n, "p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4)}


class _Metrics:
    def __init__(self) -> None:
        self.hits: dict[str, int] = dict.fromkeys(_SOURCE_RANK, 0)
        self.misses: dict[str, int] = dict.fromkeys(("layer1_cache", "memory", "disk", "sqlite"), 0)
        self.latency: dict[str, _Latency] = {}
        self.layer1_calls = 0
        self.layer1_candles = 0
        self.layer1_errors = 0
        self.requests = 0

    def lat(self, key: str, ms: float) -> None:
        ring = self.latency.get(key)
        if ring is None:
            ring = self.latency[key] = _Latency()
        ring.add(ms)


@dataclass(slots=True)
class _TierState:
    name: str
    obj: Any
    degraded_at: float | None = None
    error: str | None = None


class _NeedsLayer1(Exception):
    """Raised inside the read path when an answer needs a Layer 1 call and calls are not allowed."""


_BACKEND_ERRORS: tuple[type[BaseException], ...] = (StorageUnavailableError, OSError)
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = ()
try:  # translate backend errors that escape a tier into degradation, not crashes
    import apsw as _apsw
    import lmdb as _lmdb

    _BACKEND_ERRORS = (StorageUnavailableError, OSError, _apsw.Error, _lmdb.Error)
    _TRANSIENT_ERRORS = (_apsw.BusyError, _apsw.LockedError, _apsw.FullError, _apsw.ReadOnlyError)
except ImportError:  # pragma: no cover - both are hard dependencies
    pass


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
    ) -> None:
        self.config = config if config is not None else Config()
        if not isinstance(self.config, Config):
            raise InvalidRequestError("config must be an mds.Config")
        self._clock: Callable[[], int] = _checked_clock(clock) if clock is not None else now_ms
        self.path = Path(path).expanduser() if path is not None else default_path()
        self._lock = threading.RLock()
        self._metrics = _Metrics()
        self._symbols_ok: set[str] = set()
        self._coverage: dict[tuple[str, str], np.ndarray] = {}
        #: last covered range per series as Python ints (the fast read path's freshness check)
        self._cov_last: dict[tuple[str, str], tuple[int, int] | None] = {}
        self._frontiers: dict[tuple[str, str], int | None] = {}
        self._data_version: int | None = None
        self._closed = False
        self._batch_depth = 0
        self._deferred: list[tuple[str, Timeframe, np.ndarray]] = []
        self._disk_marked = False
        self._unheld: list[tuple[str, Timeframe, np.ndarray]] = []
        self._tiers: dict[str, _TierState] = {}
        persistent = any(t in self.config.tiers for t in ("disk", "sqlite"))
        #: False on a directory this process cannot write: the store opens read-only (reads are
        #: served, writes raise StorageUnavailableError).
        self.writable = True
        if persistent:
            # no planted links, ours and private (0700); raises before anything is opened
            self.writable = check_store_dir(self.path, create=True)
        self._changes: np.ndarray | None = None
        self._acked: np.ndarray | None = None
        self._changes_map: Any = None
        self._seen: dict[tuple[str, str], int] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._reading = threading.local()  # per thread: bypass memory during this read
        self._slot_of: dict[tuple[str, str], int] = {}
        try:
            self._open_tiers()
            if persistent:
                self._open_changes()
        except BaseException:
            self._close_tiers()
            raise
        from mds.tiers.realtime import RealtimeCache

        self._realtime = RealtimeCache(
            ticker_ttl_ms=int(self.config.realtime_ttl_s * 1000),
            orderbook_ttl_ms=int(self.config.orderbook_ttl_s * 1000),
            clock=self._clock,
        )
        self._layer1 = None
        self._peek_limit: int | None = None
        self._peek_sync = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        if layer1 is not None:
            from mds.layer1.connector import SmartRouterConnector

            self._layer1 = (
                layer1
                if isinstance(layer1, SmartRouterConnector)
                else SmartRouterConnector(
                    layer1, clock=self._clock, timeout_s=self.config.layer1_timeout_s, config=self.config
                )
            )

    # ------------------------------------------------------------------ tiers
    def _open_tiers(self) -> None:
        cfg = self.config
        if "sqlite" in cfg.tiers:
            self._tiers["sqlite"] = _TierState("sqlite", None)
            self._try_open("sqlite")
        if "disk" in cfg.tiers:
            self._tiers["disk"] = _TierState("disk", None)
            if self._try_open("disk"):
                self._drop_stale_disk()
        if "memory" in cfg.tiers:
            from mds.tiers.memory import MemoryTier

            self._tiers["memory"] = _TierState(
                "memory",
                MemoryTier(
                    capacity=cfg.memory_candles,
                    max_bytes=cfg.memory_bytes,
                    ttl_ms=int(cfg.memory_ttl_s * 1000),
                    clock=self._clock,
                ),
            )

    def _try_open(self, name: str) -> bool:
        state = self._tiers[name]
        cfg = self.config
        try:
            if name == "sqlite":
                from mds.tiers.sqlite import SqliteStore

                state.obj = SqliteStore(
                    self.path / "candles.sqlite3",
                    readonly=not self.writable,
                    durable=cfg.durable,
                    vacuum_threshold=cfg.vacuum_threshold,
                    maintenance_interval_s=cfg.maintenance_interval_s,
                    compress_after_days=cfg.compress_after_days,
                    clock=self._clock,
                )
            else:
                from mds.tiers.disk import LmdbTier

                state.obj = LmdbTier(
                    self.path / "lmdb",
                    retention_ms=int(cfg.disk_days * 86_400_000),
                    ttl_ms=int(cfg.disk_ttl_s * 1000),
                    map_size=min(64 * 1024 * 1024, cfg.disk_map_size_cap),
                    durable=cfg.durable,
                    map_size_cap=cfg.disk_map_size_cap,
                    clock=self._clock,
                    loader=self._disk_loader if "sqlite" in cfg.tiers else None,
                    readonly=not self.writable,
                )
                state.obj.version = self._stamp
        except _BACKEND_ERRORS as exc:
            self._degrade(name, exc)
            return False
        state.degraded_at = None
        state.error = None
        return True

    # ------------------------------------------------------------------ cross-process change slots
    def _open_changes(self) -> None:
        """Map ``changes.bin``: one 8-byte stamp per hash slot of series, shared by every process.

        A writer stamps a series' slot after each durable commit; a reader compares the stamp
        with the one it saw last before trusting its memory tier (about 0.2 us, where
        ``PRAGMA data_version`` costs about 5 us), and drops the series' memory and cached
        coverage when it changed. Hash collisions only cause a spurious refresh.
        """
        try:
            # blocks allocated before the map: a full disk is an error here, never a SIGBUS later
            size = (_CHANGE_SLOTS + 1) * 8
            self._changes_map = map_shared(self.path / "changes.bin", size, readonly=not self.writable)
        except StorageUnavailableError as exc:
            if self.writable:
                raise
            logger.warning("no cross-process change slots (%s): rewrites by other processes show late", exc)
            self._changes = None
            return
        self._changes = np.frombuffer(self._changes_map, dtype=np.int64, count=_CHANGE_SLOTS)
        # after the hash slots: the highest SQLite commit_seq any store acknowledged on this path
        self._acked = np.frombuffer(self._changes_map, dtype=np.int64, count=1, offset=_CHANGE_SLOTS * 8)
        try:
            lost = self._lost_commits()
        except _BACKEND_ERRORS as exc:  # the tier's own reads will report it
            lost = None
            logger.debug("commit sequence unreadable at open: %s", exc)
        if lost:
            logger.warning("%s", lost)

    def _slot(self, key: tuple[str, str]) -> int:
        slot = self._slot_of.get(key)
        if slot is None:
            digest = hashlib.blake2b(f"{key[0]}/{key[1]}".encode(), digest_size=8).digest()
            slot = self._slot_of[key] = int.from_bytes(digest, "little") % _CHANGE_SLOTS
        return slot

    def _begin_change(self, sym: str, tf: Timeframe) -> None:
        """Stamp a series' slot *in progress* (odd) before its durable write.

        Until the final stamp, readers in every process bypass their memory tier for the series
        and ask SQLite, which shows the write exactly when it commits (a seqlock, in effect).
        """
        if self._changes is None:
            return
        key = (sym, tf.name)
        self._changes[self._slot(key)] = (time.time_ns() ^ (os.getpid() << 40)) | 1
        self._dirty.add(key)

    def _end_changes(self) -> None:
        """Give every series stamped in progress its final (even) stamp, after the commit, and
        record the commit as acknowledged (see :meth:`_lost_commits`)."""
        if self._changes is None or not self._dirty:
            return
        for key in self._dirty:
            stamp = (time.time_ns() ^ (os.getpid() << 40)) & ~1
            self._changes[self._slot(key)] = stamp
            self._seen[key] = stamp
        self._dirty.clear()
        state = self._tiers.get("sqlite")
        seq = None if state is None or state.obj is None else state.obj.last_commit_seq
        if seq is not None and self._acked is not None and seq > self._acked[0]:
            self._acked[0] = seq

    def _lost_commits(self) -> str | None:
        """A message when SQLite holds fewer commits than stores on this path acknowledged.

        Every acknowledged durable commit leaves its ``commit_seq`` in ``changes.bin``, outside
        the database; a file whose own sequence is lower lost acknowledged writes (a WAL deleted
        after a crash, a file replaced by an older copy). None when nothing was lost.
        """
        db = self._tiers.get("sqlite")
        if db is None or db.obj is None or self._acked is None:
            return None
        acked = int(self._acked[0])
        have = int(db.obj.commit_seq())
        if have >= acked:
            return None
        return (
            f"sqlite: the file holds {have} committed transactions but {acked} were acknowledged: "
            f"the last {acked - have} acknowledged write(s) are lost (a deleted -wal file or an older "
            "copy of the database?); the data of that window cannot be vouched for. Restore it or "
            "refetch, then delete changes.bin to accept the file as it is"
        )

    def _stamp(self, sym: str, tf: Timeframe) -> int | None:
        """The series' current change stamp (None without change slots)."""
        if self._changes is None:
            return None
        return int(self._changes[self._slot((sym, tf.name))])

    def _fill_guard(self, sym: str, tf: Timeframe) -> Callable[[], bool] | None:
        """A guard for filling LMDB with rows this process just read from SQLite: it holds only if
        no write to the series began since (checked inside the LMDB write transaction)."""
        token = self._stamp(sym, tf)
        if token is None:
            # no change slots: SQLite's own counter of other connections' commits (coarser)
            db = self._tier("sqlite")
            if db is None:
                return None
            version = self._guard("sqlite", db.data_version)
            return lambda: version is not None and self._guard("sqlite", db.data_version) == version
        if token & 1:
            return lambda: False
        return lambda: self._stamp(sym, tf) == token

    def _sync_series(self, sym: str, tf: Timeframe) -> bool:
        """Drop what this process caches of a series another process (or store) has changed.

        Returns True while the series is being written elsewhere (odd stamp): a read should then
        bypass memory and ask SQLite, which shows the write exactly when it commits.
        """
        if self._changes is None:
            self._refresh_shared()  # no stamps (the mmap failed): the coarser SQLite check
            return False
        key = (sym, tf.name)
        stamp = int(self._changes[self._slot(key)])
        if self._seen.get(key) == stamp:
            return False
        self._drop_cov(key)
        self._frontiers.pop(key, None)
        state = self._tiers.get("memory")
        if state is not None:
            state.obj.invalidate(sym, tf)
        if stamp & 1 and key not in self._dirty:
            self._seen.pop(key, None)
            return True
        self._seen[key] = stamp
        return False

    @property
    def _stale_marker(self) -> Path:
        return self.path / "lmdb.stale"

    def _drop_stale_disk(self) -> None:
        """Clear the disk tier if SQLite was written while the disk tier could not follow.

        A store opened without the disk tier, or one whose disk tier failed to drop a range,
        leaves a marker file before its SQLite write; the next store that opens the disk tier
        empties it (it refills lazily from SQLite), so LMDB never answers older data than SQLite.
        """
        marker = self._stale_marker
        if not marker.exists():
            return
        try:
            self._tiers["disk"].obj.clear()
            marker.unlink()
            logger.info("disk tier cleared: SQLite was written while it could not follow")
        except _BACKEND_ERRORS as exc:
            self._degrade("disk", exc)

    def _mark_disk_stale(self) -> None:
        if self._disk_marked or "sqlite" not in self._tiers:
            return
        try:
            os.close(open_private(self._stale_marker, os.O_CREAT | os.O_WRONLY))
            self._disk_marked = True
        except OSError as exc:  # best effort: the write itself may still go on
            logger.warning("could not mark the disk tier stale: %s", exc)

    def _degrade(self, name: str, exc: BaseException) -> None:
        state = self._tiers[name]
        if state.degraded_at is None:
            logger.warning("tier %s degraded: %s", name, exc)
        state.degraded_at = time.monotonic()
        state.error = f"{type(exc).__name__}: {exc}"

    def _tier(self, name: str) -> Any:
        """The tier object if it is configured and usable now (a degraded tier is retried later)."""
        state = self._tiers.get(name)
        if state is None or (name == "memory" and getattr(self._reading, "bypass", False)):
            return None
        if state.degraded_at is not None:
            # A tier that could not even open (a full disk, a file being replaced) is tried again
            # at once: an open that fails is quick, and space may have been freed since.
            if state.obj is not None and time.monotonic() - state.degraded_at < _RETRY_DEGRADED_S:
                return None
            if state.obj is None and not self._try_open(name):
                return None
            if name == "disk":
                # Writes may have gone to SQLite while LMDB could not follow (or could not drop a
                # span): it is emptied before it is trusted again, and refills lazily.
                try:
                    state.obj.clear()
                    if self._stale_marker.exists():
                        self._stale_marker.unlink()
                except _BACKEND_ERRORS as exc:
                    self._degrade(name, exc)
                    return None
            state.degraded_at = None
            state.error = None
            logger.info("tier %s back in service", name)
        return state.obj

    def _guard(self, name: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Call a tier method; a backend failure degrades the tier and returns None."""
        try:
            return fn(*args)
        except _BACKEND_ERRORS as exc:
            if not _transient(exc):
                self._degrade(name, exc)
            return None

    def _db(self) -> Any:
        """The durable tier for a read; None when the store has none (memory or disk only).

        Raises :class:`_StorageDown` when the store has one that cannot answer now (degraded,
        unopenable): the fast tiers hold only windows of what it holds, so no read may fall back
        to them as if they were the whole answer (DESIGN.md section 6).
        """
        if "sqlite" not in self._tiers:
            return None
        db = self._tier("sqlite")
        if db is None:
            raise _StorageDown(reason=f"the SQLite tier is unavailable ({self._tiers['sqlite'].error})")
        return db

    def _ask_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a durable-tier read; a failure raises :class:`_StorageDown`, never an empty answer.

        Busy, locked, full or read-only is not broken: the tier stays in service for the next
        call. Anything else degrades it.
        """
        try:
            return fn(*args)
        except DamagedChunkError as exc:  # damaged rows, not a broken tier: never served
            raise _StorageDown(reason=str(exc), damaged=exc) from exc
        except _BACKEND_ERRORS as exc:
            if not _transient(exc):
                self._degrade("sqlite", exc)
            raise _StorageDown(reason=f"the SQLite tier could not answer: {exc}") from exc

    def _quarantine(self, damage: DamagedChunkError) -> bool:
        """Remove damaged rows and their span from the durable tier (the span becomes missing, to
        be refetched) and from the fast tiers. Whether anything was removed."""
        db = self._tier("sqlite")
        if db is None or not self.writable:
            return False
        tf = parse_timeframe(damage.timeframe)
        sym = damage.symbol
        self._begin_change(sym, tf)
        try:
            spans = db.quarantine_damaged(sym, tf, *damage.span)
        except _BACKEND_ERRORS as exc:
            logger.warning("%s %s: could not quarantine damaged rows: %s", sym, tf.name, exc)
            return False
        finally:
            if not self._batch_depth:
                self._end_changes()
        key = (sym, tf.name)
        self._drop_cov(key)
        self._frontiers.pop(key, None)
        for s, e in spans:
            self._invalidate_fast(sym, tf, int(s), int(e))
            logger.warning("%s %s: damaged rows in [%d, %d) quarantined; they will be refetched", sym, tf.name, s, e)
        return bool(spans)

    def _disk_loader(self, symbol: str, tf: Timeframe, start: int, end: int) -> np.ndarray:
        db = self._tier("sqlite")
        if db is None:
            raise StorageUnavailableError("SQLite tier unavailable; cannot refresh the disk tier")
        return db.read_range(symbol, tf, start, end)

    # ------------------------------------------------------------------ helpers
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

    def _check_writable(self) -> None:
        if not self.writable:
            raise StorageUnavailableError(f"the store directory {self.path} is read-only here; nothing was stored")

    def _now(self) -> int:
        return int(self._clock())

    def _cov(self, symbol: str, tf: Timeframe) -> np.ndarray:
        """Coverage of a series, cached; the cache is dropped when another process writes SQLite."""
        key = (symbol, tf.name)
        cov = self._coverage.get(key)
        if cov is None:
            db = self._db()
            cov = _EMPTY_RANGES if db is None else np.asarray(self._ask_db(db.coverage, symbol, tf), np.int64)
            cov = cov.reshape(-1, 2)
            self._set_cov(key, cov)
        if "sqlite" not in self._tiers and len(cov):
            # Without a durable tier, coverage proves only what the fast tiers still hold: a
            # candle they evicted (memory keeps the newest memory_candles, LMDB disk_days) is
            # missing again, never a no_trades slot.
            cov = _intersect(cov, self._fast_held(symbol, tf))
        return cov

    def _fast_held(self, sym: str, tf: Timeframe) -> np.ndarray:
        """The union of the ranges memory and LMDB hold of a series (each exactly as stored)."""
        parts = [_EMPTY_RANGES]
        mem = self._tier("memory")
        held = None if mem is None else mem.held(sym, tf)
        if held is not None:
            parts.append(np.array([held], dtype=np.int64))
        disk = self._tier("disk")
        ranges = None if disk is None else self._guard("disk", disk.held, sym, tf)
        if ranges is not None and len(ranges):
            parts.append(np.asarray(ranges, dtype=np.int64).reshape(-1, 2))
        return K.interval_normalize(np.concatenate(parts))

    def _set_cov(self, key: tuple[str, str], cov: np.ndarray) -> None:
        self._coverage[key] = cov
        self._cov_last[key] = (int(cov[-1, 0]), int(cov[-1, 1])) if len(cov) else None

    def _drop_cov(self, key: tuple[str, str] | None = None) -> None:
        if key is None:
            self._coverage.clear()
            self._cov_last.clear()
        else:
            self._coverage.pop(key, None)
            self._cov_last.pop(key, None)

    def _refresh_shared(self) -> None:
        """Drop all cached coverage if another connection changed SQLite since the last look.

        The fallback of :meth:`_sync_series` when there are no change stamps: it costs a PRAGMA
        (about 5 us) and clears every series, where a stamp is per series and ~0.2 us.
        """
        db = self._tier("sqlite")
        if db is None:
            return
        version = self._guard("sqlite", db.data_version)
        if version is None or version == self._data_version:
            return
        self._data_version = version
        self._drop_cov()
        self._frontiers.clear()

    def _add_coverage_cache(self, symbol: str, tf: Timeframe, ranges: np.ndarray) -> None:
        key = (symbol, tf.name)
        if "sqlite" in self._tiers and key not in self._coverage:
            return  # will be read from SQLite on next use
        self._set_cov(key, K.interval_union(self._coverage.get(key, _EMPTY_RANGES), ranges))

    @staticmethod
    def _covered_tail(cov: np.ndarray, end: int) -> int | None:
        """Start of the covered run that reaches ``end`` (None if ``end`` is not covered up to)."""
        for i in range(len(cov) - 1, -1, -1):
            s, e = int(cov[i, 0]), int(cov[i, 1])
            if s < end <= e:
                return s
            if e < end:
                return None
        return None

    # ------------------------------------------------------------------ candle input
    def _as_candles(self, candles: Any) -> np.ndarray:
        if isinstance(candles, np.ndarray):
            if candles.ndim != 1:
                raise InvalidCandleError(f"candles must be a 1-D CANDLE_DTYPE array, got {candles.ndim}-D")
            if candles.dtype != CANDLE_DTYPE:
                if candles.dtype.names is None or set(candles.dtype.names) != set(CANDLE_DTYPE.names or ()):
                    raise InvalidCandleError(f"candles must have CANDLE_DTYPE, got {candles.dtype}")
                try:
                    return candles.astype(CANDLE_DTYPE)
                except (TypeError, ValueError) as exc:
                    raise InvalidCandleError(f"cannot convert candles to CANDLE_DTYPE: {exc}") from None
            return np.array(candles, dtype=CANDLE_DTYPE, copy=True)
        if isinstance(candles, (str, bytes, Mapping)):
            raise InvalidCandleError("candles must be a CANDLE_DTYPE array or an iterable of Upbit candle dicts")
        try:
            rows = list(candles)
        except TypeError:
            raise InvalidCandleError("candles must be a CANDLE_DTYPE array or an iterable of candle dicts") from None
        return candles_from_upbit(rows)

    def _validate(self, arr: np.ndarray, tf: Timeframe, now: int) -> None:
        idx, reason = K.validate(arr, *tf.kernel_args, now)
        if len(idx):
            names = [K.REASONS.get(int(r), str(int(r))) for r in reason[:20]]
            shown = ", ".join(f"row {int(i)}: {n}" for i, n in zip(idx[:5], names[:5]))
            raise InvalidCandleError(
                f"{len(idx)} invalid candle(s), nothing stored ({shown})",
                rows=[int(i) for i in idx],
                reasons=[K.REASONS.get(int(r), str(int(r))) for r in reason],
            )

    def _range_arg(self, value: Any, name: str) -> int | None:
        return None if value is None else to_ms(value, name=name)

    # ------------------------------------------------------------------ writes
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
        arr = self._as_candles(candles)
        now = self._now()
        self._validate(arr, tf, now)
        self._check_writable()
        covered = _EMPTY_RANGES
        if complete is not None:
            try:
                c_start, c_end = complete
            except (TypeError, ValueError):
                raise InvalidRequestError("complete must be a (start, end) pair") from None
            cs, ce = to_ms(c_start, name="complete start"), to_ms(c_end, name="complete end")
            if ce <= cs:
                raise InvalidRequestError("complete: end must be after start")
            last_closed_end = tf.floor(now)
            cs, ce = tf.ceil(cs), min(tf.ceil(ce), last_closed_end)
            if ce > cs:
                covered = np.array([[cs, ce]], dtype=np.int64)
        arr = K.sort_dedup(arr)
        return self._store(sym, tf, arr, covered, now)

    def _store(self, sym: str, tf: Timeframe, arr: np.ndarray, covered: np.ndarray, now: int) -> WriteResult:
        """Write a validated, sorted, unique batch: SQLite first, then LMDB and memory."""
        self._check_writable()  # also for Layer 1 fills: a read-only store answers them unstored
        forming = tf.floor(now)
        partial = arr[arr["ts"] >= forming]
        closed = arr[arr["ts"] < forming]
        with self._lock:
            self._sync_series(sym, tf)
            counts: tuple[int, int, int] | None = None
            db = self._tier("sqlite")
            if "sqlite" in self._tiers:
                if db is None:
                    raise StorageUnavailableError(
                        f"SQLite tier is degraded ({self._tiers['sqlite'].error}); nothing was stored"
                    )
                self._begin_change(sym, tf)
                if self._tier("disk") is None:
                    self._mark_disk_stale()  # LMDB (now or later) cannot follow this write
                else:
                    self._unhold_disk(sym, tf, self._spans(tf, closed, covered))
                self._frontiers.pop((sym, tf.name), None)
                try:
                    counts = db.write(sym, tf, closed, covered if len(covered) else None)
                except _BACKEND_ERRORS as exc:
                    if not _transient(exc):  # busy is not broken: reads go on
                        self._degrade("sqlite", exc)
                    if not self._batch_depth:
                        self._end_changes()
                    raise StorageUnavailableError(f"durable write failed, nothing stored: {exc}") from exc
                if not self._batch_depth:
                    self._end_changes()
            if len(covered):
                self._add_coverage_cache(sym, tf, covered)
            spans = self._spans(tf, closed, covered)
            mem = self._tier("memory")
            if counts is None:
                counts = self._memory_counts(mem, sym, tf, closed)
            if len(spans):
                if self._batch_depth and db is not None:
                    self._deferred.append((sym, tf, spans))  # filled after the batch commits
                else:
                    self._fill_fast_tiers(sym, tf, spans, closed if db is None else None)
            if len(partial) and mem is not None:
                mem.set_partial(sym, tf, partial[-1:].copy())
            self._maybe_maintain()
        return WriteResult(*(int(c) for c in counts))

    def _unhold_disk(self, sym: str, tf: Timeframe, spans: np.ndarray) -> None:
        """Before a durable write, make the disk tier stop claiming the spans it is about to change.

        If the process dies between the SQLite commit and the LMDB update, LMDB then simply does not
        hold those spans (a miss), instead of holding rows older than SQLite's. Inside a batch the
        ranges it stopped holding are remembered, so a rolled-back batch gives back exactly those.
        """
        disk = self._tier("disk")
        if disk is None or not len(spans):
            return
        held = self._guard("disk", disk.held, sym, tf)
        if held is None or not len(held):
            return
        overlap = _intersect(spans, np.asarray(held, dtype=np.int64).reshape(-1, 2))
        if self._batch_depth and len(overlap):
            self._unheld.append((sym, tf, overlap))
        for s, e in overlap.tolist():
            if self._guard("disk", disk.delete, sym, tf, s, e) is None and self._tiers["disk"].degraded_at is not None:
                self._invalidate_fast(sym, tf, s, e, only="disk")

    def _memory_counts(self, mem: Any, sym: str, tf: Timeframe, closed: np.ndarray) -> tuple[int, int, int]:
        if not len(closed):
            return (0, 0, 0)
        old = None
        if mem is not None:
            old = mem.range(sym, tf, int(closed["ts"][0]), int(closed["ts"][-1]) + 1)
        _, ins, upd, unch = K.merge(old if old is not None else _EMPTY, closed)
        return (ins, upd, unch)

    @staticmethod
    def _spans(tf: Timeframe, closed: np.ndarray, covered: np.ndarray) -> np.ndarray:
        parts = [covered]
        if len(closed):
            parts.append(np.array([[int(closed["ts"][0]), tf.add(int(closed["ts"][-1]), 1)]], dtype=np.int64))
        return K.interval_normalize(np.concatenate(parts)) if len(parts) > 1 else K.interval_normalize(covered)

    def _fill_fast_tiers(self, sym: str, tf: Timeframe, spans: np.ndarray, batch: np.ndarray | None) -> None:
        """Make LMDB and memory hold exactly what SQLite holds in ``spans`` (just written)."""
        db = self._tier("sqlite")
        disk = self._tier("disk")
        mem = self._tier("memory")
        if disk is None and mem is None:
            return
        for s, e in spans.tolist():
            guard = None
            if db is not None:
                # Another store (thread or process) may commit the same series between this read
                # and the LMDB write: the guard, checked inside LMDB's write transaction, then
                # refuses the fill, so LMDB never keeps the earlier of two commits.
                guard = self._fill_guard(sym, tf)
                rows = self._guard("sqlite", db.read_range, sym, tf, s, e)
                if rows is None:
                    self._invalidate_fast(sym, tf, s, e)
                    continue
            else:
                rows = self._merge_with_fast(sym, tf, s, e, batch)
            self._put_fast(sym, tf, s, e, rows, guard)

    def _refill_disk(self, sym: str, tf: Timeframe, spans: np.ndarray) -> None:
        db = self._tier("sqlite")
        if db is None:
            return
        for s, e in spans.tolist():
            guard = self._fill_guard(sym, tf)
            rows = self._guard("sqlite", db.read_range, sym, tf, s, e)
            if rows is not None:
                self._put_disk(sym, tf, s, e, rows, guard)

    def _merge_with_fast(self, sym: str, tf: Timeframe, s: int, e: int, batch: np.ndarray | None) -> np.ndarray:
        """Without SQLite: what the fast tiers already hold in [s, e) merged with the batch."""
        part = _EMPTY if batch is None else batch[(batch["ts"] >= s) & (batch["ts"] < e)]
        held = None
        for name in ("memory", "disk"):
            t = self._tier(name)
            if t is not None:
                held = self._guard(name, t.range if name == "memory" else t.get_range, sym, tf, s, e)
                if held is not None:
                    break
        if held is None or not len(held):
            return np.ascontiguousarray(part)
        merged, *_ = K.merge(np.ascontiguousarray(held), part)
        return merged

    def _put_fast(
        self, sym: str, tf: Timeframe, s: int, e: int, rows: np.ndarray, guard: Callable[[], bool] | None = None
    ) -> None:
        self._put_disk(sym, tf, s, e, rows, guard)
        mem = self._tier("memory")
        if mem is not None:
            cap = self.config.memory_candles
            if len(rows) > cap:
                rows = rows[-cap:]
                s = int(rows["ts"][0])
            mem.put_range(sym, tf, s, e, np.ascontiguousarray(rows))

    def _invalidate_fast(self, sym: str, tf: Timeframe, s: int, e: int, only: str | None = None) -> None:
        """A fast tier could not be updated: make sure it cannot answer stale data for [s, e)."""
        if only in (None, "memory"):
            mem = self._tiers.get("memory")
            if mem is not None:
                mem.obj.invalidate(sym, tf)
        if only in (None, "disk"):
            state = self._tiers.get("disk")
            if state is not None and state.obj is not None:
                try:
                    state.obj.delete(sym, tf, s, e)
                except _BACKEND_ERRORS as exc:
                    # The disk tier could not drop the stale range: stop using it until it is rebuilt.
                    self._degrade("disk", exc)
                    try:
                        state.obj.clear()
                    except _BACKEND_ERRORS:
                        self._mark_disk_stale()

    # ------------------------------------------------------------------ reads
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
        """
        t0 = time.perf_counter()
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        with self._lock:
            arr = None
            if start is None and end is None and not include_partial and count.__class__ is int and count > 0:
                arr = self._fast_latest(sym, tf, count)
            if arr is not None:
                source = "storage_memory"
            else:
                arr, source = self._read(sym, tf, count, start, end, include_partial, allow_layer1=True)
        m = self._metrics
        m.requests += 1
        m.hits[source] += 1
        ms = (time.perf_counter() - t0) * 1000
        m.lat("api.candles", ms)
        m.lat(source, ms)
        return arr

    def _fast_latest(self, sym: str, tf: Timeframe, n: int) -> np.ndarray | None:
        """The memory hit of a latest-N read, with the same checks as the general path, in few
        steps: change stamp, coverage reaching the last closed interval, memory window inside it.
        None means "take the general path" (which may still answer from memory)."""
        state = self._tiers.get("memory")
        if state is None or state.degraded_at is not None:
            return None
        key = (sym, tf.name)
        changes = self._changes
        if changes is not None:
            slot = self._slot_of.get(key)
            if slot is None or self._seen.get(key) != changes[slot]:
                return None
        end = tf.floor(self._clock())
        mem = state.obj
        if self._layer1 is None:
            # Stored data may end before now: the frontier (cached; dropped with the change stamp)
            # is where a complete answer ends.
            front = self._frontiers.get(key) if changes is not None else None
            if front is not None and front < end:
                end = front
            return mem.latest(sym, tf, n, end)
        if self.config.lookup == "layer1_first":
            return None
        last = self._cov_last.get(key)
        if last is None or not last[0] < end <= last[1]:
            return None
        held = mem.held(sym, tf)
        if held is None or held[0] < last[0]:
            return None
        return mem.latest(sym, tf, n, end)

    def _read(
        self,
        sym: str,
        tf: Timeframe,
        count: Any,
        start: Any,
        end: Any,
        include_partial: bool,
        *,
        allow_layer1: bool,
    ) -> tuple[np.ndarray, str]:
        if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0):
            raise InvalidRequestError(f"count must be a positive int, not {count!r}")
        s = self._range_arg(start, "start")
        e = self._range_arg(end, "end")
        if s is not None and e is not None and e <= s:
            raise InvalidRequestError("end must be after start")
        if count is None and s is None:
            raise InvalidRequestError("give count (latest N) or start (a range)")
        self._reading.bypass = self._sync_series(sym, tf)
        try:
            return self._read_synced(sym, tf, count, s, e, include_partial, allow_layer1)
        except _StorageDown as first:
            down = first
            if self._layer1 is None:
                raise _unanswered(sym, tf, down) from None
            if not allow_layer1:
                raise _NeedsLayer1() from None
            if down.damaged is not None and self._quarantine(down.damaged):
                try:  # the damaged span is missing now: the read refetches and stores it
                    return self._read_synced(sym, tf, count, s, e, include_partial, True)
                except _StorageDown as again:
                    down = again
            logger.warning("%s %s: storage cannot answer (%s); passing the read through to Layer 1", sym, tf.name, down)
            return self._read_synced(sym, tf, count, s, e, include_partial, True, passthrough=True)
        finally:
            self._reading.bypass = False

    def _read_synced(
        self,
        sym: str,
        tf: Timeframe,
        count: Any,
        s: int | None,
        e: int | None,
        include_partial: bool,
        allow_layer1: bool,
        passthrough: bool = False,
    ) -> tuple[np.ndarray, str]:
        """The read of :meth:`candles`; with ``passthrough`` every part comes from Layer 1 alone
        (storage could not answer) and nothing is stored."""
        now = self._now()
        last_end = tf.floor(now)  # end of the last closed interval
        rng = self._range_from_layer1 if passthrough else self._range
        if count is not None and s is None:
            end = last_end if e is None else min(tf.ceil(e), last_end)
            if passthrough:
                arr = _ro(self._fetch_checked(sym, tf, count=int(count), end=end)[0][-int(count) :])
                source = "layer1_api"
            else:
                arr, source = self._latest(sym, tf, int(count), end, allow_layer1)
        elif count is not None and e is None:
            assert s is not None
            arr, source = self._first_n(sym, tf, tf.ceil(s), int(count), last_end, allow_layer1, rng)
        else:
            assert s is not None
            hi = last_end if e is None else min(e, last_end)
            arr, source = rng(sym, tf, tf.ceil(s), max(hi, tf.ceil(s)), allow_layer1)
            if count is not None and len(arr) > count:
                arr = arr[: int(count)]
        if include_partial:
            part, psource = self._partial(sym, tf, now, allow_layer1)
            if part is not None and (not len(arr) or int(part["ts"][0]) > int(arr["ts"][-1])):
                arr = np.concatenate([arr, part])
                arr.flags.writeable = False
                if _SOURCE_RANK[psource] > _SOURCE_RANK[source]:
                    source = psource
        return arr, source

    def _first_n(
        self,
        sym: str,
        tf: Timeframe,
        lo: int,
        n: int,
        last_end: int,
        allow_layer1: bool,
        rng: Callable[[str, Timeframe, int, int, bool], tuple[np.ndarray, str]],
    ) -> tuple[np.ndarray, str]:
        """The first ``n`` candles from ``lo``: a window of ``n`` intervals, doubled while no-trade
        intervals leave it short, so that N candles from an old start never fetch all history."""
        width = n
        source = "storage_memory"
        while True:
            hi = min(last_end, tf.add(lo, width))
            arr, src = rng(sym, tf, lo, max(hi, lo), allow_layer1)
            source = _slowest(source, src)
            if len(arr) >= n or hi >= last_end:
                return arr[:n], source
            width *= 2

    # latest N ---------------------------------------------------------------
    def _latest(self, sym: str, tf: Timeframe, n: int, end: int, allow_layer1: bool) -> tuple[np.ndarray, str]:
        if self._layer1 is None:
            return self._latest_stored(sym, tf, n, end)
        if self.config.lookup == "layer1_first" and allow_layer1:
            hit = self._peek_latest(sym, tf, n, end)
            if hit is not None:
                return hit, "layer1_cache"
        source = "storage_memory"
        try:
            for _ in range(4):
                cov = self._cov(sym, tf)
                tail = self._covered_tail(cov, end)
                mem = self._tier("memory")
                if mem is not None and tail is not None:
                    got = mem.latest(sym, tf, n, end)
                    if got is not None and self._proves(got, n, tail):
                        return got, source
                    self._metrics.misses["memory"] += 1
                if tail is None:
                    if not allow_layer1:
                        raise _NeedsLayer1()
                    self._fetch_tail(sym, tf, n, end, cov)
                    source = "layer1_api"
                    continue
                rows, tsrc = self._latest_from_shared(sym, tf, n, end)
                if self._proves(rows, n, tail):
                    return rows, _slowest(source, tsrc)
                # the covered run that ends at `end` holds fewer than n candles: fetch before it
                if not allow_layer1:
                    raise _NeedsLayer1()
                self._fetch_and_store(sym, tf, None, max(1, n - _count_from(rows, tail)), tail)
                source = "layer1_api"
            rows, tsrc = self._latest_from_shared(sym, tf, n, end)
            return rows, _slowest(source, tsrc)
        except _StorageDown as down:
            if not allow_layer1:
                raise _NeedsLayer1() from None
            rows = down.rows if len(down.rows) >= n else self._fetch_checked(sym, tf, count=n, end=end)[0]
            return _ro(rows[-n:]), "layer1_api"

    def _latest_stored(self, sym: str, tf: Timeframe, n: int, end: int) -> tuple[np.ndarray, str]:
        """Latest N without a Layer 1: what is stored, as fresh as the shared tiers are."""
        mem = self._tier("memory")
        if mem is not None:
            got = mem.latest(sym, tf, n, end)
            if got is not None:
                return got, "storage_memory"
            frontier = self._frontier(sym, tf)
            if frontier is not None and frontier < end:
                got = mem.latest(sym, tf, n, frontier)
                if got is not None:
                    return got, "storage_memory"
            self._metrics.misses["memory"] += 1
        return self._latest_from_shared(sym, tf, n, end)

    def _frontier(self, sym: str, tf: Timeframe) -> int | None:
        """Where stored data of a series ends (coverage end or last candle + 1 interval)."""
        key = (sym, tf.name)
        if key in self._frontiers:
            return self._frontiers[key]
        ends: list[int] = []
        cov = self._cov(sym, tf)
        if len(cov):
            ends.append(int(cov[-1, 1]))
        db = self._db()
        if db is not None:
            last = self._ask_db(db.last_ts, sym, tf)
            if last is not None:
                ends.append(tf.add(int(last), 1))
        else:
            for name in ("disk", "memory"):
                t = self._tier(name)
                held = None if t is None else self._guard(name, t.held, sym, tf)
                if held is not None and len(held):
                    ends.append(int(np.asarray(held, dtype=np.int64).reshape(-1, 2)[-1, 1]))
        front = max(ends) if ends else None
        if "sqlite" in self._tiers:
            self._frontiers[key] = front
        return front

    @staticmethod
    def _proves(rows: np.ndarray, n: int, tail: int | None) -> bool:
        """Whether the latest rows before ``end`` are complete, given the covered run ``[tail, end)``."""
        if tail is None:
            return False
        if len(rows) >= n:
            return int(rows["ts"][-n]) >= tail
        return tail <= HISTORY_START

    def _latest_from_shared(self, sym: str, tf: Timeframe, n: int, end: int) -> tuple[np.ndarray, str]:
        disk = self._tier("disk")
        if disk is not None:
            got = self._guard("disk", disk.get_latest, sym, tf, n, end)
            if got is not None and len(got) == n:
                self._to_memory(sym, tf, got, end)
                return _ro(got), "storage_disk"
            self._metrics.misses["disk"] += 1
        db = self._db()
        if db is not None:
            guard = self._fill_guard(sym, tf)  # taken before the read it protects
            got = self._ask_db(db.read_latest, sym, tf, n, end)
            self._to_memory(sym, tf, got, end)
            if len(got):
                self._put_disk(sym, tf, int(got["ts"][0]), end, got, guard)
            return _ro(got), "sqlite_db"
        # no durable tier: what the fast tiers keep is all the store holds
        if self._layer1 is None and disk is not None:
            got = self._latest_from_disk_ranges(disk, sym, tf, n, end)
            if got is not None:
                return _ro(got), "storage_disk"
        mem = self._tier("memory")
        if mem is not None:
            got = mem.latest(sym, tf, n, end)
            if got is not None:
                return got, "storage_memory"
            held = mem.held(sym, tf)
            if held is not None:
                got = mem.range(sym, tf, held[0], min(held[1], end))
                if got is not None:
                    return got[-n:], "storage_memory"
        if self._layer1 is not None:
            raise _StorageDown()
        return _EMPTY, "storage_memory"

    def _latest_from_disk_ranges(self, disk: Any, sym: str, tf: Timeframe, n: int, end: int) -> np.ndarray | None:
        """Without a durable tier, LMDB's held ranges are the store: the newest ``n`` candles
        before ``end`` from them, newest range first (None when LMDB cannot answer)."""
        held = self._guard("disk", disk.held, sym, tf)
        if held is None:
            return None
        parts: list[np.ndarray] = []
        have = 0
        for s, e in np.asarray(held, dtype=np.int64).reshape(-1, 2)[::-1].tolist():
            e = min(e, end)
            if e <= s:
                continue
            got = self._guard("disk", disk.get_range, sym, tf, s, e)
            if got is None:
                return None
            parts.insert(0, np.ascontiguousarray(got))
            have += len(got)
            if have >= n:
                break
        if not parts:
            return _EMPTY
        return np.concatenate(parts)[-n:]

    def _to_memory(self, sym: str, tf: Timeframe, rows: np.ndarray, end: int) -> None:
        """Fill the memory tier with the latest rows read from a shared tier: they are exactly the
        stored candles in ``[rows[0].ts, end)`` (capped at the stored frontier without Layer 1,
        so a late write by another process cannot hide behind the window)."""
        mem = self._tier("memory")
        if mem is None or not len(rows):
            return
        if self._layer1 is None:
            front = self._frontier(sym, tf)
            end = min(end, front) if front is not None else end
        rows = rows[-self.config.memory_candles :]
        if end > int(rows["ts"][-1]):
            mem.put_range(sym, tf, int(rows["ts"][0]), end, np.ascontiguousarray(rows))

    def _put_disk(
        self, sym: str, tf: Timeframe, s: int, e: int, rows: np.ndarray, guard: Callable[[], bool] | None = None
    ) -> None:
        """Make LMDB hold ``rows`` as exactly the stored candles of ``[s, e)``; the tier itself
        keeps only the part inside its retention window. A failed write leaves LMDB not holding
        the span, so it cannot answer older data later."""
        disk = self._tier("disk")
        if disk is None or not self.writable:
            return
        done = self._guard("disk", disk.put_range, sym, tf, s, e, np.ascontiguousarray(rows), guard)
        if done is None and self._tiers["disk"].degraded_at is not None:
            self._invalidate_fast(sym, tf, s, e, only="disk")

    # range ---------------------------------------------------------------------
    def _range(self, sym: str, tf: Timeframe, s: int, e: int, allow_layer1: bool) -> tuple[np.ndarray, str]:
        if e <= s:
            return _EMPTY, "storage_memory"
        source = "storage_memory"
        if self._layer1 is not None:
            missing = K.interval_subtract(np.array([[s, e]], dtype=np.int64), self._cov(sym, tf))
            if len(missing):
                if not allow_layer1:
                    raise _NeedsLayer1()
                fetched = self._fetch_ranges(sym, tf, missing)
                source = "layer1_api"
                if fetched is not None:  # storage could not keep it: answer from Layer 1 alone
                    whole = len(missing) == 1 and int(missing[0, 0]) == s and int(missing[0, 1]) == e
                    rows = fetched if whole else self._passthrough_range(sym, tf, s, e)
                    return _ro(rows[(rows["ts"] >= s) & (rows["ts"] < e)]), source
        for name in ("memory", "disk"):
            t = self._tier(name)
            if t is None:
                continue
            got = self._guard(name, t.range if name == "memory" else t.get_range, sym, tf, s, e)
            if got is not None:
                return _ro(got), _slowest(source, _TIER_SOURCE[name])
            self._metrics.misses[name] += 1
        db = self._db()
        if db is not None:
            guard = self._fill_guard(sym, tf)  # taken before the read it protects
            got = self._ask_db(db.read_range, sym, tf, s, e)
            self._put_disk(sym, tf, s, e, got, guard)
            return _ro(got), _slowest(source, "sqlite_db")
        mem = self._tier("memory")
        if self._layer1 is not None and (mem is None or mem.held(sym, tf) is None):
            if not allow_layer1:
                raise _NeedsLayer1()
            got = self._passthrough_range(sym, tf, s, e)
            return _ro(got), "layer1_api"
        if mem is not None:
            held = mem.held(sym, tf)
            if held is not None:
                got = mem.range(sym, tf, max(s, held[0]), min(e, held[1]))
                if got is not None:
                    return got, "storage_memory"
        return _EMPTY, source

    # partial -------------------------------------------------------------------
    def _partial(self, sym: str, tf: Timeframe, now: int, allow_layer1: bool) -> tuple[np.ndarray | None, str]:
        forming = tf.floor(now)
        mem = self._tier("memory")
        if self._layer1 is not None:
            if not allow_layer1:
                raise _NeedsLayer1()
            rows = self._l1_candles(sym, tf, count=1)[0]
            rows = rows[rows["ts"] == forming]
            if len(rows):
                if mem is not None:
                    mem.set_partial(sym, tf, rows.copy())
                return _ro(rows), "layer1_api"
            return None, "layer1_api"
        if mem is None:
            return None, "storage_memory"
        part = mem.partial(sym, tf)
        if part is None or not len(part) or int(part["ts"][0]) != forming:
            return None, "storage_memory"
        return _ro(part), "storage_memory"

    # ------------------------------------------------------------------ Layer 1
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a Layer 1 coroutine on the store's own event loop thread and wait for it.

        Whatever the Layer 1 raises (also ``SystemExit``, ``KeyboardInterrupt`` or a
        ``CancelledError`` of its own) ends this call as a :class:`Layer1Error` and leaves the
        loop thread serving the next call.
        """
        th = self._loop_thread
        if self._loop is None or th is None or not th.is_alive():
            with self._lock:
                th = self._loop_thread
                if self._loop is None or th is None or not th.is_alive():
                    if self._loop is not None:
                        logger.warning("the Layer 1 event loop thread had stopped; starting a new one")
                    loop = asyncio.new_event_loop()
                    th = threading.Thread(target=_serve_loop, args=(loop,), name="mds-layer1", daemon=True)
                    th.start()
                    self._loop, self._loop_thread = loop, th
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(_contained(coro), self._loop)
        # Other threads may use the store while this one waits for the network (a memory hit
        # must not queue behind a fetch), except inside a batch, whose transaction is this
        # thread's alone. Callers re-read what they need after the wait.
        lock: Any = self._lock
        held = None
        if not self._batch_depth and lock._is_owned():
            held = lock._release_save()
        try:
            return fut.result(timeout=self.config.layer1_timeout_s)
        except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            fut.cancel()
            raise Layer1Error(f"Layer 1 did not answer within {self.config.layer1_timeout_s} s") from None
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            raise Layer1Error("the Layer 1 call was cancelled by the Layer 1") from None
        finally:
            if held is not None:
                lock._acquire_restore(held)

    def _l1_candles(
        self, sym: str, tf: Timeframe, *, count: int | None = None, start: int | None = None, end: int | None = None
    ) -> tuple[np.ndarray, int, int, bool]:
        """Fetch candles through the connector: (rows ascending, covered start, covered end, exhausted)."""
        assert self._layer1 is not None
        req = StorageRequest(DataType.CANDLE, [sym], timeframe=tf.name, start_time=start, end_time=end, count=count)
        t0 = time.perf_counter()
        try:
            ans = self._run(self._layer1.request_data_from_layer1(req))
        except Layer1Error:
            self._metrics.layer1_errors += 1
            raise
        finally:
            self._metrics.lat("layer1_call", (time.perf_counter() - t0) * 1000)
        arr = np.ascontiguousarray(ans.arrays[sym])
        self._metrics.layer1_calls += int(ans.calls)
        self._metrics.layer1_candles += len(arr)
        lo, hi = ans.covered.get(sym, (0, 0))
        return arr, int(lo), int(hi), bool(ans.exhausted.get(sym, False))

    def _fetch_checked(
        self, sym: str, tf: Timeframe, *, count: int | None = None, start: int | None = None, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fetch closed candles before ``end`` and validate them: (rows, covered ranges)."""
        arr, lo, hi, exhausted = self._l1_candles(sym, tf, count=count, start=start, end=end)
        arr = K.sort_dedup(arr[arr["ts"] < end])
        idx, reasons = K.validate(arr, *tf.kernel_args, self._now())
        if len(idx):
            self._metrics.layer1_errors += 1
            why = K.REASONS.get(int(reasons[0]), "?")
            raise Layer1Error(
                f"Layer 1 returned {len(idx)} invalid candle(s) for {sym} {tf.name} (first: {why}); nothing stored"
            )
        # An empty page before the oldest candle (``exhausted``) proves the market's history ran
        # out, except for seconds candles, which Upbit keeps for three months only: there it
        # says nothing about older intervals.
        if exhausted and tf.name != "1s":
            # ... unless the store holds a candle before where the empty page was asked: then
            # the page lies (a flaky Layer 1), and believing it would label real candles no_trades
            bound = int(arr["ts"][0]) if len(arr) else hi
            first = self._first_stored(sym, tf)
            if first is not None and first < bound:
                self._metrics.layer1_errors += 1
                raise Layer1Error(
                    f"Layer 1 answered {sym} {tf.name} has no candle before {bound}, but the store holds one "
                    f"at {first}: the answer is wrong; nothing stored"
                )
            lo = HISTORY_START
        hi = min(hi, end)
        covered = np.array([[lo, hi]], dtype=np.int64) if hi > lo else _EMPTY_RANGES
        return arr, covered

    def _first_stored(self, sym: str, tf: Timeframe) -> int | None:
        """Open time of the oldest candle the durable tier holds (None: none, or it cannot say)."""
        db = self._tier("sqlite")
        if db is None:
            return None
        rows = self._guard("sqlite", db.read_from, sym, tf, -(2**62), 1)
        return int(rows["ts"][0]) if rows is not None and len(rows) else None

    def _fetch_and_store(self, sym: str, tf: Timeframe, start: int | None, n: int | None, end: int) -> np.ndarray:
        arr, covered = self._fetch_checked(sym, tf, count=n, start=start, end=end)
        try:
            self._store(sym, tf, arr, covered, self._now())
        except StorageUnavailableError as exc:
            logger.warning("storing fetched candles failed, answering from Layer 1: %s", exc)
            raise _StorageDown(arr) from exc
        return arr

    def _fetch_tail(self, sym: str, tf: Timeframe, n: int, end: int, cov: np.ndarray) -> None:
        before = cov[cov[:, 1] <= end] if len(cov) else cov
        last = int(before[-1, 1]) if len(before) else None
        if last is not None and tf.count(last, end) <= n:
            self._fetch_and_store(sym, tf, last, None, end)  # only the intervals that closed since
        else:
            self._fetch_and_store(sym, tf, None, n, end)

    def _fetch_ranges(self, sym: str, tf: Timeframe, missing: np.ndarray) -> np.ndarray | None:
        """Fetch uncovered ranges; returns the fetched rows only when storage could not keep them."""
        passthrough: list[np.ndarray] = []
        for ms, me in missing.tolist():
            try:
                self._fetch_and_store(sym, tf, ms, None, me)
            except _StorageDown as down:
                passthrough.append(down.rows)
        if passthrough:
            return _ro(K.sort_dedup(np.concatenate(passthrough)))
        return None

    def _passthrough_range(self, sym: str, tf: Timeframe, s: int, e: int) -> np.ndarray:
        arr, _ = self._fetch_checked(sym, tf, start=s, end=e)
        return arr[arr["ts"] >= s]

    def _range_from_layer1(self, sym: str, tf: Timeframe, s: int, e: int, allow_layer1: bool) -> tuple[np.ndarray, str]:
        if e <= s:
            return _EMPTY, "storage_memory"
        return _ro(self._passthrough_range(sym, tf, s, e)), "layer1_api"

    def _peek_latest(self, sym: str, tf: Timeframe, n: int, end: int) -> np.ndarray | None:
        """Answer a latest-N read from Layer 1's cache when it holds it fresh (never the network)."""
        assert self._layer1 is not None
        if not self._peek_can_answer(n):
            return None
        # one more than asked: the cache's newest candle may be the forming one
        req = StorageRequest(DataType.CANDLE, [sym], timeframe=tf.name, count=n + 1)
        try:
            if self._peek_sync:  # an ordinary function: ask it here, no hop to the Layer 1 thread
                ans = self._layer1.peek_now(req)
            else:
                ans = self._run(self._layer1.get_from_layer1_cache(req))
        except MdsError:
            ans = None
        return self._peek_check(ans, sym, tf, n, end)

    def _peek_can_answer(self, n: int) -> bool:
        """Whether Layer 1's cache could hold a latest-n answer (it has a peek and keeps n + 1)."""
        if self._peek_limit is None:
            l1 = self._layer1.layer1 if self._layer1 is not None else None
            limit = 0
            if callable(getattr(l1, "peek_cache", None)):
                limit = _PAGE
                try:
                    policy = getattr(l1, "cache_policy", None)
                    pol = policy() if callable(policy) else None
                    if asyncio.iscoroutine(pol):
                        pol.close()  # an async policy is read by sync_cache_policies, not here
                        pol = None
                    if isinstance(pol, Mapping) and isinstance(pol.get("candle_cache_count"), int):
                        limit = int(pol["candle_cache_count"])
                except Exception:  # foreign code; a policy we cannot read is no policy
                    limit = _PAGE
                except BaseException as exc:  # SystemExit and the like from foreign code, not the user's Ctrl-C
                    if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
                        raise
                    limit = _PAGE
            self._peek_limit = limit
            self._peek_sync = limit > 0 and not inspect.iscoroutinefunction(getattr(l1, "peek_cache", None))
        return n + 1 <= self._peek_limit

    def _peek_check(self, ans: Any, sym: str, tf: Timeframe, n: int, end: int) -> np.ndarray | None:
        if ans is None or sym not in ans.arrays:
            self._metrics.misses["layer1_cache"] += 1
            return None
        lo, hi = ans.covered.get(sym, (0, 0))
        arr = np.ascontiguousarray(ans.arrays[sym])
        arr = arr[arr["ts"] < end]
        idx, _ = K.validate(arr, *tf.kernel_args, self._now())
        # fresh only when the cache reaches the last closed interval and proves n candles
        if len(idx) or hi < end or len(arr) < n or int(arr["ts"][-n]) < lo:
            self._metrics.misses["layer1_cache"] += 1
            return None
        return _ro(arr[-n:].copy())

    async def _peek_async(self, req: StorageRequest, tf: Timeframe) -> dict[str, np.ndarray] | None:
        """The layer1_first step of the async API: one peek for all symbols, in the caller's loop."""
        if (
            self._layer1 is None
            or self.config.lookup != "layer1_first"
            or req.count is None
            or req.start_time is not None
            or not self._peek_can_answer(req.count)
        ):
            return None
        try:
            ans = await self._layer1.get_from_layer1_cache(
                StorageRequest(DataType.CANDLE, req.symbols, timeframe=tf.name, count=req.count + 1)
            )
        except MdsError:
            return None
        last_end = tf.floor(self._now())
        end = last_end if req.end_time is None else min(tf.ceil(req.end_time), last_end)
        out: dict[str, np.ndarray] = {}
        for sym in req.symbols:
            got = self._peek_check(ans, sym, tf, req.count, end)
            if got is None:
                return None
            out[sym] = got
        return out

    # ------------------------------------------------------------------ coverage and gaps
    def coverage(self, symbol: str, timeframe: str | Timeframe) -> list[tuple[int, int]]:
        """Covered ranges ``[(start, end), ...]`` (epoch ms, half-open, merged) of a series.

        A range that starts at 0 reaches back to the start of the market's history.
        """
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        with self._lock, _storage_errors(sym, tf):
            self._sync_series(sym, tf)
            return [(int(a), int(b)) for a, b in self._cov(sym, tf).tolist()]

    def gaps(self, symbol: str, timeframe: str | Timeframe, *, start: Any = None, end: Any = None) -> list[Gap]:
        """Runs of absent candles with their kind.

        ``no_trades``: inside coverage (the source was asked and had nothing); ``missing``: outside
        coverage. Without a range, the span of the series' coverage and data (coverage reaching back
        to the start of history counts from the first candle).
        """
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        s = self._range_arg(start, "start")
        e = self._range_arg(end, "end")
        if s is not None and e is not None and e <= s:
            raise InvalidRequestError("end must be after start")
        with self._lock, _storage_errors(sym, tf):
            self._sync_series(sym, tf)
            cov = self._cov(sym, tf)
            data = self._all_ts(sym, tf, s, e)
        if s is None:
            firsts = [int(data[0])] if len(data) else []
            if len(cov):
                c0 = int(cov[0, 0])
                firsts.append(c0 if c0 > HISTORY_START or not len(data) else int(data[0]))
            if not firsts:
                return []
            s = min(firsts)
        if e is None:
            lasts = [tf.add(int(data[-1]), 1)] if len(data) else []
            if len(cov):
                lasts.append(int(cov[-1, 1]))
            if not lasts:
                return []
            e = max(lasts)
        s = tf.ceil(s)
        holes = K.find_gaps(data, *tf.kernel_args, s, e)
        if not len(holes):
            return []
        out: list[Gap] = []
        for hs, he in holes.tolist():
            piece = np.array([[hs, he]], dtype=np.int64)
            inside = K.interval_normalize(_intersect(piece, cov))
            outside = K.interval_subtract(piece, cov)
            for a, b in inside.tolist():
                out.append(Gap(int(a), int(b), "no_trades"))
            for a, b in outside.tolist():
                out.append(Gap(int(a), int(b), "missing"))
        out.sort(key=lambda g: g.start)
        return out

    def _all_ts(self, sym: str, tf: Timeframe, s: int | None, e: int | None) -> np.ndarray:
        lo = -(2**62) if s is None else s
        hi = 2**62 if e is None else e
        db = self._db()
        if db is not None:
            return np.ascontiguousarray(self._ask_db(db.read_range, sym, tf, lo, hi)["ts"])
        for name in ("disk", "memory"):
            t = self._tier(name)
            if t is None:
                continue
            if name == "memory":
                held = t.held(sym, tf)
                if held is None:
                    continue
                rows = t.range(sym, tf, max(lo, held[0]), min(hi, held[1]))
            else:
                held_ranges = self._guard("disk", t.held, sym, tf)
                if held_ranges is None or not len(held_ranges):
                    continue
                rows = self._guard(
                    "disk", t.get_range, sym, tf, max(lo, int(held_ranges[0][0])), min(hi, int(held_ranges[-1][1]))
                )
            if rows is not None:
                return np.ascontiguousarray(rows["ts"])
        return np.zeros(0, dtype=np.int64)

    def delete(self, symbol: str, timeframe: str | Timeframe, *, start: Any = None, end: Any = None) -> int:
        """Remove candles in ``[start, end)`` (default: all) from every tier; coverage shrinks with it.

        Returns the number of candles removed from the durable tier (or from memory without one).
        """
        self._check_open()
        sym = self._sym(symbol)
        tf = parse_timeframe(timeframe)
        s = self._range_arg(start, "start")
        e = self._range_arg(end, "end")
        if s is not None and e is not None and e <= s:
            raise InvalidRequestError("end must be after start")
        lo = -(2**62) if s is None else s
        hi = 2**62 if e is None else e
        key = (sym, tf.name)
        self._check_writable()
        with self._lock:
            # the fast tiers first: a crash after this point leaves them missing rows, never stale
            disk = self._tier("disk")
            if disk is not None:
                try:
                    disk.delete(sym, tf, s, e)
                except _BACKEND_ERRORS as exc:
                    self._degrade("disk", exc)
                    self._invalidate_fast(sym, tf, lo, hi, only="disk")
            elif "sqlite" in self._tiers:
                self._mark_disk_stale()
            mem = self._tier("memory")
            kept = None
            if mem is not None and "sqlite" not in self._tiers:
                held = mem.held(sym, tf)
                if held is not None:
                    rows = mem.range(sym, tf, held[0], held[1])
                    if rows is not None:
                        keep = np.ascontiguousarray(rows[(rows["ts"] < lo) | (rows["ts"] >= hi)])
                        kept = (held, keep, len(rows) - len(keep))
            if mem is not None:
                mem.invalidate(sym, tf)
            self._frontiers.pop(key, None)
            db = self._tier("sqlite")
            if "sqlite" in self._tiers:
                if db is None:
                    raise StorageUnavailableError("SQLite tier is degraded; nothing was deleted")
                self._begin_change(sym, tf)
                try:
                    removed = int(db.delete(sym, tf, s, e))
                except _BACKEND_ERRORS as exc:
                    if not _transient(exc):
                        self._degrade("sqlite", exc)
                    raise StorageUnavailableError(f"delete failed, nothing removed: {exc}") from exc
                finally:
                    if not self._batch_depth:
                        self._end_changes()
                self._drop_cov(key)
            else:
                removed = len(self._all_ts(sym, tf, s, e)) if kept is None else kept[2]
                self._set_cov(
                    key,
                    K.interval_subtract(self._coverage.get(key, _EMPTY_RANGES), np.array([[lo, hi]], dtype=np.int64)),
                )
            if kept is not None and mem is not None:
                (hs, he), rows, _ = kept
                mem.put_range(sym, tf, hs, he, rows)
        return removed

    # ------------------------------------------------------------------ batch, maintenance, check
    @contextlib.contextmanager
    def batch(self) -> Iterator[Store]:
        """Every write inside commits as one SQLite transaction, all or nothing.

        The faster tiers (LMDB, memory) are updated after the commit; if the batch fails nothing
        of it is stored anywhere.
        """
        self._check_open()
        db = self._tier("sqlite")
        with self._lock:
            outer = self._batch_depth == 0
            self._batch_depth += 1
            try:
                if db is None:
                    yield self
                else:
                    with db.transaction():
                        if outer:
                            self._deferred.clear()
                            self._unheld.clear()
                        yield self
            except BaseException:
                if outer:
                    self._end_changes()
                    self._deferred.clear()
                    # SQLite rolled back: give LMDB back exactly the ranges the batch's writes had
                    # un-held, from SQLite's (restored) rows; memory was never changed by the batch
                    undo, self._unheld = self._unheld, []
                    for sym, tf, spans in undo:
                        self._refill_disk(sym, tf, spans)
                    self._drop_cov()
                    self._frontiers.clear()
                raise
            finally:
                self._batch_depth -= 1
            if outer:
                self._end_changes()
                self._unheld.clear()
            if outer and self._deferred:
                work, self._deferred = self._deferred, []
                for sym, tf, spans in work:
                    self._fill_fast_tiers(sym, tf, spans, None)
                self._maybe_maintain()

    def _maybe_maintain(self) -> None:
        if self._batch_depth:
            return
        db = self._tier("sqlite")
        if db is not None and hasattr(db, "maybe_maintain"):
            self._guard("sqlite", db.maybe_maintain)

    def maintain(self, force: bool = False) -> MaintenanceReport:
        """Run maintenance now: SQLite fragmentation check and VACUUM past the threshold (always
        with ``force``), ANALYZE / ``PRAGMA optimize``, and purge of expired LMDB entries."""
        self._check_open()
        with self._lock:
            before = after = 0.0
            vacuumed = analyzed = False
            db = self._tier("sqlite")
            if db is not None:
                rep = db.maintain(force=force)
                before = float(rep.get("fragmentation_before", 0.0))
                after = float(rep.get("fragmentation_after", before))
                vacuumed = bool(rep.get("vacuumed", False))
                analyzed = bool(rep.get("analyzed", False))
            purged = 0
            disk = self._tier("disk")
            if disk is not None:
                purged = int(self._guard("disk", disk.purge_expired) or 0)
        return MaintenanceReport(before, after, vacuumed, analyzed, purged)

    def check(self) -> CheckReport:
        """Integrity of every tier: SQLite integrity and coverage vs data, LMDB vs SQLite."""
        self._check_open()
        problems: list[str] = []
        for name, state in self._tiers.items():
            if state.degraded_at is not None:
                problems.append(f"{name}: degraded ({state.error})")
        with self._lock:
            db = self._tier("sqlite")
            if db is not None:
                problems += _checked("sqlite", lambda: [f"sqlite: {p}" for p in db.integrity_problems()])
                try:
                    lost = self._lost_commits()
                except _BACKEND_ERRORS as exc:
                    lost = f"sqlite: cannot read its commit sequence: {exc}"
                if lost:
                    problems.append(lost)
                elif self._acked is None:
                    problems.append(
                        "sqlite: no record of acknowledged commits (changes.bin unavailable): "
                        "cannot tell whether acknowledged writes were lost"
                    )
            disk = self._tier("disk")
            if disk is not None:
                problems += _checked("disk", lambda: [f"disk: {p}" for p in disk.check()])
                if db is not None:
                    problems += _checked("disk vs sqlite", lambda: self._check_disk_vs_sqlite(db, disk))
        return CheckReport(not problems, tuple(problems))

    def _check_disk_vs_sqlite(self, db: Any, disk: Any) -> list[str]:
        problems: list[str] = []
        # every series either tier knows: a series only LMDB holds is compared too (SQLite then
        # answers nothing there, so any row LMDB would serve is reported)
        names = {(sym, tfname) for sym, tfname, *_ in db.series()}
        try:
            names |= set(disk.series())
        except _BACKEND_ERRORS as exc:
            problems.append(f"disk: cannot list its series: {exc}")
        for sym, tfname in sorted(names):
            try:
                tf = parse_timeframe(tfname)
            except InvalidRequestError:
                problems.append(f"disk: holds a series of an unknown timeframe {sym!r} {tfname!r}")
                continue
            for _ in range(20):  # compare a stable state: no write to the series in between
                token = self._stamp(sym, tf)
                if token is not None and token & 1:
                    time.sleep(0.005)
                    continue
                found = self._compare_disk(db, disk, sym, tf)
                if self._stamp(sym, tf) == token:
                    problems += found
                    break
        return problems

    def _compare_disk(self, db: Any, disk: Any, sym: str, tf: Timeframe) -> list[str]:
        held = self._guard("disk", disk.held, sym, tf)
        if held is None:
            return []
        out: list[str] = []
        for s, e in np.asarray(held, dtype=np.int64).reshape(-1, 2).tolist():
            a = self._guard("disk", disk.get_range, sym, tf, s, e)
            b = db.read_range(sym, tf, s, e)
            if a is not None and (len(a) != len(b) or a.tobytes() != b.tobytes()):
                out.append(f"disk: {sym} {tf.name} [{s}, {e}) differs from SQLite")
        return out

    # ------------------------------------------------------------------ realtime
    def put_ticker(self, ticker: Mapping[str, Any]) -> None:
        """Store a ticker (Upbit REST, WebSocket DEFAULT or SIMPLE). Memory only."""
        self._realtime.put_ticker(ticker)

    def ticker(self, symbol: str) -> dict[str, Any] | None:
        """The latest ticker of a market in Upbit field names, or None."""
        return self._realtime.ticker(self._sym(symbol))

    def ticker_history(self, symbol: str, since: Any = None) -> list[dict[str, Any]]:
        """Tickers kept within the TTL, oldest first, optionally only those at or after ``since``."""
        s = self._range_arg(since, "since")
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
        s = self._range_arg(since, "since")
        return self._realtime.trades(self._sym(symbol), count=count, since=s)

    # ------------------------------------------------------------------ async API
    async def get(self, request: StorageRequest) -> StorageResponse:
        """Serve a seed-compatible request; errors become ``success=False``, never exceptions.

        ``resp.arrays`` holds ``{symbol: array}`` (candles, trades) or ``{symbol: dict}``; ``resp.data``
        is built from it only when asked for.
        """
        t0 = time.perf_counter()
        meta = StorageMetadata()
        calls_before = self._metrics.layer1_calls
        try:
            if not isinstance(request, StorageRequest):
                raise InvalidRequestError("request must be an mds.StorageRequest")
            self._check_open()
            dt = request.data_type
            if dt is DataType.CANDLE:
                arrays, source = await self._get_candles(request)
                tfname = request.timeframe
                factory = _candle_factory(tfname or "1m")
            else:
                arrays, source = await self._get_realtime(request)
                factory = _realtime_factory(dt)
            meta.source = source
            meta.cache_hit = source != "layer1_api"
            meta.layer1_calls = self._metrics.layer1_calls - calls_before  # other threads' too, if any
            meta.data_count = sum(len(v) if isinstance(v, np.ndarray) else (v is not None) for v in arrays.values())
            ms = (time.perf_counter() - t0) * 1000
            meta.processing_time_ms = ms
            self._metrics.lat("api.get", ms)
            return StorageResponse(True, arrays, meta, None, factory)
        except Exception as exc:  # the one place errors become success=False (DESIGN.md section 3)
            meta.processing_time_ms = (time.perf_counter() - t0) * 1000
            meta.cache_hit = False
            meta.source = "layer1_api" if isinstance(exc, Layer1Error) else meta.source
            return StorageResponse(False, {}, meta, f"{type(exc).__name__}: {exc}")

    async def _get_candles(self, req: StorageRequest) -> tuple[dict[str, Any], str]:
        tf = parse_timeframe(req.timeframe or "")
        peeked = None
        if self._layer1 is not None and self.config.lookup == "layer1_first" and req.count is not None:
            peeked = await self._peek_async(req, tf)
        if peeked is not None:
            self._metrics.hits["layer1_cache"] += len(peeked)
            self._metrics.requests += 1
            return peeked, "layer1_cache"
        out: dict[str, Any] = {}
        source = "storage_memory"
        pending: list[str] = []
        for sym in req.symbols:
            # Never wait for the store lock in the caller's event loop: while another thread holds
            # it (a batch, maintain(), a fetch), the read goes to a worker thread below.
            if not self._lock.acquire(blocking=False):
                pending.append(sym)
                continue
            try:
                arr, src = self._read(sym, tf, req.count, req.start_time, req.end_time, False, allow_layer1=False)
            except (_NeedsLayer1, _StorageDown):
                pending.append(sym)
                continue
            finally:
                self._lock.release()
            self._metrics.hits[src] += 1
            out[sym] = arr
            source = _slowest(source, src)
        if pending:
            results = await asyncio.gather(
                *(
                    asyncio.to_thread(self._locked_read, sym, tf, req.count, req.start_time, req.end_time)
                    for sym in pending
                )
            )
            for sym, (arr, src) in zip(pending, results):
                self._metrics.hits[src] += 1
                out[sym] = arr
                source = _slowest(source, src)
        self._metrics.requests += 1
        return {s: out[s] for s in req.symbols}, source

    def _locked_read(self, sym: str, tf: Timeframe, count: Any, start: Any, end: Any) -> tuple[np.ndarray, str]:
        with self._lock:
            return self._read(sym, tf, count, start, end, False, allow_layer1=True)

    async def _get_realtime(self, req: StorageRequest) -> tuple[dict[str, Any], str]:
        out: dict[str, Any] = {}
        missing: list[str] = []
        for sym in req.symbols:
            if req.data_type is DataType.TICKER:
                val: Any = self._realtime.ticker(sym)
            elif req.data_type is DataType.ORDERBOOK:
                val = self._realtime.orderbook(sym)
            else:
                val = self._realtime.trades(sym, count=req.count, since=req.start_time)
                if not len(val):
                    val = None
            out[sym] = val
            if val is None:
                missing.append(sym)
        source = "storage_memory"
        if missing and self._layer1 is not None:
            fetched = await asyncio.to_thread(self._fetch_realtime, req, missing)
            out.update(fetched)
            source = "layer1_api"
        return out, source

    def _fetch_realtime(self, req: StorageRequest, symbols: list[str]) -> dict[str, Any]:
        assert self._layer1 is not None
        sub = StorageRequest(req.data_type, symbols, count=req.count)
        t0 = time.perf_counter()
        try:
            ans = self._run(self._layer1.request_data_from_layer1(sub))
        finally:
            self._metrics.lat("layer1_call", (time.perf_counter() - t0) * 1000)
        self._metrics.layer1_calls += int(ans.calls)
        out: dict[str, Any] = {}
        with self._lock:
            for sym in symbols:
                val = ans.arrays.get(sym)
                try:
                    if val is None:
                        out[sym] = None
                    elif req.data_type is DataType.TICKER:
                        self._realtime.put_ticker(val)
                        out[sym] = self._realtime.ticker(sym)
                    elif req.data_type is DataType.ORDERBOOK:
                        self._realtime.put_orderbook(val)
                        out[sym] = self._realtime.orderbook(sym)
                    else:
                        self._realtime.put_trades(sym, val)
                        out[sym] = self._realtime.trades(sym, count=req.count, since=req.start_time)
                except (InvalidRequestError, InvalidCandleError) as exc:  # the Layer 1's answer, not the caller's
                    raise Layer1Error(f"Layer 1 answered an unusable {req.data_type.value} for {sym}: {exc}") from exc
        return out

    # ------------------------------------------------------------------ stats and lifecycle
    def stats(self) -> dict[str, Any]:
        """JSON-serialisable figures: hits and misses per tier, hit rate, latency percentiles per
        tier and per API, Layer 1 calls and candles fetched, sizes per tier, degraded tiers."""
        m = self._metrics
        # Readers update the counters outside the store lock: copy each dict in one C-level step
        # (no Python code runs while it is copied, so no other thread can change its size).
        hits, misses, latency = dict(m.hits), dict(m.misses), list(m.latency.items())
        served = sum(hits.values())
        from_storage = served - hits["layer1_api"]
        out: dict[str, Any] = {
            "requests": m.requests,
            "hits": hits,
            "misses": misses,
            "hit_rate": round(from_storage / served, 6) if served else None,
            "latency": {k: v.summary() for k, v in sorted(latency)},
            "layer1": {"calls": m.layer1_calls, "candles_fetched": m.layer1_candles, "errors": m.layer1_errors},
            "tiers": {},
            "degraded": sorted(n for n, s in self._tiers.items() if s.degraded_at is not None),
            "core": K.IMPLEMENTATION,
        }
        # The tiers' figures come from their connections, which a writer may be using: ask them
        # under the store lock, and say so where a long write holds it instead of waiting for it.
        held = self._lock.acquire(timeout=_STATS_WAIT_S)
        try:
            for name, state in self._tiers.items():
                info: dict[str, Any] = {"degraded": state.degraded_at is not None, "error": state.error}
                if not held:
                    info["busy"] = True
                elif state.obj is not None and state.degraded_at is None:
                    with contextlib.suppress(*_BACKEND_ERRORS):
                        info.update(_jsonable(state.obj.stats()))
                out["tiers"][name] = info
        finally:
            if held:
                self._lock.release()
        with contextlib.suppress(Exception):
            out["realtime"] = _jsonable(self._realtime.stats())
        if self._layer1 is not None:
            with contextlib.suppress(Exception):
                out["layer1"]["connector"] = _jsonable(self._run(self._layer1.monitor_layer1_performance()))
        return out

    def close(self) -> None:
        """Flush and release files. Further calls raise StorageUnavailableError."""
        if self._closed:
            return
        self._closed = True
        self._close_tiers()
        if self._loop is not None:
            loop = self._loop
            if self._layer1 is not None and hasattr(self._layer1.layer1, "aclose"):
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(self._layer1.layer1.aclose(), loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)
            loop.close()
            self._loop = None

    def _close_tiers(self) -> None:
        if self._changes_map is not None:
            self._changes = self._acked = None  # views into the map: it cannot close while they live
            with contextlib.suppress(BufferError, ValueError):
                self._changes_map.close()
            self._changes_map = None
        for state in self._tiers.values():
            if state.obj is not None and hasattr(state.obj, "close"):
                with contextlib.suppress(*_BACKEND_ERRORS):
                    state.obj.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store(path={str(self.path)!r}, tiers={self.config.tiers}, layer1={self._layer1 is not None})"


class _StorageDown(Exception):
    """Storage could not keep or answer; carries fetched rows for a pass-through answer and the
    reason, for the typed error raised when there is no Layer 1 to pass through to."""

    def __init__(
        self, rows: np.ndarray | None = None, reason: str = "storage unavailable", damaged: Any = None
    ) -> None:
        super().__init__(reason)
        self.rows = rows if rows is not None else _EMPTY
        self.reason = reason
        self.damaged = damaged  # a DamagedChunkError: rows failed their checksum


_CHECK_ERRORS: tuple[type[BaseException], ...] = (*_BACKEND_ERRORS, MdsError)


def _checked(what: str, fn: Callable[[], list[str]]) -> list[str]:
    """A part of check(): a tier that fails while being checked is a problem to report (what it
    could not vouch for), never an exception out of check()."""
    try:
        return fn()
    except _CHECK_ERRORS as exc:
        return [f"{what}: the check could not finish: {type(exc).__name__}: {exc}"]


def _transient(exc: BaseException) -> bool:
    """Whether a backend failure is a state of the moment (busy, locked, full, read-only) rather
    than a broken tier: the call fails, the tier stays in service."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, (*_TRANSIENT_ERRORS, DamagedChunkError)):  # damaged rows: that span only
            return True
        seen = seen.__cause__
    return False


#: A store clock must answer epoch ms inside this range (as the SQLite tier's keys require).
_CLOCK_MAX = 1 << 50


def _clock_value(t: Any) -> int:
    """Epoch ms from a clock's answer (an int, or a finite float, floored), or InvalidRequestError:
    never a bool, None, NaN or a string."""
    number = isinstance(t, (int, np.integer)) or (isinstance(t, (float, np.floating)) and math.isfinite(t))
    if not number or isinstance(t, (bool, np.bool_)):
        raise InvalidRequestError(f"the store clock returned {t!r}; it must return epoch milliseconds as an int")
    v = int(t // 1)
    if not 0 <= v < _CLOCK_MAX:
        raise InvalidRequestError(f"the store clock returned {v}, outside 0 .. 2**50 epoch milliseconds")
    return v


def _checked_clock(fn: Any) -> Callable[[], int]:
    """Wrap a user's clock so every answer is checked (about 0.05 us on an int); it is asked once
    here, so a wrong clock fails at open instead of in the middle of a write."""
    if not callable(fn):
        raise InvalidRequestError(f"clock must be a callable returning epoch ms, not {type(fn).__name__}")

    def clock() -> int:
        t = fn()
        if t.__class__ is int and 0 <= t < _CLOCK_MAX:
            return t
        return _clock_value(t)

    clock()
    return clock


def _serve_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The Layer 1 thread: run the loop until close() stops it. A BaseException raised by foreign
    code inside a task the loop created (``asyncio.wait_for`` wraps its awaitable in one) leaves
    ``run_forever``; the task holds it as its result, so the loop serves on and the waiting call
    gets the error."""
    while True:
        try:
            loop.run_forever()
            return
        except BaseException as exc:
            logger.warning("a Layer 1 call raised %s on the store's loop thread; serving on", type(exc).__name__)


async def _contained(coro: Coroutine[Any, Any, T]) -> T:
    """Await foreign code on the store's loop thread; a BaseException that would stop the loop
    (``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``) becomes a Layer1Error instead."""
    try:
        return await coro
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise Layer1Error(f"the Layer 1 raised {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _storage_errors(sym: str, tf: Timeframe) -> Iterator[None]:
    """Storage that cannot answer a storage-only question (coverage, gaps) is a typed error."""
    try:
        yield
    except _StorageDown as down:
        raise _unanswered(sym, tf, down) from None


def _unanswered(sym: str, tf: Timeframe, down: _StorageDown) -> StorageUnavailableError:
    """The typed error of a read that storage could not answer and no Layer 1 could take over."""
    return StorageUnavailableError(f"{sym} {tf.name}: {down.reason}; nothing was answered")


def _slowest(a: str, b: str) -> str:
    return a if _SOURCE_RANK[a] >= _SOURCE_RANK[b] else b


def _ro(arr: np.ndarray) -> np.ndarray:
    if arr.flags.writeable:
        arr.flags.writeable = False
    return arr


def _count_from(rows: np.ndarray, start: int) -> int:
    return int(np.count_nonzero(rows["ts"] >= start)) if len(rows) else 0


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a intersect b == a minus (a minus b)."""
    return K.interval_subtract(a, K.interval_subtract(a, b))


@functools.cache
def _candle_factory(tfname: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    def build(arrays: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sym, arr in arrays.items():
            out.extend(candles_to_upbit(arr, sym, tfname))
        return out

    return build


def _realtime_factory(dt: DataType) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    def build(arrays: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sym, val in arrays.items():
            if val is None:
                continue
            if isinstance(val, np.ndarray) and val.dtype == TRADE_DTYPE:
                out.extend(
                    {
                        "market": sym,
                        "timestamp": int(r["ts"]),
                        "trade_price": float(r["price"]),
                        "trade_volume": float(r["volume"]),
                        "ask_bid": "BID" if int(r["side"]) > 0 else "ASK",
                        "sequential_id": int(r["sequential_id"]),
                    }
                    for r in val
                )
            else:
                out.append(dict(val))
        return out

    return build


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def open(  # the public name fixed by DESIGN.md
    path: str | os.PathLike[str] | None = None,
    *,
    layer1: Any = None,
    config: Config | None = None,
    clock: Callable[[], int] | None = None,
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
    """
    return Store(path, layer1=layer1, config=config, clock=clock)
