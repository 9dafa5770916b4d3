"""LMDB disk tier against the SQLite tier, in one run, on the same rows.

Run: ``python -m pytest benches/bench_lmdb.py --benchmark-columns=median,mean,min,max,rounds``
(CI: ``--benchmark-disable``, every body once, a few seconds).
Groups: ``lmdb-range`` (1,000 1m candles from the middle of 31 days: LMDB warm, LMDB on its first
read in a process (checksums verified), the SQLite tier, a naive apsw row table), ``lmdb-latest`` (latest 1,000),
``lmdb-bulk`` (1,000,000 1s candles into an empty environment, and the same 56 MB written to a
new file: the floor under any bulk load), ``lmdb-append`` (one closed 1m candle appended to a
series, the live write path).
Targets (issue 5): range read <= 25 us median and >= 5x faster than SQLite; bulk load
>= 10,000,000 candles/s.

The bulk group deletes each round's environment (and file) before the next, after one warm-up
round: a long-running machine writes into page-cache pages it reuses. On a freshly booted virtual
machine, pages the guest never touched cost the host a fault each: writing 56 MB into them took
130 ms here for the raw file write alone (and 145 ms for the LMDB load), against 10 ms for the
same write into reused pages. Compare the two rows of the group.
"""

from __future__ import annotations

import itertools
import os
import shutil

import apsw
import numpy as np
import pytest

from mds._dtypes import CANDLE_DTYPE
from mds.testing import dense_candles
from mds.tiers.disk import LmdbTier
from mds.tiers.sqlite import SqliteStore
from mds.timeframes import DAY_MS, MINUTE_MS, SECOND_MS, parse_timeframe

M1 = parse_timeframe("1m")
S1 = parse_timeframe("1s")
NOW = 1_750_000_000_000 - 1_750_000_000_000 % DAY_MS
SYM = "KRW-BTC"
DAYS = 31
RANGE = 1_000
BULK = 1_000_000


@pytest.fixture(scope="module")
def month() -> np.ndarray:
    return dense_candles(DAYS * 1440 - 10, NOW - DAYS * DAY_MS + 10 * MINUTE_MS, MINUTE_MS, seed=1)


@pytest.fixture(scope="module")
def tiers(tmp_path_factory, month):
    """The same 31 days of 1m candles in an LMDB tier and in the SQLite tier."""
    d = tmp_path_factory.mktemp("lmdb-range")
    disk = LmdbTier(d / "lmdb", clock=lambda: NOW)
    disk.put_range(SYM, M1, int(month["ts"][0]), NOW, month)
    db = SqliteStore(d / "candles.sqlite3", maintenance_interval_s=None, compress_after_days=None)
    db.write(SYM, M1, month)
    yield disk, db
    disk.close()
    db.close()


def _mid(month: np.ndarray) -> tuple[int, int, np.ndarray]:
    # Starts in the afternoon, so the 1,000 rows span two day chunks (the common, costlier case).
    i = len(month) // 2 + 700
    return int(month["ts"][i]), int(month["ts"][i + RANGE]), month[i : i + RANGE]


@pytest.mark.benchmark(group="lmdb-range")
def test_range_1000_lmdb(benchmark, tiers, month):
    disk, _ = tiers
    start, end, expect = _mid(month)
    got = benchmark(disk.get_range, SYM, M1, start, end)
    assert got.tobytes() == expect.tobytes()


@pytest.mark.benchmark(group="lmdb-range")
def test_range_1000_lmdb_first_read_in_process(benchmark, tiers, month):
    disk, _ = tiers
    start, end, expect = _mid(month)

    def forget():
        disk._handle().verified.clear()  # as after opening the environment in a new process

    got = benchmark.pedantic(disk.get_range, args=(SYM, M1, start, end), setup=forget, rounds=200)
    assert got.tobytes() == expect.tobytes()


@pytest.mark.benchmark(group="lmdb-range")
def test_range_1000_sqlite_tier(benchmark, tiers, month):
    _, db = tiers
    start, end, expect = _mid(month)
    got = benchmark(db.read_range, SYM, M1, start, end)
    assert got.tobytes() == expect.tobytes()


