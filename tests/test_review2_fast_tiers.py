"""A second hostile review of stores without a durable tier (after 34e77a9, e8df3a4, aeb8cbd):
``tiers=("memory", "disk")`` or ``("disk",)``, where LMDB is the only persistent tier and the store
every process on the directory shares. Each test is one finding, written as what a user should
get; each failed on the code it was written against (all fixed in the commit that added them).

LMDB is made to fail the natural way: a map capped at 1 MiB (``disk_map_size_cap``) that a large
write (or the copy-on-write pages of a rewrite or a delete) does not fit. A failed LMDB write
degrades the tier for ``_RETRY_DEGRADED_S`` (5 s) in the process that saw it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mds
import mds.store.health
from mds import Config
from mds.errors import StorageUnavailableError
from mds.testing import dense_candles
from mds.timeutil import to_ms

SYM, TF = "KRW-BTC", "1m"
OTHER = "KRW-ETH"
MIN = 60_000
T = to_ms("2025-01-06T00:00:00Z")  # the data end here (exclusive)
NOW = T + 30_000
FAST = [("disk",), ("memory", "disk")]
CAP = 1 << 20  # LMDB's map cap: 1 MiB


def clock() -> int:
    return NOW


def history(n: int = 500, seed: int = 3) -> np.ndarray:
    return dense_candles(n, T - n * MIN, MIN, seed=seed)


def too_big() -> np.ndarray:
    return history(36_000, seed=4)  # 2 MB: more than the 1 MiB map


# ---------------------------------------------------------------------------------------------
# 1. A rejected write's complete= stays in coverage.
@pytest.mark.parametrize("tiers", FAST)
def test_a_rejected_write_proves_no_coverage(tmp_path: Path, tiers: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writer._store_fast_only adds ``complete=`` to the coverage cache (writes.py:218) before
    LMDB takes the rows; when LMDB then refuses the batch (StorageUnavailableError: nothing was
    stored) the coverage stays. gaps() then calls the holes between candles stored before
    ``no_trades``, proven by nothing but the rejected batch, and coverage() lists its range.
    A rejected batch must leave coverage as it was: the holes stay ``missing``."""
    arr = history(200)
    with mds.open(tmp_path, config=Config(tiers=tiers, disk_map_size_cap=CAP), clock=clock) as st:
        st.write_candles(SYM, TF, arr[::2])  # every other minute: the holes are missing
        before = st.gaps(SYM, TF, start=int(arr["ts"][0]), end=T)
        assert before and {g.kind for g in before} == {"missing"}
        big = too_big()
        with pytest.raises(StorageUnavailableError):
            st.write_candles(SYM, TF, big, complete=(int(big["ts"][0]), T))
        monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)  # LMDB back in service
        assert st.coverage(SYM, TF) == []  # before the fix: the rejected batch's complete range
        assert st.gaps(SYM, TF, start=int(arr["ts"][0]), end=T) == before  # before the fix: no_trades


# ---------------------------------------------------------------------------------------------
# 2. A rejected write keeps the rows of the spans it filled before the failure.
@pytest.mark.parametrize("tiers", FAST)
def test_a_rejected_write_stores_none_of_its_rows(tmp_path: Path, tiers: tuple) -> None:
    """A write with ``complete=`` disjoint from its rows changes two spans; _fill_fast_tiers
    fills them one LMDB transaction each (writes.py:409-429). When the second put fails
    (here: rewriting the 12,000 candles LMDB holds under the claimed range needs more than the
    1 MiB map) the write raises StorageUnavailableError, yet the first span's rows were stored
    and stay: a rejected batch that is half stored. Nothing of it should be stored (or it should
    not be rejected)."""
    held = history(12_000, seed=4)
    old = dense_candles(10, T - 20_000 * MIN, MIN, seed=9)  # older than every held candle
    with mds.open(tmp_path, config=Config(tiers=tiers, disk_map_size_cap=CAP), clock=clock) as st:
        st.write_candles(SYM, TF, held)
        with pytest.raises(StorageUnavailableError):
            st.write_candles(SYM, TF, old, complete=(int(held["ts"][0]), T))
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=clock) as fresh:
        got = fresh.candles(SYM, TF, start=int(old["ts"][0]), end=int(old["ts"][-1]) + MIN)
        assert len(got) == 0  # before the fix: the 10 rows of the rejected batch


