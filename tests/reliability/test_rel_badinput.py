"""Bad input, generated with hypothesis: each invalid call raises a typed error and leaves the store
byte-for-byte as it was (digest of SQLite content and change counter, raw LMDB entries, memory
windows). Valid but messy batches (unsorted, duplicated) are stored sorted and unique, last wins."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _relutil as R
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mds
from mds.convert import candles_to_upbit
from mds.symbols import validate_symbol
from mds.timeframes import parse_timeframe

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
BASE = R.T0 + 3 * R.DAY


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mds.Store]:
    with mds.open(tmp_path_factory.mktemp("bad") / "s", clock=R.Clock()) as s:
        for sym in ("KRW-BTC", "KRW-ETH"):
            s.write_candles(
                sym, "1m", R.marked(BASE + R.MIN * np.arange(3000), 5.0), complete=(BASE, BASE + 3000 * R.MIN)
            )
            s.candles(sym, "1m", count=1000)  # fills memory and LMDB
        s.write_candles("KRW-BTC", "1d", R.marked(R.T0 + R.DAY * np.arange(10), 6.0))
        yield s
        assert s.check().ok, s.check().problems


def unchanged(store: mds.Store, call: Callable[[], Any], errors: type[BaseException] | tuple = mds.MdsError) -> None:
    before = R.store_digest(store)
    with pytest.raises(errors):
        call()
    assert R.store_digest(store) == before, "a rejected call changed the store"
    R.TALLY["badinput_rejected_unchanged"] += 1


# --- candles ------------------------------------------------------------------------------------
FIELDS = ("open", "high", "low", "close", "volume", "value")


@st.composite
def corrupted_batch(draw: Any) -> np.ndarray:
    n = draw(st.integers(1, 300))
    first = draw(st.integers(0, 5000))
    a = R.marked(BASE + R.MIN * (first + np.arange(n)), draw(st.floats(0, 1e6)))
    k = draw(st.integers(1, min(n, 5)))
    for _ in range(k):
        i = draw(st.integers(0, n - 1))
        how = draw(st.sampled_from(["nonfinite", "negative", "low_above", "high_below", "misaligned", "future"]))
        if how == "nonfinite":
            a[draw(st.sampled_from(FIELDS))][i] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        elif how == "negative":
            a[draw(st.sampled_from(["volume", "value"]))][i] = -draw(st.floats(1e-9, 1e12))
        elif how == "low_above":
            a["low"][i] = max(a["open"][i], a["close"][i]) + draw(st.floats(1e-6, 1e6))
        elif how == "high_below":
            a["high"][i] = min(a["open"][i], a["close"][i]) - draw(st.floats(1e-6, 1e6))
        elif how == "misaligned":
            a["ts"][i] += draw(st.integers(1, R.MIN - 1))
        else:
            a["ts"][i] = (R.NOW // R.MIN + draw(st.integers(1, 10**6))) * R.MIN
    if draw(st.booleans()):
        a = a[draw(st.permutations(range(n)))]
    return a


def test_invalid_candles_are_rejected_and_change_nothing(store: mds.Store) -> None:
    @SETTINGS
    @given(
        batch=corrupted_batch(),
        grouped=st.booleans(),
        complete=st.booleans(),
        sym=st.sampled_from(["KRW-BTC", "KRW-NEW"]),
    )
    def run(batch: np.ndarray, grouped: bool, complete: bool, sym: str) -> None:
        R.TALLY["badinput_generated"] += 1
        cov = (BASE, BASE + 6000 * R.MIN) if complete else None

        def call() -> None:
            if grouped:
                with store.batch():
                    store.write_candles(sym, "1m", batch, complete=cov)
            else:
                store.write_candles(sym, "1m", batch, complete=cov)

        unchanged(store, call, mds.InvalidCandleError)

    run()


def test_batch_rejected_by_a_later_invalid_write_changes_nothing(tmp_path: Path) -> None:
    with mds.open(tmp_path / "s", clock=R.Clock()) as s:
        s.write_candles(
            "KRW-ETH", "1m", R.marked(BASE + R.MIN * np.arange(100), 5.0), complete=(BASE, BASE + 100 * R.MIN)
        )
        bad = R.marked([BASE], 1.0)
        bad["low"] = 1e9

        def call() -> None:
            with s.batch():
                s.write_candles("KRW-ETH", "1m", R.marked([BASE + 10 * R.MIN], 9.0))  # valid; rolled back
                s.write_candles("KRW-BTC", "1m", bad)  # invalid: the batch is rejected

        unchanged(s, call, mds.InvalidCandleError)


_WRONG = [
    np.zeros((2, 3), mds.CANDLE_DTYPE),
    np.zeros((0, 1), mds.CANDLE_DTYPE),
    np.zeros(3, dtype=[("ts", "<i8"), ("close", "<f8")]),
    np.zeros(3, dtype=np.float64),
    np.zeros((3, 7), dtype=np.float64),
    np.array([object(), None], dtype=object),
    np.zeros(3, dtype=[(n, "<U4") for n in mds.CANDLE_DTYPE.names or ()]),
    "KRW-BTC",
    b"\x00" * 56,
    {"ts": 1},
    None,
    42,
    3.5,
    [1, 2, 3],
    [None],
    [[BASE, 1, 2, 0, 1, 1, 1]],
    object(),
]


@pytest.mark.parametrize("bad", _WRONG, ids=[type(b).__name__ + str(i) for i, b in enumerate(_WRONG)])
def test_wrong_dtypes_and_shapes_are_typed_errors(store: mds.Store, bad: Any) -> None:
    R.TALLY["badinput_generated"] += 1
    unchanged(store, lambda: store.write_candles("KRW-BTC", "1m", bad), mds.MdsError)


def test_unsorted_duplicated_valid_batches_store_sorted_unique_last_wins(tmp_path: Path) -> None:
    with mds.open(tmp_path / "s", clock=R.Clock()) as s:
        model: dict[int, bytes] = {}

        @SETTINGS
        @given(
            slots=st.lists(st.integers(0, 400), min_size=1, max_size=300),
            markers=st.lists(st.floats(0, 1e9, allow_nan=False), min_size=1, max_size=300),
        )
        def run(slots: list[int], markers: list[float]) -> None:
            R.TALLY["badinput_generated"] += 1
            rows = np.concatenate(
                [R.marked([BASE + x * R.MIN], markers[i % len(markers)]) for i, x in enumerate(slots)]
            )
            s.write_candles("KRW-BTC", "1m", rows)
            for r in rows:
                model[int(r["ts"])] = r.tobytes()
            want = b"".join(model[t] for t in sorted(model))
            got = s.candles("KRW-BTC", "1m", start=BASE, end=BASE + 401 * R.MIN)
            assert got.tobytes() == want
            assert np.all(np.diff(got["ts"]) > 0)
            assert s.candles("KRW-BTC", "1m", count=len(model)).tobytes() == want

        run()
        assert s.check().ok


# --- requests -----------------------------------------------------------------------------------
HOSTILE = [
    "KRW-BTC'; DROP TABLE x;--",
    'KRW-BTC"; DROP TABLE series;--',
    "../../etc",
    "../../etc/passwd",
    "KRW-BTC/../../x",
    "KRW-BTC\x00",
    "KRW-BTC\x1f1m",
    "",
    " ",
    "krw-btc",
    "KRW-비트코인",
    "KRW-BTC\u200b",
    "ＫＲＷ-ＢＴＣ",
    "KRW-" + "A" * 10_000,
    "K" * 1_000_000,
    "KRW-BTC%",
    "KRW-*",
    "KRW-BTC OR 1=1",
    None,
    123,
    b"KRW-BTC",
    ["KRW-BTC"],
]


def _symbol_calls(store: mds.Store, sym: Any) -> list[Callable[[], Any]]:
    one = R.marked([BASE], 1.0)
    return [
        lambda: store.write_candles(sym, "1m", one, complete=(BASE, BASE + R.MIN)),
        lambda: store.candles(sym, "1m", count=10),
        lambda: store.candles(sym, "1m", start=BASE, end=BASE + R.DAY),
        lambda: store.gaps(sym, "1m"),
        lambda: store.coverage(sym, "1m"),
        lambda: store.delete(sym, "1m"),
        lambda: store.trades(sym, count=1),
        lambda: store.ticker(sym),
    ]


@pytest.mark.parametrize("sym", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_symbols_are_rejected_everywhere(store: mds.Store, sym: Any) -> None:
    for call in _symbol_calls(store, sym):
        R.TALLY["badinput_generated"] += 1
        unchanged(store, call, mds.InvalidRequestError)


def _valid_symbol(s: str) -> bool:
    try:
        validate_symbol(s)
        return True
    except mds.InvalidRequestError:
        return False


def _valid_tf(s: str) -> bool:
    try:
        parse_timeframe(s)
        return True
    except mds.InvalidRequestError:
        return False


def test_generated_symbols_and_timeframes(store: mds.Store) -> None:
    @SETTINGS
    @given(
        sym=st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE[:18])),
        tf=st.one_of(st.text(max_size=8), st.just("1m")),
    )
    def run(sym: str, tf: str) -> None:
        R.TALLY["badinput_generated"] += 1
        if _valid_symbol(sym) and _valid_tf(tf):
            return
        for call in (
            lambda: store.write_candles(sym, tf, R.marked([BASE], 1.0)),
            lambda: store.candles(sym, tf, count=5),
            lambda: store.gaps(sym, tf),
            lambda: store.delete(sym, tf),
        ):
            unchanged(store, call, mds.InvalidRequestError)

    run()


BAD_TIMEFRAMES = ["2m", "0m", "-1m", "1y", "", "1", "m1", "1m ", "1M1", "60s", "1 m", "1m;", None, 1, 1.0, b"1m"]


@pytest.mark.parametrize("tf", BAD_TIMEFRAMES, ids=range(len(BAD_TIMEFRAMES)))
def test_bad_timeframes_are_rejected(store: mds.Store, tf: Any) -> None:
    R.TALLY["badinput_generated"] += 1
    if isinstance(tf, str) and _valid_tf(tf):
        pytest.skip(f"{tf!r} is an accepted alias")
    unchanged(store, lambda: store.write_candles("KRW-BTC", tf, R.marked([BASE], 1.0)), mds.InvalidRequestError)
    unchanged(store, lambda: store.candles("KRW-BTC", tf, count=3), mds.InvalidRequestError)


_times = st.one_of(
    st.integers(-(2**62), 2**62),
    st.datetimes(min_value=dt.datetime(1800, 1, 1), max_value=dt.datetime(2300, 1, 1)),
    st.datetimes(min_value=dt.datetime(1800, 1, 1), max_value=dt.datetime(2300, 1, 1), timezones=st.timezones()),
    st.text(max_size=30),
    st.floats(),
    st.none(),
)


def test_generated_ranges_and_counts(store: mds.Store) -> None:
    """Whatever the range or count, a read answers or raises InvalidRequestError; invalid
    ``complete`` ranges and deletes change nothing."""

    @SETTINGS
    @given(
        start=_times, end=_times, count=st.one_of(st.none(), st.integers(-5, 5000), st.floats(), st.text(max_size=3))
    )
    def run(start: Any, end: Any, count: Any) -> None:
        R.TALLY["badinput_generated"] += 1
        try:
            got = store.candles("KRW-BTC", "1m", start=start, end=end, count=count)
        except mds.InvalidRequestError:
            R.TALLY["badinput_rejected_reads"] += 1
        else:
            assert got.dtype == mds.CANDLE_DTYPE
            assert np.all(np.diff(got["ts"]) > 0)
        before = R.store_digest(store)
        try:
            store.write_candles("KRW-BTC", "1m", R.marked([], 1.0), complete=(start, end))
        except mds.InvalidRequestError:
            assert R.store_digest(store) == before
            R.TALLY["badinput_rejected_unchanged"] += 1
        else:  # an accepted empty complete range: must have been a valid, ordered pair
            from mds.timeutil import to_ms

            assert to_ms(end) > to_ms(start)
            store.delete("KRW-BTC", "1m", start=start, end=end)  # keep the fixture's content
            store.write_candles(
                "KRW-BTC", "1m", R.marked(BASE + R.MIN * np.arange(3000), 5.0), complete=(BASE, BASE + 3000 * R.MIN)
            )

    run()


def test_naive_and_aware_datetimes_name_the_same_instant(store: mds.Store) -> None:
    kst = dt.timezone(dt.timedelta(hours=9))

    @SETTINGS
    @given(a=st.integers(0, 2999), n=st.integers(1, 500))
    def run(a: int, n: int) -> None:
        R.TALLY["badinput_generated"] += 1
        s_ms, e_ms = BASE + a * R.MIN, BASE + (a + n) * R.MIN
        naive = (
            dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=s_ms),
            dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=e_ms),
        )
        aware = tuple(x.replace(tzinfo=dt.timezone.utc).astimezone(kst) for x in naive)
        want = store.candles("KRW-BTC", "1m", start=s_ms, end=e_ms)
        assert store.candles("KRW-BTC", "1m", start=naive[0], end=naive[1]).tobytes() == want.tobytes()
        assert store.candles("KRW-BTC", "1m", start=aware[0], end=aware[1]).tobytes() == want.tobytes()
        assert len(want) == min(n, 3000 - a)

    run()


# --- Upbit payloads -----------------------------------------------------------------------------
def test_upbit_payloads_with_missing_or_broken_fields_are_rejected(store: mds.Store) -> None:
    good = candles_to_upbit(R.marked(BASE + R.MIN * np.arange(20), 3.0), "KRW-BTC", "1m")
    keys = sorted(good[0])

    @SETTINGS
    @given(
        i=st.integers(0, 19),
        key=st.sampled_from(keys),
        how=st.sampled_from(["drop", "none", "text", "bool", "list", "nan"]),
    )
    def run(i: int, key: str, how: str) -> None:
        R.TALLY["badinput_generated"] += 1
        rows = [dict(r) for r in good]
        if how == "drop":
            del rows[i][key]
        else:
            rows[i][key] = {"none": None, "text": "abc", "bool": True, "list": [1], "nan": float("nan")}[how]
        before = R.store_digest(store)
        try:
            store.write_candles("KRW-BTC", "1m", rows)
        except mds.MdsError:
            assert R.store_digest(store) == before
            R.TALLY["badinput_rejected_unchanged"] += 1
            return
        # accepted: the field was not one mds reads; the data must then be exactly the good rows
        got = store.candles("KRW-BTC", "1m", start=BASE, end=BASE + 20 * R.MIN)
        assert got.tobytes() == R.marked(BASE + R.MIN * np.arange(20), 3.0).tobytes()
        R.TALLY["badinput_payload_ignored_field"] += 1

    run()
    # extra fields are ignored
    extra = [{**r, "unexpected": {"nested": [1, 2]}, "market": "KRW-BTC"} for r in good]
    store.write_candles("KRW-BTC", "1m", extra)
    store.write_candles("KRW-BTC", "1m", R.marked(BASE + R.MIN * np.arange(3000), 5.0))
