"""The Store (issue 8): a simulated-day workload over FakeUpbit, and latest-1000 read latency.

Targets: overall hit rate >= 99% with Layer 1 requests only for new minutes (workload);
``store.candles(..., count=1000)`` on a memory hit <= 3 us median; ``await store.get(...)`` on a
memory hit, reading ``arrays`` only, <= 10 us median. The naive approaches (stdlib sqlite3 with a
row per candle, a Layer 1 style list of dicts) are measured in the same run; their ratios to the
Store land in ``extra_info`` of the baseline benchmarks.

    /work/venv/bin/python -m pytest benches/bench_store.py --benchmark-only \
        --benchmark-columns=median,iqr,ops --benchmark-json=/tmp/bench_store.json

The workload asserts functional outcomes only (hit rate, Layer 1 requests, correct answers); no
timing is asserted here. The headline figures that can fail on speed are the gates of
``bench_gates.py`` (issue 20).

The Store's other hot paths (issue 15), through the public API only and without Layer 1: a range
of 1,000 answered by LMDB and by SQLite, the live upsert (one closed candle a simulated minute) and
the ingest of 100,000 candles into a fresh store. Their fixtures assert which tier answers; compare
their medians before and after a change on the same machine, pinned to one core::

    taskset -c 1 python -m pytest benches/bench_store.py --benchmark-only \
        -k "range_1000 or live_upsert or ingest_100k or memory_hit" --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds
from mds import CANDLE_DTYPE, Config, DataType, StorageRequest
from mds._kernels import IMPLEMENTATION
from mds.convert import candles_to_upbit
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, dense_candles, generate_market
from mds.timeutil import to_ms

MIN = 60_000
DAY = 86_400_000
T_SIM = to_ms("2025-01-06T00:00:00Z")  # the simulated day starts here (a minute boundary)
HISTORY = 3 * DAY  # enough history for 1,000 candles of an illiquid market (60% of minutes trade)
ILLIQUID = ("KRW-CBK", "KRW-MLK", "KRW-AHT", "KRW-MBL", "KRW-ORBS", "KRW-STMX")
LIQUID = (
    "KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-DOGE", "KRW-ADA", "KRW-TRX",
    "KRW-LINK", "KRW-AVAX", "KRW-DOT", "KRW-ETC", "KRW-BCH", "KRW-SUI", "KRW-NEAR",
)  # fmt: skip
MARKETS = LIQUID + ILLIQUID  # 20
COUNTS = (200, 1000)
ARCTICDB_TAIL_1000_S = 2.5e-3  # quoted in issue 8 (ArcticDB tail of 1,000 rows), not measured here
NAIVE_SQLITE_QUOTED_S = 1.9e-3  # quoted in issue 8

#: Medians (s) of this run's Store benchmarks, for the ratios reported by the baselines.
_MEDIANS: dict[str, float] = {}


class Clock:
    """A simulated clock (epoch ms) shared by FakeUpbit, the router and the store."""

    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def _market_data(end: int) -> dict[tuple[str, str], np.ndarray]:
    return {
        (sym, "1m"): generate_market(
            sym, "1m", T_SIM - HISTORY, end, liquidity="illiquid" if sym in ILLIQUID else "liquid", seed=i
        )
        for i, sym in enumerate(MARKETS)
    }


#: FakeUpbit's rate limit, far above anything the benchmark sends. With ``rate_limit=None`` FakeUpbit
#: answers ``Remaining-Req: ...; sec=10``, which a router configured for 1,000 a second reads as "990
#: used by another process on this IP" and then stalls up to 1 s (wall clock) every few dozen
#: requests; a non-binding limit keeps the header truthful.
FAKE_RATE_LIMIT = 1_000_000


def _router(fake: FakeUpbit, clock: Clock) -> UpbitRouter:
    return UpbitRouter(fake.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)


def _expected(arr: np.ndarray, end: int, n: int) -> np.ndarray:
    i = int(np.searchsorted(arr["ts"], end))
    return arr[max(0, i - n) : i]


def _record(benchmark: Any, key: str) -> None:
    if not benchmark.disabled and benchmark.stats is not None:
        _MEDIANS[key] = float(benchmark.stats.stats.median)


def _pcts_us(ns: np.ndarray) -> dict[str, float]:
    p = np.percentile(ns, [50, 90, 99, 99.9])
    return {
        "p50_us": round(float(p[0]) / 1e3, 2),
        "p90_us": round(float(p[1]) / 1e3, 2),
        "p99_us": round(float(p[2]) / 1e3, 2),
        "p99_9_us": round(float(p[3]) / 1e3, 2),
        "max_us": round(float(ns.max()) / 1e3, 2),
    }


# ---------------------------------------------------------------------------------------------
# 1. The workload: 20 markets, latest 200 and 1,000 of each every simulated second
# ---------------------------------------------------------------------------------------------
def _workload(path: Path, minutes: int, step_s: int) -> dict[str, Any]:
    """Run the simulation; returns the figures for ``extra_info`` after asserting the outcomes.

    Minute 0 is the warm-up: the first read of each market fetches its history. From then on
    every new minute must cost exactly one candle request per market (the tail that closed).
    """
    clock = Clock(T_SIM)
    data = _market_data(T_SIM + (minutes + 1) * MIN)
    ticks = list(range(0, 60, step_s))
    lat = np.zeros((minutes, len(ticks), len(MARKETS), len(COUNTS)), dtype=np.int64)
    checked = 0
    with (
        FakeUpbit(data, clock=clock, rate_limit=FAKE_RATE_LIMIT) as fake,
        mds.open(path, layer1=_router(fake, clock), config=Config(lookup="storage_first"), clock=clock) as st,
    ):
        candles = st.candles
        perf = time.perf_counter_ns
        warm_requests = 0
        for m in range(minutes):
            for j, sec in enumerate(ticks):
                clock.t = T_SIM + m * MIN + sec * 1000
                last_end = clock.t // MIN * MIN
                check = sec == 0 or j == len(ticks) - 1  # just after the fetch, and the last read
                cell = lat[m, j]
                for k, sym in enumerate(MARKETS):
                    for c, n in enumerate(COUNTS):
                        t0 = perf()
                        got = candles(sym, "1m", count=n)
                        cell[k, c] = perf() - t0
                        if check:
                            want = _expected(data[(sym, "1m")], last_end, n)
                            assert len(got) == n, (sym, n, clock.t, len(got))
                            assert got.tobytes() == want.tobytes(), (sym, n, clock.t)
                            checked += 1
            if m == 0:
                warm_requests = fake.request_count("/v1/candles")
        records = fake.requests("/v1/candles")
        stats = st.stats()
        assert st.check().ok
    new = records[warm_requests:]
    per_market = Counter(r.params.get("market") for r in new)
    new_minutes = minutes - 1
    reads = lat.size
    # Functional outcomes (not timing): hit rate, Layer 1 requests only for new minutes, no errors.
    assert stats["hit_rate"] is not None and stats["hit_rate"] >= 0.99, stats["hit_rate"]
    assert all(r.status == 200 for r in records)
    assert len(new) <= len(MARKETS) * new_minutes, (len(new), new_minutes)
    assert set(per_market) <= set(MARKETS) and max(per_market.values(), default=0) <= new_minutes, per_market
    assert stats["layer1"]["errors"] == 0
    # The first read after a minute closes (count=200, second 0) is the one that fetches.
    fetch_reads = lat[1:, 0, :, 0].ravel()
    hit_mask = np.ones(lat.shape, dtype=bool)
    hit_mask[1:, 0, :, 0] = False
    hit_mask[0] = False  # warm-up minute
    return {
        "kernels": IMPLEMENTATION,
        "simulated_minutes": minutes,
        "read_every_simulated_s": step_s,
        "markets": len(MARKETS),
        "illiquid_markets": len(ILLIQUID),
        "reads": int(reads),
        "answers_checked_against_generated": checked,
        "hit_rate": stats["hit_rate"],
        "hits": stats["hits"],
        "layer1_requests_warmup": warm_requests,
        "layer1_requests_new_minutes": len(new),
        "layer1_requests_per_market_per_new_minute": round(len(new) / (len(MARKETS) * max(new_minutes, 1)), 4),
        "layer1_calls_stats": stats["layer1"]["calls"],
        "layer1_candles_fetched": stats["layer1"]["candles_fetched"],
        "read_latency_all": _pcts_us(lat.ravel()),
        "read_latency_memory_hits": _pcts_us(lat[hit_mask]),
        "read_latency_new_minute_fetch": _pcts_us(fetch_reads) if len(fetch_reads) else {},
        "store_latency_stats": stats["latency"],
    }


@pytest.mark.benchmark(group="workload")
def test_workload_simulated_day_20_markets(benchmark: Any, tmp_path: Path) -> None:
    # The full simulated day (1440 minutes x 60 s x 20 markets x 2 reads = 3.46M reads, about
    # 29k Layer 1 requests) runs only when timing (--benchmark-only). With --benchmark-disable
    # (CI) the same workload runs for 30 simulated minutes, still reading every simulated second:
    # reading less often (e.g. every 10 s) would leave 12 reads per market-minute for one
    # unavoidable fetch, so a 99% hit rate could not hold by construction.
    minutes = 30 if benchmark.disabled else 1440
    info = benchmark.pedantic(_workload, args=(tmp_path / "store", minutes, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(info)


# ---------------------------------------------------------------------------------------------
# 2, 3. Latest 1,000 on a memory hit: store.candles and await store.get
# ---------------------------------------------------------------------------------------------
SYM = "KRW-BTC"


@pytest.fixture(scope="module")
def sim() -> Iterator[tuple[Clock, dict[tuple[str, str], np.ndarray], FakeUpbit]]:
    clock = Clock(T_SIM + 30_000)
    data = {(SYM, "1m"): generate_market(SYM, "1m", T_SIM - HISTORY, T_SIM + DAY, seed=1)}
    with FakeUpbit(data, clock=clock, rate_limit=FAKE_RATE_LIMIT) as fake:
        yield clock, data, fake


@pytest.fixture(scope="module", params=["storage_first", "layer1_first", "no_layer1"])
def hot_store(
    request: Any, sim: tuple[Clock, dict[tuple[str, str], np.ndarray], FakeUpbit], tmp_path_factory: Any
) -> Iterator[tuple[str, mds.Store, np.ndarray]]:
    """A store whose memory tier holds the latest 1,000 candles of SYM (fetched or written)."""
    clock, data, fake = sim
    path = tmp_path_factory.mktemp(request.param)
    arr = data[(SYM, "1m")]
    if request.param == "no_layer1":
        st = mds.open(path, clock=clock)
        st.write_candles(SYM, "1m", arr[arr["ts"] < clock() // MIN * MIN])
    else:
        st = mds.open(path, layer1=_router(fake, clock), config=Config(lookup=request.param), clock=clock)
    want = _expected(arr, clock() // MIN * MIN, 1000)
    first = st.candles(SYM, "1m", count=1000)
    assert first.tobytes() == want.tobytes()
    yield request.param, st, want
    st.close()


def _memory_hits(st: mds.Store) -> int:
    return int(st.stats()["hits"]["storage_memory"])


@pytest.mark.benchmark(group="latest-1000")
def test_store_candles_1000_memory_hit(benchmark: Any, hot_store: tuple[str, mds.Store, np.ndarray]) -> None:
    mode, st, want = hot_store
    benchmark.extra_info.update(kernels=IMPLEMENTATION, lookup=mode, target_median_us=3.0)
    if mode == "layer1_first":
        # Default lookup: each read first peeks Layer 1's cache (200 candles, too few for 1,000)
        # on the store's Layer 1 thread. Measured for comparison; the 3 us target is for
        # storage_first and storage-only readers.
        benchmark.extra_info["target_median_us"] = None
    before = _memory_hits(st)
    got = benchmark(st.candles, SYM, "1m", count=1000)
    assert _memory_hits(st) > before  # every timed call was a memory hit
    assert got.tobytes() == want.tobytes() and not got.flags.writeable
    _record(benchmark, f"candles_{mode}")


def _await_once(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that completes without suspending, as ``await coro`` inside a running
    coroutine does: the cost measured is the call plus the body, with no event-loop overhead."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("store.get suspended on a memory hit")


def _loop_per_call_us(st: mds.Store, make: Callable[[], StorageRequest], k: int, rounds: int) -> float:
    """Cross-check: one coroutine awaiting get(make()) k times on a persistent loop, per call (median)."""

    async def many() -> None:
        for _ in range(k):
            resp = await st.get(make())
            assert resp.success

    loop = asyncio.new_event_loop()
    try:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            loop.run_until_complete(many())
            times.append((time.perf_counter() - t0) / k)
    finally:
        loop.close()
    return round(statistics.median(times) * 1e6, 3)


def _check_get(resp: Any, want: np.ndarray) -> None:
    assert resp.success, resp.error
    assert resp.metadata.source == "storage_memory" and resp.metadata.cache_hit
    assert resp.arrays[SYM].tobytes() == want.tobytes()


@pytest.mark.benchmark(group="get-1000")
@pytest.mark.parametrize("build_request", [False, True], ids=["prebuilt_request", "request_built_each_call"])
def test_store_get_1000_memory_hit(
    benchmark: Any, hot_store: tuple[str, mds.Store, np.ndarray], build_request: bool
) -> None:
    mode, st, want = hot_store
    if mode == "layer1_first":
        pytest.skip("the async layer1_first path peeks Layer 1 in the caller's loop; not a memory-hit figure")
    req = StorageRequest(DataType.CANDLE, [SYM], timeframe="1m", count=1000)
    # Timed: `await store.get(req)` driven by coroutine.send (see _await_once), reading arrays only.
    if build_request:

        def make() -> StorageRequest:
            return StorageRequest(DataType.CANDLE, [SYM], timeframe="1m", count=1000)

    else:

        def make() -> StorageRequest:
            return req

    def call() -> Any:
        return _await_once(st.get(make()))

    resp = benchmark(call)
    _check_get(resp, want)
    benchmark.extra_info.update(
        kernels=IMPLEMENTATION,
        lookup=mode,
        target_median_us=10.0,
        method="coroutine.send on get(): equals `await store.get(req)` inside a running coroutine",
        per_call_us_awaited_1000x_in_run_until_complete=_loop_per_call_us(
            st, make, k=10 if benchmark.disabled else 1000, rounds=1 if benchmark.disabled else 20
        ),
    )
    _record(benchmark, f"get_{mode}_{'built' if build_request else 'prebuilt'}")


# ---------------------------------------------------------------------------------------------
# 4. Baselines: naive sqlite3 rows, a Layer 1 style list of dicts
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def naive_sqlite(tmp_path_factory: Any) -> Iterator[tuple[sqlite3.Connection, np.ndarray]]:
    """A row per candle, PRIMARY KEY (symbol, timeframe, ts), the 20 markets' three days."""
    data = _market_data(T_SIM)
    con = sqlite3.connect(tmp_path_factory.mktemp("naive") / "naive.sqlite3")
    con.execute(
        "CREATE TABLE candles (symbol TEXT NOT NULL, timeframe TEXT NOT NULL, ts INTEGER NOT NULL,"
        " open REAL, high REAL, low REAL, close REAL, volume REAL, value REAL,"
        " PRIMARY KEY (symbol, timeframe, ts))"
    )
    with con:
        for (sym, tf), arr in data.items():
            con.executemany(
                "INSERT INTO candles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((sym, tf, *row) for row in arr.tolist()),
            )
    yield con, data[(SYM, "1m")][-1000:]
    con.close()