# ---------------------------------------------------------------------------------------------
# 3. A delete LMDB cannot take empties LMDB: every series is gone, and the delete "succeeds".
@pytest.mark.parametrize("tiers", FAST)
def test_a_delete_lmdb_cannot_take_never_empties_the_store(tmp_path: Path, tiers: tuple) -> None:
    """Writer._delete catches LMDB's failure (map full: the delete's copy-on-write pages do not
    fit) and calls invalidate_fast(only="disk") (writes.py:565), which deletes again and, failing,
    *clears* LMDB (writes.py:526), as for a cache of a durable tier. Without a durable tier LMDB is
    the store: every series on the directory is lost, and delete() still returns 4 as if only
    those 4 candles went. It should raise StorageUnavailableError and keep everything (or delete
    the 4 candles only)."""
    btc = history(16_000, seed=4)
    eth = dense_candles(300, T - 300 * MIN, MIN, seed=5)
    mid = len(btc) // 2
    with mds.open(tmp_path, config=Config(tiers=tiers, disk_map_size_cap=CAP), clock=clock) as st:
        st.write_candles(SYM, TF, btc)
        st.write_candles(OTHER, TF, eth)
        try:
            removed = st.delete(SYM, TF, start=int(btc["ts"][mid]) + 1, end=int(btc["ts"][mid + 5]))
        except StorageUnavailableError:
            removed = 0
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=clock) as fresh:
        assert len(fresh.candles(OTHER, TF, start=int(eth["ts"][0]), end=T)) == 300  # before the fix: 0
        assert len(fresh.candles(SYM, TF, start=int(btc["ts"][0]), end=T)) == len(btc) - removed  # before the fix: 0


# ---------------------------------------------------------------------------------------------
# 4. While LMDB is degraded, latest-N reads and series() answer "nothing stored".
@pytest.mark.parametrize("tiers", FAST)
def test_reads_while_lmdb_is_degraded_never_answer_empty(tmp_path: Path, tiers: tuple) -> None:
    """A write LMDB could not take degrades the tier for 5 s. Meanwhile Tiers.tier("disk") is
    None, and the fast tiers' listings skip it as if the store had no LMDB: Coverage.fast_held
    (coverage.py:62-64) gives Reader._latest_from_fast (reads.py) no range to read, so a latest-N
    read of a stored series answers an empty array; series._fast_series lists nothing. (A range
    read raises StorageUnavailableError, as it should: fast_rows checks the degraded state.)
    Each should answer the stored candles or raise StorageUnavailableError."""
    eth = dense_candles(300, T - 300 * MIN, MIN, seed=5)
    with mds.open(tmp_path, config=Config(tiers=tiers, disk_map_size_cap=CAP), clock=clock) as st:
        st.write_candles(OTHER, TF, eth)
        if "memory" in tiers:
            st._health.states["memory"].obj.clear()  # memory_ttl_s later (or another process wrote)
        with pytest.raises(StorageUnavailableError):
            st.write_candles(SYM, TF, too_big())  # another series: LMDB is full
        try:
            got = st.candles(OTHER, TF, count=10)
        except StorageUnavailableError:
            got = eth[-10:]
        assert got.tobytes() == eth[-10:].tobytes()  # before the fix: an empty array
        try:
            listed = [(s.symbol, s.count) for s in st.series()]
        except StorageUnavailableError:
            listed = [(OTHER, 300)]
        assert listed == [(OTHER, 300)]  # before the fix: []


# ---------------------------------------------------------------------------------------------
# 5. While LMDB is degraded, a write is acknowledged and stored nowhere persistent.
@pytest.mark.parametrize("tiers", FAST)
def test_a_write_while_lmdb_is_degraded_is_not_acknowledged(tmp_path: Path, tiers: tuple) -> None:
    """Writer._store_fast_only takes ``tiers.tier("disk") is None`` (degraded for 5 s after a
    failed LMDB write) for "the store has no LMDB" (writes.py:220): with memory it writes memory
    alone and returns WriteResult(inserted=300), though no other process and no reopen will ever
    see the rows; with ("disk",) _fill_fast_tiers returns without doing anything and the write
    answers WriteResult(0, 0, 0). Either way nothing persisted and no error: the write should
    raise StorageUnavailableError (as a write LMDB refuses does), or be stored."""
    eth = dense_candles(300, T - 300 * MIN, MIN, seed=5)
    with mds.open(tmp_path, config=Config(tiers=tiers, disk_map_size_cap=CAP), clock=clock) as st:
        with pytest.raises(StorageUnavailableError):
            st.write_candles(SYM, TF, too_big())
        try:
            st.write_candles(OTHER, TF, eth)  # a small write of another series, just after
        except StorageUnavailableError:
            return  # refused: the caller knows it was not stored
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=clock) as fresh:
        assert len(fresh.candles(OTHER, TF, start=int(eth["ts"][0]), end=T)) == 300  # before the fix: 0


