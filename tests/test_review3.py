"""A third hostile review, of the two commits "Keep the last 8 decoded chunks" (3beaa13) and
"Stores without a durable tier: a refused write or delete changes nothing, a degraded LMDB
answers nothing" (851ac61). Each test is one finding, written as what a user should get; each
failed on the code it was written against (fixed in the commit that added them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np
import pytest

import mds
from mds import Config
from mds.testing import dense_candles
from mds.timeutil import to_ms

SYM, TF = "KRW-BTC", "1m"
MIN = 60_000
T = to_ms("2025-01-06T00:00:00Z")  # the data end here (exclusive)
NOW = T + 30_000
FAST = [("disk",), ("memory", "disk")]


def clock() -> int:
    return NOW


# ---------------------------------------------------------------------------------------------
# 1. Coverage.fast_held rounds the held ranges inward: a stored candle drops out of latest-N.
@pytest.mark.parametrize("tiers", FAST)
def test_latest_n_after_an_unaligned_delete_keeps_every_stored_candle(tmp_path: Path, tiers: tuple) -> None:
    """``delete(start=t0 + 30 s, end=t0 + 90 s)`` on 1m candles removes the one candle at
    t0 + 60 s; LMDB then holds ``[..., t0 + 30 s)`` and ``[t0 + 90 s, ...)``, its bounds exactly
    as the delete gave them. Coverage.fast_held (mds/store/coverage.py:72, new in 851ac61) now
    floors the end of every held range: ``[..., t0)``, so the candle *at* t0, which is stored
    (the range read answers it), is no longer in any range Reader._latest_from_fast reads.
    ``candles(count=199)`` answers 198 rows without t0: a shorter array that skips a stored
    candle. It should answer the 199 stored candles (as it did before 851ac61)."""
    arr = dense_candles(200, T - 200 * MIN, MIN, seed=3)
    t0 = int(arr["ts"][100])
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=clock) as st:
        st.write_candles(SYM, TF, arr)
        assert st.delete(SYM, TF, start=t0 + 30_000, end=t0 + 90_000) == 1
    want = np.delete(arr, 101)
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=clock) as st:
        whole = st.candles(SYM, TF, start=int(arr["ts"][0]), end=T)
        assert np.array_equal(whole["ts"], want["ts"])  # the range read: every stored candle
        got = st.candles(SYM, TF, count=199)
        assert t0 in got["ts"].tolist()  # before the fix: missing
        assert np.array_equal(got["ts"], want["ts"])  # before the fix: 198 rows


# ---------------------------------------------------------------------------------------------
# 2, 3. An LMDB read that fails (its 126 reader slots taken, an I/O error) reads as "holds nothing".
class _ReadsFail:
    """An LMDB environment whose read transactions fail to begin, as liblmdb fails them when
    every reader slot of the lock file is taken (MDB_READERS_FULL: a 127th process on the
    directory) or on an I/O error; write transactions work."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env

    def begin(self, *args: object, **kwargs: object) -> object:
        if not (kwargs.get("write") or (len(args) > 2 and args[2])):
            raise lmdb.ReadersFullError("mdb_txn_begin: MDB_READERS_FULL: Environment maxreaders limit reached")
        return self._env.begin(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)


@contextlib.contextmanager
def _stored_then_lmdb_reads_fail(tmp_path: Path, tiers: tuple) -> Iterator[tuple[mds.Store, np.ndarray]]:
    """200 candles stored and the store opened again, its LMDB reads failing inside the block."""
    arr = dense_candles(200, T - 200 * MIN, MIN, seed=3)
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=clock) as st:
        st.write_candles(SYM, TF, arr)
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=clock) as st:
        handle = st._health.states["disk"].obj._env
        real = handle.env
        handle.env = _ReadsFail(real)
        try:
            yield st, arr
        finally:
            handle.env = real


@pytest.mark.parametrize("tiers", FAST)
def test_a_failed_lmdb_read_never_answers_an_empty_store(tmp_path: Path, tiers: tuple) -> None:
    """Without a durable tier LMDB is the store. LmdbTier.held_many (mds/tiers/disk.py:356) turns
    a read LMDB could not do into ``[]`` (``self._read(...) or [[] ...]``: "not held", right for
    a cache of a durable tier), so LmdbTier.held answers "holds nothing" and never fails;
    fast_rows and Coverage.fast_held (mds/store/coverage.py:247, 68) then read the store as
    empty, and their new ``if ranges is None: raise StorageDown`` never fires. A range read and
    a latest-N read answer empty arrays for a series of 200 stored candles. They should raise
    StorageUnavailableError (a typed error, as series() and gaps() do here). Not new in 851ac61
    (it fails on 3beaa13 too), but that commit's promise, "a degraded LMDB answers nothing",
    rests on held() reporting a failure it swallows."""
    with _stored_then_lmdb_reads_fail(tmp_path, tiers) as (st, arr):
        for want, read in (
            (arr, lambda: st.candles(SYM, TF, start=int(arr["ts"][0]), end=T)),
            (arr[-10:], lambda: st.candles(SYM, TF, count=10)),
        ):
            try:
                got = read()
            except mds.MdsError:
                continue  # a typed error: right
            assert np.array_equal(got, want)  # before the fix: an empty array


@pytest.mark.parametrize("tiers", FAST)
def test_a_write_while_lmdb_reads_fail_erases_no_stored_candle(tmp_path: Path, tiers: tuple) -> None:
    """The same failed read inside a write: Writer._merge_with_fast (mds/store/writes.py:486)
    merges the batch with what fast_rows reads of its span, here nothing, and put_ranges makes
    that the span's content. Writing back 2 of 200 stored candles (ts[10] and ts[20], unchanged)
    deletes the 9 stored candles between them, and write_candles reports 2 inserted. The write
    should raise StorageUnavailableError and change nothing (or merge with what is stored)."""
    with _stored_then_lmdb_reads_fail(tmp_path, tiers) as (st, arr), contextlib.suppress(mds.MdsError):
        st.write_candles(SYM, TF, arr[[10, 20]])
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=clock) as fresh:
        got = fresh.candles(SYM, TF, start=int(arr["ts"][0]), end=T)
        assert len(got) == 200  # before the fix: 191, ts[11] .. ts[19] erased
