"""The tiers a store runs on, and their health: opening, degradation, retry, recovery.

:class:`Tiers` owns the tier objects. A tier whose backend fails is *degraded*: it is skipped
until it is retried, and reads that it would have answered pass through to Layer 1 or raise a
typed error. The durable tier is special: when the store has one that cannot answer, no read may
fall back to the fast tiers (they hold only windows of it); :meth:`Tiers.db` and
:meth:`Tiers.ask_db` raise :class:`StorageDown` instead (DESIGN.md section 6).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from mds._dtypes import EMPTY_CANDLES
from mds._files import open_private
from mds.errors import MdsError, StorageUnavailableError
from mds.models import Config
from mds.tiers.durable import DamagedChunkError, DurableTier, SharedHistory, open_durable
from mds.timeframes import Timeframe

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A degraded tier is tried again after this many seconds.
_RETRY_DEGRADED_S = 5.0
#: The LMDB tier's ttl without a durable tier to refresh from: its chunks never go stale.
_NEVER_STALE_MS = 1 << 62

BACKEND_ERRORS: tuple[type[BaseException], ...] = (StorageUnavailableError, OSError)
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = ()
try:  # translate backend errors that escape a tier into degradation, not crashes
    import apsw as _apsw
    import lmdb as _lmdb

    BACKEND_ERRORS = (StorageUnavailableError, OSError, _apsw.Error, _lmdb.Error)
    _TRANSIENT_ERRORS = (_apsw.BusyError, _apsw.LockedError, _apsw.FullError, _apsw.ReadOnlyError)
except ImportError:  # pragma: no cover - both are hard dependencies
    pass


@dataclass(slots=True)
class TierState:
    name: str
    obj: Any
    degraded_at: float | None = None
    error: str | None = None


class StorageDown(Exception):
    """Storage could not keep or answer; carries fetched rows for a pass-through answer and the
    reason, for the typed error raised when there is no Layer 1 to pass through to."""

    def __init__(
        self, rows: np.ndarray | None = None, reason: str = "storage unavailable", damaged: Any = None
    ) -> None:
        super().__init__(reason)
        self.rows = rows if rows is not None else EMPTY_CANDLES
        self.reason = reason
        self.damaged = damaged  # a DamagedChunkError: rows failed their checksum


class _Reading(threading.local):
    """Per-thread state of the read in progress."""

    #: True while a read bypasses the memory tier (the series is being written elsewhere)
    bypass = False
    #: True while a read keeps the store's lock for its server reads (see Moved)
    stay = False
    #: True once the read in progress called Layer 1 (its answer's source, also after a restart)
    fetched = False


def counting(lock: Any) -> Any:
    """``lock`` (a ``threading.RLock``) able to say how many times the calling thread holds it
    (``_recursion_count()``, which Python 3.11's RLock has and 3.10's lacks: wrapped there)."""
    return lock if hasattr(lock, "_recursion_count") else _Counting(lock)


class _Counting:
    """An RLock that counts its owner's holds (see :func:`counting`); the count is the owner's
    alone, as only the owner changes it."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._depth = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = bool(self._lock.acquire(blocking, timeout))
        if got:
            self._depth += 1
        return got

    def release(self) -> None:
        self._depth -= 1
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _recursion_count(self) -> int:
        return self._depth if self._lock._is_owned() else 0

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())

    def _release_save(self) -> tuple[Any, int]:
        depth, self._depth = self._depth, 0
        return self._lock._release_save(), depth

    def _acquire_restore(self, saved: tuple[Any, int]) -> None:
        self._lock._acquire_restore(saved[0])
        self._depth = saved[1]


class Moved(Exception):
    """A write to the series began while the store's lock was free for a server read
    (:meth:`Tiers.read_db`): what the read decided before (coverage, what to fetch) may no longer
    hold, so ``Reader.read`` starts it over, keeping the lock this time."""


