"""Never a silent wrong answer (issue 14, items 2, 5, 6, 7 and 10's clock and loop thread).

Each scenario was answered wrongly without a word before: an empty array after a busy write, an
empty array from a damaged SQLite file, stats() breaking writers, an event loop frozen behind a
batch, LMDB keeping the earlier of two commits, a dead Layer 1 thread. Here every read answers
what is stored or what Layer 1 supplied, or raises a typed error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import _relutil as R
import numpy as np
import pytest

import mds
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit

SYM = "KRW-BTC"
N = 3000  # more than the memory tier keeps (1,000 a series)


def _seed(path: Path, tiers: tuple[str, ...] = ("memory", "disk", "sqlite")) -> np.ndarray:
    rows = R.marked(R.T0 + R.MIN * np.arange(N), 1.0)
    with mds.open(path, config=mds.Config(tiers=tiers), clock=R.Clock()) as st:
        st.write_candles(SYM, "1m", rows, complete=(R.T0, R.T0 + N * R.MIN))
    return rows


def test_busy_write_leaves_reads_of_sqlite_only_data_answering(tmp_path: Path) -> None:
    """Item 2: a write that times out on another process's write lock is a typed error for that
    write; the durable tier is not broken, and reads of data only it holds keep answering."""
    path = tmp_path / "s"
    rows = _seed(path, ("memory", "sqlite"))
    with mds.open(path, config=mds.Config(tiers=("memory", "sqlite")), clock=R.Clock()) as st:
        st._health.states["sqlite"].obj._conn.set_busy_timeout(100)
        with R.sqlite_write_locked(path / "candles.sqlite3"):
            with pytest.raises(mds.StorageUnavailableError, match="locked"):
                st.write_candles(SYM, "1m", R.marked([R.T0 + N * R.MIN], 2.0))
            # the oldest 1,000 candles: neither memory nor (absent here) LMDB hold them
            got = st.candles(SYM, "1m", start=R.T0, end=R.T0 + 1000 * R.MIN)
            assert got.tobytes() == rows[:1000].tobytes()
            assert st.gaps(SYM, "1m") == []
            assert st.coverage(SYM, "1m") == [(R.T0, R.T0 + N * R.MIN)]
            assert "sqlite" not in st.stats()["degraded"]
        st.write_candles(SYM, "1m", R.marked([R.T0 + N * R.MIN], 2.0))
        assert len(st.candles(SYM, "1m", start=R.T0, end=R.T0 + (N + 1) * R.MIN)) == N + 1


def _garbage(p: Path) -> None:
    p.write_bytes(np.random.default_rng(3).integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())


def _truncated(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _replaced(p: Path) -> None:
    import apsw

    p.unlink()
    c = apsw.Connection(str(p))
    c.execute("CREATE TABLE other(x); INSERT INTO other VALUES (1);")
    c.close()


@pytest.mark.parametrize("damage", [_garbage, _truncated, _replaced], ids=["garbage", "truncated", "replaced"])
def test_broken_sqlite_file_is_a_typed_error_never_an_empty_answer(tmp_path: Path, damage: Any) -> None:
    """Item 2: a truncated, garbage or replaced SQLite file, no Layer 1: every read raises
    StorageUnavailableError (the async API answers success=False); none answers empty."""
    path = tmp_path / "s"
    _seed(path, ("memory", "sqlite"))
    for extra in ("-wal", "-shm"):
        (path / f"candles.sqlite3{extra}").unlink(missing_ok=True)
    damage(path / "candles.sqlite3")
    with mds.open(path, config=mds.Config(tiers=("memory", "sqlite")), clock=R.Clock()) as st:
        reads = [
            lambda: st.candles(SYM, "1m", count=10),
            lambda: st.candles(SYM, "1m", start=R.T0, end=R.T0 + 100 * R.MIN),
            lambda: st.candles(SYM, "1m", start=R.T0, count=10),
            lambda: st.gaps(SYM, "1m"),
            lambda: st.gaps(SYM, "1m", start=R.T0, end=R.T0 + R.DAY),
            lambda: st.coverage(SYM, "1m"),
        ]
        for read in reads:
            with pytest.raises(mds.StorageUnavailableError):
                read()
            R.TALLY["silent_typed_errors"] += 1
        resp = asyncio.run(st.get(mds.StorageRequest("candle", [SYM], timeframe="1m", count=10)))
        assert not resp.success and "StorageUnavailableError" in (resp.error or "")
        with pytest.raises(mds.StorageUnavailableError):
            st.write_candles(SYM, "1m", R.marked([R.T0 + N * R.MIN], 2.0))


def test_broken_sqlite_file_passes_every_read_kind_through_to_layer1(tmp_path: Path) -> None:
    """Item 2 with a Layer 1: latest N, a range and N from a start are answered by Layer 1 whole."""
    clock = R.Clock()
    truth = R.marked(R.T0 + R.MIN * np.arange(N), 7.0)
    path = tmp_path / "s"
    _seed(path, ("memory", "sqlite"))
    _garbage(path / "candles.sqlite3")
    with FakeUpbit({(SYM, "1m"): truth}, clock=clock, rate_limit=None) as up:
        l1 = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
        cfg = mds.Config(tiers=("memory", "sqlite"), lookup="storage_first")
        with mds.open(path, layer1=l1, config=cfg, clock=clock) as st:
            got = st.candles(SYM, "1m", start=R.T0 + 100 * R.MIN, end=R.T0 + 700 * R.MIN)
            assert got.tobytes() == truth[100:700].tobytes()
            got = st.candles(SYM, "1m", start=R.T0 + 50 * R.MIN, count=300)
            assert got.tobytes() == truth[50:350].tobytes()
            got = st.candles(SYM, "1m", count=250)
            assert got.tobytes() == truth[-250:].tobytes()
            resp = asyncio.run(st.get(mds.StorageRequest("candle", [SYM], timeframe="1m", count=20)))
            assert resp.success and resp.metadata.source == "layer1_api"
            assert resp.arrays[SYM].tobytes() == truth[-20:].tobytes()
            assert "sqlite" in st.stats()["degraded"]


def test_stats_in_a_loop_never_breaks_a_writer(tmp_path: Path) -> None:
    """Item 5: stats() from one thread while another writes: no write fails (the SQLite connection
    was used by both threads at once), stats never raises."""
    stop = threading.Event()
    errors: list[BaseException] = []
    base = 20_000
    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        st.write_candles(SYM, "1m", R.marked(R.T0 + R.MIN * np.arange(base), 1.0))

        def poll() -> None:
            try:
                while not stop.is_set():
                    st.stats()
                    R.TALLY["silent_stats_calls"] += 1
            except BaseException as exc:
                errors.append(exc)

        th = threading.Thread(target=poll)
        th.start()
        try:
            for k in range(300):
                ts = R.T0 + R.MIN * (base + np.arange(k * 25, k * 25 + 25))
                st.write_candles(f"KRW-X{k % 10}", "1m", R.marked(ts, 1.0))
        finally:
            stop.set()
            th.join(30)
        assert not errors, errors
        assert st.stats()["degraded"] == []
        assert len(st.candles("KRW-X3", "1m", start=R.T0, end=R.NOW)) == 30 * 25
        assert st.check().ok


def test_async_get_does_not_block_the_event_loop_behind_a_batch(tmp_path: Path) -> None:
    """Item 6: while another thread holds the store (a batch), the caller's event loop keeps
    running; the read answers once the batch ends. The batch ends only after the loop has shown
    it is alive, so a blocked loop would deadlock (caught by the bounded waits)."""
    rows = R.marked(R.T0 + R.MIN * np.arange(100), 1.0)
    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        st.write_candles(SYM, "1m", rows, complete=(R.T0, R.T0 + 100 * R.MIN))
        st.candles(SYM, "1m", count=50)  # warm the memory tier
        in_batch = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with st.batch():
                in_batch.set()
                release.wait(30)

        th = threading.Thread(target=hold)
        th.start()
        assert in_batch.wait(30)

        async def main() -> mds.StorageResponse:
            task = asyncio.ensure_future(st.get(mds.StorageRequest("candle", [SYM], timeframe="1m", count=50)))
            for _ in range(3):  # the loop runs other tasks while the read waits
                await asyncio.sleep(0.01)
            assert not task.done()
            release.set()
            return await asyncio.wait_for(task, 30)

        try:
            resp = asyncio.run(main())
        finally:
            release.set()
            th.join(30)
        assert resp.success, resp.error
        assert resp.arrays[SYM].tobytes() == rows[-50:].tobytes()


def test_lmdb_never_keeps_the_earlier_of_two_commits(tmp_path: Path) -> None:
    """Item 7: store A commits v1 and reads it back to fill LMDB; store B (another thread, same
    path) commits v2 in between. LMDB must not end up holding v1."""
    path = tmp_path / "s"
    ts = R.T0 + R.MIN * np.arange(200)
    v1, v2 = R.marked(ts, 1.0), R.marked(ts, 2.0)
    with mds.open(path, clock=R.Clock()) as a, mds.open(path, clock=R.Clock()) as b:
        disk = a._health.states["disk"].obj
        real = disk.put_range
        fired = []

        def late_put(*args: Any) -> Any:
            if not fired:
                fired.append(1)
                t = threading.Thread(target=b.write_candles, args=(SYM, "1m", v2))
                t.start()
                t.join(30)
            return real(*args)

        disk.put_range = late_put
        a.write_candles(SYM, "1m", v1)
        assert fired
        del disk.put_range
        assert a.check().ok, a.check().problems
    with mds.open(path, clock=R.Clock()) as c:
        got = c.candles(SYM, "1m", start=R.T0, end=R.T0 + 200 * R.MIN)
        assert got.tobytes() == v2.tobytes()
        held = c._health.states["disk"].obj.held(SYM, mds.timeframes.parse_timeframe("1m"))
        for s, e in np.asarray(held).reshape(-1, 2).tolist():
            part = c._health.states["disk"].obj.get_range(SYM, mds.timeframes.parse_timeframe("1m"), s, e)
            assert part.tobytes() == v2[(ts >= s) & (ts < e)].tobytes()


@pytest.mark.parametrize("bad", [None, float("nan"), "1737936000000", True, -5, 1 << 62, float("inf")])
def test_a_lying_clock_is_a_typed_error_at_open(tmp_path: Path, bad: Any) -> None:
    """Item 10: a clock answering None, NaN, a string, a bool or an impossible time fails at open
    with InvalidRequestError, not late and untyped."""
    with pytest.raises(mds.InvalidRequestError, match="clock"):
        mds.open(tmp_path / "s", clock=lambda: bad)
    with pytest.raises(mds.InvalidRequestError, match="clock"):
        mds.open(tmp_path / "s", clock=12345)  # type: ignore[arg-type]


def test_a_clock_that_turns_bad_later_is_a_typed_error(tmp_path: Path) -> None:
    answers: list[Any] = [R.NOW]
    with mds.open(tmp_path / "s", clock=lambda: answers[-1]) as st:
        st.write_candles(SYM, "1m", R.marked([R.T0], 1.0))
        answers.append(float("nan"))
        with pytest.raises(mds.InvalidRequestError, match="clock"):
            st.write_candles(SYM, "1m", R.marked([R.T0 + R.MIN], 1.0))
        with pytest.raises(mds.InvalidRequestError, match="clock"):
            st.candles(SYM, "1m", count=1)
        answers.append(R.NOW)
        assert st.candles(SYM, "1m", start=R.T0, end=R.T0 + 2 * R.MIN).tobytes() == R.marked([R.T0], 1.0).tobytes()


class _Raising:
    """A Layer 1 whose get_candle_data raises ``exc`` once, then answers from ``truth``."""

    def __init__(self, exc: BaseException, truth: np.ndarray) -> None:
        self.exc: BaseException | None = exc
        self.truth = truth

    async def get_candle_data(self, symbols: list[str], interval: str, count: int = 200, to: Any = None, **_: Any):
        if self.exc is not None:
            exc, self.exc = self.exc, None
            raise exc
        rows = self.truth
        if to is not None:
            rows = rows[rows["ts"] < mds.timeutil.to_ms(to)]
        rows = rows[-count:]
        return {"success": True, "data": mds.convert.candles_to_upbit(rows[::-1], symbols[0], interval), "metadata": {}}

    async def get_ticker_data(self, symbols: list[str], use_cache: bool = True) -> dict[str, Any]:
        return {"success": False, "data": None, "metadata": {}}

    get_orderbook_data = get_ticker_data

    async def get_trades(self, symbols: list[str], count: int = 100) -> dict[str, Any]:
        return {"success": False, "data": None, "metadata": {}}


@pytest.mark.parametrize(
    "exc",
    [SystemExit(3), KeyboardInterrupt(), asyncio.CancelledError(), GeneratorExit()],
    ids=lambda e: type(e).__name__,
)
def test_a_layer1_raising_base_exceptions_leaves_the_store_serving(tmp_path: Path, exc: BaseException) -> None:
    """Item 10: SystemExit, KeyboardInterrupt, CancelledError or GeneratorExit raised by the Layer 1
    is a Layer1Error for that read; the next read is answered (the Layer 1 thread lives on)."""
    truth = R.marked(R.T0 + R.MIN * np.arange(300), 3.0)
    cfg = mds.Config(layer1_timeout_s=10)
    with mds.open(tmp_path / "s", layer1=_Raising(exc, truth), config=cfg, clock=R.Clock()) as st:
        with pytest.raises(mds.Layer1Error) as err:
            st.candles(SYM, "1m", start=R.T0, end=R.T0 + 100 * R.MIN)
        assert "did not answer" not in str(err.value)  # answered as an error, not timed out
        thread = st._fetcher.loop_thread
        assert thread is not None and thread.is_alive()
        got = st.candles(SYM, "1m", start=R.T0, end=R.T0 + 100 * R.MIN)
        assert got.tobytes() == truth[:100].tobytes()


@pytest.mark.parametrize("price", [0.0, -1.0, float("nan"), float("inf")])
def test_realtime_prices_must_be_positive_and_finite(tmp_path: Path, price: float) -> None:
    """Item 10 (realtime): a ticker or an orderbook level with a price <= 0 or not finite is
    refused with a typed error and leaves the cache as it was."""
    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        good = {
            "market": SYM,
            "trade_price": 100.0,
            "timestamp": R.NOW,
            "trade_timestamp": R.NOW,
            "trade_volume": 1.0,
            **dict.fromkeys(("opening_price", "high_price", "low_price", "prev_closing_price"), 100.0),
            **dict.fromkeys(("acc_trade_price", "acc_trade_volume"), 1.0),
            "change": "EVEN",
        }
        st.put_ticker(good)
        with pytest.raises(mds.InvalidRequestError, match="price"):
            st.put_ticker({**good, "trade_price": price, "timestamp": R.NOW + 1})
        ticker = st.ticker(SYM)
        assert ticker is not None and ticker["trade_price"] == 100.0
        unit = {"ask_price": 101.0, "bid_price": 99.0, "ask_size": 1.0, "bid_size": 2.0}
        sizes = {"total_ask_size": 1.0, "total_bid_size": 2.0}
        st.put_orderbook({"market": SYM, "timestamp": R.NOW, "orderbook_units": [unit], **sizes})
        for bad in ({**unit, "bid_price": price}, {**unit, "ask_price": price}):
            with pytest.raises(mds.InvalidRequestError):
                st.put_orderbook({"market": SYM, "timestamp": R.NOW + 1, "orderbook_units": [unit, bad], **sizes})
        book = st.orderbook(SYM)
        assert book is not None and book["orderbook_units"] == [unit]
        negative = [{**unit, "ask_size": -1.0}]
        with pytest.raises(mds.InvalidRequestError):
            st.put_orderbook({"market": SYM, "timestamp": R.NOW + 2, "orderbook_units": negative, **sizes})


def test_check_compares_series_only_lmdb_holds(tmp_path: Path) -> None:
    """Item 12: check() walked only the series SQLite knows; rows LMDB holds for a series SQLite
    has never seen (written by a store without its SQLite tier) went unreported."""
    path = tmp_path / "s"
    rows = R.marked(R.T0 + R.MIN * np.arange(100), 1.0)
    with mds.open(path, config=mds.Config(tiers=("memory", "disk")), clock=R.Clock()) as st:
        st.write_candles("KRW-ETH", "1m", rows, complete=(R.T0, R.T0 + 100 * R.MIN))
    with mds.open(path, clock=R.Clock()) as st:
        assert st._health.states["disk"].obj.series() == [("KRW-ETH", "1m")]
        rep = st.check()
        assert not rep.ok
        assert any("KRW-ETH 1m" in p and "differs from SQLite" in p for p in rep.problems), rep.problems


def _flip_first_chunk(db_file: Path) -> None:
    """Flip one byte inside the close price of a row of the series' first stored chunk."""
    import apsw

    conn = apsw.Connection(str(db_file))
    key, data = conn.execute("SELECT key, data FROM chunk ORDER BY key LIMIT 1").fetchall()[0]
    b = bytearray(data)
    b[56 * 10 + 32 + 5] ^= 0x40  # row 10, field close
    conn.execute("UPDATE chunk SET data = ? WHERE key = ?", (bytes(b), key))
    conn.close()


