"""Disk tier: the recent candles of every series in one LMDB environment.

LMDB maps the file into every process that opens the store path, so a process that starts cold
reads the last month of a series at memory-map speed, and many reader processes share one copy
in the page cache with a single writer. The tier is a cache in front of SQLite: everything in it
can be rebuilt from SQLite, which is why it favours speed over durability and why damage to it
(a corrupt, truncated or deleted file) is repaired by starting empty rather than by failing.

This module is the tier itself (its policy: retention, staleness, refresh, degradation); the
rest lives in private modules by role:

- :mod:`mds.tiers._lmdb_format`: key layout, chunk and held-range values, their codecs;
- :mod:`mds.tiers._lmdb_held`: held ranges as flat interval lists, and their record;
- :mod:`mds.tiers._lmdb_chunks`: the read walks and the replacement of a range's chunks;
- :mod:`mds.tiers._lmdb_maintenance`: purge, check and series walks over the whole environment;
- :mod:`mds.tiers._lmdb_env`: one environment per path and process (open, grow, recover) and
  its transactions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import lmdb
import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds._kernels import file_state
from mds.errors import StorageUnavailableError
from mds.tiers._lmdb_chunks import _delete_range, _latest_in, _put_periods, _range_in, _store_range
from mds.tiers._lmdb_env import _CORRUPTION, _Env, _Gone, _MiB
from mds.tiers._lmdb_format import CHUNK_PERIOD_MS, FORMAT_VERSION, _Corrupt
from mds.tiers._lmdb_held import _held_of, _intersect, _subtract
from mds.tiers._lmdb_maintenance import _check_walk, _clear_all, _purge_walk, _series_walk
from mds.timeframes import DAY_MS, Timeframe
from mds.timeutil import now_ms

__all__ = ["CHUNK_PERIOD_MS", "FORMAT_VERSION", "LmdbTier"]

log = logging.getLogger(__name__)

Loader = Callable[[str, Timeframe, int, int], np.ndarray]


_NOT_READ = object()


class _Refused(Exception):
    """A guarded write found the series changed since its rows were read; nothing is written."""


class LmdbTier:
    """Recent candles per series in LMDB, shared by every process that opens the same path.

    Parameters
    ----------
    path : str or os.PathLike
        Directory of the environment; created with mode 0700 when missing.
    retention_ms : int
        Only candles newer than ``clock() - retention_ms`` are stored and answered (31 days).
    ttl_ms : int
        A chunk written more than ``ttl_ms`` ago is stale (1 day): a read refreshes it through
        ``loader``, ``purge_expired`` removes it.
    map_size : int
        Initial map size in bytes; the map grows by itself (doubling) when a write needs more.
    map_size_cap : int
        The map never grows past this; a write that needs more raises
        :class:`~mds.errors.StorageUnavailableError` and the tier reports itself degraded.
    clock : callable, optional
        Returns epoch ms; the wall clock by default.
    loader : callable, optional
        ``loader(symbol, tf, start, end)`` returns exactly all durable (SQLite) candles in
        ``[start, end)``; used to refresh stale chunks on read. Without one, stale chunks count
        as not held.
    durable : bool
        ``fsync`` each commit. Off by default: the tier is a cache of SQLite; a killed process
        loses nothing, a power loss may leave a damaged file that is detected and rebuilt.
    readonly : bool
        Open an existing environment read-only (a read-only store directory or file system):
        reads work, every write (``put_range``, ``delete``, ``purge_expired``, ``clear``) raises
        :class:`~mds.errors.StorageUnavailableError` and changes nothing, stale chunks count as
        not held, damage is not repaired (reads of it answer None). A missing or empty
        environment raises :class:`~mds.errors.StorageUnavailableError` at open. Where LMDB's
        lock file cannot be written either, reads run without it (see Notes).

    Raises
    ------
    StorageUnavailableError
        At open: the directory or one of its files is a symbolic link or belongs to another
        user, the disk is full, the directory cannot be written (and ``readonly`` is False), or
        the environment is unusable. Nothing was written through a link; a full disk or a
        permission problem never deletes the files.

    Notes
    -----
    Every file LMDB maps is allocated before it is mapped (the lock file is created here with
    its blocks; the data file is written with ``pwrite``, not through the map), so a full disk
    is an error, never a ``SIGBUS``. A read-only tier without a writable lock file registers no
    reader slot: a writer in another process may then reuse pages a read is walking; what the
    read meets is damage, detected and answered as None (not held), never served.

    Thread-safe (one lock per environment and process). Readers in other processes see only
    committed writes. A damaged environment (corrupt, truncated or deleted files) is detected
    at open and on access and recreated empty: reads then answer None (not held) until the
    Store refills the tier. Everything read from disk is parsed with size limits; nothing is
    unpickled or evaluated.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_ms: int = 31 * DAY_MS,
        ttl_ms: int = DAY_MS,
        map_size: int = 64 * _MiB,
        map_size_cap: int = 8 << 30,
        clock: Callable[[], int] | None = None,
        loader: Loader | None = None,
        durable: bool = False,
        readonly: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self.retention_ms = int(retention_ms)
        self.ttl_ms = int(ttl_ms)
        self.clock: Callable[[], int] = clock or now_ms
        self.loader = loader
        #: ``version(symbol, tf)``: a value that changes whenever the series is written to SQLite
        #: (the Store's change stamp). A refresh through ``loader`` is kept only if it did not change.
        self.version: Callable[[str, Timeframe], object] | None = None
        self.degraded = False
        self.degraded_reason: str | None = None
        self._counts = {"hits": 0, "misses": 0, "refreshed_chunks": 0, "errors": 0}
        self._specs: dict[tuple[str, str], tuple[bytes, int, int]] = {}
        cap = max(int(map_size_cap), _MiB)
        map_size = min(max(int(map_size), _MiB), cap)
        self._env: _Env | None = _Env.acquire(self.path, map_size, cap, durable, self.readonly)

    # -- plumbing ---------------------------------------------------------------------------------
    def _handle(self) -> _Env:
        if self._env is None:
            raise StorageUnavailableError("the LMDB disk tier is closed")
        return self._env

    def _prefix(self, symbol: str, tf: Timeframe) -> bytes:
        return (self._specs.get((symbol, tf.name)) or self._spec(symbol, tf))[0]

    def _spec(self, symbol: str, tf: Timeframe) -> tuple[bytes, int, int]:
        """``(key prefix, chunk period, row interval or 0 for months)`` of a series, cached."""
        spec = (f"{symbol}\x1f{tf.name}\x1f".encode(), CHUNK_PERIOD_MS[tf.name], 0 if tf.is_month else tf.interval_ms)
        self._specs[(symbol, tf.name)] = spec
        return spec

    @staticmethod
    def _period(tf: Timeframe) -> int:
        return CHUNK_PERIOD_MS[tf.name]

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(handle, txn, *args)`` in a read transaction; damage is repaired and means None.

        The same steps as :meth:`_Env.reading`, written out: the generator-based context manager
        costs about 1 us, a quarter of a 1,000-candle read.
        """
        h = self._env
        if h is None:
            raise StorageUnavailableError("the LMDB disk tier is closed")
        try:
            with h.lock:
                env = h.env if h.env is not None else h.ensure_open()
                try:
                    txn = env.begin(buffers=True)
                except lmdb.MapResizedError:
                    h.adopt_resize()
                    txn = env.begin(buffers=True)
                try:
                    try:  # check_file's common case, inlined
                        links, size = file_state(h.fd)
                    except OSError as exc:
                        raise _Gone(str(exc)) from None
                    if not links or size != h.checked_size:
                        h.check_file(links, size)
                    return fn(h, txn, *args)
                finally:
                    txn.abort()
        except (_Corrupt, *_CORRUPTION) as exc:
            self._counts["errors"] += 1
            with h.lock:
                h.recreate(str(exc) or type(exc).__name__)
            return None
        except _Gone:
            with h.lock:
                h.reopen()
            return None
        except lmdb.Error as exc:  # readers full, I/O error ...: not held, the Store goes on
            self._counts["errors"] += 1
            log.warning("LMDB disk tier read failed: %s", exc)
            return None

    def _write(self, fn: Callable[[_Env, Any], Any], needed: int = 0) -> Any:
        """Run ``fn(handle, txn)`` in a write transaction (:meth:`_Env.write`: the map grows when
        it is full, damage is repaired); a failure degrades the tier, a success ends that."""
        h = self._handle()
        if self.readonly:
            raise StorageUnavailableError(f"the LMDB disk tier at {self.path} is open read-only; nothing was written")
        with h.lock:
            result = h.write(fn, needed, self.path, self._counts, self._degrade)
            self.degraded = False
            self.degraded_reason = None
            return result

    def _degrade(self, reason: str) -> None:
        if not self.degraded:
            log.warning("LMDB disk tier degraded: %s", reason)
        self.degraded = True
        self.degraded_reason = reason

    def _cutoff(self, now: int) -> int:
        return now - self.retention_ms

    # -- reads ------------------------------------------------------------------------------------
    def get_range(self, symbol: str, tf: Timeframe, start: int, end: int) -> np.ndarray | None:
        """The candles in ``[start, end)`` if the tier holds that whole range, else None.

        Parameters
        ----------
        symbol : str
            Canonical market code.
        tf : Timeframe
            Canonical timeframe.
        start, end : int
            Half-open range, epoch ms.

        Returns
        -------
        numpy.ndarray or None
            A new read-only CANDLE_DTYPE array (ascending ``ts``, possibly empty: a held range
            without trades), or None when part of the range is not held, older than the
            retention window, stale and not refreshable, or the environment was damaged.
        """
        start, end = int(start), int(end)
        if end <= start:
            return np.empty(0, CANDLE_DTYPE)
        now = self.clock()
        if start < now - self.retention_ms:
            self._counts["misses"] += 1
            return None
        prefix, period, step = self._specs.get((symbol, tf.name)) or self._spec(symbol, tf)
        stale_before = now - self.ttl_ms
        h = self._env
        res: Any = _NOT_READ
        if h is not None and h.env is not None:
            # _read's common case written out: a third of a read's cost went to Python frames.
            # Anything unusual (damage, a resized map, a replaced file) raises and takes _read.
            try:
                with h.lock:
                    txn = h.env.begin(None, None, False, True)  # buffers=True; keywords cost a dict a call
                    try:
                        links, size = file_state(h.fd)  # an OSError takes _read, which says "gone"
                        if not links or size != h.checked_size:
                            h.check_file(links, size)
                        res = _range_in(h, txn, prefix, period, step, start, end, stale_before)
                    finally:
                        txn.abort()
            except Exception:  # the general path below repairs and reports it
                res = _NOT_READ
        if type(res) is np.ndarray:
            self._counts["hits"] += 1
            return res
        args = (prefix, period, step, start, end, stale_before)
        return self._read_fresh(symbol, tf, _range_in, args, res)

    def _read_fresh(
        self,
        symbol: str,
        tf: Timeframe,
        walk: Callable[..., np.ndarray | list[int] | None],
        args: tuple[Any, ...],
        first: Any = _NOT_READ,
    ) -> np.ndarray | None:
        """Run a read walk ``walk(h, txn, *args)`` (unless ``first`` is its result already); when it
        names stale periods, refresh them from the loader and walk once more. Counts the hit or
        miss."""
        for attempt in range(2):
            res = first if attempt == 0 and first is not _NOT_READ else self._read(walk, *args)
            if res is None or type(res) is np.ndarray:
                break
            if not self._refresh(symbol, tf, res):  # a list of stale periods
                res = None
                break
        else:
            res = None
        if res is None:
            self._counts["misses"] += 1
            return None
        self._counts["hits"] += 1
        return res

    def get_latest(self, symbol: str, tf: Timeframe, n: int, end: int) -> np.ndarray | None:
        """The latest ``n`` candles before ``end``, if the held ranges prove they are the latest.

        Returns the rows only when the held range that reaches ``end`` contains at least ``n``
        candles (within the retention window); otherwise None (the Store asks SQLite, which
        knows the whole history). ``n <= 0`` gives an empty array.
        """
        n, end = int(n), int(end)
        if n <= 0:
            return np.empty(0, CANDLE_DTYPE)
        now = self.clock()
        spec = self._specs.get((symbol, tf.name)) or self._spec(symbol, tf)
        return self._read_fresh(symbol, tf, _latest_in, (*spec, n, end, self._cutoff(now), now - self.ttl_ms))

    def _refresh(self, symbol: str, tf: Timeframe, periods: list[int]) -> bool:
        """Reload stale chunks from the loader; False when there is no loader or it failed."""
        if self.loader is None:
            return False
        prefix = self._prefix(symbol, tf)
        period = self._period(tf)
        now = self.clock()
        cutoff = self._cutoff(now)
        held = self._read(lambda h, txn: _held_of(h, txn, prefix))
        if held is None:
            return False
        token = self.version(symbol, tf) if self.version is not None else None
        try:
            fresh = _load_periods(self.loader, symbol, tf, held, periods, period, cutoff)
        except StorageUnavailableError as exc:
            log.warning("LMDB disk tier: refresh of %s %s failed: %s", symbol, tf.name, exc)
            return False

        def apply(h: _Env, txn: Any) -> None:
            if self.version is not None and self.version(symbol, tf) != token:
                raise _Refused  # the series was written since it was loaded: do not keep that copy
            _put_periods(h, txn, prefix, fresh, now)

        try:
            self._write(apply, needed=sum(r.nbytes for r in fresh.values()))
        except (StorageUnavailableError, _Refused):
            return False
        self._counts["refreshed_chunks"] += len(fresh)
        return True

    def held(self, symbol: str, tf: Timeframe) -> np.ndarray:
        """The ranges the tier holds in full, ``int64[k, 2]`` half-open, clipped to retention.

        Staleness is not considered (a stale chunk's range is still listed).
        """
        return np.asarray(self.held_many([(symbol, tf)])[0], dtype=np.int64).reshape(-1, 2)

    def held_many(self, series: list[tuple[str, Timeframe]]) -> list[list[int]]:
        """:meth:`held` of several series, read in one transaction (a batch's writes look at
        LMDB once before they commit), each as a flat list ``[s0, e0, s1, e1, ...]``."""
        prefixes = [self._prefix(symbol, tf) for symbol, tf in series]
        flats = self._read(lambda h, txn: [_held_of(h, txn, p) for p in prefixes])
        if flats is None:
            # never "nothing held": where LMDB is the store, that would read as an empty store
            raise StorageUnavailableError("the LMDB disk tier could not be read (see the log)")
        cutoff = self._cutoff(self.clock())
        return [_subtract(flat, -(1 << 62), cutoff) if flat and flat[0] < cutoff else flat for flat in flats]

    # -- writes -----------------------------------------------------------------------------------
    def put_range(
        self,
        symbol: str,
        tf: Timeframe,
        start: int,
        end: int,
        candles: np.ndarray,
        guard: Callable[[], bool] | None = None,
    ) -> int:
        """Store ``candles`` as exactly all candles of the series in ``[start, end)``.

        What the tier held in that range is replaced, and the range is marked held, in one
        transaction. The part older than the retention window is neither stored nor held.

        Parameters
        ----------
        symbol, tf
            Canonical series.
        start, end : int
            Half-open range, epoch ms.
        candles : numpy.ndarray
            CANDLE_DTYPE, sorted by ``ts``, unique, closed candles; rows outside the range are
            ignored.
        guard : callable, optional
            Called inside the write transaction (which excludes every other LMDB writer); when it
            returns False nothing is written. A reader process filling the tier from SQLite uses
            it to check that no write to the series began since it read.

        Returns
        -------
        int
            Number of candles stored (0 when the guard refused).

        Raises
        ------
        StorageUnavailableError
            The map is full at its cap or the disk failed; the tier is then degraded (reads
            keep working, the write changed nothing).
        """
        return self.put_ranges(symbol, tf, [(start, end, candles)], guard)

    def put_ranges(
        self,
        symbol: str,
        tf: Timeframe,
        parts: list[tuple[int, int, np.ndarray]],
        guard: Callable[[], bool] | None = None,
    ) -> int:
        """:meth:`put_range` of each ``(start, end, candles)`` of one series, all in one
        transaction: every range is stored, or (a full map, a refusing ``guard``) none."""
        for _, _, candles in parts:
            if candles.dtype != CANDLE_DTYPE:
                raise TypeError(f"candles must be CANDLE_DTYPE, got {candles.dtype}")
        now = self.clock()
        cutoff = self._cutoff(now)
        todo: list[tuple[int, int, np.ndarray]] = []
        for start, end, candles in parts:
            start, end = max(int(start), cutoff), int(end)
            if end <= start:
                continue
            ts = candles["ts"]
            todo.append(
                (start, end, np.ascontiguousarray(candles[int(ts.searchsorted(start)) : int(ts.searchsorted(end))]))
            )
        if not todo:
            return 0
        prefix = self._prefix(symbol, tf)
        period = self._period(tf)

        def apply(h: _Env, txn: Any) -> None:
            if guard is not None and not guard():
                raise _Refused
            for start, end, rows in todo:
                _store_range(h, txn, prefix, period, start, end, rows, now, cutoff)

        try:
            self._write(apply, needed=sum(rows.nbytes + 4096 for _, _, rows in todo))
        except _Refused:
            return 0
        return sum(len(rows) for _, _, rows in todo)

    def delete(self, symbol: str, tf: Timeframe, start: int | None = None, end: int | None = None) -> int:
        """Remove the series' candles in ``[start, end)`` (None: unbounded) and stop holding it.

        Returns the number of candles removed.
        """
        lo = -(1 << 62) if start is None else int(start)
        hi = (1 << 62) if end is None else int(end)
        if hi <= lo:
            return 0
        prefix = self._prefix(symbol, tf)
        period = self._period(tf)
        return int(self._write(lambda h, txn: _delete_range(h, txn, prefix, period, lo, hi, self.clock())))

    def purge_expired(self) -> int:
        """Remove chunks past their TTL or older than the retention window.

        Their ranges stop being held; held ranges older than the window are dropped too.
        Returns the number of chunks removed (the Store reports it as ``disk_entries_purged``).
        """
        now = self.clock()
        cutoff = self._cutoff(now)
        stale_before = now - self.ttl_ms
        return int(self._write(lambda h, txn: _purge_walk(h, txn, cutoff, stale_before)))

    def clear(self) -> None:
        """Remove every chunk and held range (the environment stays)."""
        self._write(_clear_all)

    # -- inspection -------------------------------------------------------------------------------
    def series(self) -> list[tuple[str, str]]:
        """Every ``(symbol, timeframe name)`` the tier holds a range of, sorted.

        Raises
        ------
        StorageUnavailableError
            The environment cannot be read.
        """
        try:
            with self._handle().reading() as (h, txn):
                return _series_walk(h, txn)
        except (lmdb.Error, _Corrupt) as exc:
            raise StorageUnavailableError(f"LMDB tier {self.path}: cannot list its series: {exc}") from exc

    def check(self) -> list[str]:
        """Walk every chunk and held set; a list of problems (empty when consistent).

        Checks headers and sizes, that rows are sorted and unique, lie in their chunk's period
        and inside a held range. Read-only: it repairs nothing (``clear`` or ``delete`` do).
        """
        cutoff = self._cutoff(self.clock())
        try:
            with self._handle().reading() as (h, txn):
                return _check_walk(h, txn, cutoff)
        except lmdb.Error as exc:
            return [f"LMDB environment unreadable: {exc}"]
        except _Corrupt as exc:
            return [f"LMDB environment damaged: {exc}"]

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable figures: entries, bytes, map size, degraded flag and counters."""
        h = self._handle()
        out: dict[str, Any] = {"path": self.path, "degraded": self.degraded, "degraded_reason": self.degraded_reason}
        out.update(self._counts)
        out.update(h.figures())
        return out

    def close(self) -> None:
        """Release the environment (files stay); further calls raise StorageUnavailableError."""
        env, self._env = self._env, None
        if env is not None:
            env.release()

    def __enter__(self) -> LmdbTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_periods(
    loader: Loader, symbol: str, tf: Timeframe, held: list[int], periods: list[int], period: int, cutoff: int
) -> dict[int, np.ndarray]:
    """The durable rows of each chunk period in ``periods``, within ``held`` and the window."""
    fresh: dict[int, np.ndarray] = {}
    for p in periods:
        pieces = [_load(loader, symbol, tf, a, b) for a, b in _intersect(held, max(p, cutoff), p + period)]
        fresh[p] = np.concatenate(pieces) if pieces else np.empty(0, CANDLE_DTYPE)
    return fresh


def _load(loader: Loader, symbol: str, tf: Timeframe, a: int, b: int) -> np.ndarray:
    rows = np.asarray(loader(symbol, tf, a, b))
    if rows.dtype != CANDLE_DTYPE:
        raise TypeError(f"loader returned {rows.dtype}, expected CANDLE_DTYPE")
    ts = rows["ts"]
    return np.ascontiguousarray(rows[int(ts.searchsorted(a)) : int(ts.searchsorted(b))])
