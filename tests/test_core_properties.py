"""Property tests: the compiled kernels (mds._core) equal their numpy twin (mds._pycore).

Every kernel runs on the same generated input in both implementations and the results must be
identical, byte for byte. Where a brute-force reference is cheap (small ranges, dicts), the
twin is checked against it too, so the pair cannot agree on a wrong answer.

Inputs cover empty arrays, single rows, all-duplicate batches, unsorted batches, NaN / inf /
-0.0 fields, huge and negative timestamps (down to int64 min and up to int64 max), month ends and
weeks. The cross-checks skip only when the compiled core is not built (CI builds it).

Hypothesis profile: ``core`` (modest, the default) or ``core-stress`` with
``MDS_HYPOTHESIS_PROFILE=stress``.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mds import _pycore as P
from mds._dtypes import CANDLE_DTYPE, CANDLE_RAW
from mds.timeframes import TIMEFRAMES

try:
    from mds import _core as C
except ImportError:  # pragma: no cover - CI always builds the core
    C = None  # type: ignore[assignment]

settings.register_profile(
    "core",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "core-stress",
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("core-stress" if os.environ.get("MDS_HYPOTHESIS_PROFILE") == "stress" else "core")

needs_core = pytest.mark.skipif(C is None, reason="compiled core mds._core not built")

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
DAY = 86_400_000
MIN = 60_000

# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------
MONTH_STARTS = [P._month_start(mi) for mi in (-24_000, -13, -1, 0, 1, 11, 12, 13, 613, 626, 627, 24_000)]
EDGE_TS = [I64_MIN, I64_MIN + 1, -1, 0, 1, I64_MAX - 1, I64_MAX, -DAY, 4 * DAY, 1_700_000_000_000]
EDGE_TS += [m + d for m in MONTH_STARTS for d in (-1, 0, 1)]

timestamps = st.one_of(
    st.integers(-50, 200).map(lambda k: k * MIN),
    st.integers(-50, 200).map(lambda k: 1_700_000_040_000 + k * MIN),
    st.sampled_from(EDGE_TS),
    st.integers(I64_MIN, I64_MAX),
)
nice = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
weird = st.one_of(
    nice,
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, -1.0, 1e308, -1e-300]),
)
# Six float fields; mostly well-formed rows so the later reasons get exercised too.
good_row = st.tuples(timestamps, nice, nice, nice, nice, nice).map(
    lambda t: (t[0], t[1], max(t[1], t[2]) + t[3], min(t[1], t[2]) - t[4] / 2, t[2], t[4], t[5])
)
any_row = st.tuples(timestamps, weird, weird, weird, weird, weird, weird)
# Prices at and around zero: -0.0, the smallest subnormals, and well-formed rows whose prices were
# shifted down to zero or below (reason 8, ``nonpositive_price``, must be found by both kernels).
tiny = st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1e-300, -1.0, 1.0])
tiny_row = st.tuples(timestamps, tiny, tiny, tiny, tiny, nice, nice)
shifted_row = st.tuples(good_row, st.one_of(st.sampled_from([0.0, 0.5, 1e6]), nice)).map(
    lambda t: (t[0][0], *(v - t[1] for v in t[0][1:5]), *t[0][5:])
)
rows = st.one_of(good_row, good_row, any_row, tiny_row, shifted_row)


def _arr(lst: list[tuple[Any, ...]]) -> np.ndarray:
    return np.array(lst, dtype=CANDLE_DTYPE)


candles = st.lists(rows, max_size=40).map(_arr)
# Batches with many duplicate timestamps.
dup_batches = st.tuples(st.lists(rows, min_size=1, max_size=4), st.lists(st.integers(0, 3), max_size=30)).map(
    lambda t: _arr([t[0][i % len(t[0])] for i in t[1]])
)
batches = st.one_of(candles, dup_batches)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    return P.sort_dedup(a)


series = candles.map(_sorted_unique)

grids = st.one_of(
    st.sampled_from([tf.kernel_args for tf in TIMEFRAMES.values()]),
    st.tuples(st.integers(1, 10**12), st.integers(I64_MIN, I64_MAX), st.just(False)),
    st.tuples(st.integers(1, 7), st.integers(-10, 10), st.just(False)),
)


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(CANDLE_RAW).tobytes()


# --------------------------------------------------------------------------------------------
# validate / sort_dedup / merge
# --------------------------------------------------------------------------------------------
@needs_core
@PROFILE
@given(candles, grids, st.one_of(st.none(), timestamps))
def test_validate_compiled_equals_twin(arr: np.ndarray, grid: tuple[int, int, bool], now: int | None) -> None:
    pi, pr = P.validate(arr, *grid, now_ms=now)
    ci, cr = C.validate(arr, *grid, now_ms=now)
    assert pi.dtype == ci.dtype == np.int64 and pr.dtype == cr.dtype == np.uint8
    assert pi.tolist() == ci.tolist()
    assert pr.tolist() == cr.tolist()


def _wrap64(x: int) -> int:
    return (x + 2**63) % 2**64 - 2**63


SPOILERS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -1.0, 5e-324, 1e308]
fine_row = st.tuples(
    st.floats(1e-300, 1e300),
    st.floats(1e-300, 1e300),
    st.sampled_from([1.0, 0.5, 0.999]),  # low, of the body's low
    st.sampled_from([1.0, 2.0, 1.001]),  # high, of the body's high
    nice,
    nice,
)


@st.composite
def grid_runs(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, int, bool], int | None]:
    """Well-formed rows on the grid one interval apart (the batch the compiled prepare checks in
    one quick pass), then maybe spoiled: a row's field, ts or place, every ts moved, or a ``now``
    before some row. Runs that start near INT64_MAX wrap past it (two's complement)."""
    grid = draw(grids)
    iv, origin, is_month = grid
    n = draw(st.integers(1, 40))
    if is_month:
        m0 = draw(st.integers(-30, 700))
        ts = [P._month_start(m0 + i) for i in range(n)]
    else:
        t0 = draw(timestamps)
        t0 -= (t0 - origin) % iv  # on the grid, at or before the drawn ts
        t0 += iv if t0 < I64_MIN else 0
        ts = [_wrap64(t0 + i * iv) for i in range(n)]
    lst = []
    for t, (o, c, lo, hi, v, val) in zip(ts, draw(st.lists(fine_row, min_size=n, max_size=n)), strict=True):
        lst.append((t, o, max(o, c) * hi, min(o, c) * lo, c, v, val))
    a = _arr(lst)
    i = draw(st.integers(0, n - 1))
    spoil = draw(st.sampled_from(["none", "field", "ts", "swap", "shift"]))
    step = DAY if is_month else iv
    if spoil == "field":
        field = draw(st.sampled_from(["open", "high", "low", "close", "volume", "value"]))
        if draw(st.booleans()):
            a[field][i] = draw(st.sampled_from(SPOILERS))
        else:  # still finite and positive, maybe out of order with the other prices
            a[field][i] *= draw(st.sampled_from([0.25, 4.0]))
    elif spoil == "ts":
        a["ts"][i] = _wrap64(ts[i] + draw(st.sampled_from([1, -1, step, -step, step // 2])))
    elif spoil == "swap" and n > 1:
        a[[i, i - 1]] = a[[i - 1, i]]
    elif spoil == "shift":  # every row off the grid (or, a whole step on, still on it)
        a["ts"] = [_wrap64(t + draw(st.sampled_from([1, -1, step // 2, step]))) for t in ts]
    just_before = st.sampled_from(ts).map(lambda t: max(t - 1, I64_MIN))
    now = draw(st.one_of(st.none(), st.just(I64_MAX), st.sampled_from(ts), just_before, timestamps))
    return a, grid, now


@needs_core
@PROFILE
@given(st.one_of(grid_runs(), st.tuples(batches, grids, st.one_of(st.none(), timestamps))))
def test_prepare_compiled_equals_twin(run: tuple[np.ndarray, tuple[int, int, bool], int | None]) -> None:
    arr, grid, now = run
    p_rows, p_idx, p_reason = P.prepare(arr, *grid, now_ms=now)
    c_rows, c_idx, c_reason = C.prepare(arr, *grid, now_ms=now)
    assert p_idx.tolist() == c_idx.tolist() and p_reason.tolist() == c_reason.tolist()
    assert (p_rows is None) == (c_rows is None)
    if p_rows is not None:
        assert _bytes(p_rows) == _bytes(c_rows)
        assert not np.shares_memory(c_rows, arr)


def _month_start_ref(ts: int) -> bool:
    try:
        d = datetime(1970, 1, 1) + timedelta(milliseconds=ts)
    except OverflowError:  # beyond datetime's years 1..9999: integer calendar arithmetic
        return ts % DAY == 0 and P._civil_from_days(ts // DAY)[2] == 1
    return d.day == 1 and d.hour == d.minute == d.second == d.microsecond == 0


@PROFILE
@given(candles, grids)
def test_validate_twin_matches_row_by_row_rules(arr: np.ndarray, grid: tuple[int, int, bool]) -> None:
    iv, origin, is_month = grid
    idx, reason = P.validate(arr, iv, origin, is_month)
    got = dict(zip(idx.tolist(), reason.tolist(), strict=True))
    for i, r in enumerate(arr.tolist()):
        ts, o, h, lo, c, v, val = r
        if not all(np.isfinite([o, h, lo, c, v, val])):
            want = 1
        elif lo > min(o, c):
            want = 2
        elif h < max(o, c):
            want = 3
        elif v < 0:
            want = 4
        elif val < 0:
            want = 5
        elif not _month_start_ref(ts) if is_month else (ts - origin) % iv != 0:
            want = 6
        elif min(o, h, lo, c) <= 0:
            want = 8
        else:
            want = 0
        assert got.get(i, 0) == want, (i, r)


@needs_core
@PROFILE
@given(batches)
def test_sort_dedup_compiled_equals_twin(batch: np.ndarray) -> None:
    p, c = P.sort_dedup(batch), C.sort_dedup(batch)
    assert _bytes(p) == _bytes(c)
    # last occurrence wins
    ref = {int(r["ts"]): _bytes(batch[i : i + 1]) for i, r in enumerate(batch)}
    assert _bytes(p) == b"".join(ref[k] for k in sorted(ref))


@PROFILE
@given(series, batches)
def test_merge_twin_matches_dict_reference(s: np.ndarray, batch: np.ndarray) -> None:
    merged, ins, upd, unch = P.merge(s, batch)
    ref = {int(r["ts"]): _bytes(s[i : i + 1]) for i, r in enumerate(s)}
    last = {int(r["ts"]): _bytes(batch[i : i + 1]) for i, r in enumerate(batch)}
    want = (
        sum(k not in ref for k in last),
        sum(k in ref and ref[k] != v for k, v in last.items()),
        sum(k in ref and ref[k] == v for k, v in last.items()),
    )
    ref.update(last)
    assert (ins, upd, unch) == want
    assert _bytes(merged) == b"".join(ref[k] for k in sorted(ref))
    assert not np.shares_memory(merged, s) and not np.shares_memory(merged, batch)


@needs_core
@PROFILE
@given(series, batches, st.integers(0, 8))
def test_merge_and_merge_into_compiled_equal_twin(s: np.ndarray, batch: np.ndarray, spare: int) -> None:
    pm = P.merge(s, batch)
    cm = C.merge(s, batch)
    assert pm[1:] == cm[1:]
    assert _bytes(pm[0]) == _bytes(cm[0])
    results = []
    for impl in (P, C):
        buf = np.zeros(len(s) + spare, CANDLE_DTYPE)
        buf[: len(s)] = s
        try:
            res: Any = impl.merge_into(buf, len(s), batch)
        except P.InvalidRequestError:
            res = "full"
            assert _bytes(buf[: len(s)]) == _bytes(s)  # unchanged when refused
        results.append((res, _bytes(buf)))
    assert results[0] == results[1]
    res = results[0][0]
    if res == "full":
        assert pm[1] > spare
    else:
        assert res == (len(pm[0]), *pm[1:])
        assert results[0][1][: len(pm[0]) * 56] == _bytes(pm[0])


# --------------------------------------------------------------------------------------------
# gaps
# --------------------------------------------------------------------------------------------
def _brute_gaps(ts: np.ndarray, iv: int, origin: int, start: int, end: int) -> list[list[int]]:
    present = set(ts.tolist())
    slot = start + (-(start - origin)) % iv
    out: list[list[int]] = []
    while slot < end:
        if slot not in present:
            if out and out[-1][1] == slot:
                out[-1][1] = slot + iv
            else:
                out.append([slot, slot + iv])
        slot += iv
    if out:
        out[-1][1] = min(out[-1][1], end)
    return out


small_ts = st.lists(st.integers(-40, 120).map(lambda k: k * 30_000), max_size=60).map(
    lambda v: np.array(sorted(v), dtype=np.int64)
)


@PROFILE
@given(
    small_ts,
    st.sampled_from([(MIN, 0), (3 * MIN, 0), (7 * 30_000, 90_000)]),
    st.integers(-2_000_000, 4_000_000),
    st.integers(-2_000_000, 4_000_000),
)
def test_find_gaps_twin_matches_brute_force(ts: np.ndarray, grid: tuple[int, int], start: int, end: int) -> None:
    iv, origin = grid
    got = P.find_gaps(ts, iv, origin, False, start, end)
    assert got.dtype == np.int64 and got.shape[1:] == (2,)
    assert got.tolist() == _brute_gaps(ts, iv, origin, start, end)


sorted_ts = st.lists(timestamps, max_size=60).map(lambda v: np.array(sorted(v), dtype=np.int64))
bounds = st.one_of(timestamps, st.sampled_from(MONTH_STARTS))


@needs_core
@PROFILE
@given(sorted_ts, grids, bounds, bounds, st.booleans())
def test_find_gaps_compiled_equals_twin(
    ts: np.ndarray, grid: tuple[int, int, bool], start: int, end: int, strided: bool
) -> None:
    if strided:  # the same values as a field of candle rows
        arr = np.zeros(len(ts), CANDLE_DTYPE)
        arr["ts"] = ts
        ts = arr["ts"]
    p = P.find_gaps(ts, *grid, start, end)
    c = C.find_gaps(ts, *grid, start, end)
    assert p.tolist() == c.tolist()
    assert c.dtype == np.int64 and c.shape[1:] == (2,)


month_ts = st.lists(
    st.one_of(st.sampled_from(MONTH_STARTS), st.integers(-30, 700).map(P._month_start), timestamps),
    max_size=40,
).map(lambda v: np.array(sorted(v), dtype=np.int64))


@needs_core
@PROFILE
@given(month_ts, bounds, bounds)
def test_find_gaps_months_compiled_equals_twin(ts: np.ndarray, start: int, end: int) -> None:
    args = TIMEFRAMES["1M"].kernel_args
    assert P.find_gaps(ts, *args, start, end).tolist() == C.find_gaps(ts, *args, start, end).tolist()
    idx_p, r_p = P.validate(np.array([(t, 1, 1, 1, 1, 0, 0) for t in ts.tolist()], CANDLE_DTYPE), *args)
    idx_c, r_c = C.validate(np.array([(t, 1, 1, 1, 1, 0, 0) for t in ts.tolist()], CANDLE_DTYPE), *args)
    assert idx_p.tolist() == idx_c.tolist() and r_p.tolist() == r_c.tolist()


# --------------------------------------------------------------------------------------------
# interval sets
# --------------------------------------------------------------------------------------------
small_ranges = st.lists(st.tuples(st.integers(-5, 30), st.integers(-5, 30)), max_size=8)
big_ranges = st.lists(st.tuples(timestamps, timestamps), max_size=8)
any_ranges = st.one_of(small_ranges, big_ranges)


def _points(r: Any) -> set[int]:
    return {x for s, e in np.asarray(r, dtype=np.int64).reshape(-1, 2).tolist() for x in range(s, e)}


def _as_array(r: list[tuple[int, int]]) -> np.ndarray:
    return np.array(r, dtype=np.int64).reshape(-1, 2)


@PROFILE
@given(small_ranges, small_ranges, st.integers(-6, 31), st.integers(-6, 31))
def test_interval_twin_matches_point_sets(a: list[tuple[int, int]], b: list[tuple[int, int]], s: int, e: int) -> None:
    n = P.interval_normalize(_as_array(a))
    assert _points(n) == _points(a)
    assert all(x[1] > x[0] for x in n.tolist())
    assert all(n[i, 0] > n[i - 1, 1] for i in range(1, len(n)))  # disjoint, not adjacent
    assert _points(P.interval_union(_as_array(a), _as_array(b))) == _points(a) | _points(b)
    assert _points(P.interval_subtract(_as_array(a), _as_array(b))) == _points(a) - _points(b)
    assert P.interval_contains(_as_array(a), s, e) == (set(range(s, e)) <= _points(a))


@needs_core
@PROFILE
@given(any_ranges, any_ranges, bounds, bounds)
def test_interval_compiled_equals_twin(a: list[tuple[int, int]], b: list[tuple[int, int]], s: int, e: int) -> None:
    aa, bb = _as_array(a), _as_array(b)
    for name in ("interval_normalize",):
        assert getattr(P, name)(aa).tolist() == getattr(C, name)(aa).tolist()
    assert P.interval_union(aa, bb).tolist() == C.interval_union(aa, bb).tolist()
    assert P.interval_subtract(aa, bb).tolist() == C.interval_subtract(aa, bb).tolist()
    assert P.interval_contains(aa, s, e) == C.interval_contains(aa, s, e)
    na = P.interval_normalize(aa)
    assert P.interval_contains(na, s, e) == C.interval_contains(na, s, e)


def _labelled(pieces: list[Any]) -> list[tuple[int, int, str]]:
    return [(p.start, p.end, p.kind) for p in pieces]


@PROFILE
@given(small_ranges, small_ranges)
def test_label_gaps_twin_matches_point_sets(holes: list[tuple[int, int]], cov: list[tuple[int, int]]) -> None:
    from mds.models import Gap

    got = _labelled(P.label_gaps(_as_array(holes), _as_array(cov), Gap))
    assert [g[:2] for g in got] == sorted(g[:2] for g in got)  # ascending, and pieces never overlap
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(got))
    inside = {x for s, e, k in got if k == "no_trades" for x in range(s, e)}
    outside = {x for s, e, k in got if k == "missing" for x in range(s, e)}
    assert inside == _points(holes) & _points(cov)
    assert outside == _points(holes) - _points(cov)


@needs_core
@PROFILE
@given(any_ranges, any_ranges)
def test_label_gaps_compiled_equals_twin(holes: list[tuple[int, int]], cov: list[tuple[int, int]]) -> None:
    from mds.models import Gap

    hh, cc = _as_array(holes), _as_array(cov)
    p, c = P.label_gaps(hh, cc, Gap), C.label_gaps(hh, cc, Gap)
    assert _labelled(p) == _labelled(c)
    assert p == c and all(type(g) is Gap for g in c)  # real Gaps: equal, hashable, frozen
    assert {hash(g) for g in c} == {hash(g) for g in p}


# --------------------------------------------------------------------------------------------
# SeriesBuffer and LRU: operation sequences
# --------------------------------------------------------------------------------------------
buffer_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), batches),
        st.tuples(st.just("latest"), st.integers(-2, 30)),
        st.tuples(st.just("range"), st.tuples(timestamps, timestamps)),
        st.tuples(st.just("clear"), st.none()),
        st.tuples(st.just("drop_views"), st.none()),
    ),
    max_size=25,
)


def _run_buffer(impl: Any, capacity: int, ops: list[tuple[str, Any]]) -> list[Any]:
    buf = impl.SeriesBuffer(capacity)
    log: list[Any] = []
    views: list[tuple[np.ndarray, bytes]] = []
    for op, arg in ops:
        if op == "write":
            log.append(buf.write(arg))
        elif op == "latest":
            v = buf.latest(arg)
            views.append((v, _bytes(v)))
            log.append(_bytes(v))
        elif op == "range":
            v = buf.range(*arg)
            views.append((v, _bytes(v)))
            log.append(_bytes(v))
        elif op == "clear":
            buf.clear()
        else:
            views.clear()
        log.append((len(buf), buf.first_ts, buf.last_ts))
        assert len(buf) <= capacity
        if len(buf) >= 16:
            assert buf.nbytes <= 70 * len(buf)
        for v, snapshot in views:  # views never change afterwards
            assert not v.flags.writeable
            assert _bytes(v) == snapshot
    return log


@PROFILE
@given(st.integers(1, 40), buffer_ops)
def test_series_buffer_twin_keeps_newest_rows_and_stable_views(capacity: int, ops: list[tuple[str, Any]]) -> None:
    _run_buffer(P, capacity, ops)
    buf = P.SeriesBuffer(capacity)
    ref: dict[int, bytes] = {}
    for op, arg in ops:
        if op == "write":
            b = P.sort_dedup(arg)
            buf.write(b)
            ref.update({int(r["ts"]): _bytes(b[i : i + 1]) for i, r in enumerate(b)})
            for k in sorted(ref)[:-capacity]:
                del ref[k]
        elif op == "clear":
            buf.clear()
            ref.clear()
        assert _bytes(buf.latest(capacity)) == b"".join(ref[k] for k in sorted(ref))


@needs_core
@PROFILE
@given(st.integers(1, 40), buffer_ops)
def test_series_buffer_compiled_equals_twin(capacity: int, ops: list[tuple[str, Any]]) -> None:
    assert _run_buffer(P, capacity, ops) == _run_buffer(C, capacity, ops)


@needs_core
@PROFILE
@given(batches)
def test_ts_bounds_compiled_equals_twin(batch: np.ndarray) -> None:
    got = C.ts_bounds(batch)
    assert got == P.ts_bounds(batch)
    assert got == (None if not len(batch) else (int(batch["ts"][0]), int(batch["ts"][-1])))


lru_ops = st.lists(
    st.tuples(st.sampled_from(["touch", "touch", "remove", "pop", "oldest"]), st.integers(-3, 12)),
    max_size=60,
)


def _run_lru(lru: Any, ops: list[tuple[str, int]]) -> list[Any]:
    log: list[Any] = []
    for op, key in ops:
        if op == "touch":
            lru.touch(key)
        elif op == "remove":
            lru.remove(key)
        elif op == "pop":
            try:
                log.append(lru.pop_oldest())
            except KeyError:
                log.append("empty")
        else:
            log.append(lru.oldest())
        log.append((len(lru), key in lru))
    return log


class _RefLRU:
    def __init__(self) -> None:
        self.d: OrderedDict[int, None] = OrderedDict()

    def touch(self, k: int) -> None:
        self.d[k] = None
        self.d.move_to_end(k)

    def remove(self, k: int) -> None:
        self.d.pop(k, None)

    def pop_oldest(self) -> int:
        if not self.d:
            raise KeyError
        return self.d.popitem(last=False)[0]

    def oldest(self) -> int | None:
        return next(iter(self.d), None)

    def __len__(self) -> int:
        return len(self.d)

    def __contains__(self, k: int) -> bool:
        return k in self.d


@PROFILE
@given(lru_ops)
def test_lru_implementations_match_reference(ops: list[tuple[str, int]]) -> None:
    want = _run_lru(_RefLRU(), ops)
    assert _run_lru(P.LRU(), ops) == want
    if C is not None:
        assert _run_lru(C.LRU(), ops) == want


# --------------------------------------------------------------------------------------------
# chunk codec 2: undo the delta and checksum the rows
# --------------------------------------------------------------------------------------------
word = st.one_of(st.integers(I64_MIN, I64_MAX), st.sampled_from([I64_MIN, I64_MAX, -1, 0, 1, 2**32 - 1, 2**32]))
delta_rows = st.integers(0, 40).flatmap(
    lambda n: st.lists(word, min_size=7 * n, max_size=7 * n).map(lambda w: np.array(w, dtype=np.int64).reshape(-1, 7))
)


def _undelta_ref(rows: np.ndarray) -> tuple[bytes, int]:
    """Python integers, straight from the definitions: column sums mod 2**64, then the sum of
    the 4-byte half-words weighted 2j + 3 mod 2**64."""
    run, out = [0] * 7, []
    for r in rows.tolist():
        run = [(a + b) % 2**64 for a, b in zip(run, r)]
        out.append(list(run))
    raw = np.array(out, dtype=np.uint64).reshape(-1, 7).tobytes()
    halves = np.frombuffer(raw, dtype="<u4").tolist()
    return raw, sum((2 * j + 3) * h for j, h in enumerate(halves)) % 2**64


@PROFILE
@given(delta_rows)
def test_undelta_rows_twin_matches_python_ints_and_row_checksum(rows: np.ndarray) -> None:
    from mds._checksum import row_checksum

    want_rows, want_sum = _undelta_ref(rows)
    got = rows.copy()
    s = P.undelta_rows(got)
    assert got.tobytes() == want_rows and s == want_sum
    assert s == (row_checksum(got, 0, len(got)) if len(got) else 0)


@needs_core
@PROFILE
@given(delta_rows)
def test_undelta_rows_compiled_equals_twin(rows: np.ndarray) -> None:
    p, c = rows.copy(), rows.copy()
    assert C.undelta_rows(c) == P.undelta_rows(p)
    assert c.tobytes() == p.tobytes()


@needs_core
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_undelta_rows_sums_an_ndarray_subclass_as_its_buffer_in_both() -> None:
    """The compiled kernel reads any int64 (n, 7) buffer; the twin used to sum an np.matrix in
    place and then raise (found by a hostile review): both now sum the buffer and agree."""
    words = np.arange(70, dtype=np.int64).reshape(10, 7) * 7919
    for make in (np.asmatrix, lambda a: np.ma.MaskedArray(a)):
        p, c = make(words.copy()), make(words.copy())
        assert P.undelta_rows(p) == C.undelta_rows(c)
        assert np.asarray(p).tobytes() == np.asarray(c).tobytes() == np.cumsum(words, axis=0).tobytes()


# --------------------------------------------------------------------------------------------
# the rows' checksum (every stored chunk and tail row carries one)
# --------------------------------------------------------------------------------------------
# bytes holding some rows at an offset, with a few bytes after them: (buf, offset, n)
checksum_case = st.tuples(st.integers(0, 9), st.integers(0, 40), st.integers(0, 9)).flatmap(
    lambda t: st.tuples(
        st.binary(min_size=t[0] + 56 * t[1] + t[2], max_size=t[0] + 56 * t[1] + t[2]), st.just(t[0]), st.just(t[1])
    )
)


def _checksum_ref(buf: bytes, offset: int, n: int) -> int:
    """Python integers, straight from the definition."""
    halves = np.frombuffer(buf[offset : offset + 56 * n], dtype="<u4").tolist()
    return sum((2 * j + 3) * h for j, h in enumerate(halves)) % 2**64


@PROFILE
@given(checksum_case)
def test_row_checksum_twin_matches_python_ints(case: tuple[bytes, int, int]) -> None:
    buf, offset, n = case
    want = _checksum_ref(buf, offset, n)
    assert P.row_checksum(buf, offset, n) == want
    assert P.row_checksum(memoryview(buf), offset, n) == want


@needs_core
@PROFILE
@given(checksum_case)
def test_row_checksum_compiled_equals_twin(case: tuple[bytes, int, int]) -> None:
    buf, offset, n = case
    assert C.row_checksum(buf, offset, n) == P.row_checksum(buf, offset, n)
    if offset == 0 and len(buf) == 56 * n:  # the same rows as a read-only CANDLE_DTYPE array
        arr = np.frombuffer(buf, dtype=CANDLE_DTYPE)
        assert C.row_checksum(arr, 0, n) == P.row_checksum(arr, 0, n) == _checksum_ref(buf, 0, n)


@needs_core
def test_row_checksum_compiled_wraps_as_the_twin_at_the_largest_words() -> None:
    ones = b"\xff" * (56 * 3000)  # every half-word 2**32 - 1: the sum wraps 2**64 many times
    assert C.row_checksum(ones, 0, 3000) == P.row_checksum(ones, 0, 3000) == _checksum_ref(ones, 0, 3000)


@pytest.mark.parametrize("impl", [P, C] if C is not None else [P], ids=lambda m: m.IMPLEMENTATION)
def test_row_checksum_refuses_what_the_buffer_does_not_hold(impl: Any) -> None:
    buf = bytes(range(56)) * 4
    assert impl.row_checksum(buf, 0, 4) == _checksum_ref(buf, 0, 4)
    assert impl.row_checksum(buf, len(buf), 0) == 0
    for offset, n in ((0, 5), (1, 4), (-1, 1), (0, -1), (len(buf) + 1, 0), (2**62, 1), (0, 2**60)):
        with pytest.raises(ValueError):
            impl.row_checksum(buf, offset, n)
    rows = np.zeros(4, dtype=CANDLE_DTYPE)
    with pytest.raises(ValueError, match="contiguous"):
        impl.row_checksum(rows[::2], 0, 2)
    with pytest.raises(TypeError):
        impl.row_checksum([1, 2, 3], 0, 0)


@pytest.mark.parametrize("impl", [P, C] if C is not None else [P], ids=lambda m: m.IMPLEMENTATION)
def test_undelta_rows_rejects_what_it_cannot_sum_in_place(impl: Any) -> None:
    good = np.arange(70, dtype=np.int64).reshape(10, 7)
    for bad in (good.astype(np.float64), good.reshape(-1), good.reshape(7, 10), good[:, :6].copy(), [[1] * 7]):
        with pytest.raises(TypeError):
            impl.undelta_rows(bad)
    ro = good.copy()
    ro.flags.writeable = False
    for bad in (good[::2], np.asfortranarray(good), ro):
        with pytest.raises(ValueError):
            impl.undelta_rows(bad)
    assert good.tobytes() == np.arange(70, dtype=np.int64).tobytes()  # nothing summed on refusal
