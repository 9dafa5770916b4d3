"""History on PostgreSQL (issue 16) against the naive approach on the same server, in one run.

Every mds figure goes through the public API (``mds.open(path, config=..., history=url)``,
``store.write_candles``, ``store.candles``); the server is a throwaway cluster started here (see
``tests/postgres/pg_cluster.py``: Unix socket only, ``fsync=off``, stopped at the end). Without
the PostgreSQL binaries or psycopg the benchmarks skip with the reason, unless
MDS_REQUIRE_POSTGRES=1, where they fail.

- ``pg-ingest``: one ``write_candles`` of 1,000,000 1m candles into a store whose only tier is the
  durable one on PostgreSQL (``tiers=("sqlite",)``), a fresh database each round, against a row
  per candle: psycopg's ``executemany`` of a prepared ``INSERT`` of (ts, open, high, low, close,
  volume, value) into a plain table in one transaction. Target: >= 10x.
- ``pg-range``: a 1,000-candle range from the middle of a 1M series, fast tiers off (answered by
  PostgreSQL each call), against ``SELECT ... WHERE ts >= %s AND ts < %s ORDER BY ts`` into a
  numpy CANDLE_DTYPE array. Target: >= 5x. Timed each in a run of its own, and again in
  alternating rounds of one run (``test_range_1000_interleaved``), where a slow phase of the
  machine falls on both and neither keeps the caches warm for itself.
- ``pg-threads``: 200 of those range reads by one thread against the same 200 split over four
  threads sharing the store (reads run on pooled connections off the store's lock); the
  ``speedup`` is one thread's median over four threads'. Reported, no target.
- ``pg-hit-beside-reads``: a memory hit (latest 100) while another thread reads 1,000-candle
  ranges of another series from the server, against the same hit alone, and against the hit
  beside the same reads kept on the store's lock (as before the read pool); 2,000 hits with an
  untimed 0.5 ms pause before each; means and maxima, which carry the waits. Reported.
- ``pg-feed-seen``: from host A's ``write_candles`` of a revised candle until host B's
  ``candles(count=50)`` answers it, B's memory holding the old one; ``listening`` against
  ``deaf`` (B's listening server process stopped just before A writes: B notices by its
  heartbeat). Target (DESIGN.md 7): within 1 s, both; medians and maxima in extra_info; the
  median is gated (``-m gate``), the one figure of this file that CI asserts.
- ``pg-memory-hit``: ``store.candles(count=1000)`` answered by the memory tier (default tiers,
  ``lookup="storage_first"``, no Layer 1) of a PostgreSQL-backed store against the same on a
  SQLite-backed store. Target: the same.

The ratios (baseline median / mds median) land in ``extra_info`` of whichever of the pair runs
second; no ratio is asserted (the one gate is ``pg-feed-seen``'s 1 s bound). With
``--benchmark-disable`` (CI: every body once) the ingest uses 100,000 candles instead of 1,000,000
(the naive row-per-candle insert of 1M alone takes about 20 s); the range series stays at 1M
(filled once with COPY): the whole file then takes about 15 s. Timed, it takes about 70 s
(three naive rounds of about 16-19 s each).

    taskset -c 1 .venv/bin/pytest benches/bench_postgres.py --benchmark-only --benchmark-columns=median,iqr
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _gate import gate

import mds
from mds import CANDLE_DTYPE, Config
from mds.testing import dense_candles
from mds.timeutil import to_ms

# the tests' throwaway cluster (tests/postgres/pg_cluster.py), one module under one name for both
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "postgres"))
from pg_cluster import Cluster, fresh_database, running_cluster

MIN = 60_000
T_END = to_ms("2025-01-06T00:00:00Z")  # the series end here (exclusive)
NOW = T_END + 30_000  # the stores' fixed clock: no upkeep runs, nothing gets compressed
SYM = "KRW-BTC"
N = 1_000_000
N_DISABLED = 100_000  # ingest size under --benchmark-disable
RANGE = 1_000
FIELDS = "ts, open, high, low, close, volume, value"
NAIVE_DDL = (
    "CREATE TABLE naive (ts bigint PRIMARY KEY, open float8, high float8, low float8, close float8,"
    " volume float8, value float8)"
)
NAIVE_INSERT = f"INSERT INTO naive ({FIELDS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
NAIVE_RANGE = f"SELECT {FIELDS} FROM naive WHERE ts >= %s AND ts < %s ORDER BY ts"
HIT_WAIT_S = 20.0  # bound of the wait for the change feed (a PostgreSQL store's memory hits need it)

#: Medians (s) of this run's benchmarks, for the in-run ratios.
_MEDIANS: dict[str, float] = {}


def candles(n: int) -> np.ndarray:
    return dense_candles(n, T_END - n * MIN, MIN, seed=1)


def clock() -> int:
    return NOW


def _ratio(benchmark: Any, key: str, name: str, numerator: str, denominator: str) -> None:
    """Keep this benchmark's median under ``key``; once both sides of the pair are known, put
    ``median(numerator) / median(denominator)`` into extra_info as ``name``."""
    if benchmark.disabled or benchmark.stats is None:
        return
    _MEDIANS[key] = float(benchmark.stats.stats.median)
    benchmark.extra_info["median_s"] = float(f"{_MEDIANS[key]:.4g}")
    if numerator in _MEDIANS and denominator in _MEDIANS:
        benchmark.extra_info[name] = float(f"{_MEDIANS[numerator] / _MEDIANS[denominator]:.3g}")


def _hits(st: mds.Store) -> dict[str, int]:
    return {k: int(v) for k, v in st.stats()["hits"].items()}


@pytest.fixture(scope="module")
def pg() -> Iterator[Cluster]:
    with running_cluster() as cluster:
        yield cluster


# ---------------------------------------------------------------------------------------------
# pg-ingest: 1,000,000 candles into an empty database
# ---------------------------------------------------------------------------------------------
@contextmanager
def fresh_rounds(
    benchmark: Any, pg: Cluster, prepare: Callable[[ExitStack, str], Any], run: Callable[[Any], Any], rounds: int
) -> Iterator[tuple[Any, Any]]:
    """``benchmark.pedantic(run, ...)`` where each round's untimed setup is ``prepare(stack, url)``
    on a fresh database; yields the last result and the last prepared object, still open.
    Everything prepared is closed, and every database dropped, on exit."""
    prepared: list[Any] = []
    with ExitStack() as stack:

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            prepared.append(prepare(stack, stack.enter_context(fresh_database(pg))))
            return (prepared[-1],), {}

        result = benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
        yield result, prepared[-1]


@pytest.mark.benchmark(group="pg-ingest")
def test_ingest_1m_store_postgres(benchmark: Any, pg: Cluster, tmp_path: Path) -> None:
    n = N_DISABLED if benchmark.disabled else N
    arr = candles(n)
    names = itertools.count()

    def open_store(stack: ExitStack, url: str) -> mds.Store:
        cfg = Config(tiers=("sqlite",))
        return stack.enter_context(mds.open(tmp_path / f"s{next(names)}", config=cfg, clock=clock, history=url))

    def ingest(st: mds.Store) -> Any:
        return st.write_candles(SYM, "1m", arr)

    with fresh_rounds(benchmark, pg, open_store, ingest, rounds=5) as (result, st):
        assert (result.inserted, result.updated, result.unchanged) == (n, 0, 0)
        assert st.candles(SYM, "1m", start=int(arr["ts"][0]), end=T_END).tobytes() == arr.tobytes()
    benchmark.extra_info.update(candles=n, tiers="sqlite (the durable tier, on PostgreSQL)")
    _ratio(benchmark, "ingest_store", "naive_over_store", "ingest_naive", "ingest_store")
    if "ingest_store" in _MEDIANS:
        benchmark.extra_info["candles_per_s"] = float(f"{n / _MEDIANS['ingest_store']:.3g}")


@pytest.mark.benchmark(group="pg-ingest")
def test_ingest_1m_naive_executemany(benchmark: Any, pg: Cluster) -> None:
    import psycopg

    n = N_DISABLED if benchmark.disabled else N
    arr = candles(n)

    def connect(stack: ExitStack, url: str) -> Any:
        # prepare_threshold=0: the INSERT is a prepared statement from its first execution
        conn = stack.enter_context(psycopg.connect(url, autocommit=True, prepare_threshold=0))
        conn.execute(NAIVE_DDL)
        return conn

    def insert(conn: Any) -> None:  # a row per candle, one transaction
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(NAIVE_INSERT, arr.tolist())

    with fresh_rounds(benchmark, pg, connect, insert, rounds=3) as (_, conn):
        assert conn.execute("SELECT count(*) FROM naive").fetchone()[0] == n
    benchmark.extra_info.update(candles=n)
    _ratio(benchmark, "ingest_naive", "naive_over_store", "ingest_naive", "ingest_store")


# ---------------------------------------------------------------------------------------------
# pg-range: 1,000 candles from the middle of a 1M series, fast tiers off
# ---------------------------------------------------------------------------------------------
def naive_range(conn: Any, start: int, end: int) -> np.ndarray:
    return np.array(conn.execute(NAIVE_RANGE, (start, end)).fetchall(), dtype=CANDLE_DTYPE)


@pytest.fixture(scope="module")
def range_pair(pg: Cluster, tmp_path_factory: Any) -> Iterator[tuple[mds.Store, Any, int, int, np.ndarray]]:
    """One database holding the same 1M series twice: through a store with only the durable
    tier, and as a row per candle in ``naive`` (filled with binary COPY, which is quicker)."""
    import psycopg

    arr = candles(N)
    i = N // 2 + 123
    start, end, want = int(arr["ts"][i]), int(arr["ts"][i + RANGE]), arr[i : i + RANGE]
    path = tmp_path_factory.mktemp("pg-range")
    with (
        fresh_database(pg) as url,
        mds.open(path, config=Config(tiers=("sqlite",)), clock=clock, history=url) as st,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        st.write_candles(SYM, "1m", arr)
        conn.execute(NAIVE_DDL)
        with conn.cursor() as cur, cur.copy(f"COPY naive ({FIELDS}) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int8"] + ["float8"] * 6)
            for row in arr.tolist():
                cp.write_row(row)
        conn.execute("VACUUM ANALYZE")  # both layouts' tables
        # once, untimed: both answer the same bytes, the rows written
        assert st.candles(SYM, "1m", start=start, end=end).tobytes() == want.tobytes()
        assert naive_range(conn, start, end).tobytes() == want.tobytes()
        tier = st.stats()["tiers"]["sqlite"]
        assert tier["backend"] == "postgresql" and tier["chunks_compressed"] == 0
        yield st, conn, start, end, want


@pytest.mark.benchmark(group="pg-range")
def test_range_1000_store_postgres(benchmark: Any, range_pair: tuple[mds.Store, Any, int, int, np.ndarray]) -> None:
    st, _, start, end, want = range_pair
    before = _hits(st)
    got = benchmark(st.candles, SYM, "1m", start=start, end=end)
    after = _hits(st)
    assert got.tobytes() == want.tobytes()
    # every timed call was answered by PostgreSQL (the durable tier's hit counter), and nothing else
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]}.keys() == {"sqlite_db"}
    benchmark.extra_info.update(candles=RANGE, series=N, tiers="sqlite (the durable tier, on PostgreSQL)")
    _ratio(benchmark, "range_store", "naive_over_store", "range_naive", "range_store")


@pytest.mark.benchmark(group="pg-range")
def test_range_1000_naive_select(benchmark: Any, range_pair: tuple[mds.Store, Any, int, int, np.ndarray]) -> None:
    _, conn, start, end, want = range_pair
    got = benchmark(naive_range, conn, start, end)
    assert got.tobytes() == want.tobytes()
    benchmark.extra_info.update(candles=RANGE, series=N)
    _ratio(benchmark, "range_naive", "naive_over_store", "range_naive", "range_store")


@pytest.mark.benchmark(group="pg-range")
def test_range_1000_interleaved(benchmark: Any, range_pair: tuple[mds.Store, Any, int, int, np.ndarray]) -> None:
    """The same pair timed in alternating rounds of one process (wall clock: the server's work
    counts), so that a slow phase of the machine falls on both: ``naive_over_store`` is the
    ratio of the medians of the rounds. The two benchmarks above time each side in a run of its
    own, which one slow phase can move by 2x (the naive read measured 1.0 ms and 2.0 ms in runs
    minutes apart here)."""
    st, conn, start, end, want = range_pair

    def store() -> np.ndarray:
        return st.candles(SYM, "1m", start=start, end=end)

    def naive() -> np.ndarray:
        return naive_range(conn, start, end)

    got = benchmark(store)
    assert got.tobytes() == naive().tobytes() == want.tobytes()
    if benchmark.disabled:
        return
    times: dict[str, list[float]] = {"store": [], "naive": []}
    for r in range(200):
        for name, fn in ((("store", store), ("naive", naive)) if r % 2 else (("naive", naive), ("store", store))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    benchmark.extra_info.update(
        rounds=200,
        store_median_us=round(med["store"] * 1e6, 1),
        naive_median_us=round(med["naive"] * 1e6, 1),
        naive_over_store=round(med["naive"] / med["store"], 2),
        target=5.0,
    )


# ---------------------------------------------------------------------------------------------
# pg-threads: 200 of those range reads by one thread, against the same 200 split over 4 threads
# ---------------------------------------------------------------------------------------------
THREADS = 4
READS = 200


def _read_ranges(st: mds.Store, starts: list[int]) -> None:
    for s in starts:
        got = st.candles(SYM, "1m", start=s, end=s + RANGE * MIN)
        if len(got) != RANGE:
            raise AssertionError(f"{len(got)} candles from {s}")


def _starts(start: int) -> list[int]:
    return [start + (k % 50) * RANGE * MIN for k in range(READS)]


@pytest.mark.benchmark(group="pg-threads")
def test_ranges_one_thread(benchmark: Any, range_pair: tuple[mds.Store, Any, int, int, np.ndarray]) -> None:
    st, _, start, _, _ = range_pair
    benchmark.pedantic(_read_ranges, args=(st, _starts(start)), rounds=5, iterations=1)
    benchmark.extra_info.update(reads=READS, candles=RANGE, threads=1)
    _ratio(benchmark, "threads_1", "speedup", "threads_1", "threads_n")


@pytest.mark.benchmark(group="pg-threads")
def test_ranges_four_threads(benchmark: Any, range_pair: tuple[mds.Store, Any, int, int, np.ndarray]) -> None:
    """The reads run on the pool's read connections, off the store's lock (issue 16)."""
    import threading

    st, _, start, _, _ = range_pair
    starts = _starts(start)
    parts = [starts[k::THREADS] for k in range(THREADS)]

    def run() -> None:
        errors: list[BaseException] = []

        def work(part: list[int]) -> None:
            try:
                _read_ranges(st, part)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(part,)) for part in parts]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]

    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info.update(reads=READS, candles=RANGE, threads=THREADS)
    _ratio(benchmark, "threads_n", "speedup", "threads_1", "threads_n")


# ---------------------------------------------------------------------------------------------
# pg-memory-hit: latest 1,000 from the memory tier, history on SQLite vs on PostgreSQL
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def hot_store(request: Any, tmp_path_factory: Any) -> Iterator[tuple[str, mds.Store, np.ndarray]]:
    """A store (default tiers, storage_first, no Layer 1) whose memory tier answers the latest
    1,000 of SYM. A PostgreSQL-backed store uses its fast tiers only while the change feed
    listens, which it starts doing shortly after opening: the first memory hit is waited for."""
    arr = candles(5_000)
    want = arr[-1000:]
    with ExitStack() as stack:
        url = None
        if request.param == "postgres":
            url = stack.enter_context(fresh_database(request.getfixturevalue("pg")))
        cfg = Config(lookup="storage_first")
        path = tmp_path_factory.mktemp(f"hot-{request.param}")
        st = stack.enter_context(mds.open(path, config=cfg, clock=clock, history=url))
        st.write_candles(SYM, "1m", arr)
        deadline = time.monotonic() + HIT_WAIT_S
        while True:
            before = _hits(st)["storage_memory"]
            got = st.candles(SYM, "1m", count=1000)
            assert got.tobytes() == want.tobytes()
            if _hits(st)["storage_memory"] > before:
                break
            assert time.monotonic() < deadline, f"no memory hit within {HIT_WAIT_S} s: {st.stats()['tiers']}"
            time.sleep(0.01)
        yield request.param, st, want


@pytest.mark.benchmark(group="pg-memory-hit")
def test_latest_1000_memory_hit(benchmark: Any, hot_store: tuple[str, mds.Store, np.ndarray]) -> None:
    history, st, want = hot_store
    before = _hits(st)
    got = benchmark(st.candles, SYM, "1m", count=1000)
    after = _hits(st)
    assert got.tobytes() == want.tobytes()
    # every timed call was a memory hit
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]}.keys() == {"storage_memory"}
    benchmark.extra_info.update(history=history, lookup="storage_first", layer1=None)
    _ratio(benchmark, f"hit_{history}", "postgres_over_sqlite", "hit_postgres", "hit_sqlite")


# ---------------------------------------------------------------------------------------------
# pg-hit-beside-reads: a memory hit while another thread reads the server, against the same hit
# with no other thread (the server reads run off the store's lock: the hit must not wait for them)
# ---------------------------------------------------------------------------------------------
@contextmanager
def _server_reader(st: mds.Store, start: int) -> Iterator[list[int]]:
    """Another thread reading 1,000-candle ranges of OTHER from the server until the block ends;
    yields the count of its reads (checked to be non-zero by the caller)."""
    import threading

    done: list[int] = [0]
    stop = threading.Event()

    def run() -> None:
        k = 0
        while not stop.is_set():
            s = start + (k % 50) * RANGE * MIN
            if len(st.candles(OTHER, "1m", start=s, end=s + RANGE * MIN)) != RANGE:
                raise AssertionError("short server read")
            k += 1
            done[0] = k

    th = threading.Thread(target=run, daemon=True)
    th.start()
    deadline = time.monotonic() + HIT_WAIT_S
    while not done[0] and th.is_alive() and time.monotonic() < deadline:  # it reads before the timing starts
        time.sleep(0.001)
    try:
        yield done
    finally:
        stop.set()
        th.join(30)


OTHER = "KRW-ETH"


@pytest.fixture(scope="module")
def shared_store(pg: Cluster, tmp_path_factory: Any) -> Iterator[tuple[mds.Store, np.ndarray, int]]:
    """A PostgreSQL-backed store (default tiers) whose memory answers SYM's latest 100, and
    whose OTHER series (60,000 candles) is in no fast tier: its ranges are read from the server
    (``Config(tiers=...)`` keeps memory only: no LMDB copy of OTHER)."""
    arr = candles(60_000)
    with fresh_database(pg) as url:
        cfg = Config(lookup="storage_first", tiers=("memory", "sqlite"), memory_candles=100)
        path = tmp_path_factory.mktemp("pg-beside")
        with mds.open(path, config=cfg, clock=clock, history=url) as st:
            st.write_candles(OTHER, "1m", arr)
            st.write_candles(SYM, "1m", arr[-1000:])
            deadline = time.monotonic() + HIT_WAIT_S
            while True:
                before = _hits(st)["storage_memory"]
                st.candles(SYM, "1m", count=100)
                if _hits(st)["storage_memory"] > before:
                    break
                assert time.monotonic() < deadline, "no memory hit"
                time.sleep(0.01)
            yield st, arr[-100:], int(arr["ts"][0])


HIT_ROUNDS = 2000


def _pause() -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Untimed, before each hit: a strategy's hits come between other work, and the other
    thread runs meanwhile (a tight loop of hits would keep it from the interpreter)."""
    time.sleep(0.0005)
    return (), {}