def _naive_sqlite_tail(con: sqlite3.Connection, sym: str, n: int) -> np.ndarray:
    rows = con.execute(
        "SELECT ts, open, high, low, close, volume, value FROM candles"
        " WHERE symbol = ? AND timeframe = ? ORDER BY ts DESC LIMIT ?",
        (sym, "1m", n),
    ).fetchall()
    rows.reverse()
    return np.array(rows, dtype=CANDLE_DTYPE)


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _ratios(benchmark: Any, baseline_key: str) -> None:
    """Put baseline median / Store median into extra_info (this run's Store benchmarks)."""
    _record(benchmark, baseline_key)
    base = _MEDIANS.get(baseline_key)
    if base is None:
        return
    ratios = {f"{baseline_key}_over_{k}": _sig(base / v) for k, v in sorted(_MEDIANS.items()) if k != baseline_key}
    benchmark.extra_info["ratios"] = ratios
    benchmark.extra_info["median_us"] = round(base * 1e6, 3)
    quoted = {"arcticdb_tail_quoted": ARCTICDB_TAIL_1000_S, "naive_sqlite_quoted": NAIVE_SQLITE_QUOTED_S}
    if baseline_key != "naive_sqlite3":
        return
    benchmark.extra_info["quoted_over_store"] = {
        f"{q}_over_{k}": _sig(s / v) for q, s in quoted.items() for k, v in sorted(_MEDIANS.items())
        if k.startswith(("candles_", "get_"))
    }  # fmt: skip