@pytest.mark.benchmark(group="lmdb-range")
def test_range_1000_apsw_row_table(benchmark, tmp_path, month):
    # The naive layout for context: one row per candle, primary key ts, rows into numpy.
    conn = apsw.Connection(str(tmp_path / "rows.sqlite3"))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE c (ts INTEGER PRIMARY KEY, open REAL, high REAL, low REAL, close REAL, volume REAL, value REAL)"
    )
    with conn:
        conn.executemany("INSERT INTO c VALUES (?, ?, ?, ?, ?, ?, ?)", month.tolist())
    start, end, expect = _mid(month)

    def read():
        rows = conn.execute("SELECT * FROM c WHERE ts >= ? AND ts < ? ORDER BY ts", (start, end)).fetchall()
        return np.array(rows, dtype=CANDLE_DTYPE)

    got = benchmark(read)
    assert got.tobytes() == expect.tobytes()
    conn.close()


@pytest.mark.benchmark(group="lmdb-latest")
def test_latest_1000_lmdb(benchmark, tiers, month):
    disk, _ = tiers
    got = benchmark(disk.get_latest, SYM, M1, RANGE, NOW)
    assert got.tobytes() == month[-RANGE:].tobytes()


@pytest.mark.benchmark(group="lmdb-latest")
def test_latest_1000_sqlite_tier(benchmark, tiers, month):
    _, db = tiers
    got = benchmark(db.read_latest, SYM, M1, RANGE, NOW)
    assert got.tobytes() == month[-RANGE:].tobytes()


@pytest.fixture(scope="module")
def bulk_rows() -> np.ndarray:
    # 1,000,000 1s candles: 11.6 days, inside the retention window, 278 one-hour chunks.
    return dense_candles(BULK, NOW - BULK * SECOND_MS, SECOND_MS, seed=2)


@pytest.mark.benchmark(group="lmdb-bulk")
def test_bulk_load_1m_candles(benchmark, tmp_path, bulk_rows):
    rows = bulk_rows
    start = NOW - BULK * SECOND_MS
    counter = itertools.count()
    opened: list[LmdbTier] = []

    def setup():
        if opened:  # the previous round's environment goes, as on a machine that reuses its page cache
            opened[-1].close()
            shutil.rmtree(opened[-1].path)
        t = LmdbTier(tmp_path / f"bulk{next(counter)}", clock=lambda: NOW, map_size=128 << 20)
        opened.append(t)
        return (t,), {}

    def load(t):
        return t.put_range(SYM, S1, start, NOW, rows)

    assert benchmark.pedantic(load, setup=setup, rounds=5, warmup_rounds=1, iterations=1) == BULK
    if benchmark.stats:
        benchmark.extra_info["candles_per_s"] = BULK / benchmark.stats.stats.median
    t = opened[-1]
    assert t.get_range(SYM, S1, start, NOW).tobytes() == rows.tobytes()
    assert t.stats()["entries"] == 278
    t.close()


@pytest.mark.benchmark(group="lmdb-bulk")
def test_bulk_write_same_bytes_to_a_new_file(benchmark, tmp_path, bulk_rows):
    # The floor: the rows' 56 MB written with one write() to a new file (page cache, no fsync),
    # as LMDB writes its pages to a new environment's file.
    data = bulk_rows.view(np.uint8).data
    counter = itertools.count()
    written: list[os.PathLike[str]] = []

    def setup():
        if written:  # as for the environments: the previous round's file goes first
            os.unlink(written[-1])
        written.append(tmp_path / f"raw{next(counter)}")
        return (written[-1],), {}

    def write(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    assert (
        benchmark.pedantic(write, setup=setup, rounds=5, warmup_rounds=1, iterations=1) == BULK * CANDLE_DTYPE.itemsize
    )


@pytest.mark.benchmark(group="lmdb-append")
def test_append_one_closed_1m_candle(benchmark, tmp_path):
    # The live path: each minute one closed candle joins today's chunk (rewritten whole).
    day = dense_candles(1440, NOW - DAY_MS, MINUTE_MS, seed=3)
    t = LmdbTier(tmp_path / "append", clock=lambda: NOW)
    t.put_range(SYM, M1, NOW - DAY_MS, NOW - DAY_MS + 60 * MINUTE_MS, day[:60])
    it = iter(range(60, 1440))

    def setup():
        i = next(it)
        ts = NOW - DAY_MS + i * MINUTE_MS
        return (ts, day[i : i + 1]), {}

    benchmark.pedantic(lambda ts, row: t.put_range(SYM, M1, ts, ts + MINUTE_MS, row), setup=setup, rounds=1000)
    assert t.check() == []
    t.close()
