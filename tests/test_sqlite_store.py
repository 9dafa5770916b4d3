"""The SQLite tier: round trips, live edge, rollback, coverage and gaps, migration, maintenance,
compression, errors, and one writer with one reader process on the same file."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import apsw
import numpy as np
import pytest

from mds import _kernels as K
from mds._dtypes import CANDLE_DTYPE
from mds.convert import candles_from_upbit
from mds.errors import InvalidCandleError, InvalidRequestError, MdsError, StorageUnavailableError
from mds.tiers.sqlite import CHUNK_SLOTS, SCHEMA_VERSION, TAIL_MAX, SqliteStore
from mds.tiers.sqlite.schema import _SCHEMA_V1
from mds.tiers.sqlite.writes import _row_ok
from mds.timeframes import DAY_MS, MINUTE_MS, parse_timeframe

M1 = parse_timeframe("1m")
M3 = parse_timeframe("3m")
D1 = parse_timeframe("1d")
W1 = parse_timeframe("1w")
MO = parse_timeframe("1M")
SYM = "KRW-BTC"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS  # a UTC midnight in 2023
DATA = Path(__file__).parent / "data"


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def candles(tf, start: int, n: int, seed: int = 0, skip: float = 0.0) -> np.ndarray:
    """``n`` aligned slots from ``start`` (some dropped with probability ``skip``), valid OHLCV."""
    rng = np.random.default_rng(seed)
    if tf.is_month:
        ts = np.array([tf.add(tf.ceil(start), i) for i in range(n)], dtype=np.int64)
    else:
        ts = tf.ceil(start) + np.arange(n, dtype=np.int64) * tf.interval_ms
    if skip:
        ts = ts[rng.random(n) >= skip]
    a = np.zeros(len(ts), CANDLE_DTYPE)
    a["ts"] = ts
    p = 5e7 * np.exp(np.cumsum(rng.normal(0, 1e-3, len(ts))))
    a["open"] = np.round(p, -3)
    a["close"] = np.round(p * (1 + rng.normal(0, 5e-4, len(ts))), -3)
    a["high"] = np.maximum(a["open"], a["close"]) + 1000 * rng.integers(0, 5, len(ts))
    a["low"] = np.minimum(a["open"], a["close"]) - 1000 * rng.integers(0, 5, len(ts))
    a["volume"] = np.round(rng.exponential(2, len(ts)), 8)
    a["value"] = a["volume"] * p
    return a


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture
def db(tmp_path):
    s = SqliteStore(tmp_path / "db" / "candles.sqlite3", maintenance_interval_s=None, compress_after_days=None)
    yield s
    assert s.closed or s.integrity_problems() == []
    s.close()


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tf", [M1, M3, D1, W1, MO], ids=lambda t: t.name)
def test_round_trip_returns_what_was_written(db, tf):
    n = 3 * CHUNK_SLOTS + 17 if not tf.is_month else 40
    a = candles(tf, T0 - 4000 * tf.interval_ms if not tf.is_month else 1_000_000_000_000, n, seed=1, skip=0.1)
    assert db.write(SYM, tf, a) == (len(a), 0, 0)
    assert same(db.read_range(SYM, tf, -(2**62), 2**62), a)
    mid = int(a["ts"][len(a) // 2])
    later = int(a["ts"][len(a) // 2 + 10])
    assert same(db.read_range(SYM, tf, mid, later), a[len(a) // 2 : len(a) // 2 + 10])
    assert same(db.read_latest(SYM, tf, 25), a[-25:])
    assert same(db.read_latest(SYM, tf, 5, end=mid), a[len(a) // 2 - 5 : len(a) // 2])
    assert same(db.read_from(SYM, tf, mid + 1, 7), a[len(a) // 2 + 1 : len(a) // 2 + 8])
    assert same(db.read_latest(SYM, tf, 10**6), a)
    assert db.last_ts(SYM, tf) == int(a["ts"][-1])
    assert db.series() == [(SYM, tf.name, len(a), int(a["ts"][0]), int(a["ts"][-1]))]


def test_reads_of_unknown_series_are_empty(db):
    assert len(db.read_range("KRW-ETH", M1, 0, 2**60)) == 0
    assert len(db.read_latest("KRW-ETH", M1, 10)) == 0
    assert len(db.read_from("KRW-ETH", M1, 0, 10)) == 0
    assert db.last_ts("KRW-ETH", M1) is None
    assert db.coverage("KRW-ETH", M1).shape == (0, 2)
    assert db.series() == []


def test_recorded_upbit_pages_round_trip(db):
    for name, tf in (("krw-btc_1m_smtm_raw200.json", M1), ("krw-btc_3m_smtm_200.json", M3)):
        a = K.sort_dedup(candles_from_upbit(json.loads((DATA / name).read_text())))
        assert db.write(SYM, tf, a) == (200, 0, 0)
        assert same(db.read_range(SYM, tf, int(a["ts"][0]), int(a["ts"][-1]) + 1), a)


def test_series_are_kept_apart(db):
    a = candles(M1, T0, 500, seed=1)
    b = candles(M1, T0, 500, seed=2)
    c = candles(M3, T0, 500, seed=3)
    db.write("KRW-BTC", M1, a)
    db.write("KRW-ETH", M1, b)
    db.write("KRW-BTC", M3, c)
    assert same(db.read_latest("KRW-BTC", M1, 1000), a)
    assert same(db.read_latest("KRW-ETH", M1, 1000), b)
    assert same(db.read_latest("KRW-BTC", M3, 1000), c)
    assert [s[:3] for s in db.series()] == [("KRW-BTC", "1m", 500), ("KRW-BTC", "3m", 500), ("KRW-ETH", "1m", 500)]


# --------------------------------------------------------------------------------------------
# upserts and the live edge
# --------------------------------------------------------------------------------------------
def test_reingest_is_idempotent_and_updates_are_counted(db):
    a = candles(M1, T0, 5000, seed=4)
    assert db.write(SYM, M1, a) == (5000, 0, 0)
    assert db.write(SYM, M1, a) == (0, 0, 5000)
    b = a[1000:1010].copy()
    b["close"] = b["open"]
    b["volume"] += 1
    assert db.write(SYM, M1, b) == (0, 10, 0)
    expect = a.copy()
    expect[1000:1010] = b
    assert same(db.read_range(SYM, M1, -(2**62), 2**62), expect)
    # overlapping batch: half existing (identical), half new
    c = candles(M1, int(a["ts"][-1]) + MINUTE_MS, 100, seed=5)
    assert db.write(SYM, M1, np.concatenate([expect[-100:], c])) == (100, 0, 100)


def test_live_candles_one_at_a_time_cross_the_fold(db):
    a = candles(M1, T0, 3 * TAIL_MAX + 5 + CHUNK_SLOTS, seed=6)
    db.write(SYM, M1, a[:CHUNK_SLOTS])
    for i in range(CHUNK_SLOTS, len(a)):
        assert db.write(SYM, M1, a[i : i + 1]) == (1, 0, 0)
        assert db.write(SYM, M1, a[i : i + 1]) == (0, 0, 1)
    assert same(db.read_range(SYM, M1, -(2**62), 2**62), a)
    assert same(db.read_latest(SYM, M1, 40), a[-40:])
    # rewrite a candle that now sits in a chunk and one on the edge
    for i in (CHUNK_SLOTS + 2, len(a) - 1):
        b = a[i : i + 1].copy()
        b["volume"] += 3
        assert db.write(SYM, M1, b) == (0, 1, 0)
        a[i] = b[0]
    assert same(db.read_range(SYM, M1, -(2**62), 2**62), a)
    assert db.integrity_problems() == []


def test_small_batches_on_the_edge_and_backfill(db):
    a = candles(M1, T0, 4000, seed=7)
    db.write(SYM, M1, a[2000:2100])
    db.write(SYM, M1, a[2100:2105])  # edge rows
    db.write(SYM, M1, a[0:2000])  # backfill below the edge
    db.write(SYM, M1, a[2105:4000])  # bulk past the edge
    assert same(db.read_range(SYM, M1, -(2**62), 2**62), a)


# --------------------------------------------------------------------------------------------
# failures change nothing
# --------------------------------------------------------------------------------------------
def test_invalid_batch_changes_nothing(db):
    a = candles(M1, T0, 100, seed=8)
    db.write(SYM, M1, a[:50])
    bad = a[50:].copy()
    bad["low"][30] = bad["high"][30] + 1
    with pytest.raises(InvalidCandleError) as err:
        db.write(SYM, M1, bad)
    assert err.value.rows == [30]
    assert err.value.reasons == ["low_above_body"]
    one = a[60:61].copy()
    one["ts"] += 1  # misaligned: the single-row path must reject it too
    with pytest.raises(InvalidCandleError):
        db.write(SYM, M1, one)
    with pytest.raises(InvalidCandleError):
        db.write(SYM, M1, a[::-1].copy())  # unsorted
    assert same(db.read_range(SYM, M1, -(2**62), 2**62), a[:50])


@pytest.mark.parametrize(
    "prices",
    [
        (1.0, 2.0, 0.0, 1.0),
        (1.0, 2.0, -0.0, 1.0),
        (1.0, 2.0, -1.0, 1.0),
        (0.0, 0.0, 0.0, 0.0),
        (-3.0, -1.0, -4.0, -2.0),
    ],
    ids=["low_zero", "low_minus_zero", "low_negative", "all_zero", "all_negative"],
)
def test_nonpositive_prices_are_refused_on_the_one_row_path(db, prices):
    # DESIGN.md section 6: a price <= 0 is invalid. Each row is otherwise consistent (low <= open,
    # close <= high), so only the price check can refuse it; _row_ok is the one-row twin of validate.
    one = candles(M1, T0, 1, seed=15)
    one["open"], one["high"], one["low"], one["close"] = prices
    assert _row_ok(one, M1) is False
    with pytest.raises(InvalidCandleError):
        db.write(SYM, M1, one)
    assert len(db.read_range(SYM, M1, -(2**62), 2**62)) == 0
    assert _row_ok(candles(M1, T0, 1, seed=15), M1) is True


def test_failing_write_rolls_back_the_whole_transaction(db):
    a = candles(M1, T0, 3000, seed=9)
    db.write(SYM, M1, a[:1000])
    bad = a[2000:2010].copy()
    bad["open"][3] = np.nan

    def batch_with_a_bad_write():
        with db.transaction():
            db.write(SYM, M1, a[1000:2000])
            db.add_coverage(SYM, M1, [[T0, T0 + 10 * MINUTE_MS]])
            db.write("KRW-ETH", M1, a)
            db.write(SYM, M1, bad)

    with pytest.raises(InvalidCandleError):
        batch_with_a_bad_write()
    assert same(db.read_range(SYM, M1, -(2**62), 2**62), a[:1000])
    assert len(db.read_latest("KRW-ETH", M1, 10)) == 0
    assert db.coverage(SYM, M1).shape == (0, 2)

    # a failure swallowed inside the block still dooms the transaction
    def batch_that_swallows_a_failure():
        with db.transaction():
            db.write(SYM, M1, a[1000:2000])
            with contextlib.suppress(OSError), db.transaction():
                raise OSError("inner")

    with pytest.raises(MdsError, match="rolled back"):
        batch_that_swallows_a_failure()
    assert same(db.read_range(SYM, M1, -(2**62), 2**62), a[:1000])
    with db.transaction():
        db.write(SYM, M1, a[1000:2000])
        db.write(SYM, M1, a[2000:])
    assert same(db.read_range(SYM, M1, -(2**62), 2**62), a)


class _FaultVFS(apsw.VFS):
    """Passes through to the default VFS; after ``fail_after`` writes every write raises SQLITE_IOERR."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fail_after: int | None = None
        self.writes = 0
        super().__init__(name, "")

    def xOpen(self, name, flags):
        return _FaultFile(self, name, flags)