@pytest.mark.benchmark(group="latest-1000")
def test_naive_sqlite3_rows_latest_1000(benchmark: Any, naive_sqlite: tuple[sqlite3.Connection, np.ndarray]) -> None:
    con, want = naive_sqlite
    got = benchmark(_naive_sqlite_tail, con, SYM, 1000)
    assert got.tobytes() == want.tobytes()
    _ratios(benchmark, "naive_sqlite3")


@pytest.mark.benchmark(group="latest-1000")
def test_naive_list_of_dicts_latest_1000(benchmark: Any, naive_sqlite: tuple[sqlite3.Connection, np.ndarray]) -> None:
    _, arr = naive_sqlite
    cache: dict[tuple[str, str], list[dict[str, Any]]] = {(SYM, "1m"): candles_to_upbit(arr, SYM, "1m")}
    tail: Callable[[], list[dict[str, Any]]] = lambda: cache[(SYM, "1m")][-1000:]  # noqa: E731
    got = benchmark(tail)
    assert len(got) == 1000 and got[-1]["trade_price"] == float(arr["close"][-1])
    _ratios(benchmark, "naive_list_of_dicts")


# ---------------------------------------------------------------------------------------------
# 5. The Store's own hot paths beyond the memory hit, through the public API only (issue 15)
# ---------------------------------------------------------------------------------------------
# bench_lmdb.py and bench_sqlite.py time the tiers alone; these time the same work through
# mds.open / Store.candles / Store.write_candles, so they include the Store's own overhead (the
# read plan, change stamps, coverage, write order), which is what a redesign of the Store changes.
# No Layer 1. Each fixture checks WHICH tier answers (never how fast).
RANGE_N = 1_000
RANGE_HISTORY = 5_000  # stored candles; memory keeps the newest memory_candles (1,000) of them
RANGE_T0 = T_SIM - RANGE_HISTORY * MIN  # within LMDB's 31-day retention at the store's clock
RANGE_START = RANGE_T0 + 1_000 * MIN  # [RANGE_START, RANGE_END) is older than memory's window
RANGE_END = RANGE_START + RANGE_N * MIN
RANGE_SOURCES = ("storage_memory", "layer1_cache", "storage_disk", "sqlite_db", "layer1_api")


