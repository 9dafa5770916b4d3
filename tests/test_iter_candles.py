"""``Store.iter_candles`` (issue 19): long history in chunks, without holding it all.

Each chunk is a range read like ``store.candles``: together they are exactly the range read at
once; a span the store lacks is fetched from Layer 1 when there is one, and without one it reads
as ``store.candles`` reads it. Memory is measured with tracemalloc (numpy's arrays are traced).
"""

from __future__ import annotations

import itertools
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import mds
from mds.layer1.router import UpbitRouter
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

MIN = 60_000
DAY = 86_400_000
T0 = to_ms("2024-01-01T00:00:00Z")


def test_chunks_are_the_range_read_at_once(tmp_path: Path) -> None:
    arr = generate_market("KRW-MED", "1m", T0, T0 + 3 * DAY, liquidity="illiquid", seed=1)
    with mds.open(tmp_path / "s", clock=lambda: T0 + 10 * DAY) as store:
        store.write_candles("KRW-MED", "1m", arr, complete=(T0, T0 + 3 * DAY))
        chunks = list(store.iter_candles("KRW-MED", "1m", start=T0 + 17 * MIN, end=T0 + 3 * DAY, chunk=500))
        whole = store.candles("KRW-MED", "1m", start=T0 + 17 * MIN, end=T0 + 3 * DAY)
        assert np.concatenate(chunks).tobytes() == whole.tobytes()
        assert all(0 < len(c) <= 500 and not c.flags.writeable for c in chunks)
        assert all(int(a["ts"][-1]) < int(b["ts"][0]) for a, b in itertools.pairwise(chunks))
        # end None: up to the last closed interval
        assert sum(len(c) for c in store.iter_candles("KRW-MED", "1m", start=T0, chunk=1000)) == len(arr)


def test_arguments_are_checked_at_the_call(tmp_path: Path) -> None:
    with mds.open(tmp_path / "s") as store:
        for bad in (0, -1, 1.5, True, 10_000_001):
            with pytest.raises(mds.InvalidRequestError, match="chunk"):
                store.iter_candles("KRW-BTC", "1m", start=T0, chunk=bad)  # type: ignore[arg-type]
        with pytest.raises(mds.InvalidRequestError):
            store.iter_candles("KRW-BTC", "1m", start=None)
        with pytest.raises(mds.InvalidRequestError):
            store.iter_candles("KRW-BTC", "1m", start=T0 + DAY, end=T0)
        with pytest.raises(mds.InvalidRequestError):
            store.iter_candles("btc", "1m", start=T0)


def test_long_history_is_not_held_whole(tmp_path: Path) -> None:
    n = 300_000  # 16.8 MB of candles
    arr = generate_market("KRW-BTC", "1m", T0, T0 + n * MIN, liquidity=1.0, seed=2)
    with mds.open(tmp_path / "s", clock=lambda: T0 + (n + 10) * MIN) as store:
        store.write_candles("KRW-BTC", "1m", arr, complete=(T0, T0 + n * MIN))
        del arr
        tracemalloc.start()
        try:
            total = 0
            for c in store.iter_candles("KRW-BTC", "1m", start=T0, chunk=10_000):
                total += len(c)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert total == n
    assert peak < 16_800_000 / 4, peak  # a few chunks (560 KB each) at a time, not the history


def test_a_missing_span_is_fetched_from_layer1_as_candles_does(tmp_path: Path) -> None:
    now = T0 + 2 * DAY
    data = {("KRW-BTC", "1m"): generate_market("KRW-BTC", "1m", T0, now, seed=3)}
    with FakeUpbit(data, clock=lambda: now, rate_limit=None) as fake:
        router = UpbitRouter(fake.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=lambda: now)
        with mds.open(tmp_path / "s", layer1=router, clock=lambda: now) as store:
            half = data[("KRW-BTC", "1m")][:1000]
            store.write_candles("KRW-BTC", "1m", half, complete=(T0, int(half["ts"][-1]) + MIN))
            got = np.concatenate(list(store.iter_candles("KRW-BTC", "1m", start=T0, end=T0 + DAY, chunk=300)))
        want = data[("KRW-BTC", "1m")]
        assert got.tobytes() == want[want["ts"] < T0 + DAY].tobytes()
        assert fake.request_count("/v1/candles") > 0


def test_without_layer1_a_missing_span_reads_as_candles_reads_it(tmp_path: Path) -> None:
    arr = generate_market("KRW-BTC", "1m", T0, T0 + DAY, seed=4)
    with mds.open(tmp_path / "s", clock=lambda: T0 + 2 * DAY) as store:
        store.write_candles("KRW-BTC", "1m", arr[:300])
        store.write_candles("KRW-BTC", "1m", arr[900:])
        got = list(store.iter_candles("KRW-BTC", "1m", start=T0, end=T0 + DAY, chunk=200))
        assert np.concatenate(got).tobytes() == store.candles("KRW-BTC", "1m", start=T0, end=T0 + DAY).tobytes()
        assert [g.kind for g in store.gaps("KRW-BTC", "1m", start=T0, end=T0 + DAY)][:1] == ["missing"]
