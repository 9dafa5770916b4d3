"""The pytest plugin ``mds.testing.pytest_plugin`` (issue 19), run as a user's test suite would
run it: in a separate pytest session (``pytester``), loaded with ``-p``."""

from __future__ import annotations

import re
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]


def _installed() -> bool:
    """Whether the package's ``pytest11`` entry point is installed (then pytest loads the plugin
    itself, and ``-p`` would register the same module a second time, which pluggy refuses)."""
    return any(ep.value == "mds.testing.pytest_plugin" for ep in entry_points(group="pytest11"))


PLUGIN = ("-p", "no:cacheprovider") if _installed() else ("-p", "mds.testing.pytest_plugin", "-p", "no:cacheprovider")


def test_fixtures_give_a_running_fake_and_a_store_on_a_settable_clock(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import numpy as np
        import mds
        from mds.testing.pytest_plugin import ANCHOR_MS, MarketClock

        def test_store_reads_realistic_data(mds_store, fake_upbit, mds_clock):
            assert isinstance(mds_clock, MarketClock) and mds_clock() == ANCHOR_MS
            assert fake_upbit.clock is mds_clock
            got = mds_store.candles("KRW-BTC", "1m", count=500)
            assert len(got) == 500 and int(got["ts"][-1]) < ANCHOR_MS
            held = fake_upbit.candles("KRW-BTC", "1m")
            assert got.tobytes() == held[held["ts"] < ANCHOR_MS][-500:].tobytes()
            illiquid = mds_store.candles("KRW-MED", "1m", start=ANCHOR_MS - 86_400_000)
            assert 0 < len(illiquid) < 1440  # minutes without trades have no candle
            assert {g.kind for g in mds_store.gaps("KRW-MED", "1m")} == {"no_trades"}

        def test_moving_the_clock_reveals_the_next_candles(mds_store, mds_clock):
            before = mds_store.candles("KRW-ETH", "1m", count=1)
            mds_clock.advance(10 * 60_000)
            after = mds_store.candles("KRW-ETH", "1m", count=1)
            assert int(after["ts"][0]) > int(before["ts"][0])
            assert int(after["ts"][0]) < mds_clock()

        def test_the_clock_does_not_go_back(mds_clock):
            try:
                mds_clock.set(mds_clock() - 1)
            except mds.InvalidRequestError:
                return
            raise AssertionError("went back")
        """
    )
    res = pytester.runpytest_subprocess(*PLUGIN)
    res.assert_outcomes(passed=3)


def test_the_marker_chooses_the_data(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from mds.testing.pytest_plugin import ANCHOR_MS

        @pytest.mark.mds_data(markets={"KRW-DOGE": "liquid"}, days=1, seed=3, timeframes=("1m", "1h"))
        def test_marked(fake_upbit, mds_store):
            assert sorted(k for k in ("KRW-DOGE", "KRW-BTC") if len(fake_upbit.candles(k, "1m"))) == ["KRW-DOGE"]
            hours = mds_store.candles("KRW-DOGE", "1h", start=ANCHOR_MS - 86_400_000, end=ANCHOR_MS)
            assert len(hours) == 24

        @pytest.mark.mds_data(market="KRW-BTC")
        def test_a_misspelt_marker_is_an_error(fake_upbit):
            pass
        """
    )
    res = pytester.runpytest_subprocess(*PLUGIN)
    res.assert_outcomes(passed=1, errors=1)
    res.stdout.fnmatch_lines(["*mds_data takes markets=*"])


def test_the_same_seed_gives_the_same_data(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import hashlib

        def test_digest(fake_upbit):
            print("DIGEST", hashlib.sha256(fake_upbit.candles("KRW-MED", "1m").tobytes()).hexdigest())
        """
    )
    digests = []
    for _ in range(2):
        res = pytester.runpytest_subprocess(*PLUGIN, "-s")
        res.assert_outcomes(passed=1)
        digests += re.findall(r"DIGEST ([0-9a-f]{64})", res.stdout.str())
    assert len(digests) == 2 and digests[0] == digests[1]