def test_a_damaged_chunk_is_a_typed_error_without_layer1(tmp_path: Path) -> None:
    """Item 3 through the store: the damaged rows are never served; other ranges still are."""
    path = tmp_path / "s"
    rows = _seed(path, ("memory", "sqlite"))
    _flip_first_chunk(path / "candles.sqlite3")
    with mds.open(path, config=mds.Config(tiers=("memory", "sqlite")), clock=R.Clock()) as st:
        with pytest.raises(mds.StorageUnavailableError, match=r"checksum|damaged"):
            st.candles(SYM, "1m", start=R.T0, end=R.T0 + 100 * R.MIN)
        got = st.candles(SYM, "1m", start=R.T0 + 2048 * R.MIN, end=R.T0 + 2100 * R.MIN)
        assert got.tobytes() == rows[2048:2100].tobytes()
        assert "sqlite" not in st.stats()["degraded"]  # damaged rows are not a broken tier
        rep = st.check()
        assert not rep.ok and any("chunk" in p for p in rep.problems), rep.problems


def test_a_damaged_chunk_is_quarantined_and_refetched_with_layer1(tmp_path: Path) -> None:
    """Item 3 with a Layer 1: the read answers the market's candles, the damaged span is
    replaced by a refetch, and check() is clean afterwards."""
    clock = R.Clock()
    truth = R.marked(R.T0 + R.MIN * np.arange(N), 5.0)
    path = tmp_path / "s"
    cfg = mds.Config(tiers=("memory", "sqlite"), lookup="storage_first")
    with FakeUpbit({(SYM, "1m"): truth}, clock=clock, rate_limit=None) as up:
        l1 = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
        with mds.open(path, layer1=l1, config=cfg, clock=clock) as st:
            assert st.candles(SYM, "1m", start=R.T0, end=R.T0 + N * R.MIN).tobytes() == truth.tobytes()
        _flip_first_chunk(path / "candles.sqlite3")
        l1 = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
        with mds.open(path, layer1=l1, config=cfg, clock=clock) as st:
            got = st.candles(SYM, "1m", start=R.T0, end=R.T0 + N * R.MIN)
            assert got.tobytes() == truth.tobytes()
            rep = st.check()
            assert rep.ok, rep.problems
            db = st._health.states["sqlite"].obj
            assert db.read_range(SYM, "1m", R.T0, R.T0 + N * R.MIN).tobytes() == truth.tobytes()