# ---------------------------------------------------------------------------------------------
# 6. A write merges with a memory window another writer made stale, and LMDB takes the merge.
def test_a_write_never_undoes_another_stores_write_with_its_stale_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer.store syncs the series (writes.py:151) and only later stamps it in progress
    (_store_shared, writes.py:241). A write by another store or process that lands between the
    two is not seen: ChangeSlots.begin notices it (the series is *contested*), but the merge
    (_merge_with_fast -> fast_rows) still reads this store's old memory window, and the LMDB
    guard, whose token is taken after this begin, lets the fill through. LMDB then holds the old
    candle again: the other writer's acknowledged correction is lost for every process (the
    contested series' memory is dropped only after LMDB was written). Here the other write is
    run right after the sync, deterministically, by wrapping it; with two processes it is a race
    of a few microseconds. Both writes should land."""
    arr = history(100)
    cfg = Config(tiers=("memory", "disk"))
    with mds.open(tmp_path, config=cfg, clock=clock) as a, mds.open(tmp_path, config=cfg, clock=clock) as b:
        a.write_candles(SYM, TF, arr)
        assert len(b.candles(SYM, TF, count=100)) == 100  # b's memory holds the candles
        fix = arr[50:51].copy()
        fix["open"] = fix["high"] = fix["low"] = fix["close"] = 123.0  # a's correction of one candle
        mine = arr[[40, 60]].copy()  # b's write: two other candles, its span covers a's
        mine["volume"] += 1.0
        real_sync = b._coverage.sync
        done: list[bool] = []

        def sync_then_other_write(sym: str, tf: object) -> bool:
            out = real_sync(sym, tf)  # type: ignore[arg-type]
            if not done:
                done.append(True)
                a.write_candles(SYM, TF, fix)  # lands between b's sync and b's stamp
            return out

        monkeypatch.setattr(b._coverage, "sync", sync_then_other_write)
        b.write_candles(SYM, TF, mine)
        monkeypatch.undo()
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=clock) as fresh:
        got = fresh.candles(SYM, TF, start=int(arr["ts"][0]), end=T)
        assert got["volume"][40] == mine["volume"][0] and got["volume"][60] == mine["volume"][1]
        assert got["close"][50] == 123.0  # before the fix: the candle from before a's correction


# ---------------------------------------------------------------------------------------------
# 7. Where LMDB's retention cuts coverage, gaps() calls part of a traded interval no_trades.
@pytest.mark.parametrize("tiers", FAST)
def test_the_retention_edge_is_never_labelled_no_trades(tmp_path: Path, tiers: tuple) -> None:
    """Without a durable tier Coverage.of intersects the coverage with what the fast tiers hold
    (coverage.py:53-56), and LMDB's held ranges are cut at its retention cutoff,
    ``clock() - disk_days`` (LmdbTier.held_many), which is not on the timeframe's grid (here
    30 s into a minute; with a wall clock, almost always). The candle that opened before the
    cutoff is no longer answered (missing, rightly), but coverage now starts mid-interval, so
    gaps() reports a ``no_trades`` gap over the second half of that minute (and coverage() a
    range starting mid-candle), though that minute had a candle: every minute here did. The
    evicted interval should be ``missing`` whole."""
    arr = history(3000)  # dense: every minute traded; the last day of it inside disk_days=1
    cfg = Config(tiers=tiers, disk_days=1, memory_candles=50)
    with mds.open(tmp_path, config=cfg, clock=clock) as st:
        st.write_candles(SYM, TF, arr, complete=(int(arr["ts"][0]), T))
        gaps = st.gaps(SYM, TF, start=int(arr["ts"][0]), end=T)
        assert [g for g in gaps if g.kind == "no_trades"] == []  # before the fix: [T - 1439.5 min, T - 1439 min)
        assert all(a % MIN == 0 for a, _ in st.coverage(SYM, TF))  # before the fix: a start 30 s into a minute