class _FaultFile(apsw.VFSFile):
    def __init__(self, vfs: _FaultVFS, name, flags) -> None:
        self.vfs = vfs
        super().__init__("", name, flags)

    def xWrite(self, data, offset):
        v = self.vfs
        if v.fail_after is not None:
            if v.writes >= v.fail_after:
                raise apsw.IOError("injected I/O error")
            v.writes += 1
        super().xWrite(data, offset)


def test_io_error_mid_write_rolls_back(tmp_path):
    vfs = _FaultVFS("mds-fault")
    path = tmp_path / "f.sqlite3"
    try:
        s = SqliteStore(path, maintenance_interval_s=None, compress_after_days=None, _vfs="mds-fault")
        a = candles(M1, T0, 20 * CHUNK_SLOTS, seed=10)
        s.write(SYM, M1, a[: 5 * CHUNK_SLOTS], covered=[[T0, int(a["ts"][5 * CHUNK_SLOTS])]])
        vfs.fail_after, vfs.writes = 40, 0  # part of the next transaction's pages reach the WAL
        with pytest.raises(StorageUnavailableError, match="I/O error"):
            s.write(SYM, M1, a[5 * CHUNK_SLOTS :], covered=[[T0, int(a["ts"][-1])]])
        vfs.fail_after = None
        assert same(s.read_range(SYM, M1, -(2**62), 2**62), a[: 5 * CHUNK_SLOTS])
        s.close()
    finally:
        vfs.unregister()
    s = SqliteStore(path, maintenance_interval_s=None)
    assert same(s.read_range(SYM, M1, -(2**62), 2**62), a[: 5 * CHUNK_SLOTS])
    assert s.coverage(SYM, M1).tolist() == [[T0, int(a["ts"][5 * CHUNK_SLOTS])]]
    assert s.integrity_problems() == []
    assert s.write(SYM, M1, a[5 * CHUNK_SLOTS :]) == (15 * CHUNK_SLOTS, 0, 0)
    s.close()


