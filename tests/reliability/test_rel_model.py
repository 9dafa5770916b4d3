"""The general property of issue 14: for random sequences of writes, deletes, injected tier faults
and Layer 1 misbehaviour, every read equals a model of what was acknowledged, or raises a typed
error (an ``mds.MdsError``; for ``await store.get(...)``, ``success=False`` naming one).

Two state machines (hypothesis, derandomized: the same sequences every run):

- ``StorageMachine``: no Layer 1. The model is what the store acknowledged: rows by ``ts``
  (last write wins) and coverage from ``complete=``, both shrunk by acknowledged deletes. A
  write or delete that raised must have changed nothing. Reads must equal the model exactly;
  ``gaps()`` and ``coverage()`` too.
- ``Layer1Machine``: a fake Layer 1 serving a fixed "exchange truth" that misbehaves on demand
  (short pages, capped pages, exceptions including ``CancelledError``, ``success: false``, a bare
  list, invalid candles); the user writes only truthful candles. Reads must equal the truth
  restricted to the request; a ``no_trades`` gap must be a slot the truth has no candle for.

Faults injected between operations: another connection holding SQLite's write lock (busy), a
bit flipped in a stored SQLite blob, garbage over the SQLite header, damage to LMDB's data file
(meta pages, truncation, a flipped row), and one-shot backend errors (``apsw.IOError``,
``apsw.CorruptError``, ``lmdb.Error``, ``lmdb.CorruptedError``) from a tier method. A degraded
tier stays degraded until the step after ``degradation_window_passes`` (the store's retry delay
is patched so that steps do not depend on how fast the machine runs). As root, each sequence's
store lives on its own small tmpfs, which ``read_only`` remounts read-only (root ignores file
permissions); without root that fault is not injected. Not injected: a full disk
(tests/reliability/test_rel_disk_full.py does that on a small file system).

The counts of what was tried are added to the reliability tally (``model_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _model as M
import _relutil as R
import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

import mds
import mds.store.health
from mds import CANDLE_DTYPE, DataType, MdsError, StorageRequest

TYPED = M.typed_error_names()
#: SQLite's busy timeout for the store under test: a write behind the lock fails after this.
BUSY_MS = 50
#: The store's "retry a degraded tier after" delay, outside the step after
#: ``degradation_window_passes``: longer than any run, so a degraded tier stays degraded.
NEVER = 1e9
#: An armed one-shot backend error is removed unfired after this many further steps.
ARMED_STEPS = 3

series_names = st.sampled_from(sorted(M.SERIES))
slots = st.integers(0, 2999)  # taken modulo the series' slot count
counts = st.integers(1, 1500)
seeds = st.integers(0, 2**16)
INVALID_KINDS = ["zero_price", "negative_price", "high_below_low", "nan", "misaligned", "future"]
backend_targets = st.sampled_from([f"{tier}.{m}" for tier, ms in M.BACKEND_TARGETS.items() for m in ms])


def tally(key: str, n: int = 1) -> None:
    R.TALLY[f"model_{key}"] += n


def assert_rows(got: Any, want: np.ndarray, what: str) -> None:
    """``got`` holds exactly the rows of ``want`` (same ts, same bytes), ascending."""
    assert isinstance(got, np.ndarray) and got.dtype == CANDLE_DTYPE, f"{what}: returned {type(got).__name__}"
    g, w = got["ts"], want["ts"]
    assert not (len(g) == 0 and len(w) > 0), f"{what}: EMPTY answer, the model holds {len(w)} rows"
    lacks = np.setdiff1d(w, g)
    assert not len(lacks), f"{what}: answer lacks {len(lacks)} of {len(w)} rows (first ts {int(lacks[0])})"
    extra = np.setdiff1d(g, w)
    assert not len(extra), f"{what}: answer has {len(extra)} rows the model lacks (first ts {int(extra[0])})"
    assert len(g) == len(w) and bool(np.all(np.diff(g) > 0)), f"{what}: not ascending and unique"
    bad = np.flatnonzero(np.asarray(got) != want)
    assert got.tobytes() == want.tobytes(), f"{what}: wrong values at ts {[int(t) for t in g[bad[:3]]]}"


class _Machine(RuleBasedStateMachine):
    """What both machines share: the store's life cycle, faults, reads and their checks."""

    with_layer1 = False

    def __init__(self, base: Path) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="model-", dir=base))
        self.fs = M.Tmpfs.mount(self.dir)  # None: no read-only faults in this run
        self.clock = R.Clock()
        self.layer1: M.FakeLayer1 | None = None
        self.store: mds.Store | None = None
        self.lock: M.SqliteLock | None = None
        self.armed: M.OneShot | None = None
        self.armed_steps = 0
        self.garbled: tuple[int, bytes, bytes] | None = None  # (inode, header, garbage)
        self.retry_next = False
        self.writes = 0
        self.saved_retry = getattr(mds.store, "_RETRY_DEGRADED_S", None)
        #: the expected answers per series: what was acknowledged, or the exchange truth
        self.expect = {name: M.SeriesModel(s) for name, s in M.SERIES.items()}
        tally("sequences")

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around every rule: the degraded-retry delay of this step, and the age of an armed
        one-shot fault (removed when it fired or after ARMED_STEPS further steps)."""
        tally("steps")
        mds.store.health._RETRY_DEGRADED_S = 0.0 if self.retry_next else NEVER  # type: ignore[attr-defined]
        self.retry_next = False
        try:
            yield
        finally:
            armed = self.armed
            if armed is not None and (armed.fired or self.armed_steps >= ARMED_STEPS):
                tally("backend_error_fired" if armed.fired else "backend_error_not_reached")
                armed.remove()
                self.armed = None
            self.armed_steps += 1

    def _open(self) -> mds.Store | None:
        """The store, opened if it is not; None when opening raised a typed error (allowed: a
        typed MdsError at open)."""
        if self.store is None:
            try:
                self.store = mds.open(
                    self.dir / "store",
                    layer1=self.layer1,
                    clock=self.clock,
                    config=mds.Config(layer1_timeout_s=5.0),
                )
            except MdsError as exc:
                self.typed(exc)
                return None
            self._short_busy_timeout()
        return self.store

    def _short_busy_timeout(self) -> None:
        state = self.store._health.states.get("sqlite") if self.store is not None else None
        conn = getattr(getattr(state, "obj", None), "_conn", None)
        if conn is not None:
            conn.set_busy_timeout(BUSY_MS)

    def _close(self) -> None:
        if self.armed is not None:
            self.armed.remove()
            self.armed = None
        if self.store is not None:
            st, self.store = self.store, None
            try:
                st.close()
            except MdsError as exc:
                self.typed(exc)

    def teardown(self) -> None:
        try:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            self._close()
        finally:
            if self.fs is not None:
                self.fs.unmount()
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.saved_retry is not None:
                mds.store.health._RETRY_DEGRADED_S = self.saved_retry  # type: ignore[attr-defined]

    def last_end(self, s: M.Series) -> int:
        """End of the last closed interval at the store's clock."""
        return self.clock() - self.clock() % s.interval

    def typed(self, exc: MdsError) -> None:
        tally(f"typed_error_{type(exc).__name__}")

    def call(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, exc)`` for a typed error; anything else fails."""
        try:
            return True, fn()
        except MdsError as exc:
            self.typed(exc)
            return False, exc
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # also CancelledError, SystemExit: never the caller's to see
            raise AssertionError(f"{what}: untyped {type(exc).__name__}: {exc}") from exc

    def check_read(self, what: str, fn: Callable[[mds.Store], Any], want: np.ndarray) -> None:
        st_ = self._open()
        if st_ is None:
            return
        tally("reads_checked")
        ok, got = self.call(what, lambda: fn(st_))
        if ok:
            tally("reads_answered")
            assert_rows(got, want, what)

    def check_get(self, what: str, series: M.Series, want: np.ndarray, **req: Any) -> None:
        st_ = self._open()
        if st_ is None:
            return
        tally("reads_checked")
        request = StorageRequest(DataType.CANDLE, [series.symbol], timeframe=series.tf, **req)
        try:
            resp = asyncio.run(st_.get(request))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise AssertionError(f"{what}: get() raised {type(exc).__name__}: {exc}") from exc
        if not resp.success:
            name = str(resp.error).split(":", 1)[0]
            assert name in TYPED, f"{what}: success=False with an untyped error: {resp.error}"
            tally(f"typed_error_{name}")
            return
        tally("reads_answered")
        assert_rows(resp.arrays[series.symbol], want, what)

    # ------------------------------------------------------------------ writes
    def batch_for(self, s: M.Series, first: int, n: int, step: int, complete: str, dup: bool) -> tuple[Any, Any]:
        raise NotImplementedError

    @rule(
        series=series_names,
        first=slots,
        n=st.integers(1, 600),
        step=st.sampled_from([1, 2, 3, 7]),
        complete=st.sampled_from(["no", "exact", "wide"]),
        dup=st.booleans(),
    )
    def write(self, series: str, first: int, n: int, step: int, complete: str, dup: bool) -> None:
        """write_candles of a batch (any order; with ``dup`` every ts twice, the second wins)."""
        with self.step():
            st_ = self._open()
            if st_ is None:
                return
            s = M.SERIES[series]
            batch, cov = self.batch_for(s, first % s.slots, n, step, complete, dup)
            ok, res = self.call("write_candles", lambda: st_.write_candles(s.symbol, s.tf, batch, complete=cov))
            self.acknowledge(series, ok, res, batch, cov)

    def busy_write_refused(self, what: str, ok: bool, res: Any, changes: bool = True) -> None:
        """While another connection holds SQLite's write lock, or the directory is read-only,
        nothing can commit: a write or delete that ``changes`` something must fail with
        StorageUnavailableError (behind the lock: after the busy timeout)."""
        why = "another connection held the write lock" if self.lock is not None else "the directory was read-only"
        if (self.lock is not None or self.readonly) and changes:
            assert not ok, f"{what} acknowledged while {why}"
            assert isinstance(res, mds.StorageUnavailableError), f"{what} while {why} raised {res!r}"

    @property
    def readonly(self) -> bool:
        return self.fs is not None and self.fs.readonly

    def writable(self) -> bool:
        """No fault that holds or damages the files now (the file faults need them writable)."""
        return self.lock is None and self.garbled is None and not self.readonly

    def acknowledge(self, series: str, ok: bool, res: Any, batch: np.ndarray, cov: Any) -> None:
        self.busy_write_refused("write_candles", ok, res, len(batch) > 0 or cov is not None)
        if not ok:
            tally("writes_failed_typed")
            return
        tally("writes_acknowledged")
        expected = self.expect[series].write(batch, cov)
        if res is not None:  # None: one write of an acknowledged batch()
            assert (res.inserted, res.updated, res.unchanged) == expected, f"WriteResult {res} != {expected}"

    def marked_batch(self, s: M.Series, first: int, n: int, step: int, complete: str, dup: bool) -> tuple[Any, Any]:
        """Valid candles on every ``step``-th slot of ``[first, first + n)``, ``volume`` = the write's
        number (so overwrites show), shuffled; the ``complete=`` range as asked."""
        self.writes += 1
        ts = s.ts(0) + np.arange(first, min(first + n, s.slots), step) * s.interval
        rows = R.marked(ts, float(self.writes))
        rng = np.random.default_rng(self.writes)
        batch = rows[rng.permutation(len(rows))]
        if dup:
            batch = np.concatenate([R.marked(ts, self.writes + 0.5)[rng.permutation(len(rows))], batch])
        return batch, self.complete_range(s, first, n, complete)

    @staticmethod
    def complete_range(s: M.Series, first: int, n: int, complete: str) -> tuple[int, int] | None:
        if complete == "no":
            return None
        pad = 5 if complete == "wide" else 0
        return s.ts(max(0, first - pad)), s.ts(min(s.slots, first + n + pad))

    @rule(series=series_names, first=slots, n=st.integers(1, 300), kind=st.sampled_from(INVALID_KINDS))
    def write_invalid(self, series: str, first: int, n: int, kind: str) -> None:
        """A batch with one invalid candle: InvalidCandleError, nothing stored (the model stays)."""
        with self.step():
            st_ = self._open()
            if st_ is None:
                return
            s = M.SERIES[series]
            batch = self.invalid_batch(s, first % s.slots, n, kind)
            ok, res = self.call("write_candles(invalid)", lambda: st_.write_candles(s.symbol, s.tf, batch))
            assert not ok, f"a batch with a {kind} candle was acknowledged: {res}"
            tally(f"invalid_writes_{type(res).__name__}")

    def invalid_batch(self, s: M.Series, first: int, n: int, kind: str) -> np.ndarray:
        ts = s.ts(0) + np.arange(first, min(first + n, s.slots)) * s.interval
        batch = R.marked(ts, 999.0)
        bad = batch[len(batch) // 2 : len(batch) // 2 + 1]
        if kind == "zero_price":
            bad["open"] = bad["low"] = bad["close"] = 0.0
        elif kind == "negative_price":
            bad["open"], bad["high"], bad["low"], bad["close"] = -5.0, -1.0, -6.0, -2.0
        elif kind == "high_below_low":
            bad["high"] = bad["low"] - 1.0
        elif kind == "nan":
            bad["close"] = np.nan
        elif kind == "misaligned":
            bad["ts"] += 1000
        else:  # opens after the store's clock
            bad["ts"] = self.last_end(s) + s.interval
        return batch

    @rule(first=slots, n=st.integers(1, 300), bad_last=st.booleans())
    def batch_write(self, first: int, n: int, bad_last: bool) -> None:
        """Writes to both series in one ``batch()``; with ``bad_last`` an invalid third write
        rejects the whole batch."""
        with self.step():
            st_ = self._open()
            if st_ is None:
                return
            parts = []
            for name in sorted(M.SERIES):
                s = M.SERIES[name]
                parts.append((name, *self.batch_for(s, first % s.slots, n, 1, "exact", False)))

            def run() -> None:
                with st_.batch():
                    for name, batch, cov in parts:
                        s = M.SERIES[name]
                        st_.write_candles(s.symbol, s.tf, batch, complete=cov)
                    if bad_last:
                        s = M.SERIES["btc"]
                        st_.write_candles(s.symbol, s.tf, self.invalid_batch(s, first % s.slots, 5, "high_below_low"))

            ok, res = self.call("batch", run)
            assert not (ok and bad_last), "a batch ending in an invalid write was acknowledged"
            self.busy_write_refused("batch", ok, res)
            tally("batches_acknowledged" if ok else "batches_rejected_typed")
            if ok:
                for name, batch, cov in parts:
                    self.acknowledge(name, True, None, batch, cov)

    @rule(series=series_names, first=slots, n=st.integers(1, 1500), everything=st.booleans())
    def delete(self, series: str, first: int, n: int, everything: bool) -> None:
        with self.step():
            st_ = self._open()
            if st_ is None:
                return
            s = M.SERIES[series]
            lo, hi = (None, None) if everything else (s.ts(first % s.slots), s.ts(first % s.slots + n))
            model = self.expect[series]
            held = any((lo is None or t >= lo) and (hi is None or t < hi) for t in model.rows) or bool(
                model.cov and M.iv_subtract(model.cov, (lo or -(1 << 62), hi or 1 << 62)) != model.cov
            )
            ok, res = self.call("delete", lambda: st_.delete(s.symbol, s.tf, start=lo, end=hi))
            self.busy_write_refused("delete", ok, res, held and not self.with_layer1)
            if not ok:
                tally("deletes_failed_typed")
                return
            tally("deletes_acknowledged")
            self.acknowledge_delete(series, lo, hi, res)

    def acknowledge_delete(self, series: str, lo: int | None, hi: int | None, res: int) -> None:
        removed = self.expect[series].delete(lo, hi)
        assert res == removed, f"delete returned {res}, the model removed {removed}"

    # ------------------------------------------------------------------ reads
    @rule(series=series_names, n=counts, end=st.none() | slots)
    def read_latest(self, series: str, n: int, end: int | None) -> None:
        with self.step():
            s = M.SERIES[series]
            e = None if end is None else s.ts(end % s.slots + 1)
            self.check_read(
                f"candles({s.symbol} {s.tf}, count={n}, end={e})",
                lambda st_: st_.candles(s.symbol, s.tf, count=n, end=e),
                self.expect[series].latest(n, e, self.last_end(s)),
            )

    @rule(series=series_names, first=slots, width=counts)
    def read_range(self, series: str, first: int, width: int) -> None:
        with self.step():
            s = M.SERIES[series]
            a, b = s.ts(first % s.slots), s.ts(first % s.slots + width)
            self.check_read(
                f"candles({s.symbol} {s.tf}, start={a}, end={b})",
                lambda st_: st_.candles(s.symbol, s.tf, start=a, end=b),
                self.expect[series].range(a, b),
            )

    @rule(series=series_names, first=slots, n=st.integers(1, 800))
    def read_first(self, series: str, first: int, n: int) -> None:
        with self.step():
            s = M.SERIES[series]
            a = s.ts(first % s.slots)
            self.check_read(
                f"candles({s.symbol} {s.tf}, start={a}, count={n})",
                lambda st_: st_.candles(s.symbol, s.tf, start=a, count=n),
                self.expect[series].first(a, n, self.last_end(s)),
            )

    @rule(series=series_names, n=counts)
    def get_latest(self, series: str, n: int) -> None:
        with self.step():
            s = M.SERIES[series]
            want = self.expect[series].latest(n, None, self.last_end(s))
            self.check_get(f"get({s.symbol} {s.tf}, count={n})", s, want, count=n)

    @rule(series=series_names, first=slots, width=counts)
    def get_range(self, series: str, first: int, width: int) -> None:
        with self.step():
            s = M.SERIES[series]
            a, b = s.ts(first % s.slots), s.ts(first % s.slots + width)
            self.check_get(
                f"get({s.symbol} {s.tf}, start={a}, end={b})",
                s,
                self.expect[series].range(a, b),
                start_time=a,
                end_time=b,
            )

    @rule(series=series_names, first=st.none() | slots, width=st.none() | counts)
    def read_gaps(self, series: str, first: int | None, width: int | None) -> None:
        with self.step():
            st_ = self._open()
            if st_ is None:
                return
            s = M.SERIES[series]
            a = None if first is None else s.ts(first % s.slots)
            b = None if width is None else s.ts((0 if first is None else first % s.slots) + width)
            what = f"gaps({s.symbol} {s.tf}, start={a}, end={b})"
            tally("reads_checked")
            ok, got = self.call(what, lambda: st_.gaps(s.symbol, s.tf, start=a, end=b))
            if ok:
                tally("reads_answered")
                self.check_gaps(what, s, [(g.start, g.end, g.kind) for g in got], a, b)

    def check_gaps(self, what: str, s: M.Series, got: list[tuple[int, int, str]], a: Any, b: Any) -> None:
        raise NotImplementedError

    @rule(series=series_names)
    def read_coverage(self, series: str) -> None:
        with self.step():
            st_ = self._open()
            if st_ is None:
                return
            s = M.SERIES[series]
            tally("reads_checked")
            ok, got = self.call("coverage", lambda: st_.coverage(s.symbol, s.tf))
            if ok:
                tally("reads_answered")
                self.check_coverage(s, series, [(int(x), int(y)) for x, y in got])

    def check_coverage(self, s: M.Series, series: str, got: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ upkeep
    @rule(force=st.booleans())
    def maintain(self, force: bool) -> None:
        with self.step():
            st_ = self._open()
            if st_ is not None:
                self.call("maintain", lambda: st_.maintain(force=force))

    @rule()
    def check(self) -> None:
        """``check()`` may report problems; when it says ok, the store must be able to answer
        from storage: full-range reads of every series succeed and equal the model (with a
        Layer 1, a read may still need it, and fail with its typed error)."""
        with self.step():
            st_ = self._open()
            if st_ is None:
                return
            ok, rep = self.call("check", st_.check)
            if not ok or not rep.ok:
                tally("check_not_ok" if ok else "check_typed_error")
                return
            tally("check_ok")
            if self.armed is not None:
                # "ok" vouches for the state check() saw; a one-shot fault armed for a later call
                # is not part of it (it would fire on the reads below)
                self.armed.remove()
                self.armed = None
            for name, s in M.SERIES.items():
                what = f"candles({s.symbol} {s.tf}, full range) after check() said ok"
                want = self.expect[name].range(s.ts(0), s.ts(s.slots))
                if self.with_layer1:
                    self.check_read(
                        what, lambda st_, s=s: st_.candles(s.symbol, s.tf, start=s.ts(0), end=s.ts(s.slots)), want
                    )
                    continue
                try:
                    got = st_.candles(s.symbol, s.tf, start=s.ts(0), end=s.ts(s.slots))
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    raise AssertionError(f"{what}: raised {type(exc).__name__}: {exc}") from exc
                assert_rows(got, want, what)

    @rule()
    def reopen(self) -> None:
        with self.step():
            if self.lock is None:
                self._close()
                self._open()
                tally("reopens")

    # ------------------------------------------------------------------ faults
    @precondition(lambda self: self.writable())
    @rule()
    def busy_start(self) -> None:
        """Another connection takes SQLite's write lock and keeps it until ``busy_stop``."""
        with self.step():
            if self._open() is None:
                return
            self._short_busy_timeout()
            self.lock = M.SqliteLock.take(self.dir / "store" / "candles.sqlite3")
            tally("fault_sqlite_busy" if self.lock is not None else "fault_sqlite_busy_no_target")

    @precondition(lambda self: self.lock is not None)
    @rule()
    def busy_stop(self) -> None:
        with self.step():
            assert self.lock is not None
            self.lock.release()
            self.lock = None

    @precondition(lambda self: self.writable())
    @rule(seed=seeds)
    def sqlite_flip(self, seed: int) -> None:
        """A bit flipped inside a stored candle blob of the SQLite file (the store stays open)."""
        with self.step():
            if self._open() is None:
                return
            done = M.flip_sqlite_byte(self.dir / "store" / "candles.sqlite3", random.Random(seed))
            tally("fault_sqlite_bit_flip" if done else "fault_sqlite_bit_flip_no_target")

    @precondition(lambda self: self.writable())
    @rule(seed=seeds)
    def sqlite_header_garbage(self, seed: int) -> None:
        """Close, garbage over the SQLite header, open again (until ``sqlite_header_restored``)."""
        with self.step():
            self._close()
            path = self.dir / "store" / "candles.sqlite3"
            if path.exists():
                self.garbled = M.garble_sqlite_header(path, random.Random(seed))
                tally("fault_sqlite_header_garbage")
            self._open()

    @precondition(lambda self: self.lock is None and self.garbled is not None and not self.readonly)
    @rule()
    def sqlite_header_restored(self) -> None:
        """Close, put the header back (if the store left that file as it was), open again."""
        with self.step():
            self._close()
            assert self.garbled is not None
            M.restore_sqlite_header(self.dir / "store" / "candles.sqlite3", *self.garbled)
            self.garbled = None
            self._open()

    @precondition(lambda self: self.lock is None and not self.readonly)
    @rule(how=st.sampled_from(["meta", "truncate", "row"]), seed=seeds)
    def lmdb_damage(self, how: str, seed: int) -> None:
        """Close, damage LMDB's data file, open again (the store must detect it and rebuild)."""
        with self.step():
            self._close()
            rows = [r for m in self.expect.values() for r in list(m.rows.values())[:400]]
            if M.damage_lmdb(self.dir / "store" / "lmdb", how, rows, random.Random(seed)):
                tally(f"fault_lmdb_{how}")
            self._open()

    @precondition(lambda self: self.fs is not None and self.lock is None and not self.readonly)
    @rule()
    def read_only(self) -> None:
        """Close, remount the store's file system read-only, open again (until ``read_write``)."""
        with self.step():
            self._close()
            tally("fault_read_only" if self.fs is not None and self.fs.remount(True) else "fault_read_only_refused")
            self._open()

    @precondition(lambda self: self.readonly)
    @rule()
    def read_write(self) -> None:
        with self.step():
            self._close()
            assert self.fs is not None and self.fs.remount(False), "the file system could not be made writable again"
            self._open()

    @rule(method=backend_targets, which=st.integers(0, 1))
    def arm_backend_error(self, method: str, which: int) -> None:
        """The next call of ``tier.method`` (within ARMED_STEPS steps) raises the backend's own error."""
        with self.step():
            st_ = self._open()
            if st_ is None:
                return
            tier, name = method.split(".")
            state = st_._health.states.get(tier)
            obj = getattr(state, "obj", None)
            if obj is None or self.armed is not None:
                return
            exc = M.BACKEND_ERRORS[tier][which]("injected: " + exc_name(M.BACKEND_ERRORS[tier][which]))
            self.armed = M.OneShot(obj, name, exc)
            self.armed_steps = -1  # this step does not count
            tally(f"fault_backend_{tier}_{exc_name(type(exc))}")

    @rule(hours=st.sampled_from([2, 30]))
    def time_passes(self, hours: int) -> None:
        """The store's clock moves on: memory entries (TTL 1 h) and LMDB entries (1 day) age out.
        No candle of the test opens after the old clock, so the expected answers stay."""
        with self.step():
            self.clock.t += hours * M.HOUR

    @rule()
    def degradation_window_passes(self) -> None:
        """The next step runs after the store's retry delay for degraded tiers."""
        with self.step():
            self.retry_next = True


