"""``Store.series()`` and ``mds list`` (issue 19): what is stored, with the covered share.

On SQLite (the PostgreSQL twin is tests/postgres/test_research_pg.py), on a memory-only store
and on a memory + LMDB store without a durable tier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mds
from mds import SeriesInfo
from mds.cli import main
from mds.testing import generate_market
from mds.timeutil import to_ms

MIN = 60_000
T0 = to_ms("2025-03-03T00:00:00Z")
NOW = T0 + 2 * 86_400_000


def _clock() -> int:
    return NOW


def _fill(store: mds.Store) -> np.ndarray:
    """KRW-BTC 1m: 600 minutes; the first 400 covered (no-trade holes there), the rest not."""
    arr = generate_market("KRW-BTC", "1m", T0, T0 + 600 * MIN, liquidity=0.9, seed=5)
    store.write_candles("KRW-BTC", "1m", arr[arr["ts"] < T0 + 400 * MIN], complete=(T0, T0 + 400 * MIN))
    store.write_candles("KRW-BTC", "1m", arr[arr["ts"] >= T0 + 400 * MIN])
    return arr


def _expected(arr: np.ndarray) -> SeriesInfo:
    first, last = int(arr["ts"][0]), int(arr["ts"][-1])
    span = (last - first) // MIN + 1
    covered = (T0 + 400 * MIN - first) // MIN
    return SeriesInfo("KRW-BTC", "1m", first, last, len(arr), covered / span)


def test_series_lists_span_count_and_covered_share(tmp_path: Path) -> None:
    with mds.open(tmp_path / "s", clock=_clock) as store:
        assert store.series() == []
        arr = _fill(store)
        day = generate_market("KRW-ETH", "1d", T0 - 30 * 86_400_000, T0, seed=6)
        store.write_candles("KRW-ETH", "1d", day, complete=(T0 - 30 * 86_400_000, T0))
        # coverage alone: a span asked for where nothing traded
        store.write_candles("KRW-MED", "1m", np.zeros(0, dtype=mds.CANDLE_DTYPE), complete=(T0, T0 + 60 * MIN))
        got = store.series()
        assert got[0] == _expected(arr)
        assert 0.6 < got[0].covered < 0.7  # 400 of ~600 minutes
        assert got[1] == SeriesInfo("KRW-ETH", "1d", int(day["ts"][0]), int(day["ts"][-1]), len(day), 1.0)
        assert got[2] == SeriesInfo("KRW-MED", "1m", None, None, 0, None)
        assert len(got) == 3
        # deleting a series removes it from the list
        store.delete("KRW-MED", "1m")
        store.delete("KRW-ETH", "1d")
        assert [(i.symbol, i.timeframe) for i in store.series()] == [("KRW-BTC", "1m")]


def test_series_is_frozen_and_exported() -> None:
    info = SeriesInfo("KRW-BTC", "1m", 0, 60_000, 2, 1.0)
    with pytest.raises(AttributeError):
        info.count = 3  # type: ignore[misc]
    assert mds.SeriesInfo is SeriesInfo


@pytest.mark.parametrize("tiers", [("memory",), ("memory", "disk")])
def test_a_store_without_a_durable_tier_lists_what_its_fast_tiers_hold(tmp_path: Path, tiers: tuple[str, ...]) -> None:
    cfg = mds.Config(tiers=tiers, memory_candles=5000)
    with mds.open(tmp_path / "s", config=cfg, clock=_clock) as store:
        arr = _fill(store)
        got = store.series()
        assert got == [_expected(arr)]


def test_a_closed_store_refuses(tmp_path: Path) -> None:
    store = mds.open(tmp_path / "s", clock=_clock)
    store.close()
    with pytest.raises(mds.StorageUnavailableError):
        store.series()


def test_mds_list_shows_the_covered_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with mds.open(tmp_path / "s", clock=_clock) as store:
        arr = _fill(store)
        share = store.series()[0].covered
    assert main(["list", "--path", str(tmp_path / "s")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["symbol", "timeframe", "first", "last", "candles", "covered"]
    row = lines[2].split()
    assert row[:2] == ["KRW-BTC", "1m"] and row[4] == str(len(arr))
    assert row[5] == f"{100 * share:.1f}%"
    assert lines[-1] == f"1 series, {len(arr)} candles"


@pytest.mark.parametrize(("share", "shown"), [(1.0, "100.0%"), (0.99999, "99.9%"), (1e-6, "0.1%"), (0.0, "0.0%")])
def test_the_share_says_100_or_0_only_when_exact(share: float, shown: str) -> None:
    from mds.cli import _fmt_share

    assert _fmt_share(share) == shown