def _hits(st: mds.Store) -> dict[str, int]:
    hits = st.stats()["hits"]
    return {k: int(hits.get(k, 0)) for k in RANGE_SOURCES}


def _range_store(path: Path, tiers: tuple[str, ...], source: str) -> tuple[mds.Store, np.ndarray]:
    """A store holding RANGE_HISTORY dense 1m candles, whose range read is answered by ``source``."""
    arr = dense_candles(RANGE_HISTORY, RANGE_T0, seed=7)
    st = mds.open(path, config=Config(tiers=tiers), clock=Clock(T_SIM + 30_000))
    st.write_candles(SYM, "1m", arr)
    want = arr[(arr["ts"] >= RANGE_START) & (arr["ts"] < RANGE_END)]
    assert len(want) == RANGE_N
    for _ in range(2):  # the first read may fill a faster tier; the second is what is timed
        before = _hits(st)
        got = st.candles(SYM, "1m", start=RANGE_START, end=RANGE_END)
        after = _hits(st)
    assert got.tobytes() == want.tobytes()
    delta = {k: after[k] - before[k] for k in RANGE_SOURCES if after[k] != before[k]}
    assert delta == {source: 1}, (tiers, delta)
    return st, want


@pytest.fixture(scope="module")
def disk_range_store(tmp_path_factory: Any) -> Iterator[tuple[mds.Store, np.ndarray]]:
    st, want = _range_store(tmp_path_factory.mktemp("range_disk"), ("memory", "disk", "sqlite"), "storage_disk")
    yield st, want
    st.close()


