"""The read plan: which tier proves an answer, what to fetch, and the fill on the way back.

A latest-N read is fresh when the series' coverage reaches the last closed interval; then the
first tier that holds the whole covered tail answers (memory, LMDB, the durable tier), and a
slower tier's answer fills the faster ones. What coverage lacks is fetched from Layer 1 (only the
uncovered part), written through the write plan and read again. When storage cannot answer, the
read passes through to Layer 1 whole, or raises a typed error: never a shorter answer
(DESIGN.md section 6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mds import _kernels as K
from mds._dtypes import EMPTY_CANDLES, read_only
from mds.errors import InvalidRequestError, StorageUnavailableError
from mds.models import Config
from mds.store.changes import ChangeSlots
from mds.store.coverage import HISTORY_START, Coverage, covered_tail, fast_rows
from mds.store.fetch import Fetcher
from mds.store.health import Moved, StorageDown, Tiers, unanswered
from mds.store.metrics import SOURCE_RANK, TIER_SOURCE, Metrics, slowest
from mds.store.peeks import CachePeeks
from mds.store.writes import Writer
from mds.timeframes import Timeframe
from mds.timeutil import to_ms

logger = logging.getLogger(__name__)

Answer = tuple[np.ndarray, str]  # rows and the source that answered (metadata.source)


class NeedsLayer1(Exception):
    """Raised inside the read path when an answer needs a Layer 1 call and calls are not allowed."""


@dataclass(eq=False)
class Reader:
    """Reads of one store (call under the store lock)."""

    tiers: Tiers
    slots: ChangeSlots
    coverage: Coverage
    writer: Writer
    fetcher: Fetcher | None
    metrics: Metrics
    config: Config
    clock: Callable[[], int]
    #: Layer 1's cache, asked first under ``lookup="layer1_first"`` (None without a Layer 1).
    peeks: CachePeeks | None = None
    #: The interval of the last fast read, ``(timeframe, start, end)``: its floor, reused within it.
    _interval: tuple[Timeframe | None, int, int] = field(default=(None, 0, 0), init=False)
    #: Called (under the store lock) with ``(symbol, timeframe, rows, covered)`` after candles
    #: fetched from Layer 1 were stored: a live feed compares them with the candles it streamed.
    on_fetched: list[Callable[[str, Timeframe, np.ndarray, np.ndarray], None]] = field(default_factory=list, init=False)
    #: Live feeds that keep a series' forming candle in memory now: ``(symbol, timeframe, the
    #: forming interval's open) -> bool``; then ``include_partial`` is answered from memory.
    live_forming: list[Callable[[str, Timeframe, int], bool]] = field(default_factory=list, init=False)

    def fast_latest(self, sym: str, tf: Timeframe, n: int) -> np.ndarray | None:
        """The memory hit of a latest-N read, with the same checks as the general path, in few
        steps: change stamp, coverage reaching the last closed interval, memory window inside it.
        None means "take the general path" (which may still answer from memory)."""
        tiers = self.tiers
        state = tiers.states.get("memory")
        if state is None or state.degraded_at is not None or not tiers.feed_live:
            return None
        key = (sym, tf.name)
        slots = self.slots
        changes = slots.words
        if changes is not None:
            slot = slots.slot_of.get(key)
            if slot is None or slots.seen.get(key) != changes[slot]:
                return None
        now = self.clock()
        interval = self._interval
        if interval[0] is tf and interval[1] <= now < interval[2]:
            end = interval[1]
        else:
            end = tf.floor(now)
            self._interval = (tf, end, tf.add(end, 1))
        mem = state.obj
        if self.fetcher is None:
            # Stored data may end before now: the frontier (cached; dropped with the change stamp)
            # is where a complete answer ends.
            if changes is not None:
                front = self.coverage.frontiers.get(key)
            elif len(tiers.states) == 1:
                # memory is the whole store: the newest it holds are the newest stored
                return mem.latest_at(key, n, end, now, bound=True)
            else:  # no durable tier, so no stamp to cache by: ask the fast tiers
                front = self.coverage.frontier(sym, tf)
            if front is not None and front < end:
                end = front
            return mem.latest_at(key, n, end, now)
        if self.config.lookup == "layer1_first":
            return None
        last = self.coverage.last.get(key)
        if last is None or not last[0] < end <= last[1]:
            return None
        held = mem.held(sym, tf)
        if held is None or held[0] < last[0]:
            return None
        return mem.latest_at(key, n, end, now)

    def read(
        self, sym: str, tf: Timeframe, count: Any, start: Any, end: Any, include_partial: bool, *, allow_layer1: bool
    ) -> Answer:
        """The general read of ``Store.candles`` (arguments as there, not yet checked)."""
        if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0):
            raise InvalidRequestError(f"count must be a positive int, not {count!r}")
        s, e = time_range(start, end)
        if count is None and s is None:
            raise InvalidRequestError("give count (latest N) or start (a range)")
        reading = self.tiers.reading
        reading.bypass = self.coverage.sync(sym, tf)
        try:
            return self._synced(sym, tf, count, s, e, include_partial, allow_layer1)
        except StorageDown as first:
            down = first
            if not self.tiers.feed_live and self.tiers.durable_down():
                # the shared durable tier just stopped answering: the fast tiers, unused while it
                # answered and the feed was down, answer what they prove (DESIGN.md 7), before
                # Layer 1 is asked for it (a request against the exchange's per-IP budget)
                try:
                    return self._synced(sym, tf, count, s, e, include_partial, allow_layer1)
                except StorageDown as again:
                    down = again
            if self.fetcher is None:
                raise unanswered(sym, tf, down) from None
            if not allow_layer1:
                raise NeedsLayer1() from None
            if down.damaged is not None and self.writer.quarantine(down.damaged):
                try:  # the damaged span is missing now: the read refetches and stores it
                    return self._synced(sym, tf, count, s, e, include_partial, True)
                except StorageDown as again:
                    down = again
            logger.warning("%s %s: storage cannot answer (%s); passing the read through to Layer 1", sym, tf.name, down)
            return self._synced(sym, tf, count, s, e, include_partial, True, passthrough=True)
        finally:
            reading.bypass = False

    def _synced(self, sym: str, tf: Timeframe, *args: Any, **kwargs: Any) -> Answer:
        """:meth:`_read_synced`, started over keeping the store's lock for its server reads when
        a write to the series came while the lock was free (:class:`Moved`: for a server read,
        or for a Layer 1 fetch that found covered candles deleted meanwhile). An attempt given up
        after it called Layer 1 still makes the answer's source ``layer1_api``."""
        reading = self.tiers.reading
        fetched = reading.fetched = False
        stay = reading.stay
        try:
            for _ in range(_RESTARTS):
                try:
                    arr, source = self._read_synced(sym, tf, *args, **kwargs)
                except Moved:
                    fetched = fetched or reading.fetched
                    reading.fetched = False
                    reading.stay = True
                    reading.bypass = self.coverage.sync(sym, tf)
                    continue
                if fetched or reading.fetched:
                    source = slowest(source, "layer1_api")
                return arr, source
        finally:
            reading.stay = stay
        raise StorageUnavailableError(
            f"{sym} {tf.name}: the series was rewritten {_RESTARTS} times while it was read; nothing was answered"
        )

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
    ) -> Answer:
        """The read of :meth:`read`; with ``passthrough`` every part comes from Layer 1 alone
        (storage could not answer) and nothing is stored."""
        now = int(self.clock())
        last_end = tf.floor(now)  # end of the last closed interval
        rng = self._range_from_layer1 if passthrough else self._range
        if count is not None and s is None:
            end = last_end if e is None else min(tf.ceil(e), last_end)
            if passthrough:
                assert self.fetcher is not None
                arr = read_only(self.fetcher.checked(sym, tf, count=int(count), end=end)[0][-int(count) :])
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
                if SOURCE_RANK[psource] > SOURCE_RANK[source]:
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
        rng: Callable[[str, Timeframe, int, int, bool], Answer],
    ) -> Answer:
        """The first ``n`` candles from ``lo``: a window of ``n`` intervals, doubled while no-trade
        intervals leave it short, so that N candles from an old start never fetch all history."""
        width = n
        source = "storage_memory"
        while True:
            hi = min(last_end, tf.add(lo, width))
            arr, src = rng(sym, tf, lo, max(hi, lo), allow_layer1)
            source = slowest(source, src)
            if len(arr) >= n or hi >= last_end:
                return arr[:n], source
            width *= 2

    # ------------------------------------------------------------------ latest N
    def _latest(self, sym: str, tf: Timeframe, n: int, end: int, allow_layer1: bool) -> Answer:
        fetcher = self.fetcher
        if fetcher is None:
            return self._latest_stored(sym, tf, n, end)
        if self.peeks is not None and self.config.lookup == "layer1_first" and allow_layer1:
            hit = self.peeks.latest(sym, tf, n, end)
            if hit is not None:
                return hit, "layer1_cache"
        source = "storage_memory"
        try:
            for _ in range(4):
                cov = self.coverage.of(sym, tf)
                tail = covered_tail(cov, end)
                mem = self.tiers.tier("memory")
                if mem is not None and tail is not None:
                    got = mem.latest(sym, tf, n, end)
                    if got is not None and _proves(got, n, tail):
                        return got, source
                    self.metrics.misses["memory"] += 1
                if tail is None:
                    if not allow_layer1:
                        raise NeedsLayer1()
                    self._fetch_tail(sym, tf, n, end, cov)
                    source = "layer1_api"
                    continue
                rows, tsrc = self._latest_from_shared(sym, tf, n, end)
                if _proves(rows, n, tail):
                    return rows, slowest(source, tsrc)
                # the covered run that ends at `end` holds fewer than n candles: fetch before it
                if not allow_layer1:
                    raise NeedsLayer1()
                self._fetch_and_store(sym, tf, None, max(1, n - _count_from(rows, tail)), tail)
                source = "layer1_api"
            rows, tsrc = self._latest_from_shared(sym, tf, n, end)
            return rows, slowest(source, tsrc)
        except StorageDown as down:
            if not allow_layer1:
                raise NeedsLayer1() from None
            rows = down.rows if len(down.rows) >= n else fetcher.checked(sym, tf, count=n, end=end)[0]
            return read_only(rows[-n:]), "layer1_api"

    def _latest_stored(self, sym: str, tf: Timeframe, n: int, end: int) -> Answer:
        """Latest N without a Layer 1: what is stored, as fresh as the shared tiers are."""
        mem = self.tiers.tier("memory")
        if mem is not None:
            got = mem.latest(sym, tf, n, end)
            if got is not None:
                return got, "storage_memory"
            frontier = self.coverage.frontier(sym, tf)
            if frontier is not None and frontier < end:
                got = mem.latest(sym, tf, n, frontier)
                if got is not None:
                    return got, "storage_memory"
            self.metrics.misses["memory"] += 1
        return self._latest_from_shared(sym, tf, n, end)

    def _latest_from_shared(self, sym: str, tf: Timeframe, n: int, end: int) -> Answer:
        tiers = self.tiers
        disk = tiers.tier("disk")
        if disk is not None:
            got = tiers.guard("disk", disk.get_latest, sym, tf, n, end)
            if got is not None and len(got) == n:
                self._to_memory(sym, tf, got, end)
                return read_only(got), "storage_disk"
            self.metrics.misses["disk"] += 1
        db = tiers.db()
        if db is not None:
            guard = self.writer.fill_guard(sym, tf)  # taken before the read it protects
            got = tiers.read_db("read_latest", sym, tf, n, end, guard=guard)
            if guard is None or guard():  # no write began since (other threads ran meanwhile)
                self._to_memory(sym, tf, got, end)
            if len(got):
                self.writer.put_disk(sym, tf, int(got["ts"][0]), end, got, guard)
            return read_only(got), "sqlite_db"
        # no durable tier: what the fast tiers keep is all the store holds (with a Layer 1, the
        # caller's memory look did not prove the answer: Layer 1 gives it)
        if self.fetcher is not None:
            raise StorageDown()
        rows, from_disk = self._latest_from_fast(sym, tf, n, end)
        return read_only(rows), "storage_disk" if from_disk else "storage_memory"

    def _latest_from_fast(self, sym: str, tf: Timeframe, n: int, end: int) -> tuple[np.ndarray, bool]:
        """Without a durable tier the fast tiers are the store: the newest ``n`` candles before
        ``end`` from every range memory or LMDB holds (memory's window can reach further back than
        LMDB's disk_days), newest range first, and whether LMDB answered a part. StorageDown when
        a fast tier cannot answer."""
        parts: list[np.ndarray] = []
        have = 0
        from_disk = False
        for s, e in self.coverage.fast_held(sym, tf)[::-1].tolist():
            e = min(e, end)
            if e <= s:
                continue
            rows, disk = fast_rows(self.tiers, sym, tf, s, e)
            from_disk = from_disk or disk
            if len(rows):
                parts.insert(0, rows)
                have += len(rows)
            if have >= n:
                break
        if not parts:
            return EMPTY_CANDLES, from_disk
        return (np.concatenate(parts) if len(parts) > 1 else parts[0])[-n:], from_disk

    def _to_memory(self, sym: str, tf: Timeframe, rows: np.ndarray, end: int) -> None:
        """Fill the memory tier with the latest rows read from a shared tier: they are exactly the
        stored candles in ``[rows[0].ts, end)`` (capped at the stored frontier without Layer 1,
        so a late write by another process cannot hide behind the window)."""
        mem = self.tiers.tier("memory")
        if mem is None or not len(rows):
            return
        if self.fetcher is None:
            front = self.coverage.frontier(sym, tf)
            end = min(end, front) if front is not None else end
        rows = rows[-self.config.memory_candles :]
        if end > int(rows["ts"][-1]):
            mem.put_range(sym, tf, int(rows["ts"][0]), end, np.ascontiguousarray(rows))

    # ------------------------------------------------------------------ ranges
    def _range(self, sym: str, tf: Timeframe, s: int, e: int, allow_layer1: bool) -> Answer:
        if e <= s:
            return EMPTY_CANDLES, "storage_memory"
        tiers = self.tiers
        source = "storage_memory"
        if self.peeks is not None and self.config.lookup == "layer1_first" and allow_layer1:
            hit = self.peeks.range(sym, tf, s, e)
            if hit is not None:
                return hit, "layer1_cache"
        if self.fetcher is not None:
            want = np.array([[s, e]], dtype=np.int64)
            missing = K.interval_subtract(want, self.coverage.of(sym, tf))
            if len(missing):
                if not allow_layer1:
                    raise NeedsLayer1()
                had = K.interval_subtract(want, missing)  # covered before the fetch
                fetched = self._fetch_ranges(sym, tf, missing)
                source = "layer1_api"
                if fetched is not None:  # storage could not keep it: answer from Layer 1 alone
                    whole = len(missing) == 1 and int(missing[0, 0]) == s and int(missing[0, 1]) == e
                    rows = fetched if whole else self.fetcher.range(sym, tf, s, e)
                    return read_only(rows[(rows["ts"] >= s) & (rows["ts"] < e)]), source
                if len(had):
                    # the lock was free while Layer 1 answered: a delete may have uncovered what
                    # was covered (its rows gone), which this read counted on and did not fetch
                    tiers.reading.bypass = self.coverage.sync(sym, tf)
                    if len(K.interval_subtract(had, self.coverage.of(sym, tf))):
                        raise Moved("coverage")
        for name in ("memory", "disk"):
            t = tiers.tier(name)
            if t is None:
                continue
            got = tiers.guard(name, t.range if name == "memory" else t.get_range, sym, tf, s, e)
            if got is not None:
                return read_only(got), slowest(source, TIER_SOURCE[name])
            self.metrics.misses[name] += 1
        db = tiers.db()
        if db is not None:
            guard = self.writer.fill_guard(sym, tf)  # taken before the read it protects
            got = tiers.read_db("read_range", sym, tf, s, e, guard=guard)
            self.writer.put_disk(sym, tf, s, e, got, guard)
            return read_only(got), slowest(source, "sqlite_db")
        if self.fetcher is not None and len(
            K.interval_subtract(np.array([[s, e]], dtype=np.int64), self.coverage.of(sym, tf))
        ):
            # the fast tiers (the store) do not hold all of it even after the fetch (older than
            # LMDB keeps, newer than memory's window): Layer 1's answer
            if not allow_layer1:
                raise NeedsLayer1()
            return read_only(self.fetcher.range(sym, tf, s, e)), "layer1_api"
        return self._held_parts(sym, tf, s, e, source)

    def _held_parts(self, sym: str, tf: Timeframe, s: int, e: int, source: str) -> Answer:
        """Without a durable tier, a range that neither fast tier holds whole: every part of it
        one of them holds (:func:`fast_rows`); a part neither holds is not stored."""
        rows, from_disk = fast_rows(self.tiers, sym, tf, s, e)
        return read_only(rows), slowest(source, "storage_disk") if from_disk else source

    def _range_from_layer1(self, sym: str, tf: Timeframe, s: int, e: int, allow_layer1: bool) -> Answer:
        if e <= s:
            return EMPTY_CANDLES, "storage_memory"
        assert self.fetcher is not None
        return read_only(self.fetcher.range(sym, tf, s, e)), "layer1_api"

    def _partial(self, sym: str, tf: Timeframe, now: int, allow_layer1: bool) -> tuple[np.ndarray | None, str]:
        forming = tf.floor(now)
        mem = self.tiers.tier("memory")
        if self.fetcher is not None:
            if mem is not None and any(live(sym, tf, forming) for live in self.live_forming):
                part = mem.partial(sym, tf)  # a connected feed keeps it: newer than REST's
                if part is not None and len(part) and int(part["ts"][0]) == forming:
                    return read_only(part), "storage_memory"
            if not allow_layer1:
                raise NeedsLayer1()
            rows = self.fetcher.candles(sym, tf, count=1)[0]
            rows = rows[rows["ts"] == forming]
            if len(rows):
                if mem is not None:
                    mem.set_partial(sym, tf, rows.copy())
                return read_only(rows), "layer1_api"
            return None, "layer1_api"
        if mem is None:
            return None, "storage_memory"
        part = mem.partial(sym, tf)
        if part is None or not len(part) or int(part["ts"][0]) != forming:
            return None, "storage_memory"
        return read_only(part), "storage_memory"

    # ------------------------------------------------------------------ fetch and store
    def _fetch_and_store(self, sym: str, tf: Timeframe, start: int | None, n: int | None, end: int) -> np.ndarray:
        assert self.fetcher is not None
        self.tiers.reading.fetched = True  # the answer's source, also if the read starts over
        arr, covered = self.fetcher.checked(sym, tf, count=n, start=start, end=end)
        try:
            self.writer.store(sym, tf, arr, covered, int(self.clock()))
        except StorageUnavailableError as exc:
            logger.warning("storing fetched candles failed, answering from Layer 1: %s", exc)
            raise StorageDown(arr) from exc
        for hook in self.on_fetched:
            hook(sym, tf, arr, covered)
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
            except StorageDown as down:
                passthrough.append(down.rows)
        if passthrough:
            return read_only(K.sort_dedup(np.concatenate(passthrough)))
        return None


#: Attempts of one read that other threads' writes to its series may start over (see _synced).
_RESTARTS = 4


def time_range(start: Any, end: Any) -> tuple[int | None, int | None]:
    """``(start, end)`` as epoch ms (None stays None); InvalidRequestError unless end > start."""
    s = None if start is None else to_ms(start, name="start")
    e = None if end is None else to_ms(end, name="end")
    if s is not None and e is not None and e <= s:
        raise InvalidRequestError("end must be after start")
    return s, e


def _proves(rows: np.ndarray, n: int, tail: int | None) -> bool:
    """Whether the latest rows before ``end`` are complete, given the covered run ``[tail, end)``."""
    if tail is None:
        return False
    if len(rows) >= n:
        return int(rows["ts"][-n]) >= tail
    return tail <= HISTORY_START


def _count_from(rows: np.ndarray, start: int) -> int:
    return int(np.count_nonzero(rows["ts"] >= start)) if len(rows) else 0