def _hit_stats(benchmark: Any, key: str) -> None:
    """Means carry the tail (a hit that waited for the other thread's server read): kept with
    the maximum, and the ratio of the means."""
    if benchmark.disabled or benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    _MEDIANS[key] = float(stats.mean)
    benchmark.extra_info.update(mean_us=round(stats.mean * 1e6, 2), max_us=round(stats.max * 1e6, 1))
    if "hit_alone" in _MEDIANS and "hit_beside" in _MEDIANS:
        benchmark.extra_info["beside_over_alone_mean"] = float(f"{_MEDIANS['hit_beside'] / _MEDIANS['hit_alone']:.3g}")
    if "hit_on_lock" in _MEDIANS and "hit_beside" in _MEDIANS:
        benchmark.extra_info["on_lock_over_off_lock_mean"] = float(
            f"{_MEDIANS['hit_on_lock'] / _MEDIANS['hit_beside']:.3g}"
        )


@pytest.mark.benchmark(group="pg-hit-beside-reads")
def test_memory_hit_alone(benchmark: Any, shared_store: tuple[mds.Store, np.ndarray, int]) -> None:
    st, want, _ = shared_store

    def hit() -> np.ndarray:
        return st.candles(SYM, "1m", count=100)

    rounds = 100 if benchmark.disabled else HIT_ROUNDS
    got = benchmark.pedantic(hit, setup=_pause, rounds=rounds, iterations=1)
    assert got.tobytes() == want.tobytes()
    benchmark.extra_info.update(other_thread=None)
    _hit_stats(benchmark, "hit_alone")