def test_second_writer_gets_a_clear_error_after_the_busy_timeout(tmp_path):
    path = tmp_path / "busy.sqlite3"
    a = SqliteStore(path, maintenance_interval_s=None)
    b = SqliteStore(path, maintenance_interval_s=None, busy_timeout_ms=50)
    with a.transaction():
        a.write(SYM, M1, candles(M1, T0, 10))
        with pytest.raises(StorageUnavailableError, match="locked by another writer"):
            b.write(SYM, M1, candles(M1, T0 + DAY_MS, 10))
    assert b.write(SYM, M1, candles(M1, T0 + DAY_MS, 10)) == (10, 0, 0)
    a.close()
    b.close()


def test_files_that_are_not_mds_databases_are_refused(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 500)
    with pytest.raises(StorageUnavailableError, match="not an SQLite database"):
        SqliteStore(junk)
    newer = tmp_path / "newer.sqlite3"
    conn = apsw.Connection(str(newer))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageUnavailableError, match="newer"):
        SqliteStore(newer)
    with pytest.raises(StorageUnavailableError, match="cannot open"):
        SqliteStore(tmp_path / "missing.sqlite3", readonly=True)


def test_readonly_store_refuses_writes(tmp_path):
    path = tmp_path / "ro.sqlite3"
    SqliteStore(path).close()
    ro = SqliteStore(path, readonly=True)
    with pytest.raises(StorageUnavailableError, match="readonly"):
        ro.write(SYM, M1, candles(M1, T0, 3))
    ro.close()


