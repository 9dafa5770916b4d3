"""The LMDB disk tier: held-range semantics, retention and TTL, map growth, damage, processes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import msgpack
import numpy as np
import pytest

from mds._dtypes import CANDLE_DTYPE
from mds.errors import StorageUnavailableError
from mds.tiers.disk import CHUNK_PERIOD_MS, LmdbTier
from mds.timeframes import DAY_MS, MINUTE_MS, TIMEFRAMES, parse_timeframe

M1 = parse_timeframe("1m")
S1 = parse_timeframe("1s")
NOW = 1_750_000_000_000 - 1_750_000_000_000 % DAY_MS + 13 * 3_600_000  # 13:00 UTC
SYM = "KRW-BTC"


class Clock:
    def __init__(self, t: int = NOW) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def candles(tf, start: int, n: int, seed: int = 0, skip: float = 0.0) -> np.ndarray:
    """``n`` aligned slots from ``start`` (some dropped with probability ``skip``), valid OHLCV."""
    rng = np.random.default_rng(seed)
    ts = np.array([tf.add(tf.ceil(start), i) for i in range(n)], dtype=np.int64)
    if skip:
        ts = ts[rng.random(n) >= skip]
    a = np.zeros(len(ts), CANDLE_DTYPE)
    a["ts"] = ts
    px = 100 + rng.random(len(ts))
    a["open"] = px
    a["close"] = px + 0.5
    a["high"] = px + 1
    a["low"] = px - 1
    a["volume"] = rng.random(len(ts))
    a["value"] = a["volume"] * px
    return a


def minutes(start: int, n: int, seed: int = 0, skip: float = 0.0) -> np.ndarray:
    return candles(M1, start, n, seed, skip)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tier(tmp_path: Path, clock: Clock):
    t = LmdbTier(tmp_path / "lmdb", clock=clock)
    yield t
    assert t.check() == []
    t.close()


def test_round_trip_across_chunk_boundaries(tier: LmdbTier) -> None:
    start = NOW - 5 * DAY_MS - 17 * MINUTE_MS
    a = minutes(start, 5 * 1440, seed=1, skip=0.1)
    end = NOW - 17 * MINUTE_MS
    assert tier.put_range(SYM, M1, start, end, a) == len(a)
    assert np.array_equal(tier.get_range(SYM, M1, start, end), a)
    # Arbitrary sub-ranges, crossing day chunks, are exactly the rows inside.
    rng = np.random.default_rng(2)
    for _ in range(50):
        s, e = sorted(rng.integers(start, end, 2).tolist())
        got = tier.get_range(SYM, M1, s, e)
        assert got is not None
        assert np.array_equal(got, a[(a["ts"] >= s) & (a["ts"] < e)])
        assert not got.flags.writeable
    assert tier.held(SYM, M1).tolist() == [[start, end]]


@pytest.mark.parametrize("name", sorted(TIMEFRAMES))
def test_round_trip_every_timeframe(tmp_path: Path, clock: Clock, name: str) -> None:
    tf = TIMEFRAMES[name]
    with LmdbTier(tmp_path / "lmdb", clock=clock, retention_ms=20 * 365 * DAY_MS) as t:
        start = tf.floor(NOW - 3 * 365 * DAY_MS)
        end = tf.floor(NOW)
        n = min(tf.count(start, end), 5000)
        a = candles(tf, start, n, seed=3)
        end = tf.add(int(a["ts"][-1]), 1)
        t.put_range(SYM, tf, start, end, a)
        assert np.array_equal(t.get_range(SYM, tf, start, end), a)
        assert np.array_equal(t.get_latest(SYM, tf, 7, end), a[-7:])
        assert t.check() == []


def test_range_not_fully_held_is_none(tier: LmdbTier) -> None:
    a = minutes(NOW - DAY_MS, 600)
    s, e = int(a["ts"][100]), int(a["ts"][400])
    tier.put_range(SYM, M1, s, e, a)
    assert tier.get_range(SYM, M1, s - MINUTE_MS, e) is None
    assert tier.get_range(SYM, M1, s, e + 1) is None
    assert tier.get_range("KRW-ETH", M1, s, e) is None
    assert tier.get_range(SYM, S1, s, e) is None
    assert len(tier.get_range(SYM, M1, s, s + 1)) == 1


def test_held_range_without_trades_answers_empty(tier: LmdbTier) -> None:
    s, e = NOW - 3 * DAY_MS, NOW - 2 * DAY_MS
    tier.put_range(SYM, M1, s, e, np.empty(0, CANDLE_DTYPE))
    got = tier.get_range(SYM, M1, s, e)
    assert got is not None
    assert len(got) == 0
    assert tier.held(SYM, M1).tolist() == [[s, e]]


def test_put_range_replaces_only_inside_its_range(tier: LmdbTier) -> None:
    a = minutes(NOW - 2 * DAY_MS, 2 * 1440, seed=4)
    s, e = int(a["ts"][0]), int(a["ts"][-1]) + MINUTE_MS
    tier.put_range(SYM, M1, s, e, a)
    # The source now says [m0, m1) holds only every third candle, with new prices.
    m0, m1 = int(a["ts"][1000]), int(a["ts"][2000])
    b = a[1000:2000:3].copy()
    b["close"] += 1
    tier.put_range(SYM, M1, m0, m1, b)
    want = np.concatenate([a[:1000], b, a[2000:]])
    assert np.array_equal(tier.get_range(SYM, M1, s, e), want)
    assert tier.held(SYM, M1).tolist() == [[s, e]]


def test_adjacent_and_overlapping_puts_merge_held(tier: LmdbTier) -> None:
    a = minutes(NOW - DAY_MS, 1000)
    t = a["ts"].tolist()
    tier.put_range(SYM, M1, t[0], t[300], a[:300])
    tier.put_range(SYM, M1, t[500], t[700], a[500:700])
    assert tier.held(SYM, M1).tolist() == [[t[0], t[300]], [t[500], t[700]]]
    tier.put_range(SYM, M1, t[300], t[500], a[300:500])
    tier.put_range(SYM, M1, t[600], t[900], a[600:900])
    assert tier.held(SYM, M1).tolist() == [[t[0], t[900]]]
    assert np.array_equal(tier.get_range(SYM, M1, t[0], t[900]), a[:900])


def test_get_latest_needs_a_held_range_reaching_back(tier: LmdbTier) -> None:
    a = minutes(NOW - 3 * DAY_MS, 3 * 1440 - 60, seed=5, skip=0.2)
    s, e = NOW - 3 * DAY_MS, NOW - 60 * MINUTE_MS
    tier.put_range(SYM, M1, s, e, a)
    assert np.array_equal(tier.get_latest(SYM, M1, 1000, e), a[-1000:])
    mid = int(a["ts"][2000])
    assert np.array_equal(tier.get_latest(SYM, M1, 1500, mid), a[500:2000])
    assert tier.get_latest(SYM, M1, len(a) + 1, e) is None  # would need rows before s
    assert tier.get_latest(SYM, M1, 10, e + MINUTE_MS) is None  # e is not held
    assert len(tier.get_latest(SYM, M1, 0, e)) == 0


def test_delete_removes_rows_and_held_range(tier: LmdbTier) -> None:
    a = minutes(NOW - 2 * DAY_MS, 2000)
    s, e = int(a["ts"][0]), int(a["ts"][-1]) + MINUTE_MS
    tier.put_range(SYM, M1, s, e, a)
    m0, m1 = int(a["ts"][500]), int(a["ts"][1700])
    assert tier.delete(SYM, M1, m0, m1) == 1200
    assert tier.get_range(SYM, M1, s, e) is None
    assert np.array_equal(tier.get_range(SYM, M1, s, m0), a[:500])
    assert np.array_equal(tier.get_range(SYM, M1, m1, e), a[1700:])
    assert tier.delete(SYM, M1) == 800
    assert tier.held(SYM, M1).shape == (0, 2)
    assert tier.stats()["entries"] == 0


def test_retention_keeps_only_the_recent_window(tmp_path: Path, clock: Clock) -> None:
    with LmdbTier(tmp_path / "lmdb", clock=clock, retention_ms=10 * DAY_MS, ttl_ms=100 * DAY_MS) as t:
        start = NOW - 20 * DAY_MS
        a = minutes(start, 20 * 1440, seed=6)
        t.put_range(SYM, M1, start, NOW, a)
        cutoff = NOW - 10 * DAY_MS
        assert t.held(SYM, M1).tolist() == [[cutoff, NOW]]
        assert t.get_range(SYM, M1, start, NOW) is None
        assert np.array_equal(t.get_range(SYM, M1, cutoff, NOW), a[a["ts"] >= cutoff])
        assert t.stats()["entries"] == 11  # ten whole days and the part of one
        clock.t += 3 * DAY_MS
        assert t.get_range(SYM, M1, cutoff, NOW) is None  # fell out of the window
        assert np.array_equal(t.get_range(SYM, M1, cutoff + 3 * DAY_MS, NOW), a[a["ts"] >= cutoff + 3 * DAY_MS])
        assert t.purge_expired() == 3
        assert t.held(SYM, M1).tolist() == [[cutoff + 3 * DAY_MS, NOW]]
        assert t.check() == []


def test_stale_chunks_without_loader_are_not_held(tmp_path: Path, clock: Clock) -> None:
    with LmdbTier(tmp_path / "lmdb", clock=clock, ttl_ms=DAY_MS) as t:
        a = minutes(NOW - 2 * DAY_MS, 1440)
        s, e = int(a["ts"][0]), int(a["ts"][-1]) + MINUTE_MS
        t.put_range(SYM, M1, s, e, a)
        clock.t += DAY_MS - 1
        assert t.get_range(SYM, M1, s, e) is not None
        clock.t += 2
        assert t.get_range(SYM, M1, s, e) is None
        assert t.get_latest(SYM, M1, 10, e) is None
        assert t.purge_expired() == 2
        assert t.held(SYM, M1).shape == (0, 2)
        assert t.stats()["entries"] == 0


def test_stale_chunk_is_refreshed_through_loader(tmp_path: Path, clock: Clock) -> None:
    a = minutes(NOW - 2 * DAY_MS, 1440, seed=7)
    source = a.copy()
    source["close"] += 10  # SQLite changed since the tier was filled (another writer)
    calls = []

    def loader(symbol, tf, start, end):
        calls.append((symbol, tf.name, start, end))
        return source[(source["ts"] >= start) & (source["ts"] < end)]

    with LmdbTier(tmp_path / "lmdb", clock=clock, ttl_ms=DAY_MS, loader=loader) as t:
        s, e = int(a["ts"][0]), int(a["ts"][-1]) + MINUTE_MS
        t.put_range(SYM, M1, s, e, a)
        assert np.array_equal(t.get_range(SYM, M1, s, e), a)
        assert calls == []
        clock.t += DAY_MS + 1
        assert np.array_equal(t.get_range(SYM, M1, s, e), source)
        # One load per stale chunk, limited to what is held.
        assert sorted(calls) == sorted(
            [(SYM, "1m", s, s - s % DAY_MS + DAY_MS), (SYM, "1m", s - s % DAY_MS + DAY_MS, e)]
        )
        assert t.get_range(SYM, M1, s, e) is not None
        assert len(calls) == 2  # fresh again
        assert t.stats()["refreshed_chunks"] == 2
        assert t.check() == []


def test_appended_chunk_keeps_its_oldest_write_time(tmp_path: Path, clock: Clock) -> None:
    day = NOW - NOW % DAY_MS
    a = minutes(day, 600)
    with LmdbTier(tmp_path / "lmdb", clock=clock, ttl_ms=DAY_MS) as t:
        t.put_range(SYM, M1, day, day + 300 * MINUTE_MS, a[:300])
        clock.t += DAY_MS // 2
        t.put_range(SYM, M1, day + 300 * MINUTE_MS, day + 600 * MINUTE_MS, a[300:])
        clock.t += DAY_MS // 2 + 1
        # The first half was written more than a TTL ago: the chunk as a whole is stale.
        assert t.get_range(SYM, M1, day + 400 * MINUTE_MS, day + 500 * MINUTE_MS) is None


def test_map_grows_when_full(tmp_path: Path, clock: Clock) -> None:
    with LmdbTier(tmp_path / "lmdb", clock=clock, map_size=1 << 20, map_size_cap=1 << 30) as t:
        start = S1.floor(NOW - 2 * DAY_MS)
        a = candles(S1, start, 100_000, seed=8)  # 5.6 MB
        end = int(a["ts"][-1]) + 1000
        t.put_range(SYM, S1, start, end, a)
        st = t.stats()
        assert st["map_size"] > 5_600_000
        assert st["map_resizes"] >= 1
        assert not st["degraded"]
        assert np.array_equal(t.get_range(SYM, S1, start, end), a)


def test_full_map_at_cap_degrades_without_losing_reads(tmp_path: Path, clock: Clock) -> None:
    with LmdbTier(tmp_path / "lmdb", clock=clock, map_size=1 << 20, map_size_cap=2 << 20) as t:
        small = minutes(NOW - DAY_MS, 100)
        s, e = int(small["ts"][0]), int(small["ts"][-1]) + MINUTE_MS
        t.put_range(SYM, M1, s, e, small)
        big = candles(S1, S1.floor(NOW - 2 * DAY_MS), 100_000)
        with pytest.raises(StorageUnavailableError, match="full"):
            t.put_range("KRW-ETH", S1, int(big["ts"][0]), int(big["ts"][-1]) + 1000, big)
        assert t.stats()["degraded"]
        assert t.held("KRW-ETH", S1).shape == (0, 2)  # the failed write changed nothing
        assert np.array_equal(t.get_range(SYM, M1, s, e), small)
        t.put_range(SYM, M1, e, e + MINUTE_MS, np.empty(0, CANDLE_DTYPE))  # small writes still fit
        assert not t.stats()["degraded"]


def _filled(path: Path, clock: Clock) -> tuple[LmdbTier, np.ndarray, int, int]:
    t = LmdbTier(path, clock=clock, map_size=8 << 20)
    a = minutes(NOW - 10 * DAY_MS, 10 * 1440, seed=9)
    s, e = int(a["ts"][0]), int(a["ts"][-1]) + MINUTE_MS
    t.put_range(SYM, M1, s, e, a)
    return t, a, s, e


def _refill_and_read(t: LmdbTier, a: np.ndarray, s: int, e: int) -> None:
    t.put_range(SYM, M1, s, e, a)
    assert np.array_equal(t.get_range(SYM, M1, s, e), a)
    assert t.check() == []


def test_failing_file_check_reads_none_then_reopens(tmp_path: Path, clock: Clock) -> None:
    # fstat of the tier's descriptor fails (here: the descriptor was closed under it): the read
    # treats the file as gone and answers None instead of raising; the tier reopens the path.
    t, a, s, e = _filled(tmp_path / "lmdb", clock)
    os.close(t._handle().fd)
    assert t.get_range(SYM, M1, s, e) is None
    assert np.array_equal(t.get_range(SYM, M1, s, e), a)
    os.close(t._handle().fd)
    assert t.get_latest(SYM, M1, 10, e) is None
    assert np.array_equal(t.get_latest(SYM, M1, 10, e), a[-10:])
    t.close()


def test_truncated_data_file_while_open_reads_none_then_refills(tmp_path: Path, clock: Clock) -> None:
    t, a, s, e = _filled(tmp_path / "lmdb", clock)
    data = tmp_path / "lmdb" / "data.mdb"
    os.truncate(data, 40_000)  # well below the committed pages (the file has slack past them)
    assert t.get_range(SYM, M1, s, e) is None
    assert t.stats()["recreated"] == 1
    _refill_and_read(t, a, s, e)
    t.close()


def test_truncated_data_file_at_open_is_recreated(tmp_path: Path, clock: Clock) -> None:
    t, a, s, e = _filled(tmp_path / "lmdb", clock)
    t.close()
    data = tmp_path / "lmdb" / "data.mdb"
    os.truncate(data, 100_000)
    with LmdbTier(tmp_path / "lmdb", clock=clock) as t2:
        assert t2.get_range(SYM, M1, s, e) is None
        _refill_and_read(t2, a, s, e)


@pytest.mark.parametrize("where", ["start", "middle", "everywhere"])
def test_garbage_in_data_file_is_detected(tmp_path: Path, clock: Clock, where: str) -> None:
    t, a, s, e = _filled(tmp_path / "lmdb", clock)
    t.close()
    data = tmp_path / "lmdb" / "data.mdb"
    size = os.path.getsize(data)
    rng = np.random.default_rng(10)
    with open(data, "r+b") as f:
        if where == "start":
            f.write(rng.bytes(8192))  # both meta pages
        elif where == "middle":
            for off in rng.integers(8192, size - 4096, 40):
                f.seek(int(off))
                f.write(rng.bytes(512))
        else:
            f.write(rng.bytes(size))
    with LmdbTier(tmp_path / "lmdb", clock=clock) as t2:
        got = t2.get_range(SYM, M1, s, e)
        # Damaged pages are either caught (None: not held) or missed by a scattered write;
        # never a crash, never rows other than the ones stored.
        assert got is None or np.array_equal(got, a)
        t2.get_latest(SYM, M1, 100, e)
        t2.held(SYM, M1)
        t2.check()
        t2.purge_expired()
        t2.clear()
        _refill_and_read(t2, a, s, e)


def _fuzz(seed: int, path: str) -> None:
    """Random garbage inside the committed pages of a closed environment, then every call."""
    clock = Clock()
    t, a, s, e = _filled(Path(path), clock)
    used = t.stats()["bytes"]
    t.close()
    rng = np.random.default_rng(seed)
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        for off in rng.integers(0, used - 64, int(rng.integers(1, 60))):
            f.seek(int(off))
            f.write(rng.bytes(int(rng.integers(1, 4096))))
    with LmdbTier(path, clock=clock) as t2:
        got = t2.get_range(SYM, M1, s, e)
        assert got is None or np.array_equal(got, a)
        t2.get_latest(SYM, M1, 100, e)
        t2.held(SYM, M1)
        t2.check()
        t2.purge_expired()
        _refill_and_read(t2, a, s, e)


def _run_fuzz(tmp_path: Path, seeds: list[int]) -> None:
    # In a child: a crash (SIGBUS, SIGSEGV inside LMDB) must fail the test, not end the run.
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import test_lmdb_tier as t\n"
        f"for s in {seeds!r}: t._fuzz(s, {str(tmp_path)!r} + '/f' + str(s))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_random_damage_never_crashes_a_reader(tmp_path: Path) -> None:
    # Seeds that once returned wrong rows (1, 2), flagged transactions (64, 73, 229) or crashed (135).
    _run_fuzz(tmp_path, [1, 2, 64, 73, 135, 229])


@pytest.mark.stress
def test_random_damage_never_crashes_a_reader_300_seeds(tmp_path: Path) -> None:
    _run_fuzz(tmp_path, list(range(1, 301)))


def test_garbage_chunk_value_is_not_parsed(tier: LmdbTier) -> None:
    a = minutes(NOW - DAY_MS, 100)
    s, e = int(a["ts"][0]), int(a["ts"][-1]) + MINUTE_MS
    tier.put_range(SYM, M1, s, e, a)
    h = tier._handle()
    with h.env.begin(write=True) as txn:
        key = next(iter(txn.cursor(db=h.chunks)))[0]
        txn.put(key, b"\x08\x06" + b"\x93\x01\xce\xff\xff\xff\xff" + b"x" * 100, db=h.chunks)
    assert tier.get_range(SYM, M1, s, e) is None
    assert tier.stats()["recreated"] == 1
    _refill_and_read(tier, a, s, e)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot delete a mapped LMDB file")
def test_deleted_data_file_while_open_is_recreated(tmp_path: Path, clock: Clock) -> None:
    t, a, s, e = _filled(tmp_path / "lmdb", clock)
    os.unlink(tmp_path / "lmdb" / "data.mdb")
    os.unlink(tmp_path / "lmdb" / "lock.mdb")
    assert t.get_range(SYM, M1, s, e) is None
    _refill_and_read(t, a, s, e)
    t.close()


@pytest.mark.skipif(
    sys.platform == "win32", reason="Windows cannot delete a mapped LMDB file, and has no POSIX modes"
)
def test_deleted_directory_while_open_is_recreated(tmp_path: Path, clock: Clock) -> None:
    import shutil

    t, a, s, e = _filled(tmp_path / "lmdb", clock)
    shutil.rmtree(tmp_path / "lmdb")
    assert t.get_range(SYM, M1, s, e) is None
    assert t.held(SYM, M1).shape == (0, 2)
    _refill_and_read(t, a, s, e)
    assert (os.stat(tmp_path / "lmdb").st_mode & 0o777) == 0o700
    t.close()


def test_other_format_version_is_cleared_on_open(tmp_path: Path, clock: Clock) -> None:
    t, _, s, e = _filled(tmp_path / "lmdb", clock)
    h = t._handle()
    with h.env.begin(write=True) as txn:
        txn.put(b"format", b"\x63", db=h.meta)  # 99
    t.close()
    with LmdbTier(tmp_path / "lmdb", clock=clock) as t2:
        assert t2.stats()["entries"] == 0
        assert t2.get_range(SYM, M1, s, e) is None


def test_two_tiers_in_one_process_share_the_environment(tmp_path: Path, clock: Clock) -> None:
    t1, a, s, e = _filled(tmp_path / "lmdb", clock)
    t2 = LmdbTier(tmp_path / "lmdb", clock=clock)
    assert np.array_equal(t2.get_range(SYM, M1, s, e), a)
    t1.close()
    assert np.array_equal(t2.get_range(SYM, M1, s, e), a)
    t2.close()
    with pytest.raises(StorageUnavailableError):
        t2.get_range(SYM, M1, s, e)


def test_randomised_operations_match_a_model(tmp_path: Path, clock: Clock) -> None:
    rng = np.random.default_rng(11)
    base = NOW - 6 * DAY_MS
    universe = minutes(base, 6 * 1440, seed=12)
    model = {}  # ts -> row bytes, for held minutes only
    held = np.zeros(6 * 1440, bool)
    with LmdbTier(tmp_path / "lmdb", clock=clock) as t:
        for step in range(150):
            i, j = sorted(rng.integers(0, 6 * 1440 + 1, 2).tolist())
            s, e = base + i * MINUTE_MS, base + j * MINUTE_MS
            op = rng.random()
            if op < 0.55:
                rows = universe[i:j][rng.random(j - i) >= 0.3].copy()
                rows["close"] += step
                t.put_range(SYM, M1, s, e, rows)
                for k in range(i, j):
                    model.pop(k, None)
                model.update({int((r["ts"] - base) // MINUTE_MS): r.tobytes() for r in rows})
                held[i:j] = True
            elif op < 0.7:
                removed = t.delete(SYM, M1, s, e)
                assert removed == sum(1 for k in list(model) if i <= k < j)
                for k in range(i, j):
                    model.pop(k, None)
                held[i:j] = False
            else:
                got = t.get_range(SYM, M1, s, e)
                if j > i and not held[i:j].all():
                    assert got is None
                else:
                    want = b"".join(model[k] for k in sorted(model) if i <= k < j)
                    assert got is not None
                    assert got.tobytes() == want
        assert t.check() == []


# -- two processes -------------------------------------------------------------------------------


def _writer(path: str, rounds: int, ready, done) -> None:
    t = LmdbTier(path, clock=lambda: NOW, map_size=1 << 20)
    ready.set()
    a = minutes(NOW - 2 * DAY_MS, 2 * 1440, seed=13)
    s = int(a["ts"][0])
    for r in range(rounds):
        b = a.copy()
        b["volume"] = r  # every row of one write carries the round number
        t.put_range(SYM, M1, s, s + 2 * DAY_MS, b)
    t.close()
    done.set()


def test_reader_process_sees_only_whole_commits(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    path = str(tmp_path / "lmdb")
    LmdbTier(path, clock=lambda: NOW).close()
    proc = ctx.Process(target=_writer, args=(path, 60, ready, done))
    proc.start()
    try:
        assert ready.wait(30)
        t = LmdbTier(path, clock=lambda: NOW)
        s = minutes(NOW - 2 * DAY_MS, 1)["ts"][0]
        seen = set()
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            got = t.get_range(SYM, M1, int(s), int(s) + 2 * DAY_MS)
            if got is not None:
                assert len(got) == 2 * 1440
                vols = np.unique(got["volume"])
                assert len(vols) == 1  # never half of one write and half of another
                seen.add(float(vols[0]))
        assert done.wait(30)
        final = t.get_range(SYM, M1, int(s), int(s) + 2 * DAY_MS)
        assert final is not None
        assert np.all(final["volume"] == 59)
        assert t.stats()["map_size"] > 1 << 20  # adopted the writer's resize
        assert t.check() == []
        t.close()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    assert seen


def test_chunk_periods_cover_every_timeframe() -> None:
    assert set(CHUNK_PERIOD_MS) == set(TIMEFRAMES)
    assert all(p % 3_600_000 == 0 for p in CHUNK_PERIOD_MS.values())


def test_lmdb_errors_are_not_exported() -> None:
    assert issubclass(StorageUnavailableError, OSError)
    assert not issubclass(lmdb.Error, StorageUnavailableError)


@pytest.mark.parametrize("name", ["1s", "1m", "1h", "1w", "1M"])
@pytest.mark.parametrize("skip", [0.0, 0.3, 0.9])
def test_every_sub_range_matches_numpy_with_and_without_gaps(
    tmp_path: Path, clock: Clock, name: str, skip: float
) -> None:
    # The read computes cut indices from the interval in gap-free chunks and falls back to a
    # search elsewhere (gaps, calendar months): both must equal a plain searchsorted slice.
    tf = parse_timeframe(name)
    n = {"1s": 9000, "1m": 4000, "1h": 700, "1w": 4, "1M": 1}[name]
    with LmdbTier(tmp_path / "lmdb", clock=clock) as t:
        a = candles(tf, clock.t - 30 * DAY_MS, n, seed=7, skip=skip)
        if not len(a):
            return
        s0, e0 = int(a["ts"][0]), int(a["ts"][-1]) + 1
        t.put_range(SYM, tf, s0, e0, a)
        rng = np.random.default_rng(5)
        ts = a["ts"]
        for _ in range(150):
            s, e = sorted(int(x) for x in rng.integers(s0, e0 + 1, 2))
            s -= int(rng.integers(0, 2))  # also one ms before a row
            s = max(s, s0)
            if e <= s:
                continue
            got = t.get_range(SYM, tf, s, e)
            assert got is not None
            assert got.tobytes() == a[ts.searchsorted(s) : ts.searchsorted(e)].tobytes()
            k = int(rng.integers(1, len(a) + 1))
            lat = t.get_latest(SYM, tf, k, e)
            want = a[: ts.searchsorted(e)][-k:]
            assert (lat is None and len(want) < k) or lat.tobytes() == want.tobytes()
        assert t.check() == []


def test_read_results_are_new_read_only_aligned_arrays(tier: LmdbTier) -> None:
    a = minutes(NOW - DAY_MS, 1000)
    s, e = int(a["ts"][0]), int(a["ts"][-1]) + MINUTE_MS
    tier.put_range(SYM, M1, s, e, a)
    for got in (tier.get_range(SYM, M1, s + 300 * MINUTE_MS, e), tier.get_latest(SYM, M1, 10, e)):
        assert got.dtype == CANDLE_DTYPE and got.flags.c_contiguous and got.flags.aligned
        assert not got.flags.writeable
        with pytest.raises(ValueError):
            got["close"][0] = 1.0
    first = tier.get_range(SYM, M1, s, e)
    tier.put_range(SYM, M1, s, e, minutes(NOW - DAY_MS, 1000, seed=9))
    assert first.tobytes() == a.tobytes()  # a copy: unchanged by later writes


def test_changed_chunk_header_is_checked_again(tier: LmdbTier) -> None:
    # A remembered chunk version is recognised by its header bytes; a value whose header differs
    # (here: the same rows, another checksum) is parsed and checked in full, and refused.
    a = minutes(NOW - DAY_MS, 100)
    s, e = int(a["ts"][0]), int(a["ts"][-1]) + MINUTE_MS
    tier.put_range(SYM, M1, s, e, a)
    assert tier.get_range(SYM, M1, s, e).tobytes() == a.tobytes()
    h = tier._handle()
    assert len(h.verified) == 1
    with h.env.begin(write=True) as txn:
        key, val = (bytes(x) for x in next(iter(txn.cursor(db=h.chunks))))
        hl, m = val[0], val[1]
        head = msgpack.unpackb(val[2 : 2 + m])
        head[3] = (head[3] + 1) % (1 << 64)
        new = msgpack.packb(head)
        assert len(new) == m
        txn.put(key, val[:2] + new + val[2 + m :], db=h.chunks)
    assert hl == h.verified[key][1]
    assert tier.get_range(SYM, M1, s, e) is None  # checksum mismatch: damage, recreated
    assert tier.stats()["recreated"] == 1
    _refill_and_read(tier, a, s, e)


# -- files: allocation, planted links, read-only (issue 14, items 2, 4 and 8) --------------------


def _holes(path: Path) -> bool:
    from mds._files import has_holes

    fd = os.open(path, os.O_RDONLY)
    try:
        return has_holes(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_lock_file_has_its_blocks_before_lmdb_maps_it(tmp_path: Path, clock: Clock) -> None:
    # liblmdb creates lock.mdb with ftruncate (sparse) and maps it: on a full disk the first
    # touch of a page without a block is a SIGBUS. The tier creates it allocated, and allocates
    # an existing sparse one (left by an older version) before LMDB opens it.
    with LmdbTier(tmp_path / "lmdb", clock=clock):
        lock = tmp_path / "lmdb" / "lock.mdb"
        assert lock.stat().st_size >= 8192
        assert not _holes(lock)
    os.truncate(lock, 0)
    os.truncate(lock, 8192)  # sparse again, as liblmdb leaves it
    assert _holes(lock)
    with LmdbTier(tmp_path / "lmdb", clock=clock):
        assert not _holes(lock)
        assert lock.stat().st_size == 8192  # an existing size is kept: it fixes the reader slots


@pytest.mark.parametrize("entry", ["", "data.mdb", "lock.mdb", "recreate.lock"])
def test_planted_link_in_the_environment_is_refused(tmp_path: Path, clock: Clock, entry: str) -> None:
    _filled(tmp_path / "real", clock)[0].close()
    victim = tmp_path / "victim"
    if entry:
        env = tmp_path / "lmdb"
        env.mkdir(mode=0o700)
        victim.write_bytes(b"not LMDB's" * 1000)
        os.symlink(victim, env / entry)
    else:  # the environment directory itself: a link to another environment
        victim = tmp_path / "real"
        os.symlink(victim, tmp_path / "lmdb")
    before = {p.name: p.read_bytes() for p in ([victim] if entry else sorted(victim.iterdir()))}
    with pytest.raises(StorageUnavailableError, match="symbolic link"):
        LmdbTier(tmp_path / "lmdb", clock=clock)
    after = {p.name: p.read_bytes() for p in ([victim] if entry else sorted(victim.iterdir()))}
    assert after == before  # nothing written through the link, nothing recreated


def test_readonly_tier_reads_and_refuses_every_write(tmp_path: Path, clock: Clock) -> None:
    t, a, s, e = _filled(tmp_path / "lmdb", clock)
    t.close()
    data = (tmp_path / "lmdb" / "data.mdb").read_bytes()
    with LmdbTier(tmp_path / "lmdb", clock=clock, readonly=True) as ro:
        assert np.array_equal(ro.get_range(SYM, M1, s, e), a)
        assert np.array_equal(ro.get_latest(SYM, M1, 10, e), a[-10:])
        assert ro.held(SYM, M1).tolist() == [[s, e]]
        assert ro.check() == []
        for write in (
            lambda: ro.put_range(SYM, M1, e, e + MINUTE_MS, np.empty(0, CANDLE_DTYPE)),
            lambda: ro.delete(SYM, M1),
            ro.purge_expired,
            ro.clear,
        ):
            with pytest.raises(StorageUnavailableError, match="read-only"):
                write()
        assert np.array_equal(ro.get_range(SYM, M1, s, e), a)
    assert (tmp_path / "lmdb" / "data.mdb").read_bytes() == data


def test_readonly_tier_creates_nothing(tmp_path: Path, clock: Clock) -> None:
    with pytest.raises(StorageUnavailableError):
        LmdbTier(tmp_path / "lmdb", clock=clock, readonly=True)
    assert not (tmp_path / "lmdb").exists()
    (tmp_path / "lmdb").mkdir(mode=0o700)
    with pytest.raises(StorageUnavailableError):
        LmdbTier(tmp_path / "lmdb", clock=clock, readonly=True)
    assert not (tmp_path / "lmdb" / "data.mdb").exists()


def test_writable_tier_joins_a_readonly_one_in_the_same_process(tmp_path: Path, clock: Clock) -> None:
    t, a, s, e = _filled(tmp_path / "lmdb", clock)
    t.close()
    ro = LmdbTier(tmp_path / "lmdb", clock=clock, readonly=True)
    rw = LmdbTier(tmp_path / "lmdb", clock=clock)  # one environment per process: it is reopened writable
    b = minutes(e, 10, seed=3)
    rw.put_range(SYM, M1, e, e + 10 * MINUTE_MS, b)
    assert np.array_equal(ro.get_range(SYM, M1, s, e + 10 * MINUTE_MS), np.concatenate([a, b]))
    with pytest.raises(StorageUnavailableError):
        ro.clear()  # the tier stays read-only although the shared environment is writable
    rw.close()
    ro.close()


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """A small tmpfs at ``path`` (root only; skips otherwise), unmounted on exit."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def test_readonly_tier_on_a_read_only_file_system(tmp_path: Path, clock: Clock) -> None:
    with _tmpfs(tmp_path / "fs") as fs:
        t, a, s, e = _filled(fs / "lmdb", clock)
        t.close()
        files = {p.name: p.read_bytes() for p in (fs / "lmdb").iterdir()}
        _remount(fs, "ro")
        try:
            # liblmdb cannot open its lock file on a read-only file system: it reads without it.
            with LmdbTier(fs / "lmdb", clock=clock, readonly=True) as ro:
                assert np.array_equal(ro.get_range(SYM, M1, s, e), a)
                with pytest.raises(StorageUnavailableError, match="read-only"):
                    ro.put_range(SYM, M1, s, e, a)
            # Writable on a read-only file system: a typed error, and no attempt to recreate.
            with pytest.raises(StorageUnavailableError, match="Read-only file system"):
                LmdbTier(fs / "lmdb", clock=clock)
        finally:
            _remount(fs, "rw")
        assert {p.name: p.read_bytes() for p in (fs / "lmdb").iterdir()} == files