_ACK_THEN_WAIT = """
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np, mds, _relutil as R
st = mds.open(sys.argv[1], clock=R.Clock())
st.write_candles("KRW-BTC", "1m", R.marked(R.T0 + R.MIN * np.arange(50), 1.0))
st.write_candles("KRW-BTC", "1m", R.marked(R.T0 + R.MIN * np.arange(50, 100), 1.0))
print("acked", flush=True)
sys.stdin.readline()
"""


def test_check_reports_acknowledged_commits_lost_with_a_deleted_wal(tmp_path: Path) -> None:
    """Item 12: a process is killed after acknowledged writes and its -wal file is deleted; the
    file alone looks healthy, check() must say the acknowledged writes are gone."""
    path = tmp_path / "s"
    _seed(path)  # a checkpointed history the WAL loss leaves intact
    child = subprocess.Popen(
        [sys.executable, "-c", _ACK_THEN_WAIT, str(path), str(Path(R.__file__).parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=R.child_env(),
    )
    R.TALLY["processes_started"] += 1
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"acked"
    finally:
        child.kill()
        child.wait(30)
    (path / "candles.sqlite3-wal").unlink()
    (path / "candles.sqlite3-shm").unlink(missing_ok=True)
    with mds.open(path, clock=R.Clock()) as st:
        rep = st.check()
        assert not rep.ok
        assert any("acknowledged" in p and "lost" in p for p in rep.problems), rep.problems
    # once the loss is accepted (changes.bin deleted, as the message says), check() is clean
    (path / "changes.bin").unlink()
    with mds.open(path, clock=R.Clock()) as st:
        assert st.check().ok, st.check().problems


def test_a_huge_integer_in_a_candle_dict_is_a_typed_error(tmp_path: Path) -> None:
    """Item 10: an int beyond a double (10**400) in a candle dict raised OverflowError, untyped."""
    row = {
        "candle_date_time_utc": "2025-01-06T00:00:00",
        "opening_price": 10**400,
        "high_price": 2.0,
        "low_price": 1.0,
        "trade_price": 1.5,
        "candle_acc_trade_volume": 1.0,
        "candle_acc_trade_price": 1.5,
    }
    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        with pytest.raises(mds.InvalidCandleError):
            st.write_candles(SYM, "1m", [row])
        assert st.coverage(SYM, "1m") == []


class _Scripted:
    """A Layer 1 serving ``truth`` newest first, whose ``hook(count, to_ms, call_no)`` may replace
    an answer (return a dict) or leave it (return None)."""

    def __init__(self, truth: np.ndarray, hook: Any) -> None:
        self.truth, self.hook, self.calls = truth, hook, 0

    async def get_candle_data(self, symbols: list[str], interval: str, count: int = 200, to: Any = None, **_: Any):
        self.calls += 1
        to_ms = None if to is None else mds.timeutil.to_ms(to)
        answer = self.hook(count, to_ms, self.calls)
        if answer is not None:
            return answer
        rows = self.truth if to_ms is None else self.truth[self.truth["ts"] < to_ms]
        rows = rows[-count:]
        return {"success": True, "data": mds.convert.candles_to_upbit(rows[::-1], symbols[0], interval), "metadata": {}}

    get_ticker_data = _Raising.get_ticker_data
    get_orderbook_data = _Raising.get_ticker_data
    get_trades = _Raising.get_trades


def _no_false_no_trades(st: mds.Store, truth: np.ndarray) -> None:
    for g in st.gaps(SYM, "1m"):
        if g.kind == "no_trades":
            inside = (truth["ts"] >= g.start) & (truth["ts"] < g.end)
            assert not inside.any(), f"no_trades gap {g} holds {int(inside.sum())} real candles"


@pytest.mark.parametrize(
    "answer",
    [
        {"success": "false", "data": [], "error": "rate limited"},
        {"success": 1, "data": []},
        {"success": True, "data": [], "error": "429 too many requests"},
    ],
    ids=["string-false", "one", "true-with-error"],
)
def test_only_success_true_without_error_is_an_answer(tmp_path: Path, answer: dict[str, Any]) -> None:
    """Item 1 (hostile review): an answer whose success is truthy but not True, or that carries an
    error, was read as an empty page, proving history ran out: real candles became no_trades."""
    truth = R.marked(R.T0 + R.MIN * np.arange(1440), 4.0)
    l1 = _Scripted(truth, lambda count, to, n: answer if n == 2 else None)
    with mds.open(tmp_path / "s", layer1=l1, config=mds.Config(lookup="storage_first"), clock=R.Clock()) as st:
        with pytest.raises(mds.Layer1Error, match="success=True"):
            st.candles(SYM, "1m", start=R.T0, end=R.T0 + 1440 * R.MIN)
        _no_false_no_trades(st, truth)
        got = st.candles(SYM, "1m", start=R.T0, end=R.T0 + 1440 * R.MIN)
        assert got.tobytes() == truth.tobytes()
        _no_false_no_trades(st, truth)


def test_an_empty_page_contradicted_by_stored_candles_proves_nothing(tmp_path: Path) -> None:
    """Item 1 (hostile review): the store holds candles of the first hour; a later range read
    gets one flaky empty page. It was taken as the start of history, and the candles between were
    labelled no_trades. Now it is a Layer1Error, and the next read answers in full."""
    truth = R.marked(R.T0 + R.MIN * np.arange(3 * 1440), 4.0)
    armed = {"done": False}

    def hook(count: int, to: int | None, n: int) -> dict[str, Any] | None:
        if not armed["done"] and to is not None and R.T0 + R.DAY < to < R.T0 + 2 * R.DAY:
            armed["done"] = True
            return {"success": True, "data": [], "metadata": {}}
        return None

    cfg = mds.Config(lookup="storage_first")
    with mds.open(tmp_path / "s", layer1=_Scripted(truth, hook), config=cfg, clock=R.Clock()) as st:
        assert st.candles(SYM, "1m", start=R.T0, end=R.T0 + 60 * R.MIN).tobytes() == truth[:60].tobytes()
        with pytest.raises(mds.Layer1Error, match="holds one"):
            st.candles(SYM, "1m", start=R.T0 + R.DAY, end=R.T0 + 2 * R.DAY)
        _no_false_no_trades(st, truth)
        got = st.candles(SYM, "1m", start=R.T0 + R.DAY, end=R.T0 + 2 * R.DAY)
        assert got.tobytes() == truth[1440:2880].tobytes()
        _no_false_no_trades(st, truth)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd and /proc/self/maps (Linux)")
def test_close_releases_every_file(tmp_path: Path) -> None:
    """Hostile review: close() left changes.bin mapped and open (a second view kept the map
    alive), so the file system stayed busy after a clean close."""
    path = tmp_path / "s"
    st = mds.open(path, clock=R.Clock())
    st.write_candles(SYM, "1m", R.marked([R.T0], 1.0))
    st.close()
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
    with open("/proc/self/maps") as f:
        held += [ln.split()[-1] for ln in f if str(path) in ln]
    assert not held, held


def test_opening_a_store_while_another_process_writes_serves_reads(tmp_path: Path) -> None:
    """Item 2 (hostile review): opening set PRAGMA auto_vacuum, which takes the write lock, so an
    open behind another process's write transaction waited out the busy timeout and left the
    durable tier degraded: reads raised although WAL lets them read."""
    path = tmp_path / "s"
    rows = _seed(path, ("memory", "sqlite"))
    with (
        R.sqlite_write_locked(path / "candles.sqlite3"),
        mds.open(path, config=mds.Config(tiers=("memory", "sqlite")), clock=R.Clock()) as st,
    ):
        assert st.stats()["degraded"] == []
        got = st.candles(SYM, "1m", start=R.T0, end=R.T0 + N * R.MIN)
        assert got.tobytes() == rows.tobytes()


@pytest.mark.parametrize("tiers", [("disk",), ("memory", "disk")], ids=["disk", "memory+disk"])
def test_latest_n_without_a_durable_tier_answers_what_lmdb_holds(tmp_path: Path, tiers: tuple[str, ...]) -> None:
    """Hostile review: a store without SQLite answered count reads empty (disk only) or from the
    memory window alone (1,000 of 2,000), also after reopening, while LMDB held 3,000."""
    path = tmp_path / "s"
    rows = R.marked(R.T0 + R.MIN * np.arange(N), 1.0)
    cfg = mds.Config(tiers=tiers)
    with mds.open(path, config=cfg, clock=R.Clock()) as st:
        st.write_candles(SYM, "1m", rows, complete=(R.T0, R.T0 + N * R.MIN))
        for n in (10, 2000):
            assert st.candles(SYM, "1m", count=n).tobytes() == rows[-n:].tobytes()
    with mds.open(path, config=cfg, clock=R.Clock()) as st:
        for n in (10, 2000):
            assert st.candles(SYM, "1m", count=n).tobytes() == rows[-n:].tobytes()


def test_memory_only_eviction_makes_slots_missing_not_no_trades(tmp_path: Path) -> None:
    """Hostile review: a memory-only store keeps its newest 1,000 candles; the evicted 2,000 kept
    their coverage and were labelled no_trades. Coverage proves only what is still held."""
    rows = R.marked(R.T0 + R.MIN * np.arange(N), 1.0)
    with mds.open(tmp_path / "s", config=mds.Config(tiers=("memory",)), clock=R.Clock()) as st:
        st.write_candles(SYM, "1m", rows, complete=(R.T0, R.T0 + N * R.MIN))
        assert st.coverage(SYM, "1m") == [(int(rows["ts"][N - 1000]), R.T0 + N * R.MIN)]
        gaps = st.gaps(SYM, "1m", start=R.T0, end=R.T0 + N * R.MIN)
        assert [(g.start, g.end, g.kind) for g in gaps] == [(R.T0, int(rows["ts"][N - 1000]), "missing")]


def _flip_coverage_end(db_file: Path, bit: int) -> None:
    """Flip one bit of the first coverage row's end (a real byte edit of the closed file, found
    through the value it holds)."""
    import apsw

    conn = apsw.Connection(str(db_file))
    end = conn.execute("SELECT end_ts FROM coverage ORDER BY sid, start_ts LIMIT 1").fetchall()[0][0]
    conn.close()
    data = bytearray(db_file.read_bytes())
    needle = int(end).to_bytes(6, "big")  # SQLite's record format: a 6-byte big-endian integer
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the coverage end is not unique in the file"
    data[at + 5 - bit // 8] ^= 1 << (bit % 8)
    db_file.write_bytes(bytes(data))


def test_a_flipped_coverage_bound_never_labels_no_trades(tmp_path: Path) -> None:
    """Hostile review (items 3, 12): coverage rows had no checksum; a flipped bit in a bound made
    never-fetched slots read as no_trades and check() said ok. Now the row is refused (typed),
    check() names it, and quarantining it makes its span missing."""
    path = tmp_path / "s"
    rows = R.marked(R.T0 + R.MIN * np.arange(600, 1200), 1.0)
    cfg = mds.Config(tiers=("memory", "sqlite"))
    with mds.open(path, config=cfg, clock=R.Clock()) as st:
        st.write_candles(SYM, "1m", rows, complete=(R.T0 + 600 * R.MIN, R.T0 + 1200 * R.MIN))
    (path / "candles.sqlite3-wal").unlink(missing_ok=True)
    _flip_coverage_end(path / "candles.sqlite3", 25)
    with mds.open(path, config=cfg, clock=R.Clock()) as st:
        with pytest.raises(mds.StorageUnavailableError, match="checksum"):
            st.gaps(SYM, "1m")
        with pytest.raises(mds.StorageUnavailableError, match="checksum"):
            st.coverage(SYM, "1m")
        rep = st.check()
        assert not rep.ok and any("coverage" in p and "checksum" in p for p in rep.problems), rep.problems
        db = st._health.states["sqlite"].obj
        assert db.quarantine_damaged(SYM, "1m")
    with mds.open(path, config=cfg, clock=R.Clock()) as st:
        assert st.coverage(SYM, "1m") == []
        assert all(g.kind == "missing" for g in st.gaps(SYM, "1m"))
        assert st.candles(SYM, "1m", start=R.T0, end=R.NOW).tobytes() == rows.tobytes()


def test_check_reports_a_tier_failing_under_it_instead_of_raising(tmp_path: Path, monkeypatch: Any) -> None:
    """Found by the model test: check() let a backend error out untyped when SQLite failed while
    LMDB was compared with it. What it cannot check is a problem it reports."""
    import apsw

    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        st.write_candles(SYM, "1m", R.marked(R.T0 + R.MIN * np.arange(100), 1.0))
        st.candles(SYM, "1m", start=R.T0, end=R.T0 + 100 * R.MIN)  # LMDB holds the range

        def fail(*_: Any) -> Any:
            raise apsw.IOError("injected: disk I/O error")

        monkeypatch.setattr(st._health.states["sqlite"].obj, "read_range", fail)
        rep = st.check()
        assert not rep.ok
        assert any("could not finish" in p and "IOError" in p for p in rep.problems), rep.problems


def _flip_bits(blob: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(blob)
    for word, bit in flips:
        b[word * 8 + bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def _bit(blob: bytes, word: int, bit: int) -> int:
    return (blob[word * 8 + bit // 8] >> (bit % 8)) & 1


def test_two_flips_that_cancel_in_a_plain_sum_are_caught(tmp_path: Path) -> None:
    """Found by the model test's stress run: the checksum was a plain sum of 8-byte words, so two
    flips of one bit position in opposite directions (two words of a chunk, or a tail row's word
    and its stored checksum) cancelled, and the newest candle was served with a wrong value."""
    import apsw

    path = tmp_path / "s"
    _seed(path, ("memory", "sqlite"))
    conn = apsw.Connection(str(path / "candles.sqlite3"))
    key, data = conn.execute("SELECT key, data FROM chunk ORDER BY key LIMIT 1").fetchall()[0]
    # row 10's volume (1.0: bit 52 set) loses 2**52, row 11's ts (below 2**41: bit 52 clear) gains it
    assert _bit(data, 10 * 7 + 5, 52) == 1 and _bit(data, 11 * 7, 52) == 0
    conn.execute("UPDATE chunk SET data = ? WHERE key = ?", (_flip_bits(data, [(75, 52), (77, 52)]), key))
    ts, v = conn.execute("SELECT ts, v FROM tail ORDER BY ts DESC LIMIT 1").fetchall()[0]
    k = next(k for k in range(40, 52) if _bit(v, 5, k) == 0 and _bit(v, 7, k) == 0)
    conn.execute("UPDATE tail SET v = ? WHERE ts = ?", (_flip_bits(v, [(5, k), (7, k)]), ts))
    conn.close()
    with mds.open(path, config=mds.Config(tiers=("memory", "sqlite")), clock=R.Clock()) as st:
        with pytest.raises(mds.StorageUnavailableError, match="checksum"):
            st.candles(SYM, "1m", start=R.T0, end=R.T0 + 100 * R.MIN)
        with pytest.raises(mds.StorageUnavailableError, match="checksum"):
            st.candles(SYM, "1m", count=1)
        assert not st.check().ok
