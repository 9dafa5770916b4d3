"""A hostile review of stores without a durable tier (after 5b7bfd7): each test one finding,
written as what a user should get, each failing before the fix that followed it.
``tiers=("memory", "disk")`` or ``("disk",)``: LMDB is the only persistent tier and the store
every process on the directory shares. "Another process" is a real one where the finding is about
processes (a child started with ``python -c``); two Store objects in this process where the same
change stamps (changes.bin) carry it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mds
import mds.store.health
from mds import Config
from mds.errors import StorageUnavailableError
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, dense_candles, generate_market
from mds.timeutil import to_ms

SYM, TF = "KRW-BTC", "1m"
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
T = to_ms("2025-01-06T00:00:00Z")  # the data end here (exclusive)
NOW = T + 30_000
FAST = [("disk",), ("memory", "disk")]


def clock() -> int:
    return NOW


def history(n: int = 500, step: int = MIN, seed: int = 3) -> np.ndarray:
    return dense_candles(n, T - n * step, step, seed=seed)


def in_other_process(path: Path, body: str) -> None:
    """Run ``body`` in a child process with ``st``: the store at ``path``, tiers memory + disk."""
    code = (
        "import sys, mds\n"
        f"with mds.open(sys.argv[1], config=mds.Config(tiers=('memory', 'disk')), clock=lambda: {NOW}) as st:\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60, env=dict(os.environ))


# ---------------------------------------------------------------------------------------------
# 1. A write whose span LMDB does not hold whole replaces the span with the batch alone.
#    Writer._merge_with_fast asks memory.range / LmdbTier.get_range for the whole span; both
#    answer None unless they hold all of it, and the fill then stores the batch's rows as
#    *exactly* the candles of [first, last + 1): every stored candle between them is dropped.
@pytest.mark.parametrize("tiers", FAST)
def test_correcting_an_old_candle_with_the_new_one_keeps_the_candles_between(tmp_path: Path, tiers: tuple) -> None:
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=clock) as st:
        st.write_candles(SYM, TF, arr[:499])  # stored up to the candle before the newest
        st.write_candles(SYM, TF, arr[[100, 499]])  # one old candle again, and the newest
        assert len(st.candles(SYM, TF, start=int(ts[0]), end=T)) == 500  # got 102
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=clock) as fresh:
        assert len(fresh.candles(SYM, TF, start=int(ts[0]), end=T)) == 500


@pytest.mark.parametrize("tiers", FAST)
def test_a_sparse_write_never_turns_stored_candles_into_no_trades(tmp_path: Path, tiers: tuple) -> None:
    """Same cause: the candles dropped lie inside coverage, so gaps() calls them no_trades."""
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=clock) as st:
        st.write_candles(SYM, TF, arr[:499], complete=(int(ts[0]), int(ts[499])))
        st.write_candles(SYM, TF, arr[[100, 499]])
        assert st.gaps(SYM, TF, start=int(ts[0]), end=T) == []  # got no_trades over 101..498


# ---------------------------------------------------------------------------------------------
# 2. Latest N with N beyond memory's window: Reader._latest_from_disk_ranges answers LMDB's parts
#    only, ignoring memory, whose window (memory_candles) can be far longer than LMDB's
#    disk_days (1d, 1h candles). Asking for one more candle than memory holds gives fewer.
def test_asking_for_one_more_candle_never_answers_fewer(tmp_path: Path) -> None:
    arr = history(200, DAY)
    with mds.open(tmp_path, config=Config(tiers=("memory", "disk")), clock=clock) as st:
        st.write_candles(SYM, "1d", arr)
        assert len(st.candles(SYM, "1d", count=200)) == 200
        assert len(st.candles(SYM, "1d", count=201)) == 200  # got 30 (LMDB's 31-day window)


# ---------------------------------------------------------------------------------------------
# 3. LMDB chunks older than disk_ttl_s (1 day) count as not held without a loader, and without a
#    durable tier there is none: data inside disk_days (31) stops being answered after a day.
#    A latest-N read then answers an empty array, silently (a range read raises; delete() raises,
#    so the series cannot even be deleted).
@pytest.mark.parametrize("tiers", FAST)
def test_candles_inside_disk_days_are_answered_a_day_later(tmp_path: Path, tiers: tuple) -> None:
    arr = history()
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=clock) as st:
        st.write_candles(SYM, TF, arr)
    later = NOW + 25 * HOUR
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=lambda: later) as st:
        assert st.candles(SYM, TF, count=10).tobytes() == arr[-10:].tobytes()  # got an empty array


def test_a_daily_recorder_reads_back_what_it_wrote(tmp_path: Path) -> None:
    """A boundary chunk keeps the older written-at when appended to, so a 1d series written
    every day still goes stale a day after its first write."""
    now = [NOW]
    arr = history(10, DAY)
    with mds.open(tmp_path, config=Config(tiers=("memory", "disk")), clock=lambda: now[0]) as st:
        st.write_candles(SYM, "1d", arr)
        for k in range(2):
            now[0] += DAY
            st.write_candles(SYM, "1d", dense_candles(1, T + k * DAY, DAY, seed=10 + k))
        st._health.states["memory"].obj.clear()  # as after memory_ttl_s unread, or a restart
        assert len(st.candles(SYM, "1d", count=5)) == 5  # got 0


# ---------------------------------------------------------------------------------------------
# 4. Write counts come from memory alone (writes._memory_counts): with ("disk",), or once memory
#    no longer holds the series (another process wrote it), rewritten candles count as inserted.
def test_write_counts_with_disk_only_tell_unchanged_from_inserted(tmp_path: Path) -> None:
    arr = history()
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=clock) as st:
        st.write_candles(SYM, TF, arr)
        got = st.write_candles(SYM, TF, arr)
        assert (got.inserted, got.updated, got.unchanged) == (0, 0, 500)  # got (500, 0, 0)


def test_write_counts_after_another_process_wrote_tell_updated_from_inserted(tmp_path: Path) -> None:
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=Config(tiers=("memory", "disk")), clock=clock) as st:
        st.write_candles(SYM, TF, arr)
        # the other process writes the oldest candle again, unchanged: this one drops its memory
        in_other_process(
            tmp_path,
            f"one = st.candles({SYM!r}, {TF!r}, start={int(ts[0])}, end={int(ts[1])}).copy()\n"
            f"st.write_candles({SYM!r}, {TF!r}, one)",
        )
        fix = arr[-5:].copy()
        fix["close"] = fix["open"]
        got = st.write_candles(SYM, TF, fix)
        assert (got.inserted, got.updated) == (0, 5)  # got (5, 0)


# ---------------------------------------------------------------------------------------------
# 5. delete() never syncs with the change stamps before counting: coverage.fast_rows answers this
#    process's memory window first, which still holds what another process deleted.
def test_delete_counts_what_is_stored_after_another_process_deleted(tmp_path: Path) -> None:
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=Config(tiers=("memory", "disk")), clock=clock) as st:
        st.write_candles(SYM, TF, arr)
        st.candles(SYM, TF, count=100)  # this process's memory holds the newest candles
        in_other_process(tmp_path, f"assert st.delete({SYM!r}, {TF!r}, start={int(ts[-10])}) == 10")
        assert st.delete(SYM, TF, start=int(ts[-20])) == 10  # got 20: 10 of them were gone already


# ---------------------------------------------------------------------------------------------
# 6. series() (list_series -> stored_rows) reads memory before syncing the series' stamp: what
#    another process deleted is listed again (count, last) until the next call.
def test_series_after_another_process_deleted(tmp_path: Path) -> None:
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=Config(tiers=("memory", "disk")), clock=clock) as st:
        st.write_candles(SYM, TF, arr)
        st.candles(SYM, TF, count=100)
        in_other_process(tmp_path, f"st.delete({SYM!r}, {TF!r}, start={int(ts[-10])})")
        (info,) = st.series()
        assert (info.count, info.last) == (490, int(ts[-11]))  # got (500, ts[-1])


# ---------------------------------------------------------------------------------------------
# 7. LMDB cannot take a write (map full at disk_map_size_cap, an I/O error): put_disk degrades the
#    tier and the write returns a WriteResult, though LMDB, the only persistent tier, holds none
#    of it. When the tier is retried (5 s later) Tiers.tier() *clears* LMDB ("SQLite may have
#    been written"): every other series, written and acknowledged before, is gone too.
CAP = 1 << 20


def big() -> np.ndarray:
    return history(36_000, MIN, seed=4)  # 2 MB: more than the 1 MiB map


@pytest.mark.parametrize("tiers", FAST)
def test_a_write_lmdb_could_not_take_is_not_acknowledged(tmp_path: Path, tiers: tuple) -> None:
    rows = big()
    with mds.open(tmp_path, config=Config(tiers=tiers, disk_map_size_cap=CAP), clock=clock) as st:
        try:
            st.write_candles(SYM, TF, rows)
        except StorageUnavailableError:
            return  # refused: the user knows it was not stored
        with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=clock) as other:  # acknowledged: is it there?
            assert len(other.candles(SYM, TF, start=int(rows["ts"][0]), end=T)) == len(rows)  # got 0


@pytest.mark.parametrize("tiers", FAST)
def test_lmdb_back_in_service_keeps_the_series_it_held(
    tmp_path: Path, tiers: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = history()
    with mds.open(tmp_path, config=Config(tiers=tiers, disk_map_size_cap=CAP), clock=clock) as st:
        st.write_candles("KRW-ETH", TF, kept)
        with pytest.raises(StorageUnavailableError):  # LMDB, the only persistent tier, cannot take it
            st.write_candles(SYM, TF, big())
        monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)  # the retry interval passed
        if "memory" in tiers:
            st._health.states["memory"].obj.clear()  # memory_ttl_s later, or another process
        got = st.candles("KRW-ETH", TF, start=int(kept["ts"][0]), end=T)
        assert got.tobytes() == kept.tobytes()  # got an empty array: LMDB was cleared


# ---------------------------------------------------------------------------------------------
# 8. With a Layer 1: a range older than LMDB's retention is fetched and "stored" (LMDB drops it
#    as too old, memory ignores it as older than its window), then answered by _held_parts from
#    what the tiers hold: nothing. An empty array, where Layer 1 has the candles.
@pytest.mark.parametrize("lookup", ["storage_first", "layer1_first"])
def test_layer1_range_older_than_lmdb_retention_is_answered(tmp_path: Path, lookup: str) -> None:
    data = generate_market(SYM, "1d", T - 100 * DAY, T, seed=1)
    with FakeUpbit({(SYM, "1d"): data}, clock=clock, rate_limit=None) as up:
        router = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
        cfg = Config(tiers=("memory", "disk"), lookup=lookup)
        with mds.open(tmp_path, layer1=router, config=cfg, clock=clock) as st:
            st.candles(SYM, "1d", count=5)  # memory holds the newest days
            got = st.candles(SYM, "1d", start=T - 60 * DAY, end=T - 50 * DAY)
            want = data[(data["ts"] >= T - 60 * DAY) & (data["ts"] < T - 50 * DAY)]
            assert got.tobytes() == want.tobytes()  # got an empty array


# ---------------------------------------------------------------------------------------------
# 9. (minor, pre-existing, with a durable tier too) The forming candle a write kept in memory is
#    forgotten when the series' memory is dropped for any reason: a delete of old candles here,
#    or any write by another process (Coverage.forget).
@pytest.mark.parametrize("tiers", [("memory", "disk"), ("memory", "disk", "sqlite")])
def test_the_forming_candle_outlives_a_delete_of_old_candles(tmp_path: Path, tiers: tuple) -> None:
    arr = dense_candles(501, T - 500 * MIN, MIN, seed=3)  # the last one forms at NOW
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=clock) as st:
        st.write_candles(SYM, TF, arr)
        assert int(st.candles(SYM, TF, count=1, include_partial=True)["ts"][-1]) == T
        st.delete(SYM, TF, end=int(arr["ts"][10]))
        assert int(st.candles(SYM, TF, count=1, include_partial=True)["ts"][-1]) == T  # got T - 1 min