_NO_DAC_OVERRIDE = """
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
def drop():  # in the child before exec: root without CAP_DAC_OVERRIDE obeys file modes
    if libc.prctl(24, 1, 0, 0, 0):  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl")
sys.exit(subprocess.run(sys.argv[1:], preexec_fn=drop).returncode)
"""

_READ_WITHOUT_LOCK = """
import os, sys
sys.path.insert(0, {here!r})
import numpy as np, test_lmdb_tier as T
path = sys.argv[1]
try:
    os.close(os.open(os.path.join(path, "probe"), os.O_RDWR | os.O_CREAT, 0o600))
    print("dac-override")  # this environment cannot take the capability away
    sys.exit(0)
except PermissionError:
    pass
t = T.LmdbTier(path, clock=T.Clock(), readonly=True)
a = T.minutes(T.NOW - 10 * T.DAY_MS, 10 * 1440, seed=9)
s, e = int(a["ts"][0]), int(a["ts"][-1]) + T.MINUTE_MS
assert np.array_equal(t.get_range(T.SYM, T.M1, s, e), a)
assert t._handle().unlocked
print("ok")
"""


def test_readonly_tier_without_a_writable_lock_file(tmp_path: Path, clock: Clock) -> None:
    # A directory we may not write in and no lock file: liblmdb cannot create one (EACCES), so
    # the tier reads without it. Root would bypass the mode: the child runs without
    # CAP_DAC_OVERRIDE.
    with _tmpfs(tmp_path / "fs") as fs:
        t, _, _, _ = _filled(fs / "lmdb", clock)
        t.close()
        os.unlink(fs / "lmdb" / "lock.mdb")
        os.chmod(fs / "lmdb", 0o500)
        here = os.path.dirname(os.path.abspath(__file__))
        code = _READ_WITHOUT_LOCK.format(here=here)
        r = subprocess.run(
            [sys.executable, "-c", _NO_DAC_OVERRIDE, sys.executable, "-c", code, str(fs / "lmdb")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode == 0 and r.stdout.strip() == "dac-override":
            pytest.skip("cannot drop CAP_DAC_OVERRIDE here")
        if r.returncode and "prctl" in r.stderr:
            pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {r.stderr.strip()[-200:]}")
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
        assert not (fs / "lmdb" / "lock.mdb").exists()