@pytest.fixture(scope="module")
def sqlite_range_store(tmp_path_factory: Any) -> Iterator[tuple[mds.Store, np.ndarray]]:
    # Without LMDB: with it, the first SQLite read of the range fills LMDB and LMDB answers after.
    st, want = _range_store(tmp_path_factory.mktemp("range_sqlite"), ("memory", "sqlite"), "sqlite_db")
    yield st, want
    st.close()


def _bench_range(benchmark: Any, st: mds.Store, want: np.ndarray, source: str, tiers: str) -> None:
    before = _hits(st)
    got = benchmark(st.candles, SYM, "1m", start=RANGE_START, end=RANGE_END)
    after = _hits(st)
    assert got.tobytes() == want.tobytes() and not got.flags.writeable
    # every timed call was answered by that tier, and by no other
    assert all(after[k] == before[k] for k in RANGE_SOURCES if k != source)
    assert after[source] > before[source]
    benchmark.extra_info.update(kernels=IMPLEMENTATION, tiers=tiers, source=source, candles=RANGE_N)
    _record(benchmark, f"range_{source}")
    base = _MEDIANS.get("candles_no_layer1")
    mine = _MEDIANS.get(f"range_{source}")
    if base and mine:
        benchmark.extra_info["over_latest_1000_memory_hit"] = _sig(mine / base)


