"""SQLite tier against the naive approach, in one run.

The naive baseline is what Upbit bots usually do: stdlib ``sqlite3`` with its default settings, a
row per candle with ``PRIMARY KEY (symbol, timeframe, ts)``, ``INSERT OR REPLACE`` through
``executemany``, ``fetchall`` into a numpy array. ``naive_wal`` is the same table with WAL and
``synchronous=NORMAL`` (what mds uses), to show that the gap is the layout, not the fsync.

Run: ``python -m pytest benches/bench_sqlite.py --benchmark-columns=median,mean,min,max,rounds``
(CI: ``--benchmark-disable``, every body once, about 15 s: N stays 1,000,000).
Compare the medians within a group: ``sqlite-ingest``, ``sqlite-range``, ``sqlite-upsert``.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from mds._dtypes import CANDLE_DTYPE
from mds.testing import dense_candles
from mds.tiers.sqlite import SqliteStore
from mds.timeframes import DAY_MS, MINUTE_MS, parse_timeframe

M1 = parse_timeframe("1m")
N = 1_000_000
RANGE = 1_000
SERIES = 100
T0 = 1_600_000_000_000 - 1_600_000_000_000 % DAY_MS
SYM = "KRW-BTC"
FIELDS = "ts, open, high, low, close, volume, value"
NAIVE_DDL = (
    "CREATE TABLE IF NOT EXISTS candles (symbol TEXT, timeframe TEXT, ts INTEGER, open REAL, high REAL, "
    "low REAL, close REAL, volume REAL, value REAL, PRIMARY KEY (symbol, timeframe, ts))"
)
NAIVE_UPSERT = "INSERT OR REPLACE INTO candles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


def make_candles(n: int, start: int = T0, seed: int = 0) -> np.ndarray:
    return dense_candles(n, start, MINUTE_MS, seed=seed)


def naive_connect(path: Path, wal: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(NAIVE_DDL)
    conn.commit()
    return conn


def naive_write(conn: sqlite3.Connection, symbol: str, arr: np.ndarray) -> None:
    conn.executemany(NAIVE_UPSERT, [(symbol, "1m", *row) for row in arr.tolist()])
    conn.commit()


def naive_read(conn: sqlite3.Connection, symbol: str, start: int, end: int) -> np.ndarray:
    rows = conn.execute(
        f"SELECT {FIELDS} FROM candles WHERE symbol = ? AND timeframe = ? AND ts >= ? AND ts < ? ORDER BY ts",
        (symbol, "1m", start, end),
    ).fetchall()
    return np.array(rows, dtype=CANDLE_DTYPE)


@pytest.fixture(scope="module")
def million() -> np.ndarray:
    return make_candles(N, seed=1)


@pytest.fixture(scope="module")
def filled(tmp_path_factory, million):
    """An mds file and a naive file, each holding the same 1M-candle series (built once)."""
    d = tmp_path_factory.mktemp("sqlite-range")
    s = SqliteStore(d / "mds.sqlite3", maintenance_interval_s=None, compress_after_days=None)
    s.write(SYM, M1, million)
    z = SqliteStore(d / "mds-z.sqlite3", maintenance_interval_s=None, compress_after_days=0.0)
    z.write(SYM, M1, million)
    z.maintain()  # compresses every sealed chunk
    naive = naive_connect(d / "naive.sqlite3", wal=False)
    naive_write(naive, SYM, million)
    yield s, z, naive
    s.close()
    z.close()
    naive.close()


def _mid_range(million: np.ndarray) -> tuple[int, int, np.ndarray]:
    i = N // 2 + 123
    return int(million["ts"][i]), int(million["ts"][i + RANGE]), million[i : i + RANGE]


# --------------------------------------------------------------------------------------------
# bulk ingest of 1,000,000 candles into an empty file
# --------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="sqlite-ingest")
def test_ingest_1m_mds(benchmark, tmp_path, million):
    counter = itertools.count()
    stores: list[SqliteStore] = []

    def setup():
        s = SqliteStore(tmp_path / f"i{next(counter)}.sqlite3", maintenance_interval_s=None, compress_after_days=None)
        stores.append(s)
        return (s,), {}

    def ingest(s):
        return s.write(SYM, M1, million)

    result = benchmark.pedantic(ingest, setup=setup, rounds=5, iterations=1)
    assert result == (N, 0, 0)
    benchmark.extra_info["candles_per_s"] = N / benchmark.stats.stats.median if benchmark.stats else None
    for s in stores:
        s.close()


@pytest.mark.parametrize("wal", [False, True], ids=["naive", "naive_wal"])
@pytest.mark.benchmark(group="sqlite-ingest")
def test_ingest_1m_naive(benchmark, tmp_path, million, wal):
    counter = itertools.count()
    conns: list[sqlite3.Connection] = []

    def setup():
        c = naive_connect(tmp_path / f"n{next(counter)}.sqlite3", wal)
        conns.append(c)
        return (c,), {}

    benchmark.pedantic(lambda c: naive_write(c, SYM, million), setup=setup, rounds=3, iterations=1)
    assert conns[-1].execute("SELECT count(*) FROM candles").fetchone()[0] == N
    for c in conns:
        c.close()


# --------------------------------------------------------------------------------------------
# 1,000-candle range from the middle of a 1M series
# --------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="sqlite-range")
def test_range_1000_mds(benchmark, filled, million):
    s, _, _ = filled
    start, end, expect = _mid_range(million)
    got = benchmark(s.read_range, SYM, M1, start, end)
    assert got.tobytes() == expect.tobytes()


@pytest.mark.benchmark(group="sqlite-range")
def test_range_1000_mds_compressed_chunks(benchmark, filled, million):
    s, z, _ = filled
    start, end, expect = _mid_range(million)
    got = benchmark(z.read_range, SYM, M1, start, end)
    assert got.tobytes() == expect.tobytes()
    assert z.stats()["chunks_compressed"] > 900
    benchmark.extra_info["size_raw_bytes"] = s.size_bytes()
    benchmark.extra_info["size_compressed_bytes"] = z.size_bytes()


@pytest.mark.benchmark(group="sqlite-range")
def test_range_1000_naive(benchmark, filled, million):
    _, _, naive = filled
    start, end, expect = _mid_range(million)
    got = benchmark(naive_read, naive, SYM, start, end)
    assert got.tobytes() == expect.tobytes()


# --------------------------------------------------------------------------------------------
# upsert of the latest (live) candle of 100 series in one transaction
# --------------------------------------------------------------------------------------------
ROUNDS = 300
HISTORY = 2_000


def _live_batches() -> tuple[list[str], list[list[np.ndarray]]]:
    """Per round, for each series, a new closed candle one minute after the previous one."""
    syms = [f"KRW-C{i:03d}" for i in range(SERIES)]
    nxt = make_candles(ROUNDS + 1, start=T0 + HISTORY * MINUTE_MS, seed=3)
    rounds = [[nxt[r : r + 1].copy() for _ in syms] for r in range(ROUNDS + 1)]
    return syms, rounds


@pytest.mark.benchmark(group="sqlite-upsert")
def test_upsert_latest_100_series_mds(benchmark, tmp_path):
    s = SqliteStore(tmp_path / "live.sqlite3", maintenance_interval_s=None, compress_after_days=None)
    hist = make_candles(HISTORY, seed=2)
    for sym in [f"KRW-C{i:03d}" for i in range(SERIES)]:
        s.write(sym, M1, hist)
    syms, rounds = _live_batches()
    it = iter(rounds)

    def setup():
        return (next(it),), {}

    def upsert(batches):
        with s.transaction():
            for sym, b in zip(syms, batches):
                s.write(sym, M1, b)

    benchmark.pedantic(upsert, setup=setup, rounds=ROUNDS, iterations=1)
    assert s.read_latest(syms[0], M1, 1)["ts"][0] >= T0 + HISTORY * MINUTE_MS
    assert s.integrity_problems(full=False) == []
    s.close()


@pytest.mark.parametrize("wal", [False, True], ids=["naive", "naive_wal"])
@pytest.mark.benchmark(group="sqlite-upsert")
def test_upsert_latest_100_series_naive(benchmark, tmp_path, wal):
    conn = naive_connect(tmp_path / "live-naive.sqlite3", wal)
    hist = make_candles(HISTORY, seed=2)
    syms, rounds = _live_batches()
    for sym in syms:
        naive_write(conn, sym, hist)
    it = iter(rounds)

    def setup():
        return (next(it),), {}

    def upsert(batches):
        conn.executemany(NAIVE_UPSERT, [(sym, "1m", *b.tolist()[0]) for sym, b in zip(syms, batches)])
        conn.commit()

    benchmark.pedantic(upsert, setup=setup, rounds=ROUNDS, iterations=1)
    conn.close()
