"""Named example cases for the kernels, run against both implementations (compiled and twin)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import weakref
from types import ModuleType

import numpy as np
import pytest

from mds import _pycore
from mds._dtypes import CANDLE_DTYPE
from mds.errors import InvalidRequestError
from mds.testing import dense_candles, kernel_modules, kernel_params
from mds.timeframes import TIMEFRAMES

_core = kernel_modules()["cython"]
IMPLS = kernel_params()

MIN = 60_000
DAY = 86_400_000
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
M1 = TIMEFRAMES["1m"].kernel_args
W1 = TIMEFRAMES["1w"].kernel_args
MO = TIMEFRAMES["1M"].kernel_args
MAR_2024 = 1_709_251_200_000  # 2024-03-01 00:00 UTC
FEB_2024 = 1_706_745_600_000  # 2024-02-01 00:00 UTC


def candles(ts: list[int], close: float = 1.0) -> np.ndarray:
    a = np.zeros(len(ts), CANDLE_DTYPE)
    a["ts"] = ts
    a["open"] = a["high"] = a["low"] = 1.0
    a["close"] = close
    a["high"] = np.maximum(1.0, close)
    a["low"] = np.minimum(1.0, close)
    return a


pytestmark = pytest.mark.parametrize("k", IMPLS)


# -- validate ----------------------------------------------------------------------------------
def test_validate_reports_first_failing_reason_per_row(k: ModuleType) -> None:
    a = candles([0, MIN, 2 * MIN, 3 * MIN, 4 * MIN, 5 * MIN + 1, 6 * MIN, 7 * MIN])
    a["close"][1] = np.nan
    a["low"][2] = 5.0  # low above body, and high below body too: the first reason wins
    a["high"][3] = 0.5
    a["volume"][4] = -1.0
    a["value"][7] = -0.5
    idx, reason = k.validate(a, *M1)
    assert idx.tolist() == [1, 2, 3, 4, 5, 7]
    assert [k.REASONS[r] for r in reason.tolist()] == [
        "nonfinite",
        "low_above_body",
        "high_below_body",
        "negative_volume",
        "misaligned",
        "negative_value",
    ]


def test_validate_rejects_zero_and_negative_prices(k: ModuleType) -> None:
    """DESIGN.md section 6: open, high, low or close <= 0 is invalid (reason 8, checked last)."""
    a = candles([i * MIN for i in range(8)])
    a[0] = (0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # low 0
    a[1] = (MIN, -0.0, 1.0, -0.0, 1.0, 0.0, 0.0)  # open -0.0
    a[2] = (2 * MIN, -2.0, -1.0, -3.0, -1.5, 1.0, 1.0)  # all negative, consistent otherwise
    a[3] = (3 * MIN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # all zero
    a[4] = (4 * MIN, 5e-324, 5e-324, 5e-324, 5e-324, 0.0, 0.0)  # the smallest positive price is valid
    a[5] = (5 * MIN, 1.0, 1.0, -1.0, 1.0, -1.0, 0.0)  # negative volume comes first
    a[6] = (6 * MIN + 1, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # misaligned comes first
    a[7] = (7 * MIN, 1.0, 2.0, 0.5, 1.5, 1.0, 1.0)
    idx, reason = k.validate(a, *M1)
    assert idx.tolist() == [0, 1, 2, 3, 5, 6]
    assert [k.REASONS[r] for r in reason.tolist()] == [
        "nonpositive_price",
        "nonpositive_price",
        "nonpositive_price",
        "nonpositive_price",
        "negative_volume",
        "misaligned",
    ]
    idx, reason = k.validate(a[3:4], *M1, now_ms=0)  # future (7) is checked before price (8)
    assert reason.tolist() == [7] and k.validate(a[3:4], *M1, now_ms=10 * MIN)[1].tolist() == [8]


def test_validate_flags_future_only_when_now_given(k: ModuleType) -> None:
    a = candles([0, MIN, 2 * MIN])
    assert k.validate(a, *M1)[0].tolist() == []
    idx, reason = k.validate(a, *M1, now_ms=MIN)
    assert idx.tolist() == [2] and reason.tolist() == [7]


def test_validate_weeks_align_to_monday(k: ModuleType) -> None:
    monday = 1_704_067_200_000  # 2024-01-01 was a Monday
    a = candles([monday, monday + 7 * DAY, monday + DAY, 0])  # 1970-01-01 was a Thursday
    assert k.validate(a, *W1)[0].tolist() == [2, 3]


def test_validate_months_start_on_the_first_including_leap_february(k: ModuleType) -> None:
    feb29 = MAR_2024 - DAY
    a = candles([FEB_2024, MAR_2024, feb29, MAR_2024 + 1, -31 * DAY, -30 * DAY])  # 1969-12-01 ok
    assert k.validate(a, *MO)[0].tolist() == [2, 3, 5]


def test_validate_rejects_wrong_dtype(k: ModuleType) -> None:
    with pytest.raises(InvalidRequestError):
        k.validate(np.zeros(3, np.float64), *M1)
    with pytest.raises(InvalidRequestError):
        k.validate(candles([0]), 0, 0, False)


# -- prepare -----------------------------------------------------------------------------------
# A long valid batch one grid step apart is the batch the compiled core checks in one quick pass;
# one bad row in its middle must still be found, and reported as the row-by-row rules report it.
SPOILED = [
    ("open", float("nan"), 1),
    ("value", float("inf"), 1),
    ("low", 1e12, 2),  # above the body
    ("close", 1.0, 2),  # below the low
    ("high", 1.0, 3),  # below the body
    ("open", 1e12, 3),  # above the high
    ("volume", -1.0, 4),
    ("value", -5e-324, 5),
    ("low", -0.0, 8),
    ("low", 0.0, 8),
]


@pytest.mark.parametrize(("field", "value", "reason"), SPOILED)
def test_prepare_finds_one_bad_row_in_a_long_valid_batch(k: ModuleType, field: str, value: float, reason: int) -> None:
    a = dense_candles(1000, 10**6 * MIN)
    a[field][500] = value
    rows, idx, why = k.prepare(a, *M1, now_ms=I64_MAX)
    assert rows is None and idx.tolist() == [500] and why.tolist() == [reason]


def test_prepare_finds_a_misaligned_or_future_row_in_a_long_valid_batch(k: ModuleType) -> None:
    a = dense_candles(1000, 10**6 * MIN)
    now = int(a["ts"][-1])
    assert k.prepare(a, *M1, now_ms=now)[0] is not None
    a["ts"][500] += 1
    rows, idx, why = k.prepare(a, *M1, now_ms=now)
    assert rows is None and idx.tolist() == [500] and why.tolist() == [6]
    a["ts"][500] -= 1
    rows, idx, why = k.prepare(a, *M1, now_ms=now - 1)  # the last row is in the future
    assert rows is None and idx.tolist() == [999] and why.tolist() == [7]
    a["ts"] += MIN // 2  # every row off the grid, one step apart
    rows, idx, why = k.prepare(a, *M1, now_ms=now + MIN)
    assert rows is None and idx.tolist() == list(range(1000)) and set(why.tolist()) == {6}


def test_prepare_keeps_valid_batches_that_are_not_one_step_apart(k: ModuleType) -> None:
    a = dense_candles(1000, 10**6 * MIN)
    a["volume"][10] = a["value"][11] = -0.0  # -0.0 >= 0
    gap = np.delete(a, 500)
    assert bytes(k.prepare(gap, *M1)[0]) == bytes(gap)
    swapped = a.copy()
    swapped[[500, 501]] = swapped[[501, 500]]
    assert bytes(k.prepare(swapped, *M1)[0]) == bytes(a)
    dup = a.copy()
    dup["ts"][501] = dup["ts"][500]  # the last occurrence wins
    assert bytes(k.prepare(dup, *M1)[0]) == bytes(np.delete(dup, 500))


def test_prepare_sorts_a_batch_whose_step_wraps_past_int64_max(k: ModuleType) -> None:
    # I64_MIN is I64_MAX - 1023 plus one step of 1024 modulo 2**64: both on the grid, not sorted
    a = candles([I64_MAX - 1023, I64_MIN])
    rows, idx, _ = k.prepare(a, 1024, 0, False)
    assert idx.tolist() == [] and rows["ts"].tolist() == [I64_MIN, I64_MAX - 1023]


# -- sort_dedup / merge ------------------------------------------------------------------------
def test_sort_dedup_keeps_last_duplicate(k: ModuleType) -> None:
    b = candles([2 * MIN, 0, 2 * MIN, MIN], close=1.0)
    b["close"][2] = 7.0
    out = k.sort_dedup(b)
    assert out["ts"].tolist() == [0, MIN, 2 * MIN]
    assert out["close"].tolist() == [1.0, 1.0, 7.0]
    assert not np.shares_memory(out, b)


def test_merge_counts_inserted_updated_unchanged(k: ModuleType) -> None:
    s = candles([0, MIN, 2 * MIN])
    b = candles([3 * MIN, MIN, 2 * MIN, 0])
    b["close"][1] = 2.0
    b["high"][1] = 2.0
    merged, ins, upd, unch = k.merge(s, b)
    assert (ins, upd, unch) == (1, 1, 2)
    assert merged["ts"].tolist() == [0, MIN, 2 * MIN, 3 * MIN]
    assert merged["close"].tolist() == [1.0, 2.0, 1.0, 1.0]


def test_merge_compares_bytes_so_same_nan_is_unchanged(k: ModuleType) -> None:
    s = candles([0])
    s["value"] = np.nan
    assert k.merge(s, s.copy())[1:] == (0, 0, 1)
    z = s.copy()
    z["volume"] = -0.0
    assert k.merge(s, z)[1:] == (0, 1, 0)


def test_merge_into_appends_in_place_and_refuses_when_full(k: ModuleType) -> None:
    buf = np.zeros(5, CANDLE_DTYPE)
    buf[:3] = candles([0, MIN, 2 * MIN])
    assert k.merge_into(buf, 3, candles([3 * MIN, 4 * MIN])) == (5, 2, 0, 0)
    assert buf["ts"].tolist() == [0, MIN, 2 * MIN, 3 * MIN, 4 * MIN]
    before = buf.copy()
    with pytest.raises(InvalidRequestError):
        k.merge_into(buf, 5, candles([30 * MIN]))
    with pytest.raises(InvalidRequestError):
        k.merge_into(buf, 4, candles([30 * MIN, -MIN]))
    assert buf.tobytes() == before.tobytes()


def test_merge_into_inserts_in_the_middle(k: ModuleType) -> None:
    buf = np.zeros(8, CANDLE_DTYPE)
    buf[:4] = candles([0, 2 * MIN, 4 * MIN, 6 * MIN])
    b = candles([5 * MIN, MIN, 4 * MIN], close=3.0)
    assert k.merge_into(buf, 4, b) == (6, 2, 1, 0)
    assert buf["ts"][:6].tolist() == [0, MIN, 2 * MIN, 4 * MIN, 5 * MIN, 6 * MIN]
    assert buf["close"][:6].tolist() == [1.0, 3.0, 1.0, 3.0, 3.0, 1.0]


def test_merge_into_moves_unchanged_rows_after_an_insert(k: ModuleType) -> None:
    buf = np.zeros(4, CANDLE_DTYPE)
    buf[:2] = candles([MIN, 2 * MIN])
    assert k.merge_into(buf, 2, candles([0, MIN, 2 * MIN])) == (3, 1, 0, 2)
    assert buf["ts"][:3].tolist() == [0, MIN, 2 * MIN]
    assert buf["close"][:3].tolist() == [1.0, 1.0, 1.0]


# -- gaps --------------------------------------------------------------------------------------
def test_find_gaps_on_a_strided_field_with_start_rounded_up(k: ModuleType) -> None:
    a = candles([0, MIN, 3 * MIN, 4 * MIN, 8 * MIN])
    gaps = k.find_gaps(a["ts"], *M1, -MIN // 2, 10 * MIN)
    assert gaps.tolist() == [[2 * MIN, 3 * MIN], [5 * MIN, 8 * MIN], [9 * MIN, 10 * MIN]]


def test_find_gaps_last_gap_ends_at_end(k: ModuleType) -> None:
    ts = np.array([0], np.int64)
    assert k.find_gaps(ts, *M1, 0, MIN + 1).tolist() == [[MIN, MIN + 1]]
    assert k.find_gaps(ts, *M1, 0, MIN).tolist() == []
    assert k.find_gaps(ts, *M1, 5, 5).shape == (0, 2)


def test_find_gaps_ignores_misaligned_and_duplicate_ts(k: ModuleType) -> None:
    ts = np.array([0, 0, MIN + 7, 2 * MIN, 2 * MIN], np.int64)
    assert k.find_gaps(ts, *M1, 0, 3 * MIN).tolist() == [[MIN, 2 * MIN]]


def test_find_gaps_calendar_months(k: ModuleType) -> None:
    jan, apr = 1_704_067_200_000, 1_711_929_600_000
    ts = np.array([jan, MAR_2024], np.int64)
    assert k.find_gaps(ts, *MO, jan, apr + 1).tolist() == [[FEB_2024, MAR_2024], [apr, apr + 1]]


def test_find_gaps_near_int64_max_saturates(k: ModuleType) -> None:
    end = I64_MAX
    start = end - 3 * MIN
    got = k.find_gaps(np.zeros(0, np.int64), *M1, start, end)
    assert got[0, 0] >= start and got[-1, 1] == end


# -- intervals ---------------------------------------------------------------------------------
def test_interval_normalize_merges_adjacent_and_drops_empty(k: ModuleType) -> None:
    got = k.interval_normalize([[10, 20], [0, 5], [5, 7], [30, 30], [15, 25]])
    assert got.tolist() == [[0, 7], [10, 25]]
    assert k.interval_normalize(np.zeros((0, 2), np.int64)).shape == (0, 2)


def test_interval_subtract_splits_ranges(k: ModuleType) -> None:
    got = k.interval_subtract([[0, 100]], [[10, 20], [50, 60], [90, 200]])
    assert got.tolist() == [[0, 10], [20, 50], [60, 90]]
    assert k.interval_union([[0, 5]], [[5, 9]]).tolist() == [[0, 9]]


def test_interval_contains(k: ModuleType) -> None:
    cov = [[0, 10], [20, 30]]
    assert k.interval_contains(cov, 2, 10)
    assert not k.interval_contains(cov, 5, 21)
    assert k.interval_contains(cov, 15, 15)  # empty range
    assert k.interval_contains([[0, 5], [5, 9]], 0, 9)  # adjacent pieces


# -- SeriesBuffer ------------------------------------------------------------------------------
def test_series_buffer_latest_view_survives_appends_past_spare_room(k: ModuleType) -> None:
    buf = k.SeriesBuffer(100)
    buf.write(candles(list(range(0, 100 * MIN, MIN))))
    view = buf.latest(10)
    snapshot = view.copy()
    for i in range(100, 400):
        buf.write(candles([i * MIN]))
    assert view.tobytes() == snapshot.tobytes()
    assert len(buf) == 100 and buf.first_ts == 300 * MIN and buf.last_ts == 399 * MIN
    assert buf.latest(2)["ts"].tolist() == [398 * MIN, 399 * MIN]


def test_series_buffer_views_are_read_only_no_copy(k: ModuleType) -> None:
    buf = k.SeriesBuffer(10)
    buf.write(candles([0, MIN, 2 * MIN]))
    a, b = buf.latest(3), buf.latest(2)
    assert np.shares_memory(a, b)
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a.flags.writeable = True
    with pytest.raises(ValueError):
        a["close"][0] = 5.0


def test_series_buffer_correction_copies_only_when_a_view_holds_the_row(k: ModuleType) -> None:
    buf = k.SeriesBuffer(10)
    buf.write(candles([0, MIN, 2 * MIN]))
    view = buf.latest(3)
    assert buf.write(candles([MIN], close=5.0)) == (0, 1, 0)
    assert view["close"].tolist() == [1.0, 1.0, 1.0]
    fresh = buf.latest(3)
    assert fresh["close"].tolist() == [1.0, 5.0, 1.0]
    assert not np.shares_memory(view, fresh)
    del view, fresh
    buf.write(candles([MIN], close=4.0))  # no view alive any more: written in place
    assert buf.latest(3)["close"].tolist() == [1.0, 4.0, 1.0]

    buf = k.SeriesBuffer(10)
    buf.write(candles([0, MIN, 2 * MIN]))
    held = buf.range(0, MIN)  # views have only ever covered row 0
    buf.write(candles([2 * MIN], close=6.0))  # so row 2 is written in place
    assert held.base is buf.latest(1).base  # same array: no copy was made
    assert buf.latest(3)["close"].tolist() == [1.0, 1.0, 6.0]


def test_series_buffer_latest_again_is_the_same_rows_and_never_stale(k: ModuleType) -> None:
    buf = k.SeriesBuffer(10)
    buf.write(candles([0, MIN, 2 * MIN]))
    first = buf.latest(2)
    again = buf.latest(2)
    assert again.tobytes() == first.tobytes() and again["ts"].tolist() == [MIN, 2 * MIN]
    assert again is not first  # each caller gets its own array object
    buf.write(candles([3 * MIN]))  # an append
    assert buf.latest(2)["ts"].tolist() == [2 * MIN, 3 * MIN]
    assert first["ts"].tolist() == [MIN, 2 * MIN]
    buf.write(candles([3 * MIN], close=7.0))  # a correction of a row a view holds
    assert buf.latest(2)["close"].tolist() == [1.0, 7.0]
    assert buf.latest(1)["close"].tolist() == [7.0]


@pytest.mark.filterwarnings("ignore:Setting the strides:DeprecationWarning")  # NumPy 2.4 deprecates it; still works
def test_series_buffer_view_changed_in_place_by_one_caller_is_not_seen_by_another(k: ModuleType) -> None:
    buf = k.SeriesBuffer(10)
    buf.write(candles([0, MIN, 2 * MIN, 3 * MIN]))
    want = buf.latest(4).copy()
    v, other, ranged = buf.latest(4), buf.latest(4), buf.range(0, 4 * MIN)
    v.shape = (2, 2)  # a caller reshapes the array it got, in place
    w = buf.latest(4)
    w.dtype = np.dtype([("raw", "<i8", (7,))])  # ... or re-types it
    x = buf.latest(4)
    x.strides = (0,)  # ... or re-strides it
    y = buf.latest(4)
    for got in (other, ranged, y):
        assert got.shape == (4,) and got.dtype == CANDLE_DTYPE and got.strides == (CANDLE_DTYPE.itemsize,)
        assert got.tobytes() == want.tobytes() and not got.flags.writeable


def test_series_buffer_served_view_does_not_force_a_copy_of_the_next_correction(k: ModuleType) -> None:
    buf = k.SeriesBuffer(10)
    buf.write(candles([0, MIN, 2 * MIN]))
    buf.latest(3)  # handed out and dropped by the caller
    base = weakref.ref(buf.latest(1).base)
    buf.write(candles([2 * MIN], close=9.0))  # no caller holds a view: written in place
    assert buf.latest(3).base is base()
    assert buf.latest(3)["close"].tolist() == [1.0, 1.0, 9.0]


def test_series_buffer_range_and_window(k: ModuleType) -> None:
    buf = k.SeriesBuffer(3)
    assert buf.first_ts is None and buf.last_ts is None and len(buf) == 0
    assert buf.write(candles([0, MIN, 2 * MIN, 3 * MIN])) == (4, 0, 0)
    assert buf.range(0, 10 * MIN)["ts"].tolist() == [MIN, 2 * MIN, 3 * MIN]
    assert buf.range(2 * MIN, 3 * MIN)["ts"].tolist() == [2 * MIN]
    assert buf.range(5, 1).shape == (0,)
    assert buf.write(candles([-MIN])) == (1, 0, 0)  # older than the window: dropped
    assert buf.first_ts == MIN
    buf.clear()
    assert len(buf) == 0 and buf.latest(5).shape == (0,)


def test_series_buffer_stays_within_72_bytes_per_candle(k: ModuleType) -> None:
    buf = k.SeriesBuffer(1000)
    for i in range(0, 3000, 7):
        buf.write(candles(list(range(i * MIN, (i + 7) * MIN, MIN))))
        if len(buf) >= 16:
            assert buf.nbytes <= 72 * len(buf)
    assert len(buf) == 1000


# -- ts_bounds ---------------------------------------------------------------------------------
def test_ts_bounds_are_the_first_and_last_rows(k: ModuleType) -> None:
    assert k.ts_bounds(candles([])) is None
    assert k.ts_bounds(candles([5 * MIN])) == (5 * MIN, 5 * MIN)
    a = candles([MIN, 2 * MIN, 7 * MIN, 9 * MIN])
    assert k.ts_bounds(a) == (MIN, 9 * MIN)
    assert k.ts_bounds(a[::-2]) == (9 * MIN, 2 * MIN)  # a strided view: its own first and last rows
    for bad in (a["ts"], a.reshape(2, 2), [MIN]):
        with pytest.raises(InvalidRequestError):
            k.ts_bounds(bad)


# -- LatencyRing and HitMeter -----------------------------------------------------------------
def test_latency_ring_keeps_the_latest_samples_and_counts_all(k: ModuleType) -> None:
    ring = k.LatencyRing(4)
    assert ring.count == 0 and ring.samples().tolist() == []
    for ms in (1.0, 2.0, 3.0):
        ring.add(ms)
    assert ring.count == 3 and ring.samples().tolist() == [1.0, 2.0, 3.0]
    for ms in (4.0, 5.0, 6.0):
        ring.add(ms)
    assert ring.count == 6 and sorted(ring.samples().tolist()) == [3.0, 4.0, 5.0, 6.0]
    with pytest.raises(InvalidRequestError):
        k.LatencyRing(0)
    with pytest.raises(MemoryError):  # bytes beyond any address space: refused, never wrapped round
        k.LatencyRing(2**61)


def test_hit_meter_counts_and_adds_the_elapsed_time_to_both_rings(k: ModuleType) -> None:
    a, b = k.LatencyRing(), k.LatencyRing()
    meter = k.HitMeter(a, b)
    t0 = time.perf_counter()
    time.sleep(0.002)
    meter.hit(t0)
    meter.hit(time.perf_counter())
    assert meter.count == 2 and a.count == 2 and b.count == 2
    got = a.samples().tolist()
    assert got == b.samples().tolist()
    assert got[0] >= 2.0 and 0.0 <= got[1] < got[0]  # milliseconds since each t0
    with pytest.raises((InvalidRequestError, AttributeError)):  # made without its rings
        k.HitMeter.__new__(k.HitMeter).hit(t0)


# -- LRU ---------------------------------------------------------------------------------------
def test_lru_pops_least_recently_touched(k: ModuleType) -> None:
    lru = k.LRU()
    for key in (1, 2, 3, 1, 4):
        lru.touch(key)
    lru.remove(3)
    lru.remove(99)
    assert len(lru) == 3 and 3 not in lru and 1 in lru
    assert lru.oldest() == 2
    assert [lru.pop_oldest() for _ in range(3)] == [2, 1, 4]
    assert lru.oldest() is None
    with pytest.raises(KeyError):
        lru.pop_oldest()


def test_lru_reuses_slots_over_many_keys(k: ModuleType) -> None:
    lru = k.LRU()
    for i in range(10_000):
        lru.touch(i)
        if i % 3 == 0:
            lru.pop_oldest()
    assert len(lru) == 10_000 - 3334
    assert lru.oldest() == 3334


# -- implementation switch ---------------------------------------------------------------------
def test_implementation_switch_honours_environment(k: ModuleType) -> None:
    if k is not _pycore:
        pytest.skip("checked once")
    env = dict(os.environ, MDS_PUREPYTHON="1")
    code = "import mds._kernels as k; print(k.IMPLEMENTATION)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"
    if _core is not None:
        env = {key: v for key, v in os.environ.items() if key != "MDS_PUREPYTHON"}
        env["MDS_REQUIRE_CORE"] = "1"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "cython"


def test_compiled_struct_matches_candle_dtype(k: ModuleType) -> None:
    if k is _pycore:
        pytest.skip("compiled only")
    k._check_layout()  # raises ImportError on a mismatch