@pytest.mark.benchmark(group="store-range-1000")
def test_store_range_1000_disk_hit(benchmark: Any, disk_range_store: tuple[mds.Store, np.ndarray]) -> None:
    st, want = disk_range_store
    _bench_range(benchmark, st, want, "storage_disk", "memory,disk,sqlite")


@pytest.mark.benchmark(group="store-range-1000")
def test_store_range_1000_sqlite_hit(benchmark: Any, sqlite_range_store: tuple[mds.Store, np.ndarray]) -> None:
    st, want = sqlite_range_store
    _bench_range(benchmark, st, want, "sqlite_db", "memory,sqlite")


LIVE_HISTORY = 2_000  # candles stored before the live edge starts
LIVE_ROUNDS = 2_000
LIVE_WARMUP = 20


@pytest.mark.benchmark(group="store-write")
def test_store_live_upsert_one_candle(benchmark: Any, tmp_path: Path) -> None:
    """The live edge: each round the clock moves one minute and the candle that just closed is
    written (default tiers), timed per write_candles call.

    Untimed, a reader takes the latest candle before each write: memory drops a series not read
    for ``memory_ttl_s`` (1 h, 60 rounds here), and a live series is read, so this keeps every
    round in the same steady state (memory holding the latest window)."""
    rounds, warmup = (1, 0) if benchmark.disabled else (LIVE_ROUNDS, LIVE_WARMUP)
    t0 = T_SIM - LIVE_HISTORY * MIN
    arr = dense_candles(LIVE_HISTORY + rounds + warmup, t0, seed=11)
    clock = Clock(t0 + LIVE_HISTORY * MIN)
    written = [LIVE_HISTORY]  # candles stored so far
    with mds.open(tmp_path / "live", clock=clock) as st:
        st.write_candles(SYM, "1m", arr[:LIVE_HISTORY])
        assert st.candles(SYM, "1m", count=1000).tobytes() == arr[LIVE_HISTORY - 1000 : LIVE_HISTORY].tobytes()

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            i = written[0]
            written[0] = i + 1
            st.candles(SYM, "1m", count=1)
            clock.t = t0 + (i + 1) * MIN + 1_000  # candle i closed a second ago
            return (SYM, "1m", arr[i : i + 1]), {}

        result = benchmark.pedantic(st.write_candles, setup=setup, rounds=rounds, warmup_rounds=warmup)
        n = written[0]
        assert n == LIVE_HISTORY + rounds + warmup
        assert (result.inserted, result.updated, result.unchanged) == (1, 0, 0)
        before = _hits(st)
        assert st.candles(SYM, "1m", count=1000).tobytes() == arr[n - 1000 : n].tobytes()
        assert _hits(st)["storage_memory"] == before["storage_memory"] + 1  # memory kept the live window
    benchmark.extra_info.update(kernels=IMPLEMENTATION, tiers="memory,disk,sqlite", history=LIVE_HISTORY)
    _record(benchmark, "live_upsert")


