"""What a store knows it holds: coverage per series, its cache, the stored frontier, gap kinds.

Coverage is the set of ranges whose every candle the store holds (an absent slot inside it is a
proven no-trade interval); it lives in the durable tier and is cached here per series, together
with the *frontier* (where stored data of a series ends). The cache of a series is dropped when
its change stamp moves (another process or store wrote it), see :meth:`Coverage.sync`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mds import _kernels as K
from mds._dtypes import EMPTY_CANDLES
from mds.models import Gap
from mds.store.changes import ChangeSlots
from mds.store.health import StorageDown, Tiers
from mds.timeframes import Timeframe

#: Coverage that starts here means "from the start of the market's history" (proven by an empty
#: page asked for before the oldest candle received; a short page proves nothing).
HISTORY_START = 0
EMPTY_RANGES = np.zeros((0, 2), dtype=np.int64)


class Coverage:
    """The coverage cache of one store (call under the store lock)."""

    def __init__(self, tiers: Tiers, slots: ChangeSlots) -> None:
        self.tiers = tiers
        self.slots = slots
        self.ranges: dict[tuple[str, str], np.ndarray] = {}
        #: last covered range per series as Python ints (the fast read path's freshness check)
        self.last: dict[tuple[str, str], tuple[int, int] | None] = {}
        self.frontiers: dict[tuple[str, str], int | None] = {}
        self._data_version: int | None = None

    def of(self, symbol: str, tf: Timeframe) -> np.ndarray:
        """Coverage of a series, cached; the cache is dropped when another process writes it."""
        key = (symbol, tf.name)
        live = self.tiers.copies_usable()  # else another host may change it unheard: not cached
        cov = self.ranges.get(key) if live else None
        if cov is None:
            db = self.tiers.db()
            cov = EMPTY_RANGES if db is None else np.asarray(self.tiers.ask_db(db.coverage, symbol, tf), np.int64)
            cov = cov.reshape(-1, 2)
            if live:
                self.set(key, cov)
        if not self.tiers.durable and len(cov):
            # Without a durable tier, coverage proves only what the fast tiers still hold: a
            # candle they evicted (memory keeps the newest memory_candles, LMDB disk_days) is
            # missing again, never a no_trades slot.
            cov = intersect(cov, self.fast_held(symbol, tf))
        return cov

    def fast_held(self, sym: str, tf: Timeframe) -> np.ndarray:
        """The union of the ranges memory and LMDB hold of a series, as intervals of the
        timeframe (both ends rounded up: the same open times); StorageDown when one cannot
        answer. LMDB's retention cuts its ranges at a time that is rarely on the timeframe's
        grid: the interval it cuts through is not held (its candle opened before the cut)."""
        mem, disk = usable_fast(self.tiers)
        parts = [EMPTY_RANGES]
        held = None if mem is None else mem.held(sym, tf)
        if held is not None:
            parts.append(np.array([held], dtype=np.int64))
        if disk is not None:
            parts.append(disk_held(self.tiers, disk, sym, tf))
        whole = [(tf.ceil(a), tf.ceil(b)) for a, b in np.concatenate(parts).tolist()]
        return K.interval_normalize(np.array([ab for ab in whole if ab[0] < ab[1]], dtype=np.int64).reshape(-1, 2))

    def set(self, key: tuple[str, str], cov: np.ndarray) -> None:
        self.ranges[key] = cov
        self.last[key] = (int(cov[-1, 0]), int(cov[-1, 1])) if len(cov) else None

    def drop(self, key: tuple[str, str] | None = None) -> None:
        """Forget the cached coverage and frontier of a series (None: of every series)."""
        if key is None:
            self.ranges.clear()
            self.last.clear()
            self.frontiers.clear()
        else:
            self.ranges.pop(key, None)
            self.last.pop(key, None)
            self.frontiers.pop(key, None)

    def add(self, symbol: str, tf: Timeframe, ranges: np.ndarray) -> None:
        key = (symbol, tf.name)
        if self.tiers.durable and key not in self.ranges:
            return  # will be read from the durable tier on next use
        self.set(key, K.interval_union(self.ranges.get(key, EMPTY_RANGES), ranges))

    def subtract(self, key: tuple[str, str], lo: int, hi: int) -> None:
        """Without a durable tier: ``[lo, hi)`` is no longer covered (it was deleted)."""
        self.set(key, K.interval_subtract(self.ranges.get(key, EMPTY_RANGES), np.array([[lo, hi]], dtype=np.int64)))

    def sync(self, sym: str, tf: Timeframe) -> bool:
        """Drop what this process caches of a series another process (or store) has changed.

        Returns True while the series is being written elsewhere (odd stamp): a read should then
        bypass memory and ask the durable tier, which shows the write exactly when it commits.
        """
        slots = self.slots
        if slots.array is None:
            if self.tiers.durable:  # no durable tier: no commit counter to ask
                self._refresh_shared()  # no stamps (the mmap failed): the coarser durable-tier check
            return False
        key = (sym, tf.name)
        stamp = slots.changed(key)
        if stamp is None:
            return False
        self.forget(sym, tf)
        return bool(stamp & 1) and key not in slots.dirty

    def forget(self, sym: str, tf: Timeframe) -> None:
        """Drop what this process holds of a series besides the shared tiers: its cached
        coverage and frontier, and its memory window."""
        self.drop((sym, tf.name))
        state = self.tiers.states.get("memory")
        if state is not None:
            state.obj.invalidate(sym, tf)

    def _refresh_shared(self) -> None:
        """Drop all cached coverage if another connection changed the durable tier since the last
        look: the fallback of :meth:`sync` without change stamps (a PRAGMA, about 5 us, clearing
        every series, where a stamp is per series and ~0.2 us)."""
        db = self.tiers.tier("sqlite")
        if db is None:
            return
        version = self.tiers.guard("sqlite", db.data_version)
        if version is None or version == self._data_version:
            return
        self._data_version = version
        self.drop()

    def frontier(self, sym: str, tf: Timeframe) -> int | None:
        """Where stored data of a series ends (coverage end or last candle + 1 interval)."""
        key = (sym, tf.name)
        if key in self.frontiers and self.tiers.copies_usable():
            return self.frontiers[key]
        ends: list[int] = []
        cov = self.of(sym, tf)
        if len(cov):
            ends.append(int(cov[-1, 1]))
        db = self.tiers.db()
        if db is not None:
            last = self.tiers.ask_db(db.last_ts, sym, tf)
            if last is not None:
                ends.append(tf.add(int(last), 1))
        else:
            store = not self.tiers.durable  # the fast tiers are the store: each must answer
            mem, disk = usable_fast(self.tiers) if store else (self.tiers.tier("memory"), self.tiers.tier("disk"))
            helds: list[Any] = []
            if disk is not None:
                helds.append(
                    disk_held(self.tiers, disk, sym, tf) if store else self.tiers.guard("disk", disk.held, sym, tf)
                )
            if mem is not None:
                helds.append(self.tiers.guard("memory", mem.held, sym, tf))
            for held in helds:
                if held is not None and len(held):
                    ends.append(int(np.asarray(held, dtype=np.int64).reshape(-1, 2)[-1, 1]))
        front = max(ends) if ends else None
        if self.tiers.durable and self.tiers.copies_usable():
            self.frontiers[key] = front
        return front

    def stored_ts(self, sym: str, tf: Timeframe, s: int | None, e: int | None) -> np.ndarray:
        """Open times of every stored candle of a series in ``[s, e)`` (None: unbounded)."""
        lo = -(2**62) if s is None else s
        hi = 2**62 if e is None else e
        tiers = self.tiers
        db = tiers.db()
        if db is not None:
            return tiers.ask_db(db.read_range, sym, tf, lo, hi)["ts"]
        return fast_rows(tiers, sym, tf, lo, hi)[0]["ts"]  # a strided view: find_gaps reads it as it is


def covered_tail(cov: np.ndarray, end: int) -> int | None:
    """Start of the covered run that reaches ``end`` (None if ``end`` is not covered up to)."""
    for i in range(len(cov) - 1, -1, -1):
        s, e = int(cov[i, 0]), int(cov[i, 1])
        if s < end <= e:
            return s
        if e < end:
            return None
    return None


def gap_kinds(data: np.ndarray, cov: np.ndarray, tf: Timeframe, s: int | None, e: int | None) -> list[Gap]:
    """Runs of absent candles among the stored open times ``data`` with their kind.

    ``no_trades``: inside coverage ``cov`` (the source was asked and had nothing); ``missing``:
    outside it. Without a range, the span of the coverage and data (coverage reaching back to
    the start of history counts from the first candle).
    """
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
    return K.label_gaps(K.find_gaps(data, *tf.kernel_args, s, e), cov, Gap)


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a intersect b == a minus (a minus b)."""
    return K.interval_subtract(a, K.interval_subtract(a, b))


