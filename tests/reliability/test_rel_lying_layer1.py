"""A Layer 1 that lies, through the real store (issue 14 items 1 and 10).

- Short pages (a Layer 1 that caps pages at 100, or one flaky half page in the middle of a
  backfill) are not "history ran out": no ``no_trades`` where the source had candles, no
  coverage claimed back to epoch 0, every candle of the source stored. Only an empty page proves
  the start of history.
- Duplicate starts inside one page: the row delivered later in the page wins.
- Candles of another timeframe (day candles answered for 1h ...) are a Layer1Error, nothing stored.
- Zero or negative prices from a Layer 1 (candles, trades, tickers) are a Layer1Error.
- A Layer 1 raising CancelledError, SystemExit, KeyboardInterrupt or GeneratorExit fails that
  one read with a typed Layer1Error; the next read is answered (the Layer 1 thread survives).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _relutil as R
import numpy as np
import pytest

import mds
from mds import DataType, StorageRequest
from mds.convert import candles_to_upbit
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

SYM = "KRW-DOGE"
END = R.T0 + 3 * R.DAY
TRUTH = generate_market(SYM, "1m", R.T0, END, liquidity="illiquid", seed=14)
HOURS = generate_market(SYM, "1h", R.T0, END, seed=14)
DAYS = generate_market(SYM, "1d", R.T0 - 30 * R.DAY, END, seed=14)
WEEKS = generate_market(SYM, "1w", R.T0 - 70 * R.DAY, END, seed=14)
CFG = mds.Config(lookup="storage_first", layer1_timeout_s=5.0)

Mangle = Callable[[int, list[dict[str, Any]]], list[dict[str, Any]]]


class ArrayLayer1:
    """The Smart Router's async shape (DESIGN.md section 5) over arrays, without a cache.

    Each candle call answers the ``min(count, cap)`` newest candles before ``to``, newest first,
    passed through ``mangle(call_number, rows)`` (the hook to lie). ``raise_once`` is raised by
    the next call of the method named ``raise_in``, then the Layer 1 behaves.
    """

    def __init__(
        self,
        series: dict[tuple[str, str], np.ndarray] | None = None,
        *,
        cap: int = 200,
        mangle: Mangle | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.series = series if series is not None else {(SYM, "1m"): TRUTH}
        self.cap = cap
        self.mangle = mangle
        self.extra = extra or {}  # fields added to every candle row (another timeframe's marks)
        self.candle_calls = 0
        self.raise_once: BaseException | None = None
        self.raise_in = ""
        self.ticker_price: float = 123.0
        self.trade_price: float = 123.0

    def _maybe_raise(self, method: str) -> None:
        if self.raise_in == method and self.raise_once is not None:
            exc, self.raise_once = self.raise_once, None
            raise exc

    async def get_candle_data(
        self, symbols: list[str], interval: str, count: int = 200, to: Any = None, use_cache: bool = True
    ) -> dict[str, Any]:
        self._maybe_raise("get_candle_data")
        self.candle_calls += 1
        await asyncio.sleep(0)
        rows: list[dict[str, Any]] = []
        for s in symbols:
            arr = self.series.get((s, interval), np.zeros(0, mds.CANDLE_DTYPE))
            if to is not None:
                arr = arr[arr["ts"] < to_ms(to)]
            page = candles_to_upbit(arr[len(arr) - min(count, self.cap, len(arr)) :][::-1], s, interval)
            page = [{**r, **self.extra} for r in page]
            rows += self.mangle(self.candle_calls, page) if self.mangle else page
        return {"success": True, "data": rows, "metadata": {"source": "api"}}

    async def get_ticker_data(self, symbols: list[str], use_cache: bool = True) -> dict[str, Any]:
        self._maybe_raise("get_ticker_data")
        await asyncio.sleep(0)
        rows = [
            {
                "market": s,
                "opening_price": 120.0,
                "high_price": 130.0,
                "low_price": 110.0,
                "trade_price": self.ticker_price,
                "prev_closing_price": 120.0,
                "timestamp": R.NOW - 1000,
                "trade_timestamp": R.NOW - 1000,
                "acc_trade_volume_24h": 1.0,
                "acc_trade_price_24h": 123.0,
                "acc_trade_price": 123.0,
                "acc_trade_volume": 1.0,
                "trade_volume": 1.0,
                "change": "RISE",
            }
            for s in symbols
        ]
        return {"success": True, "data": rows, "metadata": {}}

    async def get_orderbook_data(self, symbols: list[str], use_cache: bool = True) -> dict[str, Any]:
        return {"success": False, "error": "no orderbooks here", "metadata": {}}

    async def get_trades(self, symbols: list[str], count: int = 100) -> dict[str, Any]:
        rows = [
            {
                "market": s,
                "timestamp": R.NOW - 1000 * (i + 1),
                "trade_price": self.trade_price if i == 0 else 100.0,
                "trade_volume": 0.5,
                "ask_bid": "BID",
                "sequential_id": 1000 - i,
            }
            for s in symbols
            for i in range(min(count, 5))
        ]
        return {"success": True, "data": rows, "metadata": {}}


class PeekLayer1(ArrayLayer1):
    """With an async ``peek_cache`` that misses (answers None) unless it raises."""

    async def peek_cache(self, kind: Any, symbols: Any, interval: Any = None, count: Any = None) -> Any:
        self._maybe_raise("peek_cache")
        await asyncio.sleep(0)
        return None


class SyncPeekLayer1(ArrayLayer1):
    """With an ordinary-function ``peek_cache`` (called in the reader's thread)."""

    def peek_cache(self, kind: Any, symbols: Any, interval: Any = None, count: Any = None) -> Any:
        self._maybe_raise("peek_cache")
        return None


def between(arr: np.ndarray, s: int, e: int) -> np.ndarray:
    return arr[(arr["ts"] >= s) & (arr["ts"] < e)]


def assert_no_false_no_trades(st: mds.Store, s: int, e: int) -> None:
    """Every ``no_trades`` gap in [s, e) is really without a candle of the source."""
    for g in st.gaps(SYM, "1m", start=s, end=e):
        if g.kind == "no_trades":
            real = between(TRUTH, g.start, g.end)
            assert not len(real), f"no_trades over [{g.start}, {g.end}) where the source has {len(real)} candles"


def assert_all_stored(path: Path) -> None:
    """Reopened without a Layer 1, the store holds every candle of the source, exactly."""
    with mds.open(path, clock=R.Clock()) as st:
        got = st.candles(SYM, "1m", start=0, end=END)
        assert got.tobytes() == TRUTH.tobytes()
        assert st.check().ok, st.check().problems


def half_once(at: int) -> Mangle:
    """Answer half a page (its newest half) on candle call ``at`` only: one flaky page."""

    def mangle(call: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return rows[: max(1, len(rows) // 2)] if call == at else rows

    return mangle


# -- item 1: a short page is not the start of history ------------------------------------------


@pytest.mark.parametrize("lie", ["cap_100", "half_page_once"])
def test_a_short_page_does_not_poison_coverage(tmp_path: Path, lie: str) -> None:
    l1 = ArrayLayer1(cap=100) if lie == "cap_100" else ArrayLayer1(mangle=half_once(2))
    path = tmp_path / "s"
    with mds.open(path, layer1=l1, config=CFG, clock=R.Clock()) as st:
        s, e = R.T0 + R.DAY + 17 * R.MIN, R.T0 + 2 * R.DAY + 3 * R.MIN  # a backfill of several pages
        got = st.candles(SYM, "1m", start=s, end=e)
        assert got.tobytes() == between(TRUTH, s, e).tobytes(), "a short page cut the backfill short"
        cov = st.coverage(SYM, "1m")
        assert cov == [(s, e)], f"coverage claims more than was fetched: {cov}"
        assert_no_false_no_trades(st, R.T0 - R.DAY, END)
        latest = st.candles(SYM, "1m", count=1000)
        assert latest.tobytes() == TRUTH[-1000:].tobytes()
        assert st.coverage(SYM, "1m")[0][0] > 0, "coverage reaches back to epoch 0 without proof"
        assert_no_false_no_trades(st, R.T0 - R.DAY, END)
        # a backfill that walks past the first candle: an empty page proves the start of history
        got = st.candles(SYM, "1m", start=R.T0 - R.DAY, end=END)
        assert got.tobytes() == TRUTH.tobytes()
        assert st.coverage(SYM, "1m")[0][0] == 0
        assert_no_false_no_trades(st, 0, END)
        gaps = st.gaps(SYM, "1m", start=R.T0 - R.DAY, end=END)
        assert all(g.kind == "no_trades" for g in gaps)
        R.TALLY["layer1_lies_short_pages"] += 1
    assert_all_stored(path)


@pytest.mark.parametrize("times", [1, None], ids=["one_short_page", "every_page_half"])
def test_short_pages_from_upbit_through_the_router(tmp_path: Path, times: int | None) -> None:
    clock = R.Clock()
    with FakeUpbit({(SYM, "1m"): TRUTH}, clock=clock, rate_limit=None) as up:
        l1 = UpbitRouter(up.base_url, rate_limit=1000, rate_window_s=0.1, backoff_s=0.01, clock=clock)
        path = tmp_path / "s"
        with mds.open(path, layer1=l1, config=CFG, clock=clock) as st:
            up.inject("short_page", times=times, path_prefix="/v1/candles")
            s, e = R.T0 + R.DAY, R.T0 + 2 * R.DAY
            got = st.candles(SYM, "1m", start=s, end=e)
            assert got.tobytes() == between(TRUTH, s, e).tobytes()
            assert st.coverage(SYM, "1m") == [(s, e)]
            assert_no_false_no_trades(st, R.T0 - R.DAY, END)
            got = st.candles(SYM, "1m", start=R.T0 - R.DAY, end=END)
            assert got.tobytes() == TRUTH.tobytes()
            assert_no_false_no_trades(st, 0, END)
        assert_all_stored(path)


def test_an_empty_answer_proves_the_start_of_history_at_one_extra_request(tmp_path: Path) -> None:
    l1 = ArrayLayer1()
    with mds.open(tmp_path / "s", layer1=l1, config=CFG, clock=R.Clock()) as st:
        got = st.candles(SYM, "1m", start=R.T0 - R.DAY, end=R.T0 + 12 * 3_600_000)
        want = between(TRUTH, 0, R.T0 + 12 * 3_600_000)
        assert got.tobytes() == want.tobytes()
        # the pages of candles, the short last one, then one empty page before the first candle
        assert l1.candle_calls == -(-len(want) // 200) + 1
        assert st.coverage(SYM, "1m")[0][0] == 0


# -- item 10b: duplicates in one page, the later row wins ---------------------------------------


@pytest.mark.parametrize("where", ["after", "before"])
def test_duplicate_starts_in_one_page_resolve_to_the_later_row(tmp_path: Path, where: str) -> None:
    """A page repeats the candle at position 5 with another volume, placed after (or before) the
    original in the list as delivered: the row delivered later is stored."""

    def mangle(call: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if call != 1:
            return rows
        dup = {**rows[5], "candle_acc_trade_volume": 777.0, "candle_acc_trade_price": 777.0 * rows[5]["trade_price"]}
        return [*rows, dup] if where == "after" else [dup, *rows]

    with mds.open(tmp_path / "s", layer1=ArrayLayer1(mangle=mangle), config=CFG, clock=R.Clock()) as st:
        got = st.candles(SYM, "1m", count=50)
        assert got["ts"].tolist() == TRUTH["ts"][-50:].tolist()
        row = got[got["ts"] == TRUTH["ts"][-6]][0]
        want = 777.0 if where == "after" else float(TRUTH["volume"][-6])
        assert float(row["volume"]) == want
        others = np.ones(50, dtype=bool)
        others[-6] = False
        assert got[others].tobytes() == TRUTH[-50:][others].tobytes()


# -- item 10c: candles of another timeframe ------------------------------------------------------

DAY_MARKS = {"prev_closing_price": 100.0, "change_price": 1.0, "change_rate": 0.01}
OTHER_TF = [
    # asked, what the Layer 1 answers instead (each aligned to the asked grid), its marks
    ("1h", "1d", DAYS, DAY_MARKS),
    ("1m", "1h", HOURS, {"unit": 60}),
    ("1d", "1w", WEEKS, {"first_day_of_period": "2025-01-06"}),
    ("1s", "1m", TRUTH, {"unit": 1}),
    ("1h", "1m", TRUTH[TRUTH["ts"] % 3_600_000 == 0], {"unit": 1}),
]


@pytest.mark.parametrize(("asked", "other", "rows", "marks"), OTHER_TF, ids=[f"{a}-got-{o}" for a, o, *_ in OTHER_TF])
def test_candles_of_another_timeframe_are_rejected_and_nothing_is_stored(
    tmp_path: Path, asked: str, other: str, rows: np.ndarray, marks: dict[str, Any]
) -> None:
    class Liar(ArrayLayer1):
        async def get_candle_data(
            self, symbols: list[str], interval: str, count: int = 200, to: Any = None, use_cache: bool = True
        ) -> dict[str, Any]:
            assert interval == asked
            return await super().get_candle_data(symbols, other, count, to, use_cache)

    path = tmp_path / "s"
    clock = R.Clock(END + 30_000)  # everything served is closed, also for 1s
    with mds.open(path, layer1=Liar({(SYM, other): rows}, extra=marks), config=CFG, clock=clock) as st:
        with pytest.raises(mds.Layer1Error, match="asked for " + asked):
            st.candles(SYM, asked, start=END - 10 * R.DAY, end=END)
        with pytest.raises(mds.Layer1Error):
            st.candles(SYM, asked, count=10)
        assert st.coverage(SYM, asked) == []
    with mds.open(path, clock=clock) as st:
        assert len(st.candles(SYM, asked, start=0, end=END)) == 0


def test_unmarked_candles_and_the_right_marks_are_accepted(tmp_path: Path) -> None:
    """The check does not reject Upbit's own marks for the asked timeframe."""
    for tf, rows, marks in (("1d", DAYS, DAY_MARKS), ("1h", HOURS, {"unit": 60}), ("1w", WEEKS, {})):
        l1 = ArrayLayer1({(SYM, tf): rows}, extra={**marks, "first_day_of_period": "x"} if tf == "1w" else marks)
        with mds.open(tmp_path / tf, layer1=l1, config=CFG, clock=R.Clock()) as st:
            got = st.candles(SYM, tf, start=R.T0 - 70 * R.DAY, end=END)
            assert got.tobytes() == between(rows, R.T0 - 70 * R.DAY, END).tobytes()


# -- item 10a: prices <= 0 -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["opening_price", "high_price", "low_price", "trade_price"])
@pytest.mark.parametrize("value", [0.0, -0.0, -5.0])
def test_candles_with_a_price_at_or_below_zero_are_rejected(tmp_path: Path, field: str, value: float) -> None:
    def mangle(call: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        bad = dict(rows[3])
        bad[field] = value
        if field in ("high_price",):  # keep it otherwise consistent: only the sign is wrong
            bad.update(opening_price=value, low_price=value, trade_price=value)
        elif field in ("opening_price", "trade_price"):
            bad["low_price"] = value
        return [*rows[:3], bad, *rows[4:]]

    path = tmp_path / "s"
    with mds.open(path, layer1=ArrayLayer1(mangle=mangle), config=CFG, clock=R.Clock()) as st:
        with pytest.raises(mds.Layer1Error, match="nonpositive_price"):
            st.candles(SYM, "1m", count=20)
        assert st.coverage(SYM, "1m") == []
        arr = TRUTH[-5:].copy()
        arr["low"][2] = value
        with pytest.raises(mds.InvalidCandleError, match="nonpositive_price"):
            st.write_candles(SYM, "1m", arr)
    with mds.open(path, clock=R.Clock()) as st:
        assert len(st.candles(SYM, "1m", start=0, end=END)) == 0


@pytest.mark.parametrize("what", ["ticker", "trade"])
@pytest.mark.parametrize("price", [0.0, -1.0, float("nan")])
def test_realtime_answers_with_a_price_at_or_below_zero_are_rejected(tmp_path: Path, what: str, price: float) -> None:
    l1 = ArrayLayer1()
    l1.ticker_price = l1.trade_price = price
    dt = DataType.TICKER if what == "ticker" else DataType.TRADE
    with mds.open(tmp_path / "s", layer1=l1, config=CFG, clock=R.Clock()) as st:
        resp = asyncio.run(st.get(StorageRequest(dt, [SYM], count=5 if what == "trade" else None)))
        assert not resp.success and "Layer 1" in (resp.error or "")
        assert st.ticker(SYM) is None and len(st.trades(SYM)) == 0


# -- item 10d: BaseExceptions raised by the Layer 1 -------------------------------------------------

ABORTS = [asyncio.CancelledError, SystemExit, KeyboardInterrupt, GeneratorExit]


@pytest.mark.parametrize("exc", ABORTS, ids=[e.__name__ for e in ABORTS])
@pytest.mark.parametrize("where", ["get_candle_data", "get_ticker_data"])
def test_a_layer1_raising_a_base_exception_fails_one_read_typed(tmp_path: Path, exc: type, where: str) -> None:
    l1 = ArrayLayer1()
    with mds.open(tmp_path / "s", layer1=l1, config=CFG, clock=R.Clock()) as st:
        for sym in (SYM, "KRW-XRP"):  # twice: the Layer 1 thread survives each
            l1.raise_in, l1.raise_once = where, exc("raised by the Layer 1")
            if where == "get_candle_data":
                with pytest.raises(mds.Layer1Error, match=exc.__name__):
                    st.candles(SYM, "1m", count=10)
                assert st.candles(SYM, "1m", count=10).tobytes() == TRUTH[-10:].tobytes()
                st.delete(SYM, "1m")  # the next round fetches again
            else:
                req = StorageRequest(DataType.TICKER, [sym])  # a new symbol: not cached yet
                resp = asyncio.run(st.get(req))
                assert not resp.success and exc.__name__ in (resp.error or "")
                resp = asyncio.run(st.get(req))
                assert resp.success and resp.data[0]["trade_price"] == 123.0
        R.TALLY["layer1_base_exceptions_survived"] += 2


@pytest.mark.parametrize("exc", ABORTS, ids=[e.__name__ for e in ABORTS])
@pytest.mark.parametrize("peek", ["async", "sync"])
def test_a_peek_cache_raising_a_base_exception_does_not_fail_the_read(tmp_path: Path, exc: type, peek: str) -> None:
    """A failing peek is a cache miss: the read goes on to Layer 1's API, and keeps working."""
    l1 = PeekLayer1() if peek == "async" else SyncPeekLayer1()
    cfg = mds.Config(lookup="layer1_first", layer1_timeout_s=5.0)
    out: list[Any] = []
    with mds.open(tmp_path / "s", layer1=l1, config=cfg, clock=R.Clock()) as st:

        def reads() -> None:
            for _ in range(2):
                l1.raise_in, l1.raise_once = "peek_cache", exc("raised by the Layer 1")
                out.append(st.candles(SYM, "1m", count=10).tobytes())
                assert l1.raise_once is None  # the peek was asked and raised
                out.append(st.candles(SYM, "1m", count=10).tobytes())

        # In the main thread a KeyboardInterrupt from a sync peek may be the user's Ctrl-C and is
        # never swallowed; in any other thread it is the Layer 1's and becomes a Layer1Error.
        th = threading.Thread(target=reads)
        th.start()
        th.join(60)
        assert not th.is_alive()
    assert out == [TRUTH[-10:].tobytes()] * 4


def test_keyboard_interrupt_from_a_sync_peek_in_the_main_thread_reaches_the_caller(tmp_path: Path) -> None:
    l1 = SyncPeekLayer1()
    cfg = mds.Config(lookup="layer1_first", layer1_timeout_s=5.0)
    with mds.open(tmp_path / "s", layer1=l1, config=cfg, clock=R.Clock()) as st:
        l1.raise_in, l1.raise_once = "peek_cache", KeyboardInterrupt()
        assert threading.current_thread() is threading.main_thread()
        with pytest.raises(KeyboardInterrupt):
            st.candles(SYM, "1m", count=10)
        assert st.candles(SYM, "1m", count=10).tobytes() == TRUTH[-10:].tobytes()