INGEST_N = 100_000
INGEST_ROUNDS = 5


@pytest.mark.benchmark(group="store-write")
def test_store_ingest_100k(benchmark: Any, tmp_path: Path) -> None:
    """One write_candles of 100,000 1m candles into a fresh store (default tiers), a new directory
    each round; opening and closing the store are not timed."""
    arr = dense_candles(INGEST_N, T_SIM - INGEST_N * MIN, seed=13)
    clock = Clock(T_SIM + 30_000)
    opened: list[mds.Store] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        opened.append(mds.open(tmp_path / f"ingest{len(opened)}", clock=clock))
        return (opened[-1], SYM, "1m", arr), {}

    def ingest(st: mds.Store, sym: str, tf: str, rows: np.ndarray) -> Any:
        return st.write_candles(sym, tf, rows)

    checked: list[bool] = []

    def check(st: mds.Store) -> None:  # once: the store answers exactly what was written
        if not checked:
            assert st.candles(SYM, "1m", start=int(arr["ts"][0])).tobytes() == arr.tobytes()
            checked.append(True)

    def teardown(st: mds.Store, *_: Any) -> None:  # not called with --benchmark-disable
        check(st)
        st.close()

    try:
        result = benchmark.pedantic(ingest, setup=setup, teardown=teardown, rounds=INGEST_ROUNDS)
        assert (result.inserted, result.updated, result.unchanged) == (INGEST_N, 0, 0)
        check(opened[-1])
        assert checked
    finally:
        for st in opened:
            st.close()
    benchmark.extra_info.update(kernels=IMPLEMENTATION, tiers="memory,disk,sqlite", candles=INGEST_N)
    _record(benchmark, "ingest_100k")
    mine = _MEDIANS.get("ingest_100k")
    if mine:
        benchmark.extra_info["candles_per_s"] = _sig(INGEST_N / mine)
