"""Gate (issue 18): a repeated answer from Layer 1's cache costs about a memory hit.

Both stores run over one FakeUpbit on 127.0.0.1 through a real UpbitRouter. The subject is a
``lookup="layer1_first"`` store whose Layer 1 cache holds the latest 200 candles (another user of
the router asked for them): ``store.candles(count=100)`` answers ``layer1_cache``. The baseline is
a ``lookup="storage_first"`` store answering the same read from its memory tier. Before the
conversion was kept with the cache entry, the subject cost about 100x the baseline here (255 us
against 2.5 us: every repeat parsed 200 candle dicts again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _gate import gate, ratio_gate

import mds
from mds import Config, StorageRequest
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, MarketClock, dense_candles

pytestmark = gate

SYM = "KRW-BTC"
M = 60_000
T0 = 1_736_121_600_000  # 2025-01-06 00:00 UTC


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[mds.Store, mds.Store, np.ndarray]]:
    a = dense_candles(2_000, T0)
    clock = MarketClock(int(a["ts"][-1]) + M + 5)  # the last candle closed 5 ms ago
    root: Path = tmp_path_factory.mktemp("l1cache")
    with FakeUpbit({(SYM, "1m"): a}, clock=clock, rate_limit=None) as fake:
        r = UpbitRouter(fake.base_url, rate_limit=1000, clock=clock)
        first = mds.open(root / "first", layer1=r, clock=clock)
        first._fetcher.run(r.get_candle_data([SYM], "1m", count=200))  # another user filled the cache
        mem = mds.open(
            root / "mem",
            layer1=UpbitRouter(fake.base_url, rate_limit=1000, clock=clock),
            config=Config(lookup="storage_first"),
            clock=clock,
        )
        mem.candles(SYM, "1m", count=100)  # fetched once; the memory tier holds it now
        fake.reset_log()
        yield first, mem, a
        assert fake.request_count() == 0  # neither store asked Upbit during the gates
        first.close()
        mem.close()


def test_gate_layer1_cache_vs_memory_hit(benchmark: Any, stores: tuple[mds.Store, mds.Store, np.ndarray]) -> None:
    first, mem, a = stores
    want = a[-100:].tobytes()
    assert first.candles(SYM, "1m", count=100).tobytes() == want == mem.candles(SYM, "1m", count=100).tobytes()
    before = first.stats()["hits"]["layer1_cache"], mem.stats()["hits"]["storage_memory"]
    ratio_gate(
        benchmark,
        lambda: first.candles(SYM, "1m", count=100),
        lambda: mem.candles(SYM, "1m", count=100),
        limit=3.0,
        number=200,
        what="layer1_cache repeat vs memory hit, latest 100",
    )
    after = first.stats()["hits"], mem.stats()["hits"]
    assert after[0]["layer1_cache"] > before[0] and after[0]["layer1_api"] == 0
    assert after[1]["storage_memory"] > before[1]


def test_async_get_layer1_cache_repeat(benchmark: Any, stores: tuple[mds.Store, mds.Store, np.ndarray]) -> None:
    """The seed API's figure beside the gate: ``await store.get(...)`` answered by Layer 1's cache
    (the async path converts through the connector's kept answer; reported, not gated)."""
    first, _, a = stores
    req = StorageRequest("candle", [SYM], timeframe="1m", count=100)
    loop = asyncio.new_event_loop()
    try:
        resp = loop.run_until_complete(first.get(req))
        assert resp.success and resp.metadata.source == "layer1_cache"
        assert resp.arrays[SYM].tobytes() == a[-100:].tobytes()
        benchmark(lambda: loop.run_until_complete(first.get(req)))
    finally:
        loop.close()
