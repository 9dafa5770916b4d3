"""Issue 14 items 11 and 12 (SQLite part): automatic upkeep that upkeeps, honest maintenance
reports, and the commit sequence a store compares to notice lost acknowledged commits."""

from __future__ import annotations

import contextlib

import _relutil as R
import numpy as np
import pytest

from mds.errors import InvalidCandleError, MdsError
from mds.tiers.sqlite import CHUNK_SLOTS, SqliteStore
from mds.timeframes import parse_timeframe

M1 = parse_timeframe("1m")
MIN = R.MIN
SYMS = ("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL")


def _history(n: int, marker: float = 1.0) -> np.ndarray:
    return R.marked(R.T0 + MIN * np.arange(n), marker)


def test_scheduled_maintenance_hands_free_pages_back(tmp_path):
    # The seed's criterion: fragmentation (free-page share) < 15% with automatic upkeep. The step
    # ran PRAGMA incremental_vacuum without stepping it to the end, which frees one page per run.
    clock = R.Clock()
    s = SqliteStore(tmp_path / "c.sqlite3", maintenance_interval_s=60, compress_after_days=None, clock=clock)
    for i, sym in enumerate(SYMS):
        s.write(sym, M1, _history(20 * CHUNK_SLOTS, float(i + 1)))
    for sym in SYMS[1:3]:
        s.delete(sym, M1)
    s.delete(SYMS[3], M1, R.T0, R.T0 + 10 * CHUNK_SLOTS * MIN)  # half of another series
    before = s.fragmentation()
    assert before > 0.4
    shares = []
    live = R.T0 + 20 * CHUNK_SLOTS * MIN
    for run in range(5):  # keep writing; each commit after the interval runs the scheduled step
        clock.t += 61_000
        s.write(SYMS[0], M1, R.marked([live + run * MIN], 9.0))
        shares.append(s.fragmentation())
    assert shares[-1] < s.vacuum_threshold == 0.15, shares
    assert max(shares[1:]) < 0.15, shares  # and it stays there
    assert len(s.read_latest(SYMS[0], M1, 10**6)) == 20 * CHUNK_SLOTS + 5
    assert s.integrity_problems() == []
    s.close()


def test_maintain_says_whether_statistics_were_recomputed(tmp_path):
    s = SqliteStore(tmp_path / "a.sqlite3", maintenance_interval_s=None, compress_after_days=None)
    s.write(SYMS[0], M1, _history(2 * CHUNK_SLOTS))

    def stat(table):
        rows = s._conn_().execute("SELECT stat FROM sqlite_stat1 WHERE tbl = ?", (table,)).fetchall()
        return rows[0][0] if rows else None

    first = s.maintain()
    assert (first["vacuumed"], first["analyzed"]) == (False, True)  # no statistics yet: ANALYZE
    assert stat("tail") is not None
    same = s.maintain()
    assert (same["vacuumed"], same["analyzed"]) == (False, False)  # optimize: nothing to redo
    old = stat("tail")
    for i in range(40):  # the live edge of 40 more series: the tail table grows 41-fold
        s.write(f"KRW-X{i:02d}", M1, _history(3, float(i + 2)))
    assert len(s.read_latest("KRW-X07", M1, 3)) == 3  # optimize looks at tables this connection used
    grown = s.maintain()
    assert (grown["vacuumed"], grown["analyzed"]) == (False, True)  # optimize ran an ANALYZE
    assert stat("tail") != old
    again = s.maintain()
    assert again["analyzed"] is False
    assert s.maintain(force=True)["analyzed"] is True
    s.close()


def test_commit_seq_counts_committed_data_changes_once_each(tmp_path):
    path = tmp_path / "seq.sqlite3"
    s = SqliteStore(path, maintenance_interval_s=None, compress_after_days=0.0, clock=R.Clock())
    a = _history(3 * CHUNK_SLOTS)
    assert s.commit_seq() == 0
    s.write(SYMS[0], M1, a[:1000])
    assert s.commit_seq() == 1
    with s.transaction():  # many calls, one transaction: one step
        s.write(SYMS[0], M1, a[1000:2000])
        s.write(SYMS[1], M1, a[:10])
        s.add_coverage(SYMS[0], M1, [[R.T0, R.T0 + MIN]])
    assert s.commit_seq() == 2
    s.add_coverage(SYMS[1], M1, [[R.T0, R.T0 + 10 * MIN]])
    assert s.commit_seq() == 3
    assert s.delete(SYMS[1], M1, R.T0, R.T0 + 5 * MIN) == 5
    assert s.commit_seq() == 4
    for i in range(2000, 2005):  # live-edge writes, one transaction each
        s.write(SYMS[0], M1, a[i : i + 1])
    assert s.commit_seq() == 9

    # nothing is counted for what did not commit or changed no data
    def given_up():
        with s.transaction():
            s.write(SYMS[0], M1, a[2005:2100])
            raise RuntimeError("the caller gave up")

    def swallowed():
        with s.transaction():
            s.write(SYMS[0], M1, a[2005:2100])
            with contextlib.suppress(OSError), s.transaction():
                raise OSError("inner")

    bad = a[2005:2006].copy()
    bad["close"] = 0.0
    with pytest.raises(RuntimeError):
        given_up()
    with pytest.raises(MdsError, match="rolled back"):
        swallowed()
    with pytest.raises(InvalidCandleError):
        s.write(SYMS[0], M1, bad)
    assert s.delete("KRW-NONE", M1) == 0
    s.add_coverage(SYMS[0], M1, [])
    assert s.quarantine_damaged(SYMS[0], M1) == []
    assert s.maintain(force=True)["compressed_chunks"] >= 1  # rewrites chunks, same data
    s.maybe_maintain()
    assert s.commit_seq() == 9
    assert len(s.read_range(SYMS[0], M1, R.T0, R.T0 + 3 * CHUNK_SLOTS * MIN)) == 2005

    # readers see it, it survives a reopen
    reader = SqliteStore(path, readonly=True)
    assert reader.commit_seq() == 9
    s.write(SYMS[0], M1, a[2005:2006])
    assert reader.commit_seq() == 10
    reader.close()
    s.close()
    s = SqliteStore(path, maintenance_interval_s=None)
    assert s.commit_seq() == 10
    s.close()