# --------------------------------------------------------------------------------------------
# coverage and gaps
# --------------------------------------------------------------------------------------------
def test_coverage_merges_and_shrinks(db):
    m = MINUTE_MS
    db.add_coverage(SYM, M1, [[T0, T0 + 10 * m]])
    db.add_coverage(SYM, M1, [[T0 + 20 * m, T0 + 30 * m], [T0 + 10 * m, T0 + 12 * m]])  # adjacent merges
    assert db.coverage(SYM, M1).tolist() == [[T0, T0 + 12 * m], [T0 + 20 * m, T0 + 30 * m]]
    db.add_coverage(SYM, M1, [[T0 + 5 * m, T0 + 25 * m]])  # overlap bridges both
    assert db.coverage(SYM, M1).tolist() == [[T0, T0 + 30 * m]]
    db.write(SYM, M1, candles(M1, T0, 30, seed=11))
    assert db.delete(SYM, M1, T0 + 10 * m, T0 + 15 * m) == 5
    assert db.coverage(SYM, M1).tolist() == [[T0, T0 + 10 * m], [T0 + 15 * m, T0 + 30 * m]]
    assert db.delete(SYM, M1) == 25
    assert db.coverage(SYM, M1).shape == (0, 2)
    assert db.series() == []


def test_gaps_tell_no_trades_from_missing(db):
    m = MINUTE_MS
    a = candles(M1, T0, 60, seed=12)
    keep = np.ones(60, bool)
    keep[[10, 11, 12, 40]] = False  # quiet minutes inside the fetched range
    db.write(SYM, M1, a[keep], covered=[[T0, T0 + 50 * m]])
    gaps = db.gaps(SYM, M1, T0 - 5 * m, T0 + 70 * m)
    assert gaps == [
        (T0 - 5 * m, T0, "missing"),
        (T0 + 10 * m, T0 + 13 * m, "no_trades"),
        (T0 + 40 * m, T0 + 41 * m, "no_trades"),
        (T0 + 60 * m, T0 + 70 * m, "missing"),
    ]
    # a hole that straddles the coverage edge is split in two kinds
    assert db.delete(SYM, M1, T0 + 48 * m, T0 + 52 * m) == 4
    assert db.coverage(SYM, M1).tolist() == [[T0, T0 + 48 * m]]
    assert db.gaps(SYM, M1, T0 + 45 * m, T0 + 55 * m) == [(T0 + 48 * m, T0 + 52 * m, "missing")]
    db.add_coverage(SYM, M1, [[T0 + 45 * m, T0 + 50 * m]])
    assert db.gaps(SYM, M1, T0 + 45 * m, T0 + 55 * m) == [
        (T0 + 48 * m, T0 + 50 * m, "no_trades"),
        (T0 + 50 * m, T0 + 52 * m, "missing"),
    ]
    # default range: the coverage and the data
    whole = db.gaps(SYM, M1)
    assert whole[0][0] >= T0 and whole[-1][1] <= T0 + 60 * m