def usable_fast(tiers: Tiers) -> tuple[Any, Any]:
    """Without a durable tier, where the fast tiers are the store: ``(memory, LMDB)`` as
    configured (None: not configured). A configured one that cannot answer now (degraded) leaves
    what is stored unknown: StorageDown, never a store that looks emptier."""
    state = tiers.states.get("memory")
    if state is not None and state.degraded_at is not None:
        raise StorageDown(reason=f"the memory tier cannot answer ({state.error})")
    disk = tiers.tier("disk")
    if disk is None and "disk" in tiers.states:
        raise StorageDown(reason=f"the disk tier cannot answer ({tiers.states['disk'].error or 'degraded'})")
    return tiers.tier("memory"), disk


def disk_held(tiers: Tiers, disk: Any, sym: str, tf: Timeframe) -> np.ndarray:
    """LMDB's held ranges of a series, ``int64[k, 2]``, where LMDB is the store: StorageDown when
    it cannot answer (never "holds nothing")."""
    ranges = tiers.guard("disk", disk.held, sym, tf)
    if ranges is None:
        raise StorageDown(reason="the disk tier cannot answer")
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)


def fast_rows(tiers: Tiers, sym: str, tf: Timeframe, lo: int, hi: int) -> tuple[np.ndarray, bool]:
    """Without a durable tier, where the fast tiers are the store: every candle of ``[lo, hi)``
    one of them holds (memory's window first, LMDB for the rest; what neither holds is not
    stored), and whether LMDB answered a part. A configured fast tier that cannot answer now
    (degraded) leaves what is stored unknown: StorageDown, never fewer rows."""
    mem, disk = usable_fast(tiers)
    parts: list[np.ndarray] = []
    mine = EMPTY_RANGES
    held = None if mem is None else mem.held(sym, tf)
    if held is not None:
        a, b = max(lo, held[0]), min(hi, held[1])
        rows = mem.range(sym, tf, a, b) if a < b else None
        if rows is not None:
            parts.append(rows)
            mine = np.array([[a, b]], dtype=np.int64)
    from_disk = False
    if disk is not None:
        want = np.array([[lo, hi]], dtype=np.int64)
        rest = K.interval_subtract(intersect(want, disk_held(tiers, disk, sym, tf)), mine)
        for a, b in rest.tolist():
            rows = tiers.guard("disk", disk.get_range, sym, tf, a, b)
            if rows is None:
                raise StorageDown(reason="the disk tier cannot answer")
            parts.append(rows)
            from_disk = True
    parts = [p for p in parts if len(p)]
    if not parts:
        return EMPTY_CANDLES, from_disk
    if len(parts) == 1:
        return parts[0], from_disk
    parts.sort(key=lambda p: int(p["ts"][0]))  # disjoint parts, each ascending
    return np.concatenate(parts), from_disk
