"""The write plan: validation, commit order, batches, deletes, and keeping the fast tiers exact.

Order of a write: validate the whole batch (nothing stored if any row is bad); stamp the series
*in progress*; make LMDB stop claiming the spans about to change; commit to the durable tier;
stamp *final*; then make LMDB and memory hold exactly what the durable tier holds in the written
spans (read back from it, under a guard that refuses the fill if another write began since). A
crash at any point leaves the fast tiers missing rows, never holding rows older than the durable
tier's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import numpy as np

from mds import _kernels as K
from mds._dtypes import CANDLE_DTYPE, EMPTY_CANDLES
from mds.convert import candles_from_upbit
from mds.errors import InvalidCandleError, InvalidRequestError, StorageUnavailableError
from mds.models import Config, WriteResult
from mds.store.changes import ChangeSlots
from mds.store.coverage import EMPTY_RANGES, Coverage, fast_rows, intersect, usable_fast
from mds.store.health import BACKEND_ERRORS, StorageDown, Tiers, storage_errors
from mds.tiers.durable import DamagedChunkError, SharedHistory
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import to_ms

logger = logging.getLogger(__name__)


#: Appends of fewer closed candles than this are left out of LMDB (see Writer._unhold_disk).
LMDB_APPEND_MIN = 64
#: Tries of a write without a durable tier whose LMDB fill other processes' writes keep refusing.
_SHARED_TRIES = 5


class _Fill(NamedTuple):
    """A fill of the fast tiers waiting for its batch to commit (_fill_fast_tiers' arguments)."""

    sym: str
    tf: Timeframe
    spans: np.ndarray
    exact: np.ndarray | None
    rows: int  # closed candles written
    start: int  # where the spans start


class Writer:
    """Writes of one store; each takes the store lock (reentrant) around what it changes."""

    def __init__(self, tiers: Tiers, slots: ChangeSlots, coverage: Coverage, config: Config, lock: Any) -> None:
        self.tiers = tiers
        self.lock = lock
        self.slots = slots
        self.coverage = coverage
        self.config = config
        self.depth = 0  # open batch() blocks
        #: fills of the fast tiers waiting for the batch to commit: _fill_fast_tiers' arguments
        self._deferred: list[_Fill] = []
        self._unheld: list[tuple[str, Timeframe, np.ndarray]] = []

    def in_batch(self) -> bool:
        return self.depth > 0

    # ------------------------------------------------------------------ input
    @staticmethod
    def candles_in(candles: Any) -> np.ndarray:
        """A CANDLE_DTYPE array from what a caller passed (array or Upbit dicts); a CANDLE_DTYPE
        array itself, not a copy (:meth:`prepared` makes the copy the store keeps)."""
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
            return candles
        if isinstance(candles, (str, bytes, Mapping)):
            raise InvalidCandleError("candles must be a CANDLE_DTYPE array or an iterable of Upbit candle dicts")
        try:
            rows = list(candles)
        except TypeError:
            raise InvalidCandleError("candles must be a CANDLE_DTYPE array or an iterable of candle dicts") from None
        return candles_from_upbit(rows)

    @staticmethod
    def prepared(arr: np.ndarray, tf: Timeframe, now: int) -> np.ndarray:
        """The batch checked, as the store's own copy sorted by ``ts`` without duplicates (the
        last wins); InvalidCandleError naming the bad rows, if any."""
        rows, idx, reason = K.prepare(arr, *tf.kernel_args, now)
        if rows is not None:
            return rows
        names = [K.REASONS.get(int(r), str(int(r))) for r in reason[:20]]
        shown = ", ".join(f"row {int(i)}: {n}" for i, n in zip(idx[:5], names[:5]))
        raise InvalidCandleError(
            f"{len(idx)} invalid candle(s), nothing stored ({shown})",
            rows=[int(i) for i in idx],
            reasons=[K.REASONS.get(int(r), str(int(r))) for r in reason],
        )

    @staticmethod
    def complete_range(complete: Any, tf: Timeframe, now: int) -> np.ndarray:
        """The covered ranges a ``complete=(start, end)`` argument proves (closed intervals only)."""
        if complete is None:
            return EMPTY_RANGES
        try:
            c_start, c_end = complete
        except (TypeError, ValueError):
            raise InvalidRequestError("complete must be a (start, end) pair") from None
        cs, ce = to_ms(c_start, name="complete start"), to_ms(c_end, name="complete end")
        if ce <= cs:
            raise InvalidRequestError("complete: end must be after start")
        last_closed_end = tf.floor(now)
        cs, ce = tf.ceil(cs), min(tf.ceil(ce), last_closed_end)
        return np.array([[cs, ce]], dtype=np.int64) if ce > cs else EMPTY_RANGES

    def check_writable(self) -> None:
        if not self.tiers.writable:
            raise StorageUnavailableError(
                f"the store directory {self.tiers.path} is read-only here; nothing was stored"
            )

    # ------------------------------------------------------------------ the write
    def store(
        self, sym: str, tf: Timeframe, arr: np.ndarray, covered: np.ndarray, now: int, *, prepared: bool = False
    ) -> WriteResult:
        """Write a validated, sorted, unique batch: the durable tier first, then LMDB and memory.
        ``prepared``: ``arr`` is what :meth:`prepared` returned (so the durable tier need not
        check every row again)."""
        self.check_writable()  # also for Layer 1 fills: a read-only store answers them unstored
        tiers = self.tiers
        forming = tf.floor(now)
        partial, closed = EMPTY_CANDLES, arr
        first = last = 0  # of the closed rows
        bounds = K.ts_bounds(arr)
        if bounds is not None:
            first, last = bounds
            if last >= forming:  # arr is sorted: the forming candle is last
                ts = arr["ts"]
                cut = int(ts.searchsorted(forming))
                partial, closed = arr[cut:], arr[:cut]
                last = int(ts[cut - 1]) if cut else 0
        with self.lock:
            self.coverage.sync(sym, tf)
            if not tiers.durable:
                counts = self._store_fast_only(sym, tf, closed, partial, covered, first, last)
                return _write_result(int(counts[0]), int(counts[1]), int(counts[2]))
            db = tiers.tier("sqlite")
            if db is None:
                raise StorageUnavailableError(
                    f"{tiers.durable_name} tier is degraded ({tiers.states['sqlite'].error}); nothing was stored"
                )
            spans = _spans(tf, closed, covered, first, last)
            to_disk = True
            self.slots.begin(sym, tf)
            if tiers.tier("disk") is None:
                tiers.mark_disk_stale()  # LMDB (now or later) cannot follow this write
            elif not self.depth:  # a batch looks at LMDB once, before it commits
                to_disk = not self._unhold_disk(sym, tf, spans, small=len(closed) < LMDB_APPEND_MIN)
            self.coverage.frontiers.pop((sym, tf.name), None)
            try:
                counts = db.write(sym, tf, closed, covered if len(covered) else None, validated=prepared)
            except BACKEND_ERRORS as exc:
                tiers.failed("sqlite", exc)  # busy is not broken: reads go on
                if tiers.history is not None:
                    # a server may have committed before its answer was lost: this host's
                    # copies of the spans must not outlive the write if it did
                    for s, e in spans.tolist():
                        self.invalidate_fast(sym, tf, s, e)
                self.end_changes()
                raise StorageUnavailableError(f"durable write failed, nothing stored: {exc}") from exc
            if not tiers.feed_live:
                tiers.copies_trusted = False  # the server answers: other hosts may write unheard
            contested = self.end_changes()
            if len(covered):
                self.coverage.add(sym, tf, covered)
            mem = tiers.tier("memory") if len(partial) else None
            if len(spans):
                # A small batch (the live edge) that fills its span densely is all the durable
                # tier holds there: the fast tiers take it as it is, without reading it back. A
                # large one is read back: a batch() of many (an import) must not keep them all.
                n = len(closed)
                dense = n == 1 or (n > 1 and not tf.is_month and last - first == (n - 1) * tf.interval_ms)
                exact = closed if n < LMDB_APPEND_MIN and dense and not len(covered) and self._exact_fill_ok() else None
                if contested and (sym, tf.name) in contested:
                    exact = None  # another writer wrote the series meanwhile: read back
                if self.depth:
                    start = first if not len(covered) else int(spans[0, 0])
                    self._deferred.append(_Fill(sym, tf, spans, exact, n, start))  # filled after the commit
                else:
                    self._fill_fast_tiers(sym, tf, spans, exact, to_disk)
            if len(partial) and mem is not None:
                mem.set_partial(sym, tf, partial[-1:].copy())
            if not self.depth:  # a batch maintains once, after its commit
                self.maybe_maintain()
        return _write_result(int(counts[0]), int(counts[1]), int(counts[2]))

    def _store_fast_only(
        self,
        sym: str,
        tf: Timeframe,
        closed: np.ndarray,
        partial: np.ndarray,
        covered: np.ndarray,
        first: int,
        last: int,
    ) -> tuple[int, int, int]:
        """:meth:`store` without a durable tier (under the lock): the fast tiers are the store.
        Their coverage is added once the rows are stored (a refused write proves nothing)."""
        try:
            mem, disk = usable_fast(self.tiers)
        except StorageDown as down:
            raise StorageUnavailableError(f"{sym} {tf.name}: {down.reason}; nothing was stored") from None
        if disk is None:
            assert mem is not None  # a store has at least one tier
            counts = _write_memory(mem, sym, tf, closed, covered, first, last)  # memory is the whole store
        else:
            counts = self._store_shared(sym, tf, closed, covered)
        if len(covered):
            self.coverage.add(sym, tf, covered)
        if len(partial) and mem is not None:
            mem.set_partial(sym, tf, partial[-1:].copy())
        return counts

    def _store_shared(self, sym: str, tf: Timeframe, closed: np.ndarray, covered: np.ndarray) -> tuple[int, int, int]:
        """Without a durable tier, LMDB is the store every process on the path shares. The write
        stamps the series as a durable write does, so that what other processes keep of it in
        memory is dropped at their next read, and fills LMDB only while no other process began
        a write of the series since this stamp (checked inside LMDB's write transaction): a fill
        refused so is merged again with what the other left, up to :data:`_SHARED_TRIES` times.

        Raises StorageUnavailableError when other processes kept writing the series, or LMDB
        could not take the write: nothing of it is stored then."""
        spans = _spans(tf, closed, covered)
        slots = self.slots
        try:
            for _ in range(_SHARED_TRIES):
                slots.begin(sym, tf)
                if (sym, tf.name) in slots.contested:
                    # another writer moved the stamp since this process last looked (after the
                    # store's sync, too): what memory holds of the series may predate its write
                    self.coverage.forget(sym, tf)
                if not len(spans):
                    return (0, 0, 0)
                counts = self._fill_shared(sym, tf, spans, closed)
                if counts is not None:
                    return counts
                # another process wrote the series between this stamp and the fill: merge again
                logger.info("%s %s: another process wrote the series meanwhile; merging again", sym, tf.name)
                self.coverage.forget(sym, tf)
        finally:
            self.end_changes()
        raise StorageUnavailableError(
            f"{sym} {tf.name}: other processes on this store directory kept writing the series "
            f"({_SHARED_TRIES} tries); the write was not completed, retry it"
        )

    def end_changes(self) -> set[tuple[str, str]]:
        """Final stamps for the series written, unless a batch still holds them open; the
        series found contested (see :meth:`_stamp_final`)."""
        return set() if self.depth else self._stamp_final()

    def _stamp_final(self) -> set[tuple[str, str]]:
        """Final stamps after a commit. Returns the series another writer wrote meanwhile
        (contested, see ChangeSlots), which this process has dropped."""
        state = self.tiers.states.get("sqlite")
        seq = None
        # the acknowledged commit_seq vouches for a file this directory owns; a server's counter
        # is shared by every host, so this directory's commits there are recorded apart
        if state is not None and state.obj is not None:
            if self.tiers.history is None:
                seq = state.obj.last_commit_seq
            else:
                self._acknowledged(cast(SharedHistory, state.obj))
        if not self.slots.dirty:
            return set()  # nothing stamped in progress: no commit to acknowledge
        self.slots.end(seq)
        contested = self.slots.take_contested()
        if contested:
            # Another writer moved a series' stamp while this one wrote it: which commit came last
            # is unknown here, so this process drops what it holds of the series, and the fills
            # waiting for it read the durable tier back instead of taking their own rows.
            for sym, name in contested:
                self.coverage.forget(sym, parse_timeframe(name))
            self._deferred = [f._replace(exact=None) if (f.sym, f.tf.name) in contested else f for f in self._deferred]
        return contested

    def _acknowledged(self, server: SharedHistory) -> None:
        """Record a commit the shared history server acknowledged (see SharedAcks); warn when its
        ledger shows that commits acknowledged here before were lost."""
        commit = server.take_commit()
        shared = self.slots.shared
        if commit is not None and shared is not None and self.slots.writable:
            lost = shared.commit(server.identity, *commit)
            if lost:
                logger.warning("%s", lost)

    def _unhold_batch(self) -> list[bool]:
        """:meth:`_unhold_disk` for every write of the batch, before it commits, with what LMDB
        holds of each series read in one transaction. Returns which of the waiting fills LMDB
        takes (``to_disk`` of :meth:`_fill_fast_tiers`), in their order."""
        deferred = self._deferred
        disk = self.tiers.tier("disk")
        if disk is None or not deferred:
            return [True] * len(deferred)
        series = {(f.sym, f.tf.name): (f.sym, f.tf) for f in deferred}
        got = self.tiers.guard("disk", disk.held_many, list(series.values()))
        if got is None:
            return [True] * len(deferred)  # LMDB failed: degraded, and emptied before it is used again
        held = dict(zip(series, got))
        to_disk: list[bool] = []
        for f in deferred:
            key = (f.sym, f.tf.name)
            flat = held[key]
            small = f.rows < LMDB_APPEND_MIN
            if small and flat and f.start >= flat[-1]:
                to_disk.append(False)  # the usual case at the live edge, decided without arrays
            else:
                held_spans = np.asarray(flat, dtype=np.int64).reshape(-1, 2)
                took = not self._unhold_disk(f.sym, f.tf, f.spans, held_spans, small)
                to_disk.append(took)
                if took:
                    # The fills run in order after the commit: LMDB will hold this fill's spans
                    # (an exact fill: with this write's rows) when the later writes of the series
                    # are filled, so they are decided against that, not against what it holds now.
                    # Else a later small append inside these spans skips LMDB and leaves it this
                    # write's superseded rows.
                    held[key] = K.interval_union(held_spans, f.spans).ravel().tolist()
        return to_disk

    def _unhold_disk(
        self, sym: str, tf: Timeframe, spans: np.ndarray, held: np.ndarray | None = None, small: bool = False
    ) -> bool:
        """Before a durable write, make the disk tier stop claiming the spans it is about to change.

        If the process dies between the durable commit and the LMDB update, LMDB then simply does
        not hold those spans (a miss), instead of holding rows older than the durable tier's.
        Inside a batch the ranges it stopped holding are remembered, so a rolled-back batch gives
        back exactly those.

        Returns True when LMDB should not take the write: a ``small`` one (fewer than
        :data:`LMDB_APPEND_MIN` candles) that appends, i.e. LMDB holds the series and the spans
        start at or after the end of what it holds. Such appends, the live edge, are not copied
        to LMDB (it rewrites a whole chunk for every change, many times the durable write of a
        candle or two); memory and the durable tier answer them, and LMDB takes them from the
        first read that the durable tier answers.
        """
        tiers = self.tiers
        disk = tiers.tier("disk")
        if disk is None or not len(spans):
            return False
        if held is None:
            held = tiers.guard("disk", disk.held, sym, tf)
        if held is None or not len(held):
            return False
        held = np.asarray(held, dtype=np.int64).reshape(-1, 2)
        if int(spans[0, 0]) >= int(held[-1, 1]):
            return small
        overlap = intersect(spans, held)
        if self.depth and len(overlap):
            self._unheld.append((sym, tf, overlap))
        for s, e in overlap.tolist():
            if tiers.guard("disk", disk.delete, sym, tf, s, e) is None and tiers.states["disk"].degraded_at is not None:
                self.invalidate_fast(sym, tf, s, e, only="disk")
        return False

    def _unexact(self, key: tuple[str, str]) -> None:
        """Rows are removed from a series inside a batch: its waiting fills read the committed
        rows back instead of taking their batches as they were written."""
        self._deferred = [f._replace(exact=None) if (f.sym, f.tf.name) == key else f for f in self._deferred]

    def _exact_fill_ok(self) -> bool:
        """Whether the fast tiers may take a dense batch as the durable tier's rows: a history
        on a server may change under this host at any time, and without change stamps a guard
        cannot tell whether the series changed since this commit."""
        return self.tiers.history is None and self.slots.array is not None

    # ------------------------------------------------------------------ the fast tiers
    def _fill_fast_tiers(
        self,
        sym: str,
        tf: Timeframe,
        spans: np.ndarray,
        exact: np.ndarray | None = None,
        to_disk: bool = True,
    ) -> None:
        """Make LMDB and memory hold exactly what the durable tier holds in ``spans`` (just written).

        ``exact``: the rows the durable tier holds in the one span, as this store committed them
        (no read back). ``to_disk`` False: an append that LMDB does not take.
        """
        tiers = self.tiers
        mem = tiers.tier("memory")
        if _fill_live_edge(mem, self.config.memory_candles, sym, tf, spans, exact, to_disk):
            return
        db = tiers.tier("sqlite")
        if tiers.tier("disk") is None and mem is None:
            return
        for s, e in spans.tolist():
            guard: Callable[[], bool] | None = None
            rows: np.ndarray | None
            if exact is not None:
                if to_disk:
                    guard = self._committed_guard(sym, tf)
                rows = exact
            else:
                # Another store (thread or process) may commit the same series between this read
                # and the LMDB write: the guard, checked inside LMDB's write transaction, then
                # refuses the fill, so LMDB never keeps the earlier of two commits.
                guard = self.fill_guard(sym, tf)
                rows = None if db is None else tiers.guard("sqlite", db.read_range, sym, tf, s, e)
                if rows is None:
                    self.invalidate_fast(sym, tf, s, e)
                    continue
            if to_disk:
                self.put_disk(sym, tf, s, e, rows, guard)
            if mem is not None:
                self._fill_memory(mem, sym, tf, s, e, rows)

    def _fill_memory(self, mem: Any, sym: str, tf: Timeframe, s: int, e: int, rows: np.ndarray) -> None:
        """Memory holds exactly ``rows`` in ``[s, e)``, or, when they are more than its window, the
        newest of them: what its window held of the rest is older than this write (a window
        proven empty there would go on claiming it so), so the window starts afresh."""
        cap = self.config.memory_candles
        if len(rows) > cap:
            rows = rows[-cap:]
            s = int(rows["ts"][0])
            _drop_window(mem, sym, tf)
        mem.put_range(sym, tf, s, e, np.ascontiguousarray(rows))

    def _fill_shared(
        self, sym: str, tf: Timeframe, spans: np.ndarray, batch: np.ndarray
    ) -> tuple[int, int, int] | None:
        """Without a durable tier (see :meth:`_store_shared`): each span's rows, what the fast tiers
        hold merged with ``batch``, go to LMDB in one transaction (all spans or none), then to
        memory. Returns the merges' ``(inserted, updated, unchanged)``; None, with nothing
        stored, when another writer began a write of the series since its stamp now."""
        tiers = self.tiers
        refused: list[bool] = []
        own = _unmoved(self.slots, sym, tf, refused)
        counts = [0, 0, 0]  # every row of the batch lies in one span: the spans' merges count them
        parts = [(s, e, self._merge_with_fast(sym, tf, s, e, batch, counts)) for s, e in spans.tolist()]
        disk = tiers.tier("disk")
        if disk is None or not tiers.writable:
            raise StorageUnavailableError(f"{sym} {tf.name}: the disk tier cannot take the write; nothing was stored")
        done = tiers.guard("disk", disk.put_ranges, sym, tf, parts, own)
        if refused:
            return None
        if done is None:
            state = tiers.states["disk"]
            raise StorageUnavailableError(
                f"{sym} {tf.name}: the disk tier, the store's only persistent tier, could not take the write "
                f"({state.error or 'a transient failure'}); it was not stored"
            )
        mem = tiers.tier("memory")
        if mem is not None:
            for s, e, rows in parts:
                self._fill_memory(mem, sym, tf, s, e, rows)
        return counts[0], counts[1], counts[2]

    def _refill_disk(self, sym: str, tf: Timeframe, spans: np.ndarray) -> None:
        db = self.tiers.tier("sqlite")
        if db is None:
            return
        for s, e in spans.tolist():
            guard = self.fill_guard(sym, tf)
            rows = self.tiers.guard("sqlite", db.read_range, sym, tf, s, e)
            if rows is not None:
                self.put_disk(sym, tf, s, e, rows, guard)

    def _merge_with_fast(
        self, sym: str, tf: Timeframe, s: int, e: int, batch: np.ndarray, counts: list[int]
    ) -> np.ndarray:
        """Without a durable tier: every candle the fast tiers hold in [s, e) (in parts too: what
        neither holds is not stored) merged with the batch; its ``(inserted, updated,
        unchanged)`` are added to ``counts``."""
        part = batch[(batch["ts"] >= s) & (batch["ts"] < e)]
        with storage_errors(sym, tf):
            held = fast_rows(self.tiers, sym, tf, s, e)[0]
        merged, ins, upd, unch = K.merge(np.ascontiguousarray(held), np.ascontiguousarray(part))
        counts[0] += ins
        counts[1] += upd
        counts[2] += unch
        return merged

    def _committed_guard(self, sym: str, tf: Timeframe) -> Callable[[], bool]:
        """A guard for filling LMDB with the rows this store just committed (not read back): it
        holds only while the series' stamp is still the one this commit left."""
        token = self.slots.seen.get((sym, tf.name))
        return lambda: token is not None and self.slots.stamp(sym, tf) == token

    def fill_guard(self, sym: str, tf: Timeframe) -> Callable[[], bool] | None:
        """A guard for filling LMDB with rows this process just read from the durable tier: it
        holds only if no write to the series began since (checked inside the LMDB write
        transaction)."""
        slots = self.slots
        token = slots.stamp(sym, tf)
        if token is None:
            # no change slots: the durable tier's own counter of other connections' commits (coarser)
            db = self.tiers.tier("sqlite")
            if db is None:
                return None
            version = self.tiers.guard("sqlite", db.data_version)
            return lambda: version is not None and self.tiers.guard("sqlite", db.data_version) == version
        if token & 1:
            return lambda: False
        return lambda: slots.stamp(sym, tf) == token

    def put_disk(
        self, sym: str, tf: Timeframe, s: int, e: int, rows: np.ndarray, guard: Callable[[], bool] | None = None
    ) -> None:
        """Make LMDB, a copy of the durable tier, hold ``rows`` as exactly the stored candles of
        ``[s, e)``; the tier itself keeps only the part inside its retention window. A failed
        write leaves LMDB not holding the span, so it cannot answer older data later. (Without
        a durable tier LMDB is the store, written by :meth:`_fill_shared`.)"""
        disk = self.tiers.tier("disk")
        if disk is None or not self.tiers.writable:
            return
        done = self.tiers.guard("disk", disk.put_range, sym, tf, s, e, np.ascontiguousarray(rows), guard)
        if done is None and self.tiers.states["disk"].degraded_at is not None:
            self.invalidate_fast(sym, tf, s, e, only="disk")

    def invalidate_fast(self, sym: str, tf: Timeframe, s: int, e: int, only: str | None = None) -> None:
        """A fast tier could not be updated: make sure it cannot answer stale data for [s, e)."""
        states = self.tiers.states
        if only in (None, "memory"):
            mem = states.get("memory")
            if mem is not None:
                mem.obj.invalidate(sym, tf)
        if only in (None, "disk") and self.tiers.durable:  # without one, LMDB is the store, no copy
            state = states.get("disk")
            if state is not None and state.obj is not None:
                try:
                    state.obj.delete(sym, tf, s, e)
                except BACKEND_ERRORS as exc:
                    # The disk tier could not drop the stale range: stop using it until it is rebuilt.
                    self.tiers.degrade("disk", exc)
                    try:
                        state.obj.clear()
                    except BACKEND_ERRORS:
                        self.tiers.mark_disk_stale()

    # ------------------------------------------------------------------ delete, quarantine
    def delete(self, sym: str, tf: Timeframe, s: int | None, e: int | None) -> int:
        """Remove ``[s, e)`` from every tier, the fast tiers first: a crash after that leaves them
        missing rows, never stale. The count removed from the durable tier (memory without one)."""
        tiers = self.tiers
        self.check_writable()
        with self.lock:
            self._unexact((sym, tf.name))
            self.coverage.sync(sym, tf)  # what another process changed is not counted from memory
            if not tiers.durable and tiers.tier("disk") is not None:
                # LMDB is the store the processes on the path share: they learn of the delete by
                # the stamp (as of a durable one), final once LMDB committed it
                self.slots.begin(sym, tf)
                try:
                    return self._delete(sym, tf, s, e)
                finally:
                    self.end_changes()
            return self._delete(sym, tf, s, e)

    def _delete(self, sym: str, tf: Timeframe, s: int | None, e: int | None) -> int:
        """:meth:`delete` under the lock."""
        tiers = self.tiers
        lo = -(2**62) if s is None else s
        hi = 2**62 if e is None else e
        key = (sym, tf.name)
        stored = 0
        if not tiers.durable:  # the fast tiers are the store: what they hold is what goes
            with storage_errors(sym, tf):
                stored = len(fast_rows(tiers, sym, tf, lo, hi)[0])
        disk = tiers.tier("disk")
        if disk is not None:
            try:
                disk.delete(sym, tf, s, e)
            except BACKEND_ERRORS as exc:
                tiers.degrade("disk", exc)
                if not tiers.durable:  # LMDB is the store: its transaction changed nothing
                    raise StorageUnavailableError(
                        f"{sym} {tf.name}: the disk tier, the store's only persistent tier, could not take "
                        f"the delete ({exc}); nothing was removed"
                    ) from exc
                self.invalidate_fast(sym, tf, lo, hi, only="disk")
        elif tiers.durable:
            tiers.mark_disk_stale()
        mem = tiers.tier("memory")
        kept = None
        if mem is not None and not tiers.durable:
            held = mem.held(sym, tf)
            if held is not None:
                rows = mem.range(sym, tf, held[0], held[1])
                if rows is not None:
                    keep = np.ascontiguousarray(rows[(rows["ts"] < lo) | (rows["ts"] >= hi)])
                    kept = (held, keep)
        forming = None
        if mem is not None:
            forming = mem.partial(sym, tf)  # the candle still forming is kept unless deleted
            mem.invalidate(sym, tf)
        self.coverage.frontiers.pop(key, None)
        db = tiers.tier("sqlite")
        if tiers.durable:
            if db is None:
                raise StorageUnavailableError(f"{tiers.durable_name} tier is degraded; nothing was deleted")
            self.slots.begin(sym, tf)
            try:
                removed = int(db.delete(sym, tf, s, e))
            except BACKEND_ERRORS as exc:
                tiers.failed("sqlite", exc)
                raise StorageUnavailableError(f"delete failed, nothing removed: {exc}") from exc
            finally:
                self.end_changes()
            self.coverage.drop(key)
        else:
            removed = stored
            self.coverage.subtract(key, lo, hi)
        if kept is not None and mem is not None:
            (hs, he), rows = kept
            mem.put_range(sym, tf, hs, he, rows)
        if forming is not None and mem is not None and not lo <= int(forming["ts"][0]) < hi:
            mem.set_partial(sym, tf, forming)
        return removed

    def quarantine(self, damage: DamagedChunkError) -> bool:
        """Remove damaged rows and their span from the durable tier (the span becomes missing, to
        be refetched) and from the fast tiers. Whether anything was removed."""
        db = self.tiers.tier("sqlite")
        if db is None or not self.tiers.writable:
            return False
        tf = parse_timeframe(damage.timeframe)
        sym = damage.symbol
        self._unexact((sym, tf.name))
        self.slots.begin(sym, tf)
        try:
            spans = db.quarantine_damaged(sym, tf, *damage.span)
        except BACKEND_ERRORS as exc:
            logger.warning("%s %s: could not quarantine damaged rows: %s", sym, tf.name, exc)
            return False
        finally:
            self.end_changes()
        self.coverage.drop((sym, tf.name))
        for s, e in spans:
            self.invalidate_fast(sym, tf, int(s), int(e))
            logger.warning("%s %s: damaged rows in [%d, %d) quarantined; they will be refetched", sym, tf.name, s, e)
        return bool(spans)

    # ------------------------------------------------------------------ batch, upkeep
    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One durable transaction around every write inside; the fast tiers follow the commit."""
        with self.lock:
            db = self.tiers.tier("sqlite")
            outer = self.depth == 0
            self.depth += 1
            to_disk: list[bool] = []  # of the waiting fills: which LMDB takes (see _unhold_batch)
            try:
                if db is None:
                    yield
                else:
                    with db.transaction():
                        if outer:
                            self._deferred.clear()
                            self._unheld.clear()
                        yield
                        if outer:
                            to_disk = self._unhold_batch()
            except BaseException:
                if outer:
                    self._stamp_final()
                    self._deferred.clear()
                    # The durable tier rolled back: give LMDB back exactly the ranges the batch's
                    # writes had un-held, from its (restored) rows; memory was never changed by it
                    undo, self._unheld = self._unheld, []
                    for sym, tf, spans in undo:
                        self._refill_disk(sym, tf, spans)
                    self.coverage.drop()
                raise
            finally:
                self.depth -= 1
            if outer:
                self._stamp_final()
                self._unheld.clear()
            if outer and self._deferred:
                work, self._deferred = self._deferred, []
                mem = self.tiers.tier("memory")
                cap = self.config.memory_candles
                # no flags: the batch began without the durable tier (fills as without a batch)
                for f, disk_too in zip(work, to_disk or [True] * len(work)):
                    if not _fill_live_edge(mem, cap, f.sym, f.tf, f.spans, f.exact, disk_too):
                        self._fill_fast_tiers(f.sym, f.tf, f.spans, f.exact, disk_too)
                self.maybe_maintain()

    def maybe_maintain(self) -> None:
        if self.depth or not self.tiers.durable:
            return
        db = self.tiers.tier("sqlite")
        if db is not None:
            self.tiers.guard("sqlite", db.maybe_maintain)


_new_result = object.__new__
_set_inserted = WriteResult.__dict__["inserted"].__set__
_set_updated = WriteResult.__dict__["updated"].__set__
_set_unchanged = WriteResult.__dict__["unchanged"].__set__


def _write_result(inserted: int, updated: int, unchanged: int) -> WriteResult:
    """``WriteResult(inserted, updated, unchanged)`` as the frozen dataclass's ``__init__`` builds
    it (a slot set per field), without its three ``object.__setattr__`` calls: 0.2 us instead of
    0.6 us, on every write (the live edge's hundred writes a minute pay it a hundred times)."""
    r = _new_result(WriteResult)
    _set_inserted(r, inserted)
    _set_updated(r, updated)
    _set_unchanged(r, unchanged)
    return r


def _write_memory(
    mem: Any, sym: str, tf: Timeframe, closed: np.ndarray, covered: np.ndarray, first: int, last: int
) -> tuple[int, int, int]:
    """Memory is the whole store: merge the batch into its window, span by span, in place (the
    counts come from that merge: no second merge to count, no copy of the window). ``first``
    and ``last``: the open times of the first and last closed rows."""
    if not len(covered):  # the usual write: one span, the rows' own
        if not len(closed):
            return (0, 0, 0)
        got = mem.write_range(sym, tf, first, tf.add(last, 1), closed)
        return (len(closed), 0, 0) if got is None else got  # None: older than the window, not kept
    spans = _spans(tf, closed, covered)
    counts = [0, 0, 0]
    bounds = np.searchsorted(closed["ts"], spans.ravel()).tolist()
    for k, (s, e) in enumerate(spans.tolist()):
        part = closed[bounds[2 * k] : bounds[2 * k + 1]]
        got = mem.write_range(sym, tf, s, e, part)
        for i, c in enumerate((len(part), 0, 0) if got is None else got):
            counts[i] += c
    return counts[0], counts[1], counts[2]


def _drop_window(mem: Any, sym: str, tf: Timeframe) -> None:
    """Forget what memory holds of a series but the candle still forming."""
    forming = mem.partial(sym, tf)
    mem.invalidate(sym, tf)
    if forming is not None:
        mem.set_partial(sym, tf, forming)


def _unmoved(slots: ChangeSlots, sym: str, tf: Timeframe, refused: list[bool]) -> Callable[[], bool]:
    """A guard that holds while the series' stamp is the one it has now (no other writer began
    since); each refusal appends to ``refused``."""
    token = slots.stamp(sym, tf)

    def guard() -> bool:
        if token is None or slots.stamp(sym, tf) == token:
            return True
        refused.append(True)
        return False

    return guard


def _fill_live_edge(
    mem: Any, cap: int, sym: str, tf: Timeframe, spans: np.ndarray, exact: np.ndarray | None, to_disk: bool
) -> bool:
    """The live edge of :meth:`Writer._fill_fast_tiers`: an exact one-span append that LMDB does
    not take goes to memory as committed, and that is all. False: not this case (nothing done)."""
    if exact is None or to_disk or len(spans) != 1 or len(exact) > cap:
        return False
    if mem is not None:
        s, e = spans[0].tolist()
        mem.put_range(sym, tf, s, e, exact)
    return True


_ONE_SPAN = np.zeros((1, 2), dtype=np.int64)  # the template of a write's one span (see _spans)


def _spans(
    tf: Timeframe, closed: np.ndarray, covered: np.ndarray, first: int | None = None, last: int | None = None
) -> np.ndarray:
    """The ranges a write changes: ``covered`` and the span of the closed rows (whose first and
    last open times may be given, as the write path already knows them)."""
    if not len(covered):  # the usual write: the rows' own span, nothing to merge
        if not len(closed):
            return EMPTY_RANGES
        if first is None or last is None:
            ts = closed["ts"]
            first, last = int(ts[0]), int(ts[-1])
        one = _ONE_SPAN.copy()  # about half the cost of np.empty((1, 2)), a third of np.array
        one[0, 0] = first
        one[0, 1] = tf.add(last, 1)
        return one
    parts = [covered]
    if len(closed):
        parts.append(np.array([[int(closed["ts"][0]), tf.add(int(closed["ts"][-1]), 1)]], dtype=np.int64))
    return K.interval_normalize(np.concatenate(parts)) if len(parts) > 1 else K.interval_normalize(covered)