# --------------------------------------------------------------------------------------------
# schema migration
# --------------------------------------------------------------------------------------------
def test_migrates_a_version_1_file(tmp_path):
    path = tmp_path / "old.sqlite3"
    a = candles(M1, T0, 2500, seed=13, skip=0.05)
    d = candles(D1, T0 - 400 * DAY_MS, 300, seed=14)
    conn = apsw.Connection(str(path))
    conn.execute(_SCHEMA_V1)
    with conn:
        for sym, tf, arr in (("KRW-BTC", "1m", a), ("KRW-ETH", "1d", d)):
            conn.executemany(
                "INSERT INTO candles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(sym, tf, *row) for row in arr.tolist()]
            )
        conn.execute("INSERT INTO coverage VALUES ('KRW-BTC', '1m', ?, ?)", (T0, T0 + 100 * MINUTE_MS))
        conn.execute("INSERT INTO coverage VALUES ('KRW-XRP', '1m', ?, ?)", (T0, T0 + 5 * MINUTE_MS))
    conn.close()
    s = SqliteStore(path, maintenance_interval_s=None)
    assert s._pragma_int("user_version") == SCHEMA_VERSION
    assert s.commit_seq() == 1  # the migration is one commit
    assert same(s.read_range("KRW-BTC", M1, -(2**62), 2**62), a)
    assert same(s.read_range("KRW-ETH", D1, -(2**62), 2**62), d)
    assert s.coverage("KRW-BTC", M1).tolist() == [[T0, T0 + 100 * MINUTE_MS]]
    assert s.coverage("KRW-XRP", M1).tolist() == [[T0, T0 + 5 * MINUTE_MS]]
    assert s.integrity_problems() == []
    tables = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    assert "v1_candles" not in tables and "candles" not in tables
    s.close()
    SqliteStore(path).close()  # opening again is a no-op


# --------------------------------------------------------------------------------------------
# maintenance and compression
# --------------------------------------------------------------------------------------------
def test_maintain_lowers_fragmentation_after_heavy_deletes(tmp_path):
    s = SqliteStore(tmp_path / "m.sqlite3", maintenance_interval_s=None, compress_after_days=None)
    for i, sym in enumerate(("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL")):
        s.write(sym, M1, candles(M1, T0, 20 * CHUNK_SLOTS, seed=20 + i))
    for sym in ("KRW-ETH", "KRW-XRP", "KRW-SOL"):
        assert s.delete(sym, M1) == 20 * CHUNK_SLOTS
    s.delete("KRW-BTC", M1, T0, T0 + 10 * CHUNK_SLOTS * MINUTE_MS)
    before = s.fragmentation()
    assert before > 0.5
    report = s.maintain()
    assert report["vacuumed"] is True
    assert report["fragmentation_before"] == pytest.approx(before)
    assert report["fragmentation_after"] < 0.05
    assert report["size_after"] < report["size_before"] / 2
    assert report["problems"] == []
    assert len(s.read_latest("KRW-BTC", M1, 10**6)) == 10 * CHUNK_SLOTS
    again = s.maintain()
    # nothing changed since the ANALYZE after VACUUM: PRAGMA optimize has nothing to recompute
    assert again["vacuumed"] is False and again["analyzed"] is False
    with pytest.raises(InvalidRequestError), s.transaction():
        s.maintain()
    s.close()


