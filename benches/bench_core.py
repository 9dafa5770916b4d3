"""Kernel benchmarks: compiled core and numpy twin side by side, plus naive numpy baselines.

Targets (issue 3), on a 1,000,000-candle series:

- merge 1,000 rows, append case and 500-overlap case: <= 10 us (``merge_into`` on a buffer with
  spare room; the numpy twin is the "numpy with spare capacity" approach)
- gap scan of 1M candles: <= 1.2 ms (on the strided ``ts`` field and on a contiguous column)
- validate 1M rows: within 2x of the gap scan
- latest-1000 read from a SeriesBuffer: <= 1 us (a view; the baseline copies 56 KB)

    python setup.py build_ext --inplace
    python -m pytest benches/bench_core.py --benchmark-only --benchmark-columns=median,iqr,rounds \\
        --benchmark-group-by=func
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from mds._dtypes import CANDLE_DTYPE, CANDLE_RAW
from mds.testing import kernel_params
from mds.timeframes import TIMEFRAMES

IMPLS = kernel_params()

N = 1_000_000
B = 1_000
M = 60_000
T0 = 1_700_000_040_000 // M * M
TF = TIMEFRAMES["1m"].kernel_args


def _series(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.zeros(n, CANDLE_DTYPE)
    # 0.1% of the minutes have no trades: realistic gaps for the scan
    slots = np.arange(n + n // 1000)
    keep = np.sort(rng.choice(slots.shape[0], n, replace=False))
    a["ts"] = T0 + slots[keep] * M
    c = 100 * np.exp(0.001 * rng.standard_normal(n).cumsum())
    a["open"], a["close"] = c, c + 0.5
    a["high"], a["low"] = c + 1, c - 1
    a["volume"] = rng.random(n)
    a["value"] = a["volume"] * c
    return a


@pytest.fixture(scope="module")
def series() -> np.ndarray:
    return _series(N)


@pytest.fixture(scope="module")
def spare_buf(series: np.ndarray) -> np.ndarray:
    buf = np.zeros(N + 2 * B, CANDLE_DTYPE)
    buf[:N] = series
    return buf


def _append_batch(series: np.ndarray) -> np.ndarray:
    b = _series(B, seed=1)
    b["ts"] = series["ts"][-1] + (np.arange(B) + 1) * M
    return b


def _overlap_batch(series: np.ndarray) -> np.ndarray:
    b = _series(B, seed=2)
    half = B // 2
    b["ts"][:half] = series["ts"][-half:]
    b["ts"][half:] = series["ts"][-1] + (np.arange(B - half) + 1) * M
    return b


# -- merge -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", IMPLS)
def test_merge_1000_append_into_1m(benchmark, k: ModuleType, series: np.ndarray, spare_buf: np.ndarray) -> None:
    batch = _append_batch(series)
    res = benchmark(k.merge_into, spare_buf, N, batch)
    assert res == (N + B, B, 0, 0)


@pytest.mark.parametrize("k", IMPLS)
def test_merge_1000_overlap_500_into_1m(benchmark, k: ModuleType, series: np.ndarray, spare_buf: np.ndarray) -> None:
    batch = _overlap_batch(series)
    n_new, ins, upd, unch = benchmark(k.merge_into, spare_buf, N, batch)
    assert (n_new, ins, upd + unch) == (N + B // 2, B // 2, B // 2)
    spare_buf[:N] = series  # leave the shared buffer as it was


def _naive_merge(series: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """Concatenate, stable sort, keep the last duplicate: what a numpy user writes first."""
    both = np.concatenate((series, batch))
    order = np.argsort(both["ts"], kind="stable")
    ts = both["ts"][order]
    keep = np.append(ts[1:] != ts[:-1], True)
    return both[order[keep]]


def test_merge_1000_overlap_500_into_1m_naive_numpy(benchmark, series: np.ndarray) -> None:
    out = benchmark(_naive_merge, series, _overlap_batch(series))
    assert out.shape[0] == N + B // 2


# -- gaps --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", IMPLS)
def test_find_gaps_1m_strided_field(benchmark, k: ModuleType, series: np.ndarray) -> None:
    ts = series["ts"]
    gaps = benchmark(k.find_gaps, ts, *TF, int(ts[0]), int(ts[-1]) + M)
    assert gaps.shape[0] > 0


@pytest.mark.parametrize("k", IMPLS)
def test_find_gaps_1m_contiguous_column(benchmark, k: ModuleType, series: np.ndarray) -> None:
    ts = series["ts"].copy()
    gaps = benchmark(k.find_gaps, ts, *TF, int(ts[0]), int(ts[-1]) + M)
    assert gaps.shape[0] > 0


def _naive_gaps(ts: np.ndarray) -> np.ndarray:
    d = np.diff(ts)
    i = np.flatnonzero(d != M)
    return np.stack((ts[i] + M, ts[i + 1]), axis=1)


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_find_gaps_1m_naive_numpy_diff(benchmark, layout: str, series: np.ndarray) -> None:
    ts = series["ts"] if layout == "strided" else series["ts"].copy()
    gaps = benchmark(_naive_gaps, ts)
    assert gaps.shape[0] > 0


# -- validate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", IMPLS)
def test_validate_1m(benchmark, k: ModuleType, series: np.ndarray) -> None:
    idx, _ = benchmark(k.validate, series, *TF, None)
    assert idx.shape == (0,)


# -- series buffer -----------------------------------------------------------------------------
@pytest.mark.parametrize("k", IMPLS)
def test_series_buffer_latest_1000(benchmark, k: ModuleType, series: np.ndarray) -> None:
    buf = k.SeriesBuffer(1000)
    buf.write(series[-1000:])
    view = benchmark(buf.latest, 1000)
    assert view.shape == (1000,) and not view.flags.writeable


def test_series_buffer_latest_1000_copy_baseline(benchmark, series: np.ndarray) -> None:
    rows = series[-1000:].view(CANDLE_RAW)
    out = benchmark(rows.copy)
    assert out.shape == (1000,)


@pytest.mark.parametrize("k", IMPLS)
def test_series_buffer_append_one(benchmark, k: ModuleType, series: np.ndarray) -> None:
    buf = k.SeriesBuffer(1000)
    buf.write(series[-1000:])
    one = series[-1:].copy()
    state = {"ts": int(series["ts"][-1])}

    def step() -> tuple[int, int, int]:
        state["ts"] += M
        one["ts"] = state["ts"]
        return buf.write(one)

    assert benchmark(step) == (1, 0, 0)
    assert len(buf) == 1000


# -- LRU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", IMPLS)
def test_lru_touch_and_evict(benchmark, k: ModuleType) -> None:
    lru = k.LRU()
    for i in range(10_000):
        lru.touch(i)
    state = {"i": 10_000}

    def step() -> int:
        state["i"] += 1
        lru.touch(state["i"])
        return lru.pop_oldest()

    benchmark(step)
    assert len(lru) == 10_000