@pytest.mark.benchmark(group="pg-hit-beside-reads")
@pytest.mark.parametrize("reads", ["off_lock", "on_lock"])
def test_memory_hit_beside_server_reads(
    benchmark: Any, shared_store: tuple[mds.Store, np.ndarray, int], reads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``on_lock``: the baseline, the other thread's server reads kept on the store's lock as
    they were before the read pool (57fbe80)."""
    st, want, start = shared_store
    if reads == "on_lock":
        monkeypatch.setattr(st._health, "_off_lock", lambda *a: None)
    before = _hits(st)

    def hit() -> np.ndarray:
        return st.candles(SYM, "1m", count=100)

    with _server_reader(st, start) as done:
        rounds = 100 if benchmark.disabled else HIT_ROUNDS
        got = benchmark.pedantic(hit, setup=_pause, rounds=rounds, iterations=1)
    after = _hits(st)
    assert got.tobytes() == want.tobytes()
    assert done[0] > 0 and after["sqlite_db"] > before["sqlite_db"]  # the other thread read the server meanwhile
    benchmark.extra_info.update(other_thread="1,000-candle ranges from PostgreSQL", server_reads=done[0])
    _hit_stats(benchmark, "hit_beside" if reads == "off_lock" else "hit_on_lock")


# ---------------------------------------------------------------------------------------------
# pg-feed-seen: another host's write, seen by this host's reads
# ---------------------------------------------------------------------------------------------
SEEN_ROUNDS = 7


@pytest.fixture(scope="module")
def two_hosts(pg: Cluster, tmp_path_factory: Any) -> Iterator[tuple[mds.Store, mds.Store]]:
    """Hosts A and B: two stores (default tiers, own paths) over one database; B's memory
    answers SYM's latest 50."""
    arr = candles(1_000)
    with fresh_database(pg) as url, ExitStack() as stack:
        cfg = Config(lookup="storage_first")
        a, b = (
            stack.enter_context(mds.open(tmp_path_factory.mktemp(n), config=cfg, clock=clock, history=url))
            for n in ("host-a", "host-b")
        )
        a.write_candles(SYM, "1m", arr, complete=(int(arr["ts"][0]), T_END))
        yield a, b


def _wait_memory_hit(st: mds.Store) -> np.ndarray:
    """Read SYM's latest 50 until memory answers them (the feed listens, the copies are filled)."""
    deadline = time.monotonic() + HIT_WAIT_S
    while True:
        before = _hits(st)["storage_memory"]
        got = st.candles(SYM, "1m", count=50)
        if _hits(st)["storage_memory"] > before:
            return got
        assert time.monotonic() < deadline, "no memory hit"
        time.sleep(0.01)


@gate
@pytest.mark.benchmark(group="pg-feed-seen")
@pytest.mark.parametrize("feed", ["listening", "deaf"])
def test_another_hosts_write_seen(benchmark: Any, two_hosts: tuple[mds.Store, mds.Store], feed: str) -> None:
    """From host A's ``write_candles`` (a revised last candle) until host B's ``candles(count=50)``
    answers it, B polling every millisecond, B's memory holding the old candle. ``deaf``: B's
    listening server process is stopped (SIGSTOP) just before A writes, as a hung backend or a
    silently dropped path would leave it: no error, no notification; B must notice by its
    heartbeat (mds/tiers/postgres/feed.py). Target (DESIGN.md 7): within 1 s, both: a gate on
    the median of the rounds (the only time this file asserts)."""
    import os
    import signal

    a, b = two_hosts
    listener = b._health.states["sqlite"].obj._listener
    stopped: list[int] = []
    bump = itertools.count(1)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        old = _wait_memory_hit(b)
        new = old[-1:].copy()
        new["close"] = new["open"] = float(old["close"][-1]) + next(bump)
        new["high"] = max(float(old["high"][-1]), float(new["close"][0]))
        if feed == "deaf":
            pid = listener.pid
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        return (new,), {}

    def write_and_wait(new: np.ndarray) -> None:
        want = float(new["close"][0])
        a.write_candles(SYM, "1m", new)
        deadline = time.monotonic() + HIT_WAIT_S
        while float(b.candles(SYM, "1m", count=50)["close"][-1]) != want:
            assert time.monotonic() < deadline, "B never saw A's write"
            time.sleep(0.001)

    def teardown(new: np.ndarray) -> None:
        while stopped:
            os.kill(stopped.pop(), signal.SIGCONT)

    try:
        rounds = 1 if benchmark.disabled else SEEN_ROUNDS
        benchmark.pedantic(write_and_wait, setup=setup, teardown=teardown, rounds=rounds, iterations=1)
    finally:
        teardown(np.empty(0))
    benchmark.extra_info.update(target_s=1.0, reconnects=listener.reconnects)
    if not benchmark.disabled and benchmark.stats is not None:
        benchmark.extra_info.update(
            median_ms=round(benchmark.stats.stats.median * 1000, 1), max_ms=round(benchmark.stats.stats.max * 1000, 1)
        )
        # the design's bound, gated (CI: ``-m gate --benchmark-only``) on the median of the rounds
        seen = benchmark.stats.stats.median
        assert seen < 1.0, f"another host's write seen after {seen:.2f} s (median), not within 1 s"