def exc_name(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


class StorageMachine(_Machine):
    """No Layer 1: every read equals what was acknowledged, or raises a typed error."""

    @initialize()
    def seed_store(self) -> None:
        """Start from stored history: 2500 1m and 300 1h candles, complete, some holes."""
        with self.step():
            st_ = self._open()
            assert st_ is not None, "a fresh store did not open"
            for name, n in (("btc", 2500), ("eth", 300)):
                s = M.SERIES[name]
                batch, cov = self.marked_batch(s, 0, n, 1, "exact", False)
                batch = batch[batch["ts"] % (17 * s.interval) != 0]  # no-trade slots
                res = st_.write_candles(s.symbol, s.tf, batch, complete=cov)
                self.acknowledge(name, True, res, batch, cov)

    def batch_for(self, s: M.Series, first: int, n: int, step: int, complete: str, dup: bool) -> tuple[Any, Any]:
        return self.marked_batch(s, first, n, step, complete, dup)

    def check_gaps(self, what: str, s: M.Series, got: list[tuple[int, int, str]], a: Any, b: Any) -> None:
        model = self.expect[_name(s)]
        for gs, ge, kind in got:
            for t in range(gs, ge, s.interval):
                assert t not in model.rows, f"{what}: gap {kind} at {t}, where a candle was acknowledged"
                if kind == "no_trades":
                    assert M.iv_contains(model.cov, t), f"{what}: no_trades at {t}, never acknowledged complete"
        want = model.gaps(a, b)
        assert got == want, f"{what}: {got[:4]}... != model {want[:4]}... ({len(got)} vs {len(want)} runs)"

    def check_coverage(self, s: M.Series, series: str, got: list[tuple[int, int]]) -> None:
        want = self.expect[series].cov
        assert got == want, f"coverage({s.symbol} {s.tf}) = {got}, acknowledged {want}"


class Layer1Machine(_Machine):
    """A fake Layer 1 with the exchange truth: every read equals the truth, or a typed error."""

    with_layer1 = True

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        truth = {(s.symbol, s.tf): M.truth_market(s, seed=i + 1) for i, s in enumerate(M.SERIES.values())}
        self.layer1 = M.FakeLayer1(truth)
        for name, s in M.SERIES.items():
            self.expect[name].write(truth[(s.symbol, s.tf)], None)

    def teardown(self) -> None:
        if self.layer1 is not None:
            for mode, n in self.layer1.misbehaved.items():
                tally(f"fault_layer1_{mode}", n)
            tally("layer1_calls", self.layer1.calls)
        super().teardown()

    def batch_for(self, s: M.Series, first: int, n: int, step: int, complete: str, dup: bool) -> tuple[Any, Any]:
        """The user writes what the exchange has: every truth candle of the range it claims."""
        cov = self.complete_range(s, first, n, complete)
        a, b = cov if cov is not None else (s.ts(first), s.ts(first + n))
        rows = self.expect[_name(s)].range(a, b)
        return (np.concatenate([rows, rows]) if dup else rows.copy()), cov

    def acknowledge(self, series: str, ok: bool, res: Any, batch: np.ndarray, cov: Any) -> None:
        self.busy_write_refused("write_candles", ok, res, len(batch) > 0 or cov is not None)
        if res is not None:
            tally("writes_acknowledged" if ok else "writes_failed_typed")  # the truth does not change

    def acknowledge_delete(self, series: str, lo: int | None, hi: int | None, res: int) -> None:
        pass  # the exchange still has them: later reads fetch them again

    def check_gaps(self, what: str, s: M.Series, got: list[tuple[int, int, str]], a: Any, b: Any) -> None:
        truth = self.expect[_name(s)]
        for gs, ge, kind in got:
            if kind != "no_trades":
                continue
            for t in range(gs, ge, s.interval):
                assert t not in truth.rows, f"{what}: no_trades at {t}, where the exchange has a candle"

    def check_coverage(self, s: M.Series, series: str, got: list[tuple[int, int]]) -> None:
        pass  # proven by the reads (a covered range is answered from storage) and by gaps()

    @rule(mode=st.sampled_from(M.L1_MODES), calls=st.integers(1, 3))
    def layer1_misbehaves(self, mode: str, calls: int) -> None:
        """The next ``calls`` candle calls of the Layer 1 misbehave as ``mode``."""
        with self.step():
            assert self.layer1 is not None
            self.layer1.queue.extend([mode] * calls)

    @rule(cap=st.sampled_from([200, 100, 37]))
    def layer1_caps_pages(self, cap: int) -> None:
        """From now on the Layer 1 answers at most ``cap`` candles a call (200: behaves again)."""
        with self.step():
            assert self.layer1 is not None
            self.layer1.cap = cap
            if cap < 200:
                tally(f"fault_layer1_cap_{cap}")

    @rule()
    def layer1_heals(self) -> None:
        with self.step():
            assert self.layer1 is not None
            self.layer1.queue.clear()


def _name(s: M.Series) -> str:
    return next(k for k, v in M.SERIES.items() if v == s)


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=True,
    )


def test_storage_sequences_match_the_model(tmp_path: Path) -> None:
    run_state_machine_as_test(lambda: StorageMachine(tmp_path), settings=_settings(200, 30))


def test_layer1_sequences_match_the_exchange(tmp_path: Path) -> None:
    run_state_machine_as_test(lambda: Layer1Machine(tmp_path), settings=_settings(150, 30))


@pytest.mark.stress
def test_storage_sequences_match_the_model_stress(tmp_path: Path) -> None:
    run_state_machine_as_test(lambda: StorageMachine(tmp_path), settings=_settings(1500, 60))


@pytest.mark.stress
def test_layer1_sequences_match_the_exchange_stress(tmp_path: Path) -> None:
    run_state_machine_as_test(lambda: Layer1Machine(tmp_path), settings=_settings(1000, 50))