def test_scheduled_maintenance_runs_after_commits_and_compresses_old_chunks(tmp_path):
    clock = Clock(T0 + 30 * DAY_MS)
    s = SqliteStore(tmp_path / "c.sqlite3", maintenance_interval_s=60, compress_after_days=7, clock=clock)
    old = candles(M1, T0, 8 * CHUNK_SLOTS, seed=30)  # about 6 days, all older than 7 days
    s.write(SYM, M1, old)
    raw_size = s.stats()["chunks_raw"]
    assert raw_size >= 7 and s.stats()["chunks_compressed"] == 0
    clock.t += 61_000
    s.write("KRW-ETH", M1, candles(M1, clock.t - 10 * MINUTE_MS, 3))  # commit triggers the step
    st = s.stats()
    assert st["chunks_compressed"] >= 7 and st["chunks_raw"] == 0
    assert same(s.read_range(SYM, M1, -(2**62), 2**62), old)
    assert same(s.read_latest(SYM, M1, 3000), old[-3000:])
    # updating a compressed chunk stores it raw again, and the data stays exact
    b = old[100:101].copy()
    b["volume"] += 1
    assert s.write(SYM, M1, b) == (0, 1, 0)
    old[100] = b[0]
    assert same(s.read_range(SYM, M1, -(2**62), 2**62), old)
    assert s.integrity_problems() == []
    assert s.maybe_maintain() is False  # not due yet
    s.close()


# --------------------------------------------------------------------------------------------
# two processes
# --------------------------------------------------------------------------------------------
BATCH = 40
ROUNDS = 60


def _writer(path: str, go) -> None:
    s = SqliteStore(path, maintenance_interval_s=None)
    a = candles(M1, T0, BATCH * ROUNDS, seed=40)
    go.wait(10)
    for r in range(ROUNDS):
        with s.transaction():
            s.write("KRW-BTC", M1, a[r * BATCH : (r + 1) * BATCH])
            s.write("KRW-ETH", M1, a[r * BATCH : (r + 1) * BATCH])
        time.sleep(0.002)
    s.close()


def _reader(path: str, go, out) -> None:
    s = SqliteStore(path, readonly=True)
    seen = set()
    go.set()
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            with s.transaction():
                x = s.read_latest("KRW-BTC", M1, 10**6)
                y = s.read_range("KRW-ETH", M1, -(2**62), 2**62)
            if len(x) != len(y) or len(x) % BATCH or x.tobytes() != y.tobytes():
                out.put(f"torn read: {len(x)} vs {len(y)}")
                return
            seen.add(len(x))
            if len(x) == BATCH * ROUNDS:
                break
        out.put(sorted(seen))
    finally:
        s.close()


def test_one_writer_and_one_reader_process_never_see_half_a_batch(tmp_path):
    path = str(tmp_path / "shared.sqlite3")
    SqliteStore(path).close()  # create the schema before either process starts
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    go = ctx.Event()
    out = ctx.Queue()
    w = ctx.Process(target=_writer, args=(path, go))
    r = ctx.Process(target=_reader, args=(path, go, out))
    r.start()
    w.start()
    w.join(30)
    r.join(30)
    assert w.exitcode == 0 and r.exitcode == 0
    seen = out.get(timeout=5)
    assert isinstance(seen, list), seen
    assert seen[-1] == BATCH * ROUNDS
    assert len(seen) > 2  # the reader saw intermediate states, each a whole batch
    s = SqliteStore(path, readonly=True)
    assert len(s.read_latest("KRW-BTC", M1, 10**6)) == BATCH * ROUNDS
    v = s.data_version()
    w2 = SqliteStore(path, maintenance_interval_s=None)
    w2.write("KRW-XRP", M1, candles(M1, T0, 5))
    assert s.data_version() != v
    w2.close()
    s.close()