class Tiers:
    """The configured tiers of one store and their state.

    ``states`` maps a configured tier's name (``memory``, ``disk``, ``sqlite``) to its
    :class:`TierState`; ``reading.bypass`` (per thread) hides the memory tier during a read that
    must see the durable tier's newest commit.
    """

    def __init__(
        self, path: Path, config: Config, clock: Callable[[], int], writable: bool, history: str | None = None
    ) -> None:
        self.path = path
        self.config = config
        #: None: the durable tier is the SQLite file under ``path``; else the server URL it lives at.
        self.history = history
        #: The durable tier's name in messages.
        self.durable_name = "SQLite" if history is None else "PostgreSQL"
        self.clock = clock
        self.writable = writable
        self.states: dict[str, TierState] = {}
        self.reading = _Reading()
        self.stamp: Callable[[str, Timeframe], int | None] = lambda sym, tf: None
        self._disk_marked = False
        #: False while a shared durable tier's change feed is down: memory and LMDB are then not
        #: used while the durable tier answers (see mds.store.remote).
        self.feed_live = True
        #: Whether the fast tiers' copies may answer while the feed is down and the durable tier
        #: does not answer either: True until the durable tier answers while the feed is down
        #: (then other hosts may have written unheard); set again when the feed listens again.
        self.copies_trusted = True
        #: Called with (name, tier object) each time a tier opens (also on a reopen after a failure).
        self.on_open: list[Callable[[str, Any], None]] = []
        #: The Store's lock (set by the Store): :meth:`read_db` lets other threads have it while a
        #: shared durable tier's server answers.
        self.lock: Any = None

    @property
    def durable(self) -> bool:
        """Whether the store has a durable tier (usable or not)."""
        return "sqlite" in self.states

    def open(self, stamp: Callable[[str, Timeframe], int | None]) -> None:
        """Open the configured tiers; one that cannot open starts degraded (retried on use)."""
        cfg = self.config
        self.stamp = stamp
        if "sqlite" in cfg.tiers:
            self.states["sqlite"] = TierState("sqlite", None)
            self._try_open("sqlite")
        if "disk" in cfg.tiers:
            self.states["disk"] = TierState("disk", None)
            if self._try_open("disk"):
                self._drop_stale_disk()
                if self.history is not None:
                    # LMDB now holds rows of a shared history: a store opened later on this
                    # directory with its own SQLite file must not answer them
                    self.mark_disk_stale()
        if "memory" in cfg.tiers:
            from mds.tiers.memory import MemoryTier

            self.states["memory"] = TierState(
                "memory",
                MemoryTier(
                    capacity=cfg.memory_candles,
                    max_bytes=cfg.memory_bytes,
                    ttl_ms=int(cfg.memory_ttl_s * 1000),
                    clock=self.clock,
                ),
            )

    def _try_open(self, name: str) -> bool:
        state = self.states[name]
        cfg = self.config
        try:
            if name == "sqlite":
                state.obj = open_durable(
                    self.path,
                    cfg,
                    readonly=not self.writable,
                    clock=self.clock,
                    history=self.history,
                    origin=origin_of(self.path),
                )
            else:
                from mds.tiers.disk import LmdbTier

                state.obj = LmdbTier(
                    self.path / "lmdb",
                    retention_ms=int(cfg.disk_days * 86_400_000),
                    # without a durable tier LMDB is the store: nothing to refresh a chunk from, so
                    # none goes stale (only the retention window applies)
                    ttl_ms=int(cfg.disk_ttl_s * 1000) if "sqlite" in cfg.tiers else _NEVER_STALE_MS,
                    map_size=min(64 * 1024 * 1024, cfg.disk_map_size_cap),
                    durable=cfg.durable,
                    map_size_cap=cfg.disk_map_size_cap,
                    clock=self.clock,
                    loader=self._disk_loader if "sqlite" in cfg.tiers else None,
                    readonly=not self.writable,
                )
                state.obj.version = self.stamp
        except BACKEND_ERRORS as exc:
            self.degrade(name, exc)
            return False
        state.degraded_at = None
        state.error = None
        for hook in self.on_open:
            hook(name, state.obj)
        return True

    def _disk_loader(self, symbol: str, tf: Timeframe, start: int, end: int) -> np.ndarray:
        db = self.tier("sqlite")
        if db is None:
            raise StorageUnavailableError(f"{self.durable_name} tier unavailable; cannot refresh the disk tier")
        return db.read_range(symbol, tf, start, end)

    # ------------------------------------------------------------------ the stale-disk marker
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
            self.states["disk"].obj.clear()
            marker.unlink(missing_ok=True)  # another process of the directory may have cleared it too
            logger.info("disk tier cleared: SQLite was written while it could not follow")
        except BACKEND_ERRORS as exc:
            self.degrade("disk", exc)

    def mark_disk_stale(self) -> None:
        """Leave the marker that makes the next opener of the disk tier empty it (best effort)."""
        if self._disk_marked or "sqlite" not in self.states:
            return
        try:
            os.close(open_private(self._stale_marker, os.O_CREAT | os.O_WRONLY))
            self._disk_marked = True
        except OSError as exc:  # best effort: the write itself may still go on
            logger.warning("could not mark the disk tier stale: %s", exc)

    # ------------------------------------------------------------------ degradation
    def degrade(self, name: str, exc: BaseException) -> None:
        state = self.states[name]
        if state.degraded_at is None:
            logger.warning("tier %s degraded: %s", name, exc)
        state.degraded_at = time.monotonic()
        state.error = f"{type(exc).__name__}: {exc}"

    def degraded(self) -> list[str]:
        """Names of the tiers degraded now, sorted."""
        return sorted(n for n, s in self.states.items() if s.degraded_at is not None)

    def tier(self, name: str) -> Any:
        """The tier object if it is configured and usable now (a degraded tier is retried later)."""
        state = self.states.get(name)
        if state is None:
            return None
        if state.degraded_at is None and self.feed_live and (name != "memory" or not self.reading.bypass):
            return state.obj  # the usual case, asked several times by every write
        if name == "memory" and self.reading.bypass:
            return None
        if not self.feed_live and name != "sqlite" and not self.copies_usable():
            return None
        if state.degraded_at is not None:
            # A tier that could not even open (a full disk, a file being replaced) is tried again
            # at once: an open that fails is quick, and space may have been freed since.
            if state.obj is not None and time.monotonic() - state.degraded_at < _RETRY_DEGRADED_S:
                return None
            if state.obj is None and not self._try_open(name):
                return None
            if name == "disk" and self.durable:
                # Writes may have gone to SQLite while LMDB could not follow (or could not drop a
                # span): it is emptied before it is trusted again, and refills lazily. Without a
                # durable tier it is the store, and no write went past it (it raised instead).
                try:
                    state.obj.clear()
                    self._stale_marker.unlink(missing_ok=True)
                except BACKEND_ERRORS as exc:
                    self.degrade(name, exc)
                    return None
            state.degraded_at = None
            state.error = None
            logger.info("tier %s back in service", name)
        return state.obj

    def guard(self, name: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Call a tier method; a backend failure degrades the tier and returns None."""
        try:
            return fn(*args)
        except BACKEND_ERRORS as exc:
            if not transient(exc):
                self.degrade(name, exc)
            return None

    def failed(self, name: str, exc: BaseException) -> None:
        """A call to tier ``name`` failed: degrade it unless the failure is of the moment."""
        if not transient(exc):
            self.degrade(name, exc)

    # ------------------------------------------------------------------ the durable tier
    def copies_usable(self) -> bool:
        """Whether what this host holds of the durable tier (fast tiers, cached coverage) may
        answer: while the change feed listens, or while neither it nor the server answers and the
        server did not answer since the feed went down (nobody can have written unheard)."""
        return self.feed_live or (self.copies_trusted and self.durable_down())

    def durable_down(self) -> bool:
        """Whether the store has a durable tier that is degraded now."""
        state = self.states.get("sqlite")
        return state is not None and state.degraded_at is not None

    def db(self) -> DurableTier | None:
        """The durable tier for a read; None when the store has none (memory or disk only).

        Raises :class:`StorageDown` when the store has one that cannot answer now (degraded,
        unopenable): the fast tiers hold only windows of what it holds, so no read may fall back
        to them as if they were the whole answer (DESIGN.md section 6).
        """
        if "sqlite" not in self.states:
            return None
        db = self.tier("sqlite")
        if db is None:
            raise StorageDown(reason=f"the {self.durable_name} tier is unavailable ({self.states['sqlite'].error})")
        return db

    def ask_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a durable-tier read; a failure raises :class:`StorageDown`, never an empty answer.

        Busy, locked, full or read-only is not broken: the tier stays in service for the next
        call. Anything else degrades it.
        """
        try:
            answer = fn(*args)
        except DamagedChunkError as exc:  # damaged rows, not a broken tier: never served
            raise StorageDown(reason=str(exc), damaged=exc) from exc
        except BACKEND_ERRORS as exc:
            self.failed("sqlite", exc)
            raise StorageDown(reason=f"the {self.durable_name} tier could not answer: {exc}") from exc
        if not self.feed_live:
            self.copies_trusted = False  # the server answers: other hosts may write unheard
        return answer

    def read_db(self, method: str, *args: Any, guard: Callable[[], bool] | None = None) -> Any:
        """:meth:`ask_db` of the durable tier's read ``method``, off the store's lock where it can
        be (:meth:`off_lock`). ``guard`` (``Writer.fill_guard`` of the series, taken before) says
        whether no write to the series began since: when one did while the lock was free,
        :class:`Moved` is raised (the caller's read starts over on the lock: what it decided
        before, such as the coverage, may have changed too, and a derived timeframe reads the
        coverage that proves its rows after them). The caller guards what it fills its fast
        tiers with by the same ``guard``."""
        db = self.db()
        if db is None:
            raise StorageDown(reason="the store has no durable tier")
        off = self._off_lock(db, method, False)
        if off is None:
            return self.ask_db(getattr(db, method), *args)
        got = self.ask_db(off, *args)
        if guard is not None and not guard():
            raise Moved(method)
        return got

    def off_lock(self, db: DurableTier, method: str, writable: bool = False) -> Callable[..., Any]:
        """``db``'s ``method``, made to run on a connection of its own while other threads use the
        store, where ``db`` is a shared durable tier (a server: a round trip, or a server that
        stopped answering, must not stall memory hits of other threads) and the caller holds the
        store's lock once. Held recursively, an outer caller counts on the lock across several
        calls (a derived timeframe reads rows, then the coverage that proves them): the method
        itself, under the lock; as it is inside a transaction, or without a connection to spare.
        ``writable``: the method writes (upkeep), on a connection of its own too."""
        off = self._off_lock(db, method, writable)
        return getattr(db, method) if off is None else off

    def _off_lock(self, db: DurableTier, method: str, writable: bool) -> Callable[..., Any] | None:
        """:meth:`off_lock`'s call, or None where the method itself must run."""
        fn: Callable[..., Any] = getattr(db, method)
        lock = self.lock
        if self.history is None or lock is None or self.reading.stay or lock._recursion_count() != 1:
            return None
        spare = cast(SharedHistory, db).off_lock(writable)
        if spare is None:
            return None
        off = spare

        def call(*a: Any, **kw: Any) -> Any:
            held = lock._release_save()
            try:
                with off as other:
                    if other is not None:
                        return getattr(other, method)(*a, **kw)
            finally:
                lock._acquire_restore(held)
            return fn(*a, **kw)

        return call

    def first_stored(self, sym: str, tf: Timeframe) -> int | None:
        """Open time of the oldest candle the durable tier holds (None: none, or it cannot say)."""
        db = self.tier("sqlite")
        if db is None:
            return None
        rows = self.guard("sqlite", db.read_from, sym, tf, -(2**62), 1)
        return int(rows["ts"][0]) if rows is not None and len(rows) else None

    def close(self) -> None:
        for state in self.states.values():
            if state.obj is not None and hasattr(state.obj, "close"):
                with contextlib.suppress(*BACKEND_ERRORS):
                    state.obj.close()


def origin_of(path: Path) -> str:
    """This store directory's name in a shared durable tier's change feed: host and the
    directory's identity, the same for every process that opens it (they share its fast tiers,
    which each writer keeps exact itself), different for every other store directory."""
    try:
        st = os.stat(path)
        ident = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        ident = str(path)
    return f"{socket.gethostname()}:{ident}"


def transient(exc: BaseException) -> bool:
    """Whether a backend failure is a state of the moment (busy, locked, full, read-only) rather
    than a broken tier: the call fails, the tier stays in service."""
    seen: BaseException | None = exc
    kinds = (*_TRANSIENT_ERRORS, *_server_transient(), DamagedChunkError)  # damaged rows: that span only
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__
    return False


def _server_transient() -> tuple[type[BaseException], ...]:
    """A shared history server's states of the moment: another host's lock held past
    ``lock_timeout``, a deadlock the server broke by rolling this transaction back. (psycopg is
    loaded once such a tier was opened; it is an optional dependency, not imported here.)"""
    pg = sys.modules.get("psycopg")
    if pg is None:
        return ()
    return (pg.errors.LockNotAvailable, pg.errors.DeadlockDetected)


_CHECK_ERRORS: tuple[type[BaseException], ...] = (*BACKEND_ERRORS, MdsError)


def checked(what: str, fn: Callable[[], list[str]]) -> list[str]:
    """A part of check(): a tier that fails while being checked is a problem to report (what it
    could not vouch for), never an exception out of check()."""
    try:
        return fn()
    except _CHECK_ERRORS as exc:
        return [f"{what}: the check could not finish: {type(exc).__name__}: {exc}"]


@contextlib.contextmanager
def storage_errors(sym: str, tf: Timeframe) -> Iterator[None]:
    """Storage that cannot answer a storage-only question (coverage, gaps) is a typed error."""
    try:
        yield
    except StorageDown as down:
        raise unanswered(sym, tf, down) from None


def unanswered(sym: str, tf: Timeframe, down: StorageDown) -> StorageUnavailableError:
    """The typed error of a read that storage could not answer and no Layer 1 could take over."""
    return StorageUnavailableError(f"{sym} {tf.name}: {down.reason}; nothing was answered")
